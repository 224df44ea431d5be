//! `distoptim selftest`: the collective layer's conformance suite on a real backend,
//! the way CI checks the MPI engine (`mpirun -np 4 distoptim selftest`: the backend
//! comes from the environment, as for `train`).
//! Runs the suite on the whole group, on an odd/even split and, for sizes divisible by
//! two, on both dimensions of a 2-D mesh.

use anyhow::{anyhow, Result};

use crate::value::BackendChoice;
use clap::Args;
use distoptim_collective::{conformance, Backend, Communicator, DeviceMesh};

#[derive(Args)]
pub struct SelftestArgs {
    /// Ranks (processes for shm, threads for threads; mpirun decides for mpi).
    #[arg(long, default_value_t = 4)]
    nproc: usize,
    /// Where to run: from the environment (mpirun, `distoptim launch`; otherwise a shm job
    /// started here), or shm, threads, mpi.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    args.backend.run(args.nproc, suite)
}

/// Rank 0 all-reduces one element more than the others, on a group split off for the
/// purpose (a mismatch leaves its group unusable): every rank must get the mismatch
/// error, naming both calls, instead of a hang or mixed buffers.
fn mismatch_is_caught(world: &Communicator) -> Result<()> {
    let me = world.rank();
    let probe = world.split(Some(0), me as i64)?.ok_or_else(|| anyhow!("split gave no group"))?;
    let mut buf = vec![1f32; if me == 0 { 7 } else { 6 }];
    match probe.all_reduce(&mut buf, distoptim_collective::ReduceOp::Sum) {
        Err(e) if e.to_string().contains("collective mismatch") && e.to_string().contains("all_reduce(f32, 7") => Ok(()),
        other => Err(anyhow!("rank {me}: a mismatched all_reduce (7 elements on rank 0, 6 elsewhere) was not caught: {other:?}")),
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
    if n > 1 {
        mismatch_is_caught(world)?;
    }
    world.barrier()?;
    println!("rank {me} of {n} ({}): {checks} collective results match the sequential reference", world.topology());
    Ok(())
}
