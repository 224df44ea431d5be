//! `distoptim bench`: figures users compare, each next to a reference from the same run.

mod candle;
mod collectives;
mod optim;
mod overlap;
mod ps;
mod step;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// SGD-momentum and AdamW steps on flat buffers, next to a memory copy of the same bytes.
    Optim(optim::OptimArgs),
    /// Collectives in the style of nccl-tests (time, algbw, busbw), next to memcpy.
    Collectives(collectives::CollectivesArgs),
    /// The distributed optimizer step per strategy, next to its parts measured alone.
    Step(step::StepArgs),
    /// Copies between candle's Vars/GradStore and the flat buffers, next to memcpy.
    Candle(candle::CandleArgs),
    /// DDP buckets reduced during a (simulated) layer-by-layer backward, next to the
    /// backward followed by the reduction.
    Overlap(overlap::OverlapArgs),
    /// The parameter server on loopback: send and step latency, gradient throughput for
    /// 1–4 concurrent clients, next to a plain TCP stream and memcpy.
    Ps(ps::PsArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Optim(args) => optim::run(args),
        BenchCommand::Collectives(args) => collectives::run(args),
        BenchCommand::Step(args) => step::run(args),
        BenchCommand::Candle(args) => candle::run(args),
        BenchCommand::Overlap(args) => overlap::run(args),
        BenchCommand::Ps(args) => ps::run(args),
    }
}

/// The median of measurements (the upper one for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over iterations (after two warm-ups) of the slowest rank's time for `f`,
/// each iteration started from a barrier.
pub(super) fn timed_ranks(comm: &distoptim_collective::Communicator, iters: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    timed_ranks_after(comm, iters, || Ok(()), f)
}

/// [`timed_ranks`] with `setup` run before each iteration, outside the timed region
/// (refilling the gradients, say).
pub(super) fn timed_ranks_after(
    comm: &distoptim_collective::Communicator,
    iters: usize,
    mut setup: impl FnMut() -> Result<()>,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        setup()?;
        comm.barrier()?;
        let t0 = std::time::Instant::now();
        f()?;
        if i >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    comm.all_reduce(&mut times, distoptim_collective::ReduceOp::Max)?;
    Ok(median(times))
}
