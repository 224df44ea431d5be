//! Whole-matrix transforms under ZeRO (Muon's Newton–Schulz): which rank runs each, and
//! the exchange that brings every matrix's input to it and its output back.
//!
//! Muon's momentum and step are elementwise, so ZeRO shards its state like any other
//! (balanced ranges, matrices cut anywhere); only Newton–Schulz needs a whole matrix
//! ([`Kernel::transforms_whole`]). Each such matrix gets one *worker* rank, chosen by
//! longest-processing-time bin-packing on [`Kernel::transform_cost`] (largest first,
//! each to the least-loaded rank: Megatron's layer-wise Muon balances its owners the
//! same way), independent of where the ranges fall. One step then exchanges twice, for
//! all matrices at once (Moonlight's distributed Muon gathers the inputs the same way,
//! then has every rank run every matrix):
//!
//! 1. the inputs U: every rank contributes the pieces its range holds to one all-gather
//!    over the concatenation of the transformed parameters in layout order (a
//!    contiguous range of it per rank), in bf16 for Muon (whose Newton–Schulz rounds U
//!    to bf16 first and ends on bf16 values, so nothing changes a bit), else in f32;
//! 2. each worker transforms its matrices;
//! 3. the outputs: one all-gather over the same parameters ordered by worker (again a
//!    contiguous range per rank), from which every rank takes its pieces.
//!
//! The transform sees the same whole input as one process would, so the step's bits do
//! not depend on the world size or on who ran it.
//!
//! The exchange is not free (two all-gathers and four copies of every transformed
//! element: in f32 about one elementwise update's memory traffic, [`ELEMENT_COST`]; half
//! that in bf16), and a contiguous partition that keeps every matrix whole on its range's
//! owner, balanced by cost, often comes close to LPT (a stack of identical layers packs
//! evenly). So [`shard`] weighs both and exchanges only when LPT's busiest rank plus the
//! exchange costs less than the contiguous partition's busiest rank.
//!
//! [`ELEMENT_COST`]: distoptim_optim::kernels::ELEMENT_COST
//! [`Kernel::transforms_whole`]: distoptim_optim::kernels::Kernel::transforms_whole
//! [`Kernel::transform_cost`]: distoptim_optim::kernels::Kernel::transform_cost

use std::ops::Range;

use distoptim_collective::{bf16, Communicator};
use distoptim_optim::kernels::ELEMENT_COST;
use distoptim_optim::{Layout, ParamGroup, Transforms};

use crate::config::Strategy;
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::precision::{round_into, widen_into, Working};

/// Where each transformed parameter lives in the two exchanges, and who transforms it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TransformPlan {
    /// Per parameter of the layout: its position among the transformed ones.
    slot: Vec<Option<usize>>,
    /// Per transformed parameter (layout order): its index, worker, offset in the
    /// input exchange and in the output exchange.
    params: Vec<usize>,
    worker: Vec<usize>,
    input_at: Vec<usize>,
    output_at: Vec<usize>,
    /// Per rank: its range of the input exchange (what its state range holds) and of the
    /// output exchange (the matrices it transforms).
    input_ranges: Vec<Range<usize>>,
    output_ranges: Vec<Range<usize>>,
    /// Per rank: the cost of the transforms it runs.
    loads: Vec<f64>,
    /// Whether the exchange carries bf16 (every transforming rule reads and writes bf16
    /// values, [`Kernel::transform_in_bf16`]), else f32.
    ///
    /// [`Kernel::transform_in_bf16`]: distoptim_optim::kernels::Kernel::transform_in_bf16
    bf16: bool,
    /// The exchange's two buffers, kept between steps (faulting fresh pages in each
    /// step costs more than the copies): f32 or bf16.
    buffers: (Vec<f32>, Vec<f32>),
    buffers16: (Vec<bf16>, Vec<bf16>),
}

/// The ranges of a layout sharded over `size` ranks (ZeRO) and how its whole-matrix
/// transforms run: exchanged, over balanced ranges, or on the owners of contiguous
/// ranges that keep each matrix whole, whichever leaves the busiest rank less work (see
/// the module docs).
pub(crate) fn shard(layout: &Layout, groups: &[ParamGroup], size: usize) -> (Vec<Range<usize>>, TransformPlan) {
    let balanced = grad_sync::partition(layout, groups, size, false);
    let transforming = groups.iter().any(|g| g.config.kernel().transforms_whole());
    if size <= 1 || !transforming {
        let plan = TransformPlan::local(layout, groups, &balanced);
        return (balanced, plan);
    }
    let whole = grad_sync::partition(layout, groups, size, true);
    let local = TransformPlan::local(layout, groups, &whole);
    let exchanged = TransformPlan::new(layout, groups, &balanced);
    let exchange_cost = exchanged.elements() as f64 * ELEMENT_COST * exchanged.element_bytes() as f64 / 4.0;
    if exchanged.busiest() + exchange_cost < local.busiest() {
        (balanced, exchanged)
    } else {
        (whole, local)
    }
}

impl TransformPlan {
    /// No exchange: each rank runs the transforms of the matrices its range holds whole
    /// (all of them when it holds everything, as under DDP).
    pub(crate) fn local(layout: &Layout, groups: &[ParamGroup], ranges: &[Range<usize>]) -> TransformPlan {
        let mut loads = vec![0.0; ranges.len()];
        for g in groups.iter().filter(|g| g.config.kernel().transforms_whole()) {
            for &i in g.params.iter().filter(|&&i| i < layout.len()) {
                let spec = layout.param(i);
                // Every rank whose range holds it runs it (under DDP, all of them).
                for (load, range) in loads.iter_mut().zip(ranges) {
                    if !range.is_empty() && range.start <= spec.offset && spec.range().end <= range.end {
                        *load += g.config.kernel().transform_cost(spec);
                    }
                }
            }
        }
        TransformPlan { slot: vec![None; layout.len()], loads, ..Default::default() }
    }

    /// The exchange for `layout` and `groups` on ranks that own `ranges` (one contiguous
    /// range of the layout each, tiling it).
    pub(crate) fn new(layout: &Layout, groups: &[ParamGroup], ranges: &[Range<usize>]) -> TransformPlan {
        let size = ranges.len().max(1);
        let mut plan = TransformPlan { slot: vec![None; layout.len()], loads: vec![0.0; size], ..Default::default() };
        let mut costs = Vec::new();
        plan.bf16 = true;
        for g in groups {
            let kernel = g.config.kernel();
            if !kernel.transforms_whole() {
                continue;
            }
            plan.bf16 &= kernel.transform_in_bf16();
            for &i in &g.params {
                if i < layout.len() {
                    costs.push((i, kernel.transform_cost(layout.param(i))));
                }
            }
        }
        costs.sort_by_key(|&(i, _)| i);
        let mut total = 0;
        for (k, &(i, _)) in costs.iter().enumerate() {
            plan.slot[i] = Some(k);
            plan.params.push(i);
            plan.input_at.push(total);
            total += layout.param(i).numel();
        }
        // LPT: largest first (ties in layout order), each to the least-loaded rank (ties
        // to the lowest): the same answer on every rank.
        let mut order: Vec<usize> = (0..costs.len()).collect();
        order.sort_by(|&a, &b| costs[b].1.total_cmp(&costs[a].1).then(a.cmp(&b)));
        plan.worker = vec![0; costs.len()];
        for k in order {
            let least = (0..size).min_by(|&a, &b| plan.loads[a].total_cmp(&plan.loads[b]).then(a.cmp(&b))).unwrap_or(0);
            plan.worker[k] = least;
            plan.loads[least] += costs[k].1;
        }
        // The output exchange: by worker, then layout order.
        plan.output_at = vec![0; costs.len()];
        let mut at = 0;
        for r in 0..size {
            let start = at;
            for k in (0..costs.len()).filter(|&k| plan.worker[k] == r) {
                plan.output_at[k] = at;
                at += layout.param(plan.params[k]).numel();
            }
            plan.output_ranges.push(start..at);
        }
        // The input exchange: each rank's range of the layout, restricted to the
        // transformed parameters (contiguous, since both run in layout order).
        for range in ranges {
            let (mut lo, mut hi) = (None, 0);
            for (i, piece) in layout.overlapping(range.clone()) {
                if let Some(k) = plan.slot[i] {
                    let start = plan.input_at[k] + piece.start - layout.param(i).offset;
                    lo.get_or_insert(start);
                    hi = start + piece.len();
                }
            }
            // A rank without pieces gets an empty range where its neighbours meet.
            let lo = lo.unwrap_or_else(|| plan.input_ranges.last().map_or(0, |r: &Range<usize>| r.end));
            plan.input_ranges.push(lo..hi.max(lo));
        }
        plan
    }

    /// Whether the step exchanges (else every transform runs where its matrix lies).
    pub(crate) fn exchanges(&self) -> bool {
        !self.params.is_empty()
    }

    /// The transform work of the busiest rank.
    fn busiest(&self) -> f64 {
        self.loads.iter().cloned().fold(0.0, f64::max)
    }

    /// Elements of each exchange buffer (every transformed parameter once).
    pub(crate) fn elements(&self) -> usize {
        self.output_ranges.last().map_or(0, |r| r.end)
    }

    /// Bytes of one exchanged element: 2 in bf16, else 4.
    fn element_bytes(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// The bytes of the exchange's buffers, the gathered inputs and outputs (part of the
    /// memory ledger's communication buffers).
    pub(crate) fn exchange_bytes(&self) -> u64 {
        2 * (self.elements() * self.element_bytes()) as u64
    }

    /// The bytes of one of the exchange's all-gathers.
    pub(crate) fn gather_bytes(&self) -> u64 {
        (self.elements() * self.element_bytes()) as u64
    }

    /// The exchange of one step (collective): gathers the inputs, runs this rank's
    /// transforms, gathers the outputs and writes this rank's pieces of them into `t`.
    pub(crate) fn exchange(&mut self, comm: &Communicator, t: &mut Transforms<'_>) -> Result<()> {
        if self.bf16 {
            let mut buffers = std::mem::take(&mut self.buffers16);
            self.exchange_as(comm, t, &mut buffers)?;
            self.buffers16 = buffers;
        } else {
            let mut buffers = std::mem::take(&mut self.buffers);
            self.exchange_as(comm, t, &mut buffers)?;
            self.buffers = buffers;
        }
        Ok(())
    }

    /// [`exchange`](Self::exchange) carrying the values as `T` (exact: f32, or bf16 for
    /// rules that read and write bf16 values).
    fn exchange_as<T: Working>(&self, comm: &Communicator, t: &mut Transforms<'_>, (input, output): &mut (Vec<T>, Vec<T>)) -> Result<()> {
        let me = comm.rank();
        let n = self.elements();
        input.resize(n, T::default());
        output.resize(n, T::default());
        for p in &t.pieces {
            let k = self.slot(t.layout(), p.param)?;
            let at = self.input_at[k] + p.range.start - t.layout().param(p.param).offset;
            round_into(&t.values[p.at..p.at + p.range.len()], &mut input[at..at + p.range.len()]);
        }
        grad_sync::all_gather_ranges(comm, input, &self.input_ranges)?;
        let mut matrix = Vec::new();
        for k in (0..self.params.len()).filter(|&k| self.worker[k] == me) {
            let numel = t.layout().param(self.params[k]).numel();
            let (from, to) = (self.input_at[k], self.output_at[k]);
            matrix.resize(numel, 0f32);
            widen_into(&input[from..from + numel], &mut matrix);
            t.transform(self.params[k], &mut matrix)?;
            round_into(&matrix, &mut output[to..to + numel]);
        }
        grad_sync::all_gather_ranges(comm, output, &self.output_ranges)?;
        for p in &t.pieces {
            let k = self.slot(t.layout(), p.param)?;
            let at = self.output_at[k] + p.range.start - t.layout().param(p.param).offset;
            widen_into(&output[at..at + p.range.len()], &mut t.values[p.at..p.at + p.range.len()]);
        }
        Ok(())
    }

    fn slot(&self, layout: &Layout, param: usize) -> Result<usize> {
        self.slot.get(param).copied().flatten().ok_or_else(|| {
            DistError::Invalid(format!(
                "parameter {} has no whole-matrix transform in this plan",
                layout.params().get(param).map_or("?", |p| &p.name)
            ))
        })
    }
}

/// The whole-matrix transform work (Muon's Newton–Schulz flops, [`Kernel::transform_cost`])
/// each rank runs per step under `strategy` on `world_size` ranks: the LPT packing under
/// ZeRO, every transform on every rank under DDP (each rank steps everything).
///
/// [`Kernel::transform_cost`]: distoptim_optim::kernels::Kernel::transform_cost
pub fn transform_loads(layout: &Layout, groups: &[ParamGroup], strategy: Strategy, world_size: usize) -> Vec<f64> {
    let w = world_size.max(1);
    if strategy.shards_state() {
        return shard(layout, groups, w).1.loads;
    }
    TransformPlan::local(layout, groups, &vec![0..layout.numel(); w]).loads
}

#[cfg(test)]
mod tests {
    use super::*;
    use distoptim_optim::{AdamConfig, MuonConfig, OptimizerConfig};

    /// LPT gives the largest matrices to different ranks, whatever the layout order, and
    /// both exchanges tile their buffers with one contiguous range per rank.
    #[test]
    fn matrices_are_packed_largest_first_and_the_ranges_tile() {
        let layout =
            Layout::new([("a", vec![8, 8]), ("b", vec![8]), ("c", vec![32, 32]), ("d", vec![16, 16]), ("e", vec![32, 32])]).unwrap();
        let groups = vec![
            ParamGroup { params: vec![0, 2, 3, 4], config: OptimizerConfig::Muon(MuonConfig::default()) },
            ParamGroup { params: vec![1], config: OptimizerConfig::Adam(AdamConfig::adamw()) },
        ];
        let n = layout.numel();
        let ranges: Vec<Range<usize>> = (0..2).map(|r| distoptim_collective::shard_range(n, 2, r)).collect();
        let plan = TransformPlan::new(&layout, &groups, &ranges);
        // c and e (equal, largest) go to ranks 0 and 1, then d to rank 0 (a tie: the
        // lowest), then a to rank 1, the lighter one.
        assert_eq!(plan.worker, vec![1, 0, 0, 1], "a, c, d, e");
        let (l0, l1) = (plan.loads[0], plan.loads[1]);
        assert!((l0 - l1).abs() <= plan.loads.iter().sum::<f64>() * 0.2, "{l0} vs {l1}");
        let transformed = 64 + 1024 + 256 + 1024;
        assert_eq!(plan.elements(), transformed);
        for rs in [&plan.input_ranges, &plan.output_ranges] {
            assert_eq!(rs[0].start, 0);
            assert_eq!(rs[1].end, transformed);
            assert_eq!(rs[0].end, rs[1].start);
        }
        assert!(!TransformPlan::new(&layout, &groups[1..], &ranges).exchanges());
    }

    /// Square matrices of sides `sides` in layout order, Muon, each with an AdamW bias.
    fn squares(sides: &[usize]) -> (Layout, Vec<ParamGroup>) {
        let mut named = Vec::new();
        for (i, &k) in sides.iter().enumerate() {
            named.push((format!("m{i}.weight"), vec![k, k]));
            named.push((format!("m{i}.bias"), vec![k]));
        }
        let layout = Layout::new(named).unwrap();
        let groups = vec![
            ParamGroup { params: (0..layout.len()).step_by(2).collect(), config: OptimizerConfig::Muon(MuonConfig::default()) },
            ParamGroup { params: (1..layout.len()).step_by(2).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) },
        ];
        (layout, groups)
    }

    /// The exchange is taken where LPT's gain pays for it: largest first in layout order
    /// leaves a contiguous partition short of LPT at 2, 3 and 4 ranks (at 2 by less than
    /// the exchange would cost in f32, more than in bf16), not at 5 (both reach the
    /// largest matrix); a stack of equal layers always packs contiguously.
    #[test]
    fn the_exchange_is_taken_where_it_pays() {
        let (layout, groups) = squares(&[256, 256, 224, 224, 192, 192]);
        let n = layout.numel();
        for (size, exchanges) in [(2, true), (3, true), (4, true), (5, false)] {
            let (ranges, plan) = shard(&layout, &groups, size);
            assert_eq!(plan.exchanges(), exchanges, "{size} ranks");
            let local = TransformPlan::local(&layout, &groups, &grad_sync::partition(&layout, &groups, size, true));
            assert!(plan.busiest() <= local.busiest(), "{size} ranks: {:?} vs {:?}", plan.loads, local.loads);
            if exchanges {
                // Balanced ranges, and LPT's busiest rank well under the contiguous one's.
                assert!(ranges.iter().enumerate().all(|(r, range)| *range == distoptim_collective::shard_range(n, size, r)));
                assert!(plan.busiest() + plan.elements() as f64 * ELEMENT_COST / 2.0 < local.busiest(), "{size}");
            } else {
                // Every matrix whole on the rank that runs it.
                for i in (0..layout.len()).step_by(2) {
                    let p = layout.param(i);
                    assert!(ranges.iter().any(|r| r.start <= p.offset && p.range().end <= r.end), "{size}: m{i} cut");
                }
            }
        }
        let (layout, groups) = squares(&[128; 12]);
        for size in 2..=5 {
            assert!(!shard(&layout, &groups, size).1.exchanges(), "{size} ranks");
        }
    }
}
