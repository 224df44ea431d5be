//! `bench step`: the whole distributed optimizer step (reduce, clip, AdamW, gather) per
//! strategy, next to its parts measured alone in the same run on the same buffers:
//! the collectives the strategy needs and the AdamW update of the elements the rank
//! owns. "overhead" is what the step costs beyond the sum of its parts.
//!
//! Like `bench collectives`, it launches itself on `--nproc` processes (shm backend);
//! each process uses one optimizer thread so ranks do not fight over cores.

use anyhow::{bail, Context, Result};
use clap::Args;
use distoptim::{ClipConfig, DistributedOptimizer, StepConfig, Strategy};
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::clip::NormType;
use distoptim_optim::{AdamConfig, Layout, Optimizer, OptimizerConfig, ParamGroup};

use super::timed_ranks as timed;

#[derive(Args)]
pub struct StepArgs {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Parameters in the flat buffer.
    #[arg(long, default_value_t = 25_000_000)]
    params: usize,
    /// Strategies to run.
    #[arg(long, value_delimiter = ',', default_values_t = ["ddp".to_string(), "zero1".into(), "zero2".into(), "zero3".into()])]
    strategies: Vec<String>,
    /// Timed steps per strategy (median reported), after two warm-up steps.
    #[arg(long, default_value_t = 7)]
    iters: usize,
}

pub fn run(args: StepArgs) -> Result<()> {
    if distoptim_collective::backend_from_env()?.is_none() {
        return crate::launch::launch_self(args.nproc);
    }
    let comm = Communicator::from_env()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("building the optimizer pool")?;
    pool.install(|| body(&comm, &args))
}

fn strategy(name: &str) -> Result<Strategy> {
    Ok(match name {
        "ddp" => Strategy::Ddp,
        "zero1" => Strategy::Zero1,
        "zero2" => Strategy::Zero2,
        "zero3" => Strategy::Zero3,
        other => bail!("unknown strategy {other:?} (ddp, zero1, zero2, zero3)"),
    })
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
            "# distoptim bench step: {} ranks (shm), {n} f32 params, AdamW + clip, one optimizer thread per rank, median of {}",
            comm.size(),
            args.iters
        );
        println!("# parts: the strategy's collectives alone + AdamW over the owned elements alone, same run, same buffers");
        println!(
            "{:<7} {:>10} {:>12} {:>12} {:>10} {:>9} {:>16}",
            "step", "ms/step", "collectives", "adamw (own)", "parts sum", "overhead", "state MB / rank"
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
        let step = timed(comm, args.iters, || {
            fill(&mut grads);
            opt.step(&mut params, &mut grads, 1)?;
            Ok(())
        })? - timed(comm, args.iters, || {
            fill(&mut grads);
            Ok(())
        })?;
        let collectives = timed(comm, args.iters, || {
            match s {
                Strategy::Ddp => comm.all_reduce(&mut grads, ReduceOp::Sum)?,
                Strategy::Zero1 => {
                    comm.all_reduce(&mut grads, ReduceOp::Sum)?;
                    comm.all_gather(&mut params)?;
                }
                Strategy::Zero2 => {
                    comm.reduce_scatter(&mut grads, ReduceOp::Sum)?;
                    comm.all_gather(&mut params)?;
                }
                Strategy::Zero3 => comm.reduce_scatter(&mut grads, ReduceOp::Sum)?,
            }
            Ok(())
        })?;
        let owned = opt.owned();
        let mut local = Optimizer::with_groups(layout.clone(), groups.clone(), owned.clone())?;
        let adam = timed(comm, args.iters, || {
            local.step(&mut params[owned.clone()], &grads[owned.clone()])?;
            Ok(())
        })?;
        let parts = collectives + adam;
        if out {
            println!(
                "{:<7} {:>10.2} {:>12.2} {:>12.2} {:>10.2} {:>8.0}% {:>16.1}",
                name,
                step * 1e3,
                collectives * 1e3,
                adam * 1e3,
                parts * 1e3,
                100.0 * (step / parts - 1.0),
                (opt.state_elems() * 8) as f64 / 1e6
            );
        }
    }
    Ok(())
}
