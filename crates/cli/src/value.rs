//! The command line's value parsers: the one parser for sizes (`4096`, `1k`, `4K`, `16M`,
//! `1.3B`), and the library's named types restricted to what a command accepts (clap
//! lists the choices and refuses others before any rank starts).
//!
//! Suffixes are case-insensitive. Byte sizes are binary (`4K` = 4096 bytes, as
//! nccl-tests and `dd` read them); counts of parameters or elements are decimal (`25M` =
//! 25,000,000, as model sizes are quoted), with `B` or `G` for billions.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use distoptim::{FloatDtype, Strategy};

/// The synchronous strategies (ddp, zero1, zero2, zero3): what `bench step` and
/// `estimate` measure.
pub fn synchronous() -> impl TypedValueParser<Value = Strategy> {
    let names: Vec<&'static str> = Strategy::ALL.iter().filter(|s| s.is_synchronous()).map(|s| s.name()).collect();
    PossibleValuesParser::new(names).try_map(|s| s.parse::<Strategy>())
}

/// The types gradients may be reduced in (f32, bf16; f16 would need a loss scale per
/// group).
pub fn reduce_dtype() -> impl TypedValueParser<Value = FloatDtype> {
    PossibleValuesParser::new([FloatDtype::F32.name(), FloatDtype::Bf16.name()]).try_map(|s| s.parse::<FloatDtype>())
}

/// Where `selftest` and `bench collectives` run: `auto` joins the job the environment
/// describes (mpirun, `distoptim launch`, torchrun) and otherwise starts its own shm job,
/// as `train` does; an explicit backend that contradicts the environment is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// From the environment (default).
    Auto,
    /// Processes on this host through /dev/shm (launched here when outside a job).
    Shm,
    /// Threads of this process.
    Threads,
    /// The MPI job this process was started in (needs the `mpi` feature).
    Mpi,
}

impl BackendChoice {
    /// Runs `body` on every rank of the chosen job: `nproc` threads, a launch of this
    /// command on `nproc` shm processes, or this process's part of the job it is in.
    pub fn run(self, nproc: usize, body: impl Fn(&distoptim_collective::Communicator) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
        use distoptim_collective::{backend_from_env, Backend, CommConfig, Communicator};
        let env = backend_from_env()?;
        match (self, env) {
            (BackendChoice::Threads, _) => Communicator::run_threads(nproc, &CommConfig::default(), |c| body(&c))?.into_iter().collect(),
            (BackendChoice::Shm, Some(Backend::Mpi)) => anyhow::bail!(
                "--backend shm, but this process was started by an MPI launcher: each rank would run its own shm job; use --backend mpi (or leave --backend out)"
            ),
            (BackendChoice::Mpi, Some(Backend::Shm)) => {
                anyhow::bail!("--backend mpi, but this process was started by distoptim launch or torchrun (RANK is set): use --backend shm or auto")
            }
            (BackendChoice::Mpi, None) => anyhow::bail!("--backend mpi outside an MPI job: start it under mpirun"),
            (BackendChoice::Auto | BackendChoice::Shm, None) => crate::launch::launch_self(nproc, None),
            (_, Some(_)) => body(&Communicator::from_env()?),
        }
    }
}

/// The largest size accepted: 2^48, far above any buffer this machine can hold, so that
/// no later multiplication overflows.
const MAX: f64 = (1u64 << 48) as f64;

/// A byte size: `4096`, `4K`, `64M`, `1G`, `4KB`, `1.5M`.
pub fn bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.strip_suffix('B').unwrap_or(&t);
    parse(s, t, &[('K', 1024.0), ('M', 1048576.0), ('G', 1073741824.0)], "a byte size like 4096, 4K, 64M or 1G")
}

/// A count of parameters or elements: `4096`, `10k`, `25M`, `1.3B`.
pub fn count(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_uppercase();
    parse(s, &t, &[('K', 1e3), ('M', 1e6), ('B', 1e9), ('G', 1e9)], "a count like 4096, 10k, 25M or 1.3B")
}

/// A matrix shape `ROWSxCOLS` (`1024x4096`), each side at least 1, at most 2^24.
pub fn matrix(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{s:?} is not a matrix shape like 1024x4096");
    let (r, c) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let side = |v: &str| v.trim().parse::<usize>().ok().filter(|&n| (1..=1 << 24).contains(&n)).ok_or_else(bad);
    Ok((side(r)?, side(c)?))
}

/// `t` (upper case, trimmed) as a number times its suffix's scale: at least 1, at most
/// [`MAX`], and whole.
fn parse(original: &str, t: &str, suffixes: &[(char, f64)], what: &str) -> Result<usize, String> {
    let (digits, scale) = match t.chars().last().and_then(|c| suffixes.iter().find(|(s, _)| *s == c)) {
        Some(&(_, scale)) => (&t[..t.len() - 1], scale),
        None => (t, 1.0),
    };
    match digits.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v * scale >= 1.0 && v * scale <= MAX && (v * scale).fract() == 0.0 => Ok((v * scale) as usize),
        _ => Err(format!("{original:?} is not {what} (at least 1, at most 2^48)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes("4K"), Ok(4096));
        assert_eq!(bytes("4k"), Ok(4096));
        assert_eq!(bytes("64MB"), Ok(64 << 20));
        assert_eq!(bytes("1.5M"), Ok(3 << 19));
        assert_eq!(count("1k"), Ok(1000));
        assert_eq!(count("25M"), Ok(25_000_000));
        assert_eq!(count("1.3b"), Ok(1_300_000_000));
        assert_eq!(count("4096"), Ok(4096));
        for bad in ["0", "-1", "1e30", "x", "", "0.5", "1.00001K"] {
            assert!(count(bad).is_err() && bytes(bad).is_err(), "{bad}");
        }
    }
}
