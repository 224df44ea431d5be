//! `distoptim estimate`: the bytes per rank by category, the bytes each rank sends per
//! step and a predicted optimizer-step time, for a model size, world sizes, strategies
//! and precisions (see `distoptim::estimate` for the model).
//!
//! The network and memory figures default to a calibration on this host, run first for
//! each world size asked for: the shared-memory engine's all-reduce at 4 KiB (latency)
//! and 64 MiB (bandwidth), and the AdamW kernel over 4M elements on every rank at once
//! (memory bandwidth per rank as the kernel achieves it while the ranks share the host). `--latency-us`, `--bandwidth-gbs` and `--memory-gbs` replace them
//! to plan a job on another network (a multi-host one, say).

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use distoptim::estimate::{estimate, Machine, OptimizerPlan, Plan};
use distoptim::{FloatDtype, Precision, Strategy};
use distoptim_collective::{CommConfig, Communicator, ReduceOp};
use distoptim_optim::kernels::Adamw8bitConfig;
use distoptim_optim::{
    AdafactorConfig, AdamConfig, Layout, LionConfig, MuonConfig, Optimizer, OptimizerConfig, ParamGroup, ScheduleFreeConfig, SgdConfig,
};

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// Parameters of the model: a number with an optional K, M or B suffix (25M, 1.3B).
    #[arg(long, value_parser = crate::value::count, conflicts_with = "layers")]
    params: Option<usize>,
    /// Or the model's tensors as shapes, e.g. `2048x4096,4096,4096x4096,4096,4096x10,10`
    /// (needed for muon, which takes the matrices; exact for adafactor's factored state).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape)]
    layers: Vec<Vec<usize>>,
    /// World sizes.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [1usize, 2, 4, 8], value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    nproc: Vec<usize>,
    /// Strategies.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_value = "ddp,zero1,zero2,zero3", value_parser = crate::value::synchronous())]
    strategy: Vec<Strategy>,
    /// Working types of the parameters and gradients.
    #[arg(long, value_delimiter = ',', num_args = 1.., value_enum, default_value = "f32,bf16")]
    precision: Vec<FloatDtype>,
    /// What gradients are summed in.
    #[arg(long, default_value = "f32", value_parser = crate::value::reduce_dtype())]
    reduce_dtype: FloatDtype,
    /// The optimizer, with `train`'s param groups (muon: Muon for the matrices, AdamW for
    /// the rest); its state is computed as the live optimizer keeps it.
    #[arg(long, default_value = "adamw", value_parser = ["sgd", "adam", "adamw", "muon", "adafactor", "lion", "schedule_free_adamw", "adamw8bit"])]
    optimizer: String,
    /// Latency per collective step, in microseconds (default: calibrated on this host).
    #[arg(long, value_parser = positive)]
    latency_us: Option<f64>,
    /// Bytes per second a rank sends, in GB/s (default: calibrated on this host).
    #[arg(long, value_parser = positive)]
    bandwidth_gbs: Option<f64>,
    /// Memory bandwidth of one rank's optimizer kernel, in GB/s (default: calibrated).
    #[arg(long, value_parser = positive)]
    memory_gbs: Option<f64>,
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a positive number, got {s:?}")),
    }
}

/// `4096x2048` → [4096, 2048] (at most 2^48 elements).
fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let shape = s
        .split('x')
        .map(|d| d.trim().parse::<usize>().map_err(|_| format!("{s:?} is not a shape like 4096x2048")))
        .collect::<Result<Vec<_>, _>>()?;
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d).filter(|&n| n <= 1 << 48))
        .ok_or_else(|| format!("{s:?} has too many elements"))?;
    Ok(shape)
}

/// `train`'s param groups for `optimizer` over `layout`, with its default hyperparameters
/// (only the state matters here).
fn groups_for(optimizer: &str, layout: &Layout) -> Result<Vec<ParamGroup>> {
    let config = |name: &str| -> OptimizerConfig {
        match name {
            "sgd" => SgdConfig { momentum: 0.9, ..SgdConfig::default() }.into(),
            "adam" => AdamConfig::adam().into(),
            "adafactor" => AdafactorConfig::default().into(),
            "lion" => LionConfig::default().into(),
            "schedule_free_adamw" => ScheduleFreeConfig::default().into(),
            "adamw8bit" => Adamw8bitConfig::default().into(),
            _ => AdamConfig::adamw().into(),
        }
    };
    if optimizer != "muon" {
        return Ok(vec![ParamGroup { params: (0..layout.len()).collect(), config: config(optimizer) }]);
    }
    let (matrices, rest): (Vec<usize>, Vec<usize>) = (0..layout.len()).partition(|&i| layout.param(i).shape.len() == 2);
    ensure!(!matrices.is_empty(), "muon updates 2-D parameters: give the model's shapes with --layers (4096x2048,4096,…)");
    let mut groups = vec![ParamGroup { params: matrices, config: MuonConfig::default().into() }];
    if !rest.is_empty() {
        groups.push(ParamGroup { params: rest, config: config("adamw") });
    }
    Ok(groups)
}

/// The alpha-beta figures of `comm`'s all-reduce (collective): the latency per ring step
/// from 4 KiB, the bandwidth per rank from 64 MiB (medians, the slowest rank's), on a
/// buffer from the communicator, as distoptim's gradient and staging buffers are.
pub fn measure_network(comm: &Communicator) -> Result<(f64, f64)> {
    let w = comm.size();
    if w == 1 {
        return Ok((0.0, f64::INFINITY));
    }
    let median = |len: usize, reps: usize| -> Result<f64> {
        let mut buf = comm.alloc::<f32>(len)?;
        buf.fill(1.0);
        let mut t = Vec::new();
        for i in 0..reps + 2 {
            comm.barrier()?;
            let start = Instant::now();
            comm.all_reduce(&mut buf, ReduceOp::Sum)?;
            if i >= 2 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
        t.sort_by(f64::total_cmp);
        let mut all = [t[t.len() / 2]];
        comm.all_reduce(&mut all, ReduceOp::Max)?;
        Ok(all[0])
    };
    let (small, large) = (median(1024, 50)?, median(16 << 20, 5)?);
    let steps = 2.0 * (w as f64 - 1.0);
    let alpha = small / steps;
    let bytes = steps / w as f64 * (64u64 << 20) as f64;
    Ok((alpha, bytes / (large - steps * alpha).max(1e-9)))
}

/// Bytes per second each rank of `comm` can fault fresh memory in while every rank does
/// (collective; 64 MiB, median of 3): what a buffer allocated per step costs.
pub fn measure_first_touch(comm: &Communicator) -> Result<f64> {
    let n = 64 << 20;
    let mut t = Vec::new();
    for _ in 0..3 {
        comm.barrier()?;
        let start = Instant::now();
        let mut fresh = vec![0u8; n];
        fresh.iter_mut().step_by(4096).for_each(|b| *b = 1);
        std::hint::black_box(&fresh);
        drop(fresh);
        let mut took = [start.elapsed().as_secs_f64()];
        comm.all_reduce(&mut took, ReduceOp::Max)?;
        t.push(took[0]);
    }
    t.sort_by(f64::total_cmp);
    Ok(n as f64 / t[1])
}

/// Bytes per second the AdamW kernel moves on each rank of `comm` while every rank runs
/// it at once, as in a step (collective; 4M elements, 7 f32 accesses each, the median of
/// the slowest rank's times over 5 runs after 3 warm-ups).
pub fn measure_kernel(comm: &Communicator) -> Result<f64> {
    let n = 4 << 20;
    let layout = Layout::new([("w", vec![n])])?;
    let mut opt = Optimizer::new(layout, OptimizerConfig::Adam(AdamConfig::adamw()))?;
    let (mut p, g) = (vec![0.5f32; n], vec![0.01f32; n]);
    let mut t = Vec::new();
    for i in 0..8 {
        comm.barrier()?;
        let start = Instant::now();
        opt.step(&mut p, &g)?;
        let mut took = [start.elapsed().as_secs_f64()];
        comm.all_reduce(&mut took, ReduceOp::Max)?;
        if i >= 3 {
            t.push(took[0]);
        }
    }
    t.sort_by(f64::total_cmp);
    Ok(7.0 * 4.0 * n as f64 / t[t.len() / 2])
}

/// Every figure of [`Machine`], measured on `comm`'s ranks (collective).
pub fn measure_machine(comm: &Communicator) -> Result<Machine> {
    let (alpha, beta) = measure_network(comm)?;
    Ok(Machine { alpha, beta, memory_bandwidth: measure_kernel(comm)?, first_touch: measure_first_touch(comm)? })
}

/// The host's figures for each world size, measured with that many threads on the
/// shared-memory engine, each with one kernel thread (the ranks of a job share the
/// cores).
fn calibrate(sizes: &[usize]) -> Result<Vec<(usize, Machine)>> {
    let config = CommConfig::default().with_timeout(std::time::Duration::from_secs(60));
    let mut out = Vec::new();
    for &w in sizes.iter().filter(|&&w| w <= 64) {
        let fits = Communicator::run_threads(w, &config, |comm| -> Result<Machine> {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().context("building a one-thread pool")?;
            pool.install(|| measure_machine(&comm))
        })?;
        out.push((w, fits.into_iter().next().context("no rank")??));
    }
    Ok(out)
}

pub fn run(args: EstimateArgs) -> Result<()> {
    let shapes: Vec<Vec<usize>> = match (args.params, args.layers.is_empty()) {
        (Some(p), _) => vec![vec![p]],
        (None, false) => args.layers.clone(),
        (None, true) => bail!("give the model size with --params (25M, 1.3B) or --layers (4096x2048,4096,…)"),
    };
    let layout = Layout::new(shapes.iter().enumerate().map(|(i, s)| (format!("t{i}"), s.clone())))?;
    let params = layout.numel();
    ensure!(params > 0, "the model has no parameters");
    let groups = groups_for(&args.optimizer, &layout)?;
    let per_param = Optimizer::planned_state_bytes(&layout, &groups, 0..params)? as f64 / params as f64;
    let reduce_dtype = args.reduce_dtype;
    let given = (args.latency_us, args.bandwidth_gbs);
    let measured = if given.0.is_some() && given.1.is_some() && args.memory_gbs.is_some() {
        Vec::new()
    } else {
        println!("# calibrating on this host: per world size, the shared-memory all-reduce at 4 KiB and 64 MiB and AdamW over 4M elements on every rank at once…");
        calibrate(&args.nproc)?
    };
    let machine_for = |w: usize| -> Machine {
        let m = measured
            .iter()
            .find(|(n, _)| *n == w)
            .map_or(Machine { alpha: 0.0, beta: f64::INFINITY, memory_bandwidth: f64::INFINITY, first_touch: f64::INFINITY }, |(_, m)| *m);
        Machine {
            alpha: args.latency_us.map_or(m.alpha, |us| us * 1e-6),
            beta: args.bandwidth_gbs.map_or(m.beta, |g| g * 1e9),
            memory_bandwidth: args.memory_gbs.map_or(m.memory_bandwidth, |g| g * 1e9),
            first_touch: args.memory_gbs.map_or(m.first_touch, |g| g * 1e9 / 4.0),
        }
    };
    println!(
        "# distoptim estimate: {params} parameters, {} ({per_param:.3} bytes of state per parameter), reduce in {reduce_dtype}",
        args.optimizer
    );
    for &w in &args.nproc {
        let m = machine_for(w);
        {
            println!(
                "# W={w}: latency {:.2} us per step, bandwidth {:.2} GB/s per rank, optimizer kernel {:.1} GB/s per rank, fresh memory {:.1} GB/s{}",
                m.alpha * 1e6,
                m.beta / 1e9,
                m.memory_bandwidth / 1e9,
                m.first_touch / 1e9,
                if given.0.is_some() || given.1.is_some() || args.memory_gbs.is_some() { " (flags where given, else measured here)" } else { " (measured here)" }
            );
        }
    }
    println!(
        "{:<6} {:>4} {:>6} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} | {:>10} {:>10} {:>10}",
        "strat", "W", "prec", "params", "grads", "master", "state", "comm", "total MiB", "bytes/par", "sent MB", "comm ms", "step ms"
    );
    for &strategy in &args.strategy {
        for &dtype in &args.precision {
            let precision = Precision::new(dtype).with_reduce_dtype(reduce_dtype);
            for &w in &args.nproc {
                let optimizer = OptimizerPlan::Groups { layout: layout.clone(), groups: groups.clone() };
                let plan = Plan { params, world_size: w, strategy, precision, optimizer };
                let e = estimate(&plan, &machine_for(w))?;
                let mib = |b: u64| b as f64 / 1048576.0;
                let m = e.memory;
                println!(
                    "{:<6} {:>4} {:>6} | {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>10.2} | {:>10.1} {:>10.2} {:>10.2}",
                    strategy.name(),
                    w,
                    dtype,
                    mib(m.working_params),
                    mib(m.grads),
                    mib(m.master),
                    mib(m.optimizer_state),
                    mib(m.comm_buffers),
                    mib(m.total()),
                    m.total() as f64 / params as f64,
                    e.sent_bytes / 1e6,
                    e.comm_seconds * 1e3,
                    e.step_seconds() * 1e3
                );
            }
        }
    }
    println!("# memory: what distoptim holds per rank (the framework's own copies of the model and its gradients come on top); step: the optimizer step (collectives + kernel), not forward/backward");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_shapes_parse_with_checks() {
        assert_eq!(parse_shape("4096x2048"), Ok(vec![4096, 2048]));
        assert!(parse_shape("99999999x99999999x99999").is_err());
    }
}
