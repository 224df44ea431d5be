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
//! ZeRO-3's step includes the all-gather of the parameters before the next forward pass
//! (its per-iteration cost), so every strategy's row is one training iteration's
//! optimizer work.
//!
//! `--precision bf16,f16` adds mixed-precision rows (parameters and gradients of that
//! type, f32 master and state, reduction in `--reduce-dtype`), each with its time next to
//! the f32 row of the same strategy. Every row also shows `distoptim estimate`'s
//! prediction for it, from an alpha-beta fit of this run's own all-reduce and the AdamW
//! kernel's measured bandwidth, and the prediction's error; the ledger of the live
//! optimizer is checked against the estimate's (it must be equal).
//!
//! Like `bench collectives`, it launches itself on `--nproc` processes (shm backend);
//! each process uses one optimizer thread so ranks do not fight over cores.

use anyhow::{bail, Context, Result};
use clap::Args;
use distoptim::estimate::{estimate, OptimizerPlan, Plan};
use distoptim::{data_parallel, ClipConfig, DataParallel, DataParallelConfig, FloatDtype, Precision, ReduceMode, Strategy, Working};
use distoptim_collective::{bf16, f16};
use distoptim_collective::{Communicator, ReduceOp};
use distoptim_optim::clip::NormType;
use distoptim_optim::kernels::muon::newton_schulz_flops;
use distoptim_optim::{AdamConfig, Layout, MuonConfig, Optimizer, OptimizerConfig, ParamGroup};

use super::{timed_ranks as timed, timed_ranks_after};

#[derive(Args)]
pub struct StepArgs {
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Parameters in the flat buffer (`25M`, `100M`…).
    #[arg(long, default_value_t = 25_000_000, value_parser = crate::value::count)]
    params: usize,
    /// Strategies to run.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "ddp,zero1,zero2,zero3", value_parser = crate::value::synchronous())]
    strategies: Vec<Strategy>,
    /// Timed steps per strategy (median reported), after two warm-up steps.
    #[arg(long, default_value_t = 11)]
    iters: usize,
    /// Optimizer threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Working types of the parameters and gradients to measure (f32 is always run, as
    /// the reference of the others).
    #[arg(long, value_delimiter = ',', num_args = 1.., value_enum, default_value = "f32")]
    precision: Vec<FloatDtype>,
    /// What the mixed-precision rows sum gradients in.
    #[arg(long, default_value = "f32", value_parser = crate::value::reduce_dtype())]
    reduce_dtype: FloatDtype,
    /// Also a Muon table: a model of these matrices (`ROWSxCOLS`, Muon) each with a bias
    /// (AdamW), the step per strategy and how evenly the owners' Newton–Schulz work is
    /// spread (none: skip it).
    #[arg(long, value_delimiter = ',', num_args = 0.., value_parser = crate::value::matrix)]
    muon_shapes: Vec<(usize, usize)>,
    /// Also deterministic mode's step per strategy: each rank adds its share of
    /// `--micro-shards` gradients to the exact sum, then steps on it; next to the normal
    /// step of the same run.
    #[arg(long)]
    deterministic: bool,
    /// Deterministic mode's pieces per global batch (a rank adds micro_shards / nproc).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    micro_shards: u64,
    /// Also the cost of an elastic snapshot per strategy (the copy of a rank's state into
    /// shared memory `train --elastic` makes after every step), next to the normal step.
    #[arg(long)]
    snapshot: bool,
}

pub fn run(args: StepArgs) -> Result<()> {
    if distoptim_collective::backend_from_env()?.is_none() {
        return crate::launch::launch_self(args.nproc, None);
    }
    let comm = Communicator::from_env()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(args.threads.max(1)).build().context("building the optimizer pool")?;
    pool.install(|| body(&comm, &args))
}

fn body(comm: &Communicator, args: &StepArgs) -> Result<()> {
    let n = args.params;
    let layout = Layout::new([("flat", vec![n])])?;
    let adamw = OptimizerConfig::Adam(AdamConfig { lr: 1e-3, ..AdamConfig::adamw() });
    let groups = vec![ParamGroup { params: vec![0], config: adamw }];
    let clip = Some(ClipConfig::new(1.0));
    let setup = Setup { comm, layout: layout.clone(), groups: groups.clone(), clip, iters: args.iters };
    let out = comm.rank() == 0;
    let machine = crate::estimate::measure_machine(comm)?;
    let predict = |s: Strategy, precision: Precision| {
        estimate(&Plan { params: n, world_size: comm.size(), strategy: s, precision, optimizer: OptimizerPlan::Buffers(2) }, &machine)
    };
    if out {
        println!(
            "# estimate's machine, fitted in this run: latency {:.2} us/step, {:.2} GB/s per rank, AdamW kernel {:.1} GB/s, fresh memory {:.1} GB/s",
            machine.alpha * 1e6,
            machine.beta / 1e9,
            machine.memory_bandwidth / 1e9,
            machine.first_touch / 1e9
        );
        println!(
            "# distoptim bench step: {} ranks (shm), {n} f32 params, AdamW + clip (L2, 1.0), {} optimizer thread(s) per rank, median of {}",
            comm.size(),
            args.threads.max(1),
            args.iters
        );
        println!("# parts: the strategy's collectives alone + AdamW over the owned elements alone, same run, same buffers; norm (own): a separate read of the owned gradients, for reference (the step measures the norm inside the collective)");
        println!(
            "{:<7} {:>10} {:>12} {:>12} {:>10} {:>9} {:>11} {:>16} {:>10} {:>10} {:>10} {:>7}",
            "step",
            "ms/step",
            "collectives",
            "adamw (own)",
            "parts sum",
            "overhead",
            "norm (own)",
            "state MB / rank",
            "MB moved",
            "minimum",
            "predicted",
            "error"
        );
    }
    let mut f32_times = Vec::new();
    for &s in &args.strategies {
        // Shared-memory buffers, which the collectives reduce in place.
        let (mut params, mut grads) = (comm.alloc::<f32>(n)?, comm.alloc::<f32>(n)?);
        params.iter_mut().enumerate().for_each(|(i, p)| *p = (i % 97) as f32 * 1e-3);
        let mut opt = setup.build(s, Precision::f32(), &params)?;
        let step = timed_step(comm, opt.as_mut(), &mut params, &mut grads, args.iters)?;
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
                Strategy::Zero3 => {
                    comm.reduce_scatter(&mut grads, ReduceOp::Avg)?;
                    comm.all_gather(&mut params)?;
                }
                Strategy::PostLocalSgd | Strategy::Diloco => {}
            }
            Ok(())
        })?;
        let owned = opt.state_range();
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
        let predicted = predict(s, Precision::f32())?;
        // The estimate is rank 0's (the largest shard when W does not divide the model).
        if comm.rank() == 0 {
            check_ledger(opt.as_ref(), &predicted.memory)?;
        }
        f32_times.push((s, step));
        if out {
            println!(
                "{:<7} {:>10.2} {:>12.2} {:>12.2} {:>10.2} {:>8.0}% {:>11.2} {:>16.1} {:>10.0} {:>10.0} {:>10.2} {:>6.0}%",
                s.name(),
                step * 1e3,
                collectives * 1e3,
                adam * 1e3,
                parts * 1e3,
                100.0 * (step / parts - 1.0),
                norm * 1e3,
                (owned.len() * 8) as f64 / 1e6,
                moved / 1e6,
                minimum / 1e6,
                predicted.step_seconds() * 1e3,
                100.0 * (predicted.step_seconds() / step - 1.0)
            );
        }
    }
    let (mixed, reduce_dtype) = (args.precision.clone(), args.reduce_dtype);
    let mixed: Vec<FloatDtype> = mixed.into_iter().filter(|&d| d != FloatDtype::F32 || reduce_dtype != FloatDtype::F32).collect();
    if !mixed.is_empty() && out {
        println!("# mixed precision: parameters and gradients of the working type, f32 master and state, reduced in {reduce_dtype}; bytes sent per rank per step as the ring model counts them");
        println!(
            "{:<7} {:>6} {:>10} {:>9} {:>12} {:>16} {:>10} {:>7} {:>16}",
            "step", "dtype", "ms/step", "vs f32", "sent MB", "f32 sent MB", "predicted", "error", "state+master MB"
        );
    }
    for dtype in mixed {
        let precision = Precision::new(dtype).with_reduce_dtype(reduce_dtype);
        for (s, f32_step) in f32_times.clone() {
            let (step, opt_bytes) = match dtype {
                FloatDtype::F32 => setup.mixed_step::<f32>(s, precision)?,
                FloatDtype::Bf16 => setup.mixed_step::<bf16>(s, precision)?,
                FloatDtype::F16 => setup.mixed_step::<f16>(s, precision)?,
            };
            let predicted = predict(s, precision)?;
            let reference = predict(s, Precision::f32())?;
            if out {
                println!(
                    "{:<7} {:>6} {:>10.2} {:>8.2}x {:>12.1} {:>16.1} {:>10.2} {:>6.0}% {:>16.1}",
                    s.name(),
                    dtype.name(),
                    step * 1e3,
                    step / f32_step,
                    predicted.sent_bytes / 1e6,
                    reference.sent_bytes / 1e6,
                    predicted.step_seconds() * 1e3,
                    100.0 * (predicted.step_seconds() / step - 1.0),
                    opt_bytes as f64 / 1e6
                );
            }
        }
    }
    if !args.muon_shapes.is_empty() {
        muon_rows(comm, args, clip)?;
    }
    if args.deterministic {
        deterministic_rows(&setup, args, &f32_times)?;
    }
    if args.snapshot {
        snapshot_rows(&setup, &f32_times)?;
    }
    Ok(())
}

/// Deterministic mode next to the normal step: a rank's micro-shard gradients added to
/// the exact sum, then the step on it (exact reduction, exact norm, AdamW, gathers).
fn deterministic_rows(setup: &Setup, args: &StepArgs, normal: &[(Strategy, f64)]) -> Result<()> {
    let comm = setup.comm;
    let n = setup.layout.numel();
    let terms = distoptim_collective::shard_range(args.micro_shards as usize, comm.size(), comm.rank()).len();
    if comm.rank() == 0 {
        println!(
            "# deterministic: each rank adds its {} of {} micro-shard gradients to the exact sum, then steps on it; ratio = deterministic / normal step of this run",
            terms, args.micro_shards
        );
        println!("{:<7} {:>10} {:>10} {:>8} {:>10} {:>12}", "step", "ms/step", "normal", "ratio", "adds ms", "step ms");
    }
    for &(s, normal_step) in normal {
        let mut params: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
        let mut opt = setup.build(s, Precision::f32(), &params)?;
        let grads: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
        let mut sum = distoptim::ReproducibleSum::new(n, args.micro_shards as usize)?;
        let adds = timed(comm, setup.iters, || {
            sum.clear();
            for _ in 0..terms {
                sum.add(&grads)?;
            }
            Ok(())
        })?;
        let sum = std::cell::RefCell::new(sum);
        let step = timed_ranks_after(
            comm,
            setup.iters,
            || {
                let mut s = sum.borrow_mut();
                s.clear();
                (0..terms).try_for_each(|_| s.add(&grads))?;
                Ok(())
            },
            || {
                opt.step_deterministic((&mut params).into(), &mut sum.borrow_mut())?;
                opt.gather((&mut params).into())?;
                Ok(())
            },
        )?;
        if comm.rank() == 0 {
            let total = adds + step;
            println!(
                "{:<7} {:>10.2} {:>10.2} {:>7.2}x {:>10.2} {:>12.2}",
                s.name(),
                total * 1e3,
                normal_step * 1e3,
                total / normal_step,
                adds * 1e3,
                step * 1e3
            );
        }
    }
    Ok(())
}

/// An elastic snapshot (what `train --elastic` takes after every step: this rank's
/// state copied into its slot in shared memory) next to the normal step.
fn snapshot_rows(setup: &Setup, normal: &[(Strategy, f64)]) -> Result<()> {
    let comm = setup.comm;
    let n = setup.layout.numel();
    let mut stamp = [0i64];
    if comm.rank() == 0 {
        stamp[0] = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    }
    comm.broadcast(&mut stamp, 0)?;
    let dir = std::path::PathBuf::from("/dev/shm").join(format!("distoptim-bench-snapshot-{:x}", stamp[0]));
    if comm.rank() == 0 {
        println!(
            "# elastic snapshot: this rank's master and AdamW state copied into its slot in {} (two slots, alternating); ratio = snapshot / normal step",
            dir.display()
        );
        println!("{:<7} {:>12} {:>10} {:>8} {:>12}", "step", "snapshot ms", "normal", "ratio", "MB / rank");
    }
    for &(s, normal_step) in normal {
        let mut params: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
        let mut opt = setup.build(s, Precision::f32(), &params)?;
        let mut grads: Vec<f32> = (0..n).map(|i| ((i % 89) as f32 - 44.0) * 1e-4).collect();
        opt.step((&mut params).into(), (&mut grads).into(), 1)?;
        opt.gather((&mut params).into())?;
        let mut snapshots = distoptim::elastic::Snapshots::new(dir.join(s.name()), 0, comm.rank(), comm.size());
        let counters = std::collections::BTreeMap::from([("train_step".to_string(), 1)]);
        let mut step = 0;
        let snapshot = timed(comm, setup.iters, || {
            step += 1;
            opt.snapshot(&mut snapshots, step, (&params).into(), &counters)?;
            Ok(())
        })?;
        // Three buffers of the rank's balanced range: the parameters, exp_avg, exp_avg_sq.
        let bytes = 3 * 4 * distoptim_collective::shard_range(n, comm.size(), comm.rank()).len();
        if comm.rank() == 0 {
            println!(
                "{:<7} {:>12.2} {:>10.2} {:>7.1}% {:>12.1}",
                s.name(),
                snapshot * 1e3,
                normal_step * 1e3,
                100.0 * snapshot / normal_step,
                bytes as f64 / 1e6
            );
        }
        comm.barrier()?;
    }
    if comm.rank() == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// The live optimizer's ledger must be the estimate's: a mismatch is a bug in one of them.
fn check_ledger(opt: &dyn DataParallel, predicted: &distoptim::MemoryLedger) -> Result<()> {
    let live = opt.memory();
    if &live != predicted {
        bail!("the optimizer's ledger {live:?} differs from the estimate's {predicted:?}");
    }
    Ok(())
}

/// The distributed Muon step: under ZeRO each matrix's Newton–Schulz runs on one rank,
/// packed by cost (LPT; every rank runs every matrix under DDP), so the step waits for the
/// busiest one; the balance is its NS work over the mean.
fn muon_rows(comm: &Communicator, args: &StepArgs, clip: Option<ClipConfig>) -> Result<()> {
    let mut named = Vec::new();
    for (i, &(r, c)) in args.muon_shapes.iter().enumerate() {
        named.push((format!("m{i}.weight"), vec![r, c]));
        named.push((format!("m{i}.bias"), vec![r]));
    }
    let layout = Layout::new(named)?;
    let muon = MuonConfig { lr: 0.02, ..MuonConfig::default() };
    let steps = muon.ns_steps;
    let groups = vec![
        ParamGroup { params: (0..layout.len()).step_by(2).collect(), config: OptimizerConfig::Muon(muon) },
        ParamGroup { params: (1..layout.len()).step_by(2).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) },
    ];
    let (w, n) = (comm.size(), layout.numel());
    let costs: Vec<f64> = args.muon_shapes.iter().map(|&(r, c)| newton_schulz_flops(r, c, steps)).collect();
    let total: f64 = costs.iter().sum();
    let setup = Setup { comm, layout: layout.clone(), groups, clip, iters: args.iters };
    if comm.rank() == 0 {
        println!(
            "# muon: {} matrices ({n} parameters, {:.1} NS GFLOP per step in all), Muon for the matrices, AdamW for the biases; balance = the busiest owner's NS GFLOP / the mean",
            args.muon_shapes.len(),
            total / 1e9
        );
        let largest = costs.iter().cloned().fold(0.0, f64::max);
        println!(
            "# reference: no assignment of whole matrices to {w} ranks can beat balance {:.2} (the largest matrix, or the mean)",
            largest.max(total / w as f64) / (total / w as f64)
        );
        println!("{:<7} {:>10} {:>16} {:>16} {:>9}", "step", "ms/step", "NS GFLOP max", "NS GFLOP mean", "balance");
    }
    for &s in &args.strategies {
        let (mut params, mut grads) = (comm.alloc::<f32>(n)?, comm.alloc::<f32>(n)?);
        params.iter_mut().enumerate().for_each(|(i, p)| *p = ((i % 97) as f32 - 48.0) * 1e-3);
        let mut opt = setup.build(s, Precision::f32(), &params)?;
        let step = timed_step(comm, opt.as_mut(), &mut params, &mut grads, args.iters)?;
        let costs = distoptim::transform_loads(&layout, &setup.groups, s, w);
        let (max, mean) = (costs.iter().cloned().fold(0.0, f64::max), costs.iter().sum::<f64>() / w as f64);
        if comm.rank() == 0 {
            println!("{:<7} {:>10.1} {:>16.3} {:>16.3} {:>9.2}", s.name(), step * 1e3, max / 1e9, mean / 1e9, max / mean);
        }
    }
    Ok(())
}

/// What every row of one run shares: the group, the model, the optimizer and the clip.
struct Setup<'a> {
    comm: &'a Communicator,
    layout: Layout,
    groups: Vec<ParamGroup>,
    clip: Option<ClipConfig>,
    iters: usize,
}

impl Setup<'_> {
    /// The strategy `s` as the one data-parallel interface builds it: mean reduction,
    /// the clip, `precision`, the master starting at `init`.
    fn build(&self, s: Strategy, precision: Precision, init: &[f32]) -> Result<Box<dyn DataParallel>> {
        let config = DataParallelConfig::new().with_reduce(ReduceMode::Mean).with_clip(self.clip).with_precision(precision);
        Ok(data_parallel(s, self.comm.clone(), self.layout.clone(), self.groups.clone(), None, &config, init)?)
    }

    /// The median mixed-precision step (and, for ZeRO-3, the gather after it) with
    /// working type `T`; returns it and the bytes of optimizer state and master this rank
    /// holds.
    fn mixed_step<T: Working>(&self, s: Strategy, precision: Precision) -> Result<(f64, u64)> {
        let n = self.layout.numel();
        let init: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3).collect();
        let mut opt = self.build(s, precision, &init)?;
        let mut params: Vec<T> = init.iter().map(|&x| T::from_f32(x)).collect();
        drop(init);
        let mut grads = vec![T::default(); n];
        let step = timed_step(self.comm, opt.as_mut(), &mut params, &mut grads, self.iters)?;
        let m = opt.memory();
        Ok((step, m.optimizer_state + m.master))
    }
}

/// The median step (and, for ZeRO-3, the gather after it), with the gradients refilled
/// before each one outside the timed region.
fn timed_step<T: Working>(comm: &Communicator, opt: &mut dyn DataParallel, params: &mut [T], grads: &mut [T], iters: usize) -> Result<f64> {
    let grads = std::cell::RefCell::new(grads);
    timed_ranks_after(
        comm,
        iters,
        || {
            grads.borrow_mut().iter_mut().enumerate().for_each(|(i, x)| *x = T::from_f32(((i % 89) as f32 - 44.0) * 1e-4));
            Ok(())
        },
        || {
            opt.step((&mut *params).into(), (&mut **grads.borrow_mut()).into(), 1)?;
            opt.gather((&mut *params).into())?;
            Ok(())
        },
    )
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
        Strategy::Zero3 => reduce_scatter + gather,
        Strategy::PostLocalSgd | Strategy::Diloco => reduce_scatter,
    };
    // Mean: the collective divides and the norm is measured on the blocks it writes.
    (collective + 7.0 * own, collective + 7.0 * own)
}
