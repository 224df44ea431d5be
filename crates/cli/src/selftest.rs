//! `distoptim selftest`: the collective layer's conformance suite on a real backend,
//! the way CI checks the MPI engine (`mpirun -np 4 distoptim selftest --backend mpi`).
//! Runs the suite on the whole group, on an odd/even split and, for sizes divisible by
//! two, on both dimensions of a 2-D mesh.

use anyhow::{anyhow, bail, Result};
use clap::Args;
use distoptim_collective::{conformance, Backend, CommConfig, Communicator, DeviceMesh};

#[derive(Args)]
pub struct SelftestArgs {
    /// Ranks (processes for shm, threads for threads; mpirun decides for mpi).
    #[arg(long, default_value_t = 4)]
    nproc: usize,
    /// shm, threads or mpi.
    #[arg(long, default_value = "shm")]
    backend: String,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    match args.backend.as_str() {
        "threads" => Communicator::run_threads(args.nproc, &CommConfig::default(), |comm| suite(&comm))?.into_iter().collect(),
        "shm" if std::env::var_os("RANK").is_none() => crate::launch::launch_self(args.nproc),
        "shm" | "mpi" => suite(&Communicator::from_env()?),
        other => bail!("--backend must be shm, threads or mpi, not {other:?}"),
    }
}

fn suite(world: &Communicator) -> Result<()> {
    // MPI chooses its own summation order: float sums are compared within tolerance.
    let exact = world.backend() != Backend::Mpi;
    let (me, n) = (world.rank(), world.size());
    let on = |what: &str, comm: &Communicator| conformance::run_suite(comm, exact).map_err(|e| anyhow!("{what}: {e}"));
    let mut checks = on("world", world)?;
    let half = world.split(Some((me % 2) as u32), me as i64)?.ok_or_else(|| anyhow!("split gave no group"))?;
    checks += on("odd/even split", &half)?;
    if n % 2 == 0 {
        let mesh = DeviceMesh::new(world.clone(), &[("dp", n / 2), ("tp", 2)])?;
        checks += on("mesh dp", &mesh.group("dp")?)?;
        checks += on("mesh tp", &mesh.group("tp")?)?;
    }
    world.barrier()?;
    println!("rank {me} of {n} ({}): {checks} collective results match the sequential reference", world.backend().name());
    Ok(())
}
