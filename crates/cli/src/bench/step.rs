//! `bench step`: the whole distributed optimizer step (reduce, clip, AdamW, gather) per
//! strategy, next to its parts measured alone in the same run on the same buffers:
//! the collectives the strategy needs and the AdamW update of the elements the rank
//! owns. "overhead" is what the step costs beyond the sum of its parts. Gradients are
//! refilled before every timed step, outside the timed region; every figure is a median.
//!
//! "MB moved" is this rank's memory traffic per step as the code makes it (a model, not
//! a hardware counter): the collective's reads and writes of the gradient and parameter
//! buffers (AVG divides as it writes), the clip's norm (measured on the blocks the
//! collective has just written, so no traffic of its own, except on one rank, where
//! there is no collective and it reads the gradients once), and AdamW's 7 accesses per
//! owned element (g, p, m, v read; p, m, v written). "minimum" is the same without the
//! norm: what the kernels must move.
//!
//! Like `bench collectives`, it launches itself on `--nproc` processes (shm backend);
//! each process uses one optimizer thread so ranks do not fight over cores.

use anyhow::{bail, Context, Result};
use clap::Args;
use distoptim::{ClipConfig, DistributedOptimizer, StepConfig, Strategy};
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::clip::NormType;
use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, ParamGroup};

use super::{timed_ranks as timed, timed_ranks_after};

#[derive(Args)]
pub struct StepArgs {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Parameters in the flat buffer.
    #[arg(long, default_value_t = 25_000_000)]
    params: usize,
    /// Strategies to run.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = ["ddp".to_string(), "zero1".into(), "zero2".into(), "zero3".into()], value_parser = ["ddp", "zero1", "zero2", "zero3"])]
    strategies: Vec<String>,
    /// Timed steps per strategy (median reported), after two warm-up steps.
    #[arg(long, default_value_t = 11)]
    iters: usize,
    /// Optimizer threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

pub fn run(args: StepArgs) -> Result<()> {
    if distoptim_collective::backend_from_env()?.is_none() {
        return crate::launch::launch_self(args.nproc);
    }
    let comm = Communicator::from_env()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads.max(1)).build().context("building the optimizer pool")?;
    pool.install(|| body(&comm, &args))
}

fn strategy(name: &str) -> Result<Strategy> {
    let s: Strategy = name.parse()?;
    if !s.is_synchronous() {
        bail!("bench step measures the synchronous strategies (ddp, zero1, zero2, zero3), not {s}");
    }
    Ok(s)
}

fn body(comm: &Communicator, args: &StepArgs) -> Result<()> {
    let n = args.params;
    let layout = Layout::new([("flat", vec![n])])?;
    let adamw = OptimizerConfig::Adam(AdamConfig { lr: 1e-3, ..AdamConfig::adamw() });
    let groups = vec![ParamGroup { params: vec![0], config: adamw }];
    let clip = Some(ClipConfig { max_norm: 1.0, norm: NormType::P(2.0), error_if_nonfinite: false });
    let out = comm.rank() == 0;
    if out {
        println!(
            "# distoptim bench step: {} ranks (shm), {n} f32 params, AdamW + clip (L2, 1.0), {} optimizer thread(s) per rank, median of {}",
            comm.size(),
            args.threads.max(1),
            args.iters
        );
        println!("# parts: the strategy's collectives alone + AdamW over the owned elements alone, same run, same buffers; norm (own): a separate read of the owned gradients, for reference (the step measures the norm inside the collective)");
        println!(
            "{:<7} {:>10} {:>12} {:>12} {:>10} {:>9} {:>11} {:>16} {:>10} {:>10}",
            "step",
            "ms/step",
            "collectives",
            "adamw (own)",
            "parts sum",
            "overhead",
            "norm (own)",
            "state MB / rank",
            "MB moved",
            "minimum"
        );
    }
    for name in &args.strategies {
        let s = strategy(name)?;
        let config = StepConfig { clip, ..StepConfig::new(s) };
        let mut opt = DistributedOptimizer::new(comm.clone(), layout.clone(), groups.clone(), None, config)?;
        let mut grads = opt.alloc_grads()?;
        let mut params = comm.alloc::<f32>(n)?;
        params.iter_mut().enumerate().for_each(|(i, p)| *p = (i % 97) as f32 * 1e-3);
        let fill = |g: &mut [f32]| g.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 89) as f32 - 44.0) * 1e-4);
        let shared = std::cell::RefCell::new(&mut grads);
        let step = timed_ranks_after(
            comm,
            args.iters,
            || {
                fill(&mut shared.borrow_mut());
                Ok(())
            },
            || {
                opt.step(&mut params, &mut shared.borrow_mut(), 1)?;
                Ok(())
            },
        )?;
        let collectives = timed(comm, args.iters, || {
            match s {
                Strategy::Ddp => comm.all_reduce(&mut grads, ReduceOp::Avg)?,
                Strategy::Zero1 => {
                    comm.all_reduce(&mut grads, ReduceOp::Avg)?;
                    comm.all_gather(&mut params)?;
                }
                Strategy::Zero2 => {
                    comm.reduce_scatter(&mut grads, ReduceOp::Avg)?;
                    comm.all_gather(&mut params)?;
                }
                Strategy::Zero3 => comm.reduce_scatter(&mut grads, ReduceOp::Avg)?,
                Strategy::PostLocalSgd | Strategy::Diloco => bail!("bench step measures the synchronous strategies, not {s}"),
            }
            Ok(())
        })?;
        let owned = opt.owned();
        let mut local = Optimizer::with_groups(layout.clone(), groups.clone(), owned.clone())?;
        let adam = timed(comm, args.iters, || {
            local.step(&mut params[owned.clone()], &grads[owned.clone()])?;
            Ok(())
        })?;
        let norm = timed(comm, args.iters, || {
            std::hint::black_box(distoptim_optim::clip::partial_norm(&grads[owned.clone()], NormType::P(2.0)));
            Ok(())
        })?;
        let parts = collectives + adam;
        let (moved, minimum) = traffic(s, n, owned.len(), comm.size());
        if out {
            println!(
                "{:<7} {:>10.2} {:>12.2} {:>12.2} {:>10.2} {:>8.0}% {:>11.2} {:>16.1} {:>10.0} {:>10.0}",
                name,
                step * 1e3,
                collectives * 1e3,
                adam * 1e3,
                parts * 1e3,
                100.0 * (step / parts - 1.0),
                norm * 1e3,
                (opt.state_elems() * 8) as f64 / 1e6,
                moved / 1e6,
                minimum / 1e6
            );
        }
    }
    Ok(())
}

/// Bytes this rank moves through memory per step (see the module docs): the modelled
/// total and the kernels' minimum. `n` elements in all, `own` owned, `w` ranks.
fn traffic(s: Strategy, n: usize, own: usize, w: usize) -> (f64, f64) {
    let (n, own, w) = (n as f64 * 4.0, own as f64 * 4.0, w as f64);
    if w == 1.0 {
        // One rank: no reduction; the norm pass reads the gradients (the divisor is 1).
        return (own + 7.0 * own, 7.0 * own);
    }
    // Reduce-scatter: read every rank's copy of the owned part, write it once; all-reduce
    // adds an all-gather of the reduced gradient; a parameter all-gather reads every
    // rank's part and writes the whole buffer.
    let reduce_scatter = w * own + own;
    let gather = n + n;
    let collective = match s {
        Strategy::Ddp => reduce_scatter + gather,
        Strategy::Zero1 => reduce_scatter + 2.0 * gather,
        Strategy::Zero2 => reduce_scatter + gather,
        Strategy::Zero3 | Strategy::PostLocalSgd | Strategy::Diloco => reduce_scatter,
    };
    // Mean: the collective divides and the norm is measured on the blocks it writes.
    (collective + 7.0 * own, collective + 7.0 * own)
}
