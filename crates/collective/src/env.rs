//! Joining a group from the environment a launcher sets up.
//!
//! - `distoptim launch` and torchrun set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `distoptim launch` adds
//!   `DISTOPTIM_JOB_ID` and `DISTOPTIM_TOKEN`, which make the segment private to the job.
//! - `mpirun` / `srun` set their own variables (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`,
//!   `PMIX_RANK`); the MPI library reads them itself.
//!
//! `DISTOPTIM_BACKEND` (`shm` or `mpi`) chooses when both could apply.

use crate::comm::{Backend, Communicator};
use crate::config::CommConfig;
use crate::error::{CommError, Result};

/// Variables that show the process was started by an MPI launcher.
const MPI_MARKERS: [&str; 4] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID"];

/// The backend the environment asks for, if any.
pub fn backend_from_env() -> Result<Option<Backend>> {
    match std::env::var("DISTOPTIM_BACKEND").ok().as_deref() {
        Some("shm") => return Ok(Some(Backend::Shm)),
        Some("mpi") => return Ok(Some(Backend::Mpi)),
        Some("nccl") => return Ok(Some(Backend::Nccl)),
        Some(other) => return Err(CommError::Env(format!("DISTOPTIM_BACKEND={other:?} is not one of shm, mpi, nccl"))),
        None => {}
    }
    if std::env::var_os("RANK").is_some() {
        Ok(Some(Backend::Shm))
    } else if MPI_MARKERS.iter().any(|v| std::env::var_os(v).is_some()) {
        Ok(Some(Backend::Mpi))
    } else {
        Ok(None)
    }
}

impl Communicator {
    /// Joins the job this process was started in (see the module docs), with
    /// [`CommConfig::from_env`].
    pub fn from_env() -> Result<Communicator> {
        let config = CommConfig::from_env()?;
        match backend_from_env()? {
            Some(Backend::Shm) => shm_from_env(&config),
            Some(Backend::Mpi) => mpi_from_env(&config),
            Some(Backend::Nccl) => nccl_from_env(&config),
            Some(Backend::Threads) | None => Err(CommError::Env(
                "no launcher environment: set RANK and WORLD_SIZE (as `distoptim launch` and torchrun do) or start under mpirun/srun"
                    .into(),
            )),
        }
    }
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| CommError::Env(format!("{name} is not set (needed by the shm backend; `distoptim launch` sets it)")))
}

fn number(name: &str) -> Result<usize> {
    let v = var(name)?;
    v.trim().parse().map_err(|_| CommError::Env(format!("{name}={v:?} is not a non-negative integer")))
}

pub(crate) fn shm_from_env(config: &CommConfig) -> Result<Communicator> {
    let (rank, size) = (number("RANK")?, number("WORLD_SIZE")?);
    if size == 0 || rank >= size {
        return Err(CommError::Env(format!("RANK={rank} must be below WORLD_SIZE={size}")));
    }
    if let Ok(local) = std::env::var("LOCAL_WORLD_SIZE") {
        if local.trim() != size.to_string() {
            return Err(CommError::Env(format!(
                "LOCAL_WORLD_SIZE={local} differs from WORLD_SIZE={size}: the shm backend runs on one host; use mpi across hosts"
            )));
        }
    }
    if let Ok(addr) = std::env::var("MASTER_ADDR") {
        check_local_address(&addr)?;
    }
    let job = match std::env::var("DISTOPTIM_JOB_ID").or_else(|_| std::env::var("TORCHELASTIC_RUN_ID")) {
        Ok(job) => job,
        Err(_) => format!("{}-{}", var("MASTER_ADDR")?, var("MASTER_PORT")?),
    };
    let token = std::env::var("DISTOPTIM_TOKEN").unwrap_or_default();
    Communicator::shm(&job, &token, rank, size, config)
}

/// Refuses a `MASTER_ADDR` that is not this host: the shm backend meets its peers in this
/// host's /dev/shm, so ranks started on another host would wait for the timeout instead.
fn check_local_address(addr: &str) -> Result<()> {
    let wrong = |why: &str| {
        Err(CommError::Env(format!(
            "MASTER_ADDR={addr:?} {why}: the shm backend joins ranks of one host through /dev/shm; across hosts start the job with mpirun (the mpi backend)"
        )))
    };
    let ips: Vec<std::net::IpAddr> = match addr.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) if addr == "localhost" || Some(addr) == hostname().as_deref() => return Ok(()),
        Err(_) => match std::net::ToSocketAddrs::to_socket_addrs(&(addr, 0)) {
            Ok(found) => found.map(|a| a.ip()).collect(),
            Err(_) => return wrong("does not resolve"),
        },
    };
    let local = local_addresses();
    if ips.iter().any(|ip| ip.is_loopback() || ip.is_unspecified() || local.contains(ip)) {
        Ok(())
    } else {
        wrong("is not an address of this host")
    }
}

/// This host's name, as `gethostname` gives it.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0)?;
    (rc == 0).then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The IP addresses of this host's interfaces.
fn local_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points at a sockaddr whose family says its type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are `sockaddr_in`.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(std::net::IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are `sockaddr_in6`.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(std::net::IpAddr::from(a.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(feature = "mpi")]
fn mpi_from_env(config: &CommConfig) -> Result<Communicator> {
    crate::mpi::world(config)
}

#[cfg(not(feature = "mpi"))]
fn mpi_from_env(_config: &CommConfig) -> Result<Communicator> {
    Err(CommError::Env("started by an MPI launcher, but this program was built without MPI: enable the `mpi` feature of the distoptim crate (distoptim = { ..., features = [\"mpi\"] }), or build the CLI with `cargo build --release --features mpi`".into()))
}

#[cfg(feature = "nccl")]
fn nccl_from_env(config: &CommConfig) -> Result<Communicator> {
    crate::nccl::from_env(config)
}

#[cfg(not(feature = "nccl"))]
fn nccl_from_env(_config: &CommConfig) -> Result<Communicator> {
    Err(CommError::Env("DISTOPTIM_BACKEND=nccl, but this program was built without NCCL: enable the `nccl` feature of the distoptim crate, or build the CLI with `cargo build --release --features nccl`".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addr_must_be_this_host() {
        for local in ["127.0.0.1", "localhost", "::1", "0.0.0.0"] {
            assert!(check_local_address(local).is_ok(), "{local}");
        }
        if let Some(name) = hostname() {
            assert!(check_local_address(&name).is_ok(), "{name}");
        }
        assert!(local_addresses().iter().any(|ip| ip.is_loopback()));
        // TEST-NET-1 (RFC 5737) is never assigned to a host.
        let err = check_local_address("192.0.2.1").unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR=\"192.0.2.1\" is not an address of this host") && err.contains("mpirun"), "{err}");
    }
}
