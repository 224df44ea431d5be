//! `bench overlap`: DDP's gradient buckets reduced while a layer-by-layer backward pass
//! still runs, against the same backward followed by the reduction, in the same run.
//!
//! The backward pass is simulated: each layer's gradient is computed by a fixed amount
//! of arithmetic per element (`--work` FMAs), last layer first. Reported per step: the
//! backward alone, the step alone (reduce + SGD update), backward then step
//! (sequential), and with buckets launched as layers finish (overlapped); the ideal is
//! max(backward, reduce) + update. Launches itself on `--nproc` processes (shm).

use anyhow::Result;
use clap::Args;
use distoptim::{GradBuckets, ShardedOptimizer, StepConfig, Strategy};
use distoptim_collective::Communicator;
use distoptim_optim::{Layout, OptimizerConfig, ParamGroup, SgdConfig};

use super::timed_ranks as timed;

#[derive(Args)]
pub struct OverlapArgs {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Layers of the simulated model.
    #[arg(long, default_value_t = 16)]
    layers: usize,
    /// Elements per layer.
    #[arg(long, default_value_t = 1_000_000)]
    layer_size: usize,
    /// Multiply-adds per gradient element in the simulated backward.
    #[arg(long, default_value_t = 8)]
    work: usize,
    /// DDP bucket size, MiB.
    #[arg(long, default_value_t = 25.0)]
    bucket_cap_mb: f64,
    /// Timed steps (median reported), after two warm-up steps.
    #[arg(long, default_value_t = 7)]
    iters: usize,
}

pub fn run(args: OverlapArgs) -> Result<()> {
    if distoptim_collective::backend_from_env()?.is_none() {
        return crate::launch::launch_self(args.nproc, None);
    }
    let comm = Communicator::from_env()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    pool.install(|| body(&comm, &args))
}

/// One layer's simulated gradient: `work` dependent multiply-adds per element.
fn backward_layer(out: &mut [f32], layer: usize, work: usize) {
    for (i, g) in out.iter_mut().enumerate() {
        let mut x = (i % 101) as f32 * 1e-3 + layer as f32 * 1e-4;
        for _ in 0..work {
            x = x.mul_add(0.999, 1e-4);
        }
        *g = x;
    }
}

fn body(comm: &Communicator, args: &OverlapArgs) -> Result<()> {
    let layout = Layout::new((0..args.layers).map(|l| (format!("layer{l}"), vec![args.layer_size])))?;
    let n = layout.numel();
    let sgd = OptimizerConfig::Sgd(SgdConfig { lr: 1e-6, ..Default::default() });
    let groups = vec![ParamGroup { params: (0..args.layers).collect(), config: sgd }];
    let config = StepConfig { bucket_cap_mb: args.bucket_cap_mb, ..StepConfig::new(Strategy::Ddp) };
    let mut opt = ShardedOptimizer::new(comm.clone(), layout.clone(), groups, None, config)?;
    let mut buckets = opt.grad_buckets()?;
    let mut params = vec![0.5f32; n];
    let backward = |b: &mut GradBuckets, mark: bool| -> Result<()> {
        for l in (0..args.layers).rev() {
            backward_layer(b.param_mut(l)?, l, args.work);
            if mark {
                b.mark_ready(l)?;
            }
        }
        Ok(())
    };
    let compute = timed(comm, args.iters, || backward(&mut buckets, false))?;
    let step_alone = timed(comm, args.iters, || {
        buckets.start(1)?;
        opt.step_buckets(&mut params, &mut buckets)?;
        Ok(())
    })?;
    // The same round either way; only whether layers are marked ready as they finish.
    let mut round = |mark: bool| {
        timed(comm, args.iters, || {
            buckets.start(1)?;
            backward(&mut buckets, mark)?;
            opt.step_buckets(&mut params, &mut buckets)?;
            Ok(())
        })
    };
    let sequential = round(false)?;
    let overlapped = round(true)?;
    if comm.rank() == 0 {
        println!(
            "# distoptim bench overlap: {} ranks (shm), {} layers x {} f32, {} buckets of <= {} MiB, {} FMAs/element backward, median of {}",
            comm.size(),
            args.layers,
            args.layer_size,
            buckets.bucket_ranges().len(),
            args.bucket_cap_mb,
            args.work,
            args.iters
        );
        println!("{:<36} {:>10}", "", "ms/step");
        for (name, t) in [
            ("backward alone", compute),
            ("reduce + update alone", step_alone),
            ("backward, then reduce + update", sequential),
            ("buckets reduced during backward", overlapped),
        ] {
            println!("{name:<36} {:>10.2}", t * 1e3);
        }
        println!("overlap saved {:.1}% of the sequential step", 100.0 * (1.0 - overlapped / sequential));
    }
    Ok(())
}
