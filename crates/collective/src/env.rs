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
    let job = match std::env::var("DISTOPTIM_JOB_ID").or_else(|_| std::env::var("TORCHELASTIC_RUN_ID")) {
        Ok(job) => job,
        Err(_) => format!("{}-{}", var("MASTER_ADDR")?, var("MASTER_PORT")?),
    };
    let token = std::env::var("DISTOPTIM_TOKEN").unwrap_or_default();
    Communicator::shm(&job, &token, rank, size, config)
}

#[cfg(feature = "mpi")]
fn mpi_from_env(config: &CommConfig) -> Result<Communicator> {
    crate::mpi::world(config)
}

#[cfg(not(feature = "mpi"))]
fn mpi_from_env(_config: &CommConfig) -> Result<Communicator> {
    Err(CommError::Env("started by an MPI launcher, but this build has no `mpi` feature (cargo build --features mpi)".into()))
}

#[cfg(feature = "nccl")]
fn nccl_from_env(config: &CommConfig) -> Result<Communicator> {
    crate::nccl::from_env(config)
}

#[cfg(not(feature = "nccl"))]
fn nccl_from_env(_config: &CommConfig) -> Result<Communicator> {
    Err(CommError::Env("DISTOPTIM_BACKEND=nccl, but this build has no `nccl` feature (cargo build --features nccl)".into()))
}
