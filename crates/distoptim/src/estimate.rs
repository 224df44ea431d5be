//! Planning a job before running it: the bytes each rank holds by category (the same
//! ledger [`ShardedOptimizer::memory`](crate::ShardedOptimizer::memory) reports
//! for a live run), the bytes each rank sends per step, and a predicted step time from an
//! alpha-beta network model and the optimizer's memory traffic.
//!
//! The network model charges each collective over W ranks `steps · alpha + bytes / beta`,
//! with the ring algorithm's counts: a reduce-scatter or all-gather of `B` bytes takes
//! W-1 steps and sends (W-1)/W · B per rank; an all-reduce twice that. A step is:
//!
//! | strategy | gradient collective (`reduce_dtype`) | parameter collective (`param_dtype`) |
//! |---|---|---|
//! | ddp   | all-reduce | – |
//! | zero1 | all-reduce (f32) or reduce-scatter (mixed) | all-gather |
//! | zero2 | reduce-scatter | all-gather |
//! | zero3 | reduce-scatter | all-gather (before the next forward pass) |
//!
//! plus the optimizer kernel over the owned elements (and, under mixed precision, the
//! conversions between types) at the host's memory bandwidth.

use crate::config::{StepConfig, Strategy};
use crate::error::{DistError, Result};
use crate::optimizer::MemoryLedger;
use crate::precision::{FloatDtype, Precision};
use crate::transforms::TransformPlan;
use distoptim_collective::shard_range;
use distoptim_optim::{Layout, Optimizer, ParamGroup};

/// What is being planned.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Parameters of the model.
    pub params: usize,
    /// Data-parallel ranks.
    pub world_size: usize,
    /// DDP or ZeRO-1/2/3.
    pub strategy: Strategy,
    /// Working and reduction types.
    pub precision: Precision,
    /// The optimizer's state.
    pub optimizer: OptimizerPlan,
}

/// What the optimizer keeps, for the plan.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerPlan {
    /// A number of f32 buffers per parameter (2 for Adam/AdamW, 3 with amsgrad, 1 for SGD
    /// with momentum), for a model known only by its size: ZeRO ranges are balanced.
    Buffers(usize),
    /// The model's layout and param groups: rank 0's range and state are the live
    /// optimizer's, exactly (ranges snapped to whole matrices or quantization blocks,
    /// packed Adafactor statistics, 8-bit codes and scales, Muon's exchange buffers).
    Groups {
        /// The parameters.
        layout: Layout,
        /// Their rules.
        groups: Vec<ParamGroup>,
    },
}

/// The network and host the plan runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    /// Seconds per collective step (latency).
    pub alpha: f64,
    /// Bytes per second a rank sends.
    pub beta: f64,
    /// Bytes per second one rank's optimizer kernel moves through memory.
    pub memory_bandwidth: f64,
    /// Bytes per second a rank faults freshly allocated memory in (what a buffer
    /// allocated anew each step costs: ZeRO-3's reduction buffer).
    pub first_touch: f64,
}

/// The plan's prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Bytes rank 0 holds by category (the largest shard: rank 0's is never smaller).
    pub memory: MemoryLedger,
    /// Bytes each rank sends per step.
    pub sent_bytes: f64,
    /// Predicted seconds in collectives per step.
    pub comm_seconds: f64,
    /// Predicted seconds in the optimizer kernel per step.
    pub optimizer_seconds: f64,
}

impl Estimate {
    /// Predicted seconds per optimizer step (communication plus the kernel; the forward
    /// and backward passes are the model's and not counted).
    pub fn step_seconds(&self) -> f64 {
        self.comm_seconds + self.optimizer_seconds
    }
}

/// One collective of a step: ring steps and bytes sent per rank.
fn ring(w: usize, bytes: f64, all_reduce: bool) -> (f64, f64) {
    let w = w as f64;
    let k = if all_reduce { 2.0 } else { 1.0 };
    (k * (w - 1.0), k * (w - 1.0) / w * bytes)
}

/// The estimate of `plan` on `machine`; an error for groups the optimizer would refuse.
pub fn estimate(plan: &Plan, machine: &Machine) -> Result<Estimate> {
    let (n, w) = (plan.params, plan.world_size.max(1));
    let p = plan.precision;
    let config = StepConfig { precision: p, ..StepConfig::new(plan.strategy) };
    let shards = plan.strategy.shards_state();
    let (ranges, state_bytes, transforms) = match &plan.optimizer {
        OptimizerPlan::Buffers(k) => {
            let ranges: Vec<_> = (0..w).map(|r| if shards { shard_range(n, w, r) } else { 0..n }).collect();
            let state = (ranges[0].len() * k) as u64 * 4;
            (ranges, state, TransformPlan::default())
        }
        OptimizerPlan::Groups { layout, groups } => {
            if layout.numel() != n {
                return Err(DistError::Invalid(format!("the plan has {n} parameters, its layout {}", layout.numel())));
            }
            let (ranges, transforms) = crate::ShardedOptimizer::ranges_for(&config, layout, groups, w);
            let state = Optimizer::planned_state_bytes(layout, groups, ranges[0].clone())?;
            (ranges, state, transforms)
        }
    };
    // Ranges snapped far from the balanced ones take the staged path, as mixed precision does.
    let mixed = p.param_dtype != FloatDtype::F32
        || p.reduce_dtype != FloatDtype::F32
        || p.loss_scale.is_some()
        || crate::optimizer::halo(&ranges, n, plan.strategy).is_none();
    let owned = ranges[0].len();
    let (psize, rsize) = (p.param_dtype.size() as u64, p.reduce_dtype.size() as u64);
    let kept = if plan.strategy == Strategy::Zero3 { owned } else { n };
    let transient = if mixed { crate::grad_sync::staging_bytes(&config, w, n) + owned as u64 * 4 } else { 0 };
    let memory = MemoryLedger {
        working_params: kept as u64 * psize,
        grads: n as u64 * psize,
        master: if p.has_master() { owned as u64 * 4 } else { 0 },
        optimizer_state: state_bytes,
        comm_buffers: transient + transforms.exchange_bytes(),
    };
    let grad_bytes = (n as u64 * rsize) as f64;
    let param_bytes = (n as u64 * psize) as f64;
    let collectives: Vec<(f64, f64)> = if w == 1 {
        Vec::new()
    } else {
        match plan.strategy {
            Strategy::Ddp => vec![ring(w, grad_bytes, true)],
            Strategy::Zero1 if !mixed => vec![ring(w, grad_bytes, true), ring(w, param_bytes, false)],
            _ => vec![ring(w, grad_bytes, false), ring(w, param_bytes, false)],
        }
    };
    // The whole-matrix transforms' two all-to-alls (Muon's inputs and outputs, in bf16):
    // one message to each other rank, carrying rank 0's pieces.
    let exchange = transforms.sent_bytes(0).map(|b| ((w - 1) as f64, b as f64));
    let collectives: Vec<(f64, f64)> =
        collectives.into_iter().chain(transforms.exchanges().then_some(exchange).into_iter().flatten()).collect();
    let comm_seconds = collectives.iter().fold(0.0, |t, (steps, bytes)| t + steps * machine.alpha + bytes / machine.beta);
    let sent_bytes = collectives.iter().fold(0.0, |t, (_, b)| t + b);
    // The kernel reads g and p, writes p, and reads and writes its state. A
    // mixed step also converts the whole working-type gradient into the staging chunks
    // (read it, write the reduction type), widens the owned result into a freshly zeroed
    // f32 buffer, and rounds the master into the working parameters.
    let kernel = owned as f64 * 12.0 + 2.0 * state_bytes as f64;
    let conversions = if mixed {
        let (ps, rs) = (psize as f64, rsize as f64);
        n as f64 * (ps + rs) + owned as f64 * (rs + 4.0 + 4.0 + 4.0 + ps)
    } else {
        0.0
    };
    // ZeRO-3 allocates its reduction buffer anew each step.
    let fresh = if mixed && plan.strategy == Strategy::Zero3 { owned as f64 * 4.0 / machine.first_touch } else { 0.0 };
    let optimizer_seconds = (kernel + conversions) / machine.memory_bandwidth + fresh;
    Ok(Estimate { memory, sent_bytes, comm_seconds, optimizer_seconds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShardedOptimizer;
    use distoptim_collective::{CommConfig, Communicator};
    use distoptim_optim::{AdamConfig, OptimizerConfig};

    /// The plan's ledger is what a live optimizer reports after a step, for every
    /// strategy, precision and world size.
    #[test]
    fn the_estimate_is_the_live_ledger() {
        let n = 1001;
        let layout = Layout::new([("w", vec![n])]).unwrap();
        let groups = vec![ParamGroup { params: vec![0], config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
        check_ledgers(&layout, &groups, OptimizerPlan::Buffers(2));
        // Muon (its exchange buffers), rules whose ranges snap (8-bit blocks) and whose state
        // is packed (Adafactor), planned from their groups.
        let layout = Layout::new([("a", vec![24, 20]), ("b", vec![24]), ("c", vec![30, 17]), ("d", vec![7])]).unwrap();
        let muon = OptimizerConfig::Muon(distoptim_optim::MuonConfig::default());
        let adamw = OptimizerConfig::Adam(AdamConfig::adamw());
        let q8 = OptimizerConfig::Adamw8bit(distoptim_optim::kernels::Adamw8bitConfig { block_size: 64, ..Default::default() });
        let ada = OptimizerConfig::Adafactor(distoptim_optim::AdafactorConfig::default());
        for groups in [
            vec![ParamGroup { params: vec![0, 2], config: muon }, ParamGroup { params: vec![1, 3], config: adamw.clone() }],
            vec![ParamGroup { params: vec![0, 2], config: q8 }, ParamGroup { params: vec![1, 3], config: adamw }],
            vec![ParamGroup { params: vec![0, 1, 2, 3], config: ada }],
        ] {
            check_ledgers(&layout, &groups, OptimizerPlan::Groups { layout: layout.clone(), groups: groups.clone() });
        }
    }

    fn check_ledgers(layout: &Layout, groups: &[ParamGroup], optimizer: OptimizerPlan) {
        let n = layout.numel();
        let machine = Machine { alpha: 1e-6, beta: 1e9, memory_bandwidth: 1e10, first_touch: 1e9 };
        for w in [1, 3, 4] {
            for strategy in [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3] {
                for precision in [Precision::f32(), Precision::new(FloatDtype::Bf16).with_reduce_dtype(FloatDtype::Bf16)] {
                    let live = Communicator::run_threads(w, &CommConfig::default(), |comm| {
                        let config = StepConfig { precision, ..StepConfig::new(strategy) };
                        let mut opt = ShardedOptimizer::new(comm, layout.clone(), groups.to_vec(), None, config).unwrap();
                        let full = vec![0.5f32; n];
                        opt.set_master(&full).unwrap();
                        if precision.param_dtype == FloatDtype::F32 {
                            opt.step(&mut full.clone(), &mut vec![0.1f32; n], 1).unwrap();
                        } else {
                            let mut p = vec![distoptim_collective::bf16::from_f32(0.5); n];
                            opt.step(&mut p, &mut vec![distoptim_collective::bf16::from_f32(0.1); n], 1).unwrap();
                        }
                        opt.memory()
                    })
                    .unwrap();
                    let plan = Plan { params: n, world_size: w, strategy, precision, optimizer: optimizer.clone() };
                    assert_eq!(estimate(&plan, &machine).unwrap().memory, live[0], "{strategy} W={w} {precision:?} {groups:?}");
                }
            }
        }
    }

    #[test]
    fn bytes_sent_follow_the_ring_counts() {
        let machine = Machine { alpha: 0.0, beta: 1.0, memory_bandwidth: 1e30, first_touch: 1e30 };
        let plan = |strategy, precision| Plan { params: 1000, world_size: 4, strategy, precision, optimizer: OptimizerPlan::Buffers(2) };
        // DDP f32: an all-reduce of 4000 bytes sends 2·3/4 of them.
        assert_eq!(estimate(&plan(Strategy::Ddp, Precision::f32()), &machine).unwrap().sent_bytes, 6000.0);
        // ZeRO-2 bf16/bf16: a reduce-scatter and an all-gather of 2000 bytes each.
        let bf16 = Precision::new(FloatDtype::Bf16).with_reduce_dtype(FloatDtype::Bf16);
        assert_eq!(estimate(&plan(Strategy::Zero2, bf16), &machine).unwrap().sent_bytes, 3000.0);
        assert_eq!(estimate(&plan(Strategy::Zero2, bf16), &machine).unwrap().comm_seconds, 3000.0);
    }
}
