//! Whole-matrix transforms under ZeRO (Muon's Newton–Schulz): which rank runs each, and
//! the exchange that brings every matrix's input to it and its output back.
//!
//! Muon's momentum and step are elementwise, so ZeRO shards its state like any other
//! (balanced ranges, matrices cut anywhere); only Newton–Schulz needs a whole matrix
//! ([`Kernel::transforms_whole`]). Each such matrix gets one *worker* rank, chosen by
//! longest-processing-time bin-packing on [`Kernel::transform_cost`] (largest first,
//! each to the least-loaded rank: Megatron's layer-wise Muon balances its owners the
//! same way), independent of where the ranges fall. One step then exchanges twice, for
//! all matrices at once, each time one all-to-all (`Communicator::all_to_all`):
//!
//! 1. the inputs U: every rank sends each worker the pieces of that worker's matrices
//!    its range holds, in bf16 for Muon (whose Newton–Schulz rounds U to bf16 first and
//!    ends on bf16 values, so nothing changes a bit), else in f32;
//! 2. each worker assembles its matrices from the pieces (sender order is layout order)
//!    and transforms them;
//! 3. the outputs: the same all-to-all reversed, each piece back to the rank it came
//!    from.
//!
//! A rank sends and receives only its own pieces and matrices, about `2/W` of the
//! transformed elements, where gathering everything would move all of them to every
//! rank. The transform sees the same whole input as one process would, so the step's
//! bits do not depend on the world size or on who ran it.
//!
//! The exchange is not free (two all-to-alls and two copies each way of every piece and
//! matrix element a rank holds: about one elementwise update's memory traffic over them,
//! [`ELEMENT_COST`]; half that in bf16), and a contiguous partition that keeps every
//! matrix whole on its range's owner, balanced by cost, often comes close to LPT (a stack
//! of identical layers packs evenly). So [`shard`] weighs both and exchanges only when
//! LPT's busiest rank, with its exchange, costs less than the contiguous partition's
//! busiest rank.
//!
//! [`ELEMENT_COST`]: distoptim_optim::kernels::ELEMENT_COST
//! [`Kernel::transforms_whole`]: distoptim_optim::kernels::Kernel::transforms_whole
//! [`Kernel::transform_cost`]: distoptim_optim::kernels::Kernel::transform_cost

use std::ops::Range;

use distoptim_collective::{bf16, Communicator, SharedBuf};
use distoptim_optim::kernels::ELEMENT_COST;
use distoptim_optim::{Layout, ParamGroup, Transforms};

use crate::config::Strategy;
use crate::error::{DistError, Result};
use crate::grad_sync;
use crate::precision::{round_into, widen_into, Working};

/// Who transforms each transformed parameter, and which pieces of it each rank holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct TransformPlan {
    /// Per parameter of the layout: its position among the transformed ones.
    slot: Vec<Option<usize>>,
    /// Per transformed parameter (layout order): its index, elements, worker, and offset
    /// in the concatenation of the transformed parameters (the *input space*).
    params: Vec<usize>,
    numel: Vec<usize>,
    worker: Vec<usize>,
    input_at: Vec<usize>,
    /// Per rank: the transformed parameters it works on, in layout order.
    by_worker: Vec<Vec<usize>>,
    /// Per rank: the range of the input space its state range holds.
    input_ranges: Vec<Range<usize>>,
    /// Per rank: the cost of the transforms it runs.
    loads: Vec<f64>,
    /// Whether the exchange carries bf16 (every transforming rule reads and writes bf16
    /// values, [`Kernel::transform_in_bf16`]), else f32.
    ///
    /// [`Kernel::transform_in_bf16`]: distoptim_optim::kernels::Kernel::transform_in_bf16
    bf16: bool,
    /// The most elements any rank holds of the transformed parameters, and the most it
    /// transforms: every rank's two exchange buffers have these lengths (one collective
    /// allocation for all).
    longest: (usize, usize),
    /// The exchange's two buffers.
    buffers: Buffers,
}

/// The exchange's two buffers: this rank's pieces by worker, and its matrices' pieces by
/// sender, in f32 or bf16. Allocated from the communicator at the first exchange, so the
/// all-to-alls read them in place on shm, and kept between steps (faulting fresh pages
/// in each step costs more than the copies). Scratch: not part of the plan's identity,
/// and a clone starts without them.
#[derive(Default)]
struct Buffers {
    f32: Option<(SharedBuf<f32>, SharedBuf<f32>)>,
    bf16: Option<(SharedBuf<bf16>, SharedBuf<bf16>)>,
}

impl Clone for Buffers {
    fn clone(&self) -> Self {
        Buffers::default()
    }
}

impl PartialEq for Buffers {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffers").field("f32", &self.f32.is_some()).field("bf16", &self.bf16.is_some()).finish()
    }
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
    if exchanged.busiest_with_exchange() < local.busiest() {
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
            plan.numel.push(layout.param(i).numel());
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
        plan.by_worker = (0..size).map(|r| (0..costs.len()).filter(|&k| plan.worker[k] == r).collect()).collect();
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
        let held = plan.input_ranges.iter().map(|r| r.len()).max().unwrap_or(0);
        let worked = plan.by_worker.iter().map(|ks| ks.iter().map(|&k| plan.numel[k]).sum()).max().unwrap_or(0);
        plan.longest = (held, worked);
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

    /// The transform work of the busiest rank, with its exchange: [`ELEMENT_COST`] per
    /// element of its pieces and of its matrices (two copies of each way, half the bytes
    /// in bf16).
    fn busiest_with_exchange(&self) -> f64 {
        let per_element = ELEMENT_COST * self.element_bytes() as f64 / 4.0;
        (0..self.loads.len()).map(|r| self.loads[r] + self.exchanged(r) as f64 * per_element).fold(0.0, f64::max)
    }

    /// Elements rank `r` exchanges: the pieces its range holds and those of the matrices
    /// it transforms (the lengths of its two buffers).
    fn exchanged(&self, r: usize) -> usize {
        if !self.exchanges() {
            return 0;
        }
        self.input_ranges[r].len() + self.by_worker[r].iter().map(|&k| self.numel[k]).sum::<usize>()
    }

    /// Bytes of one exchanged element: 2 in bf16, else 4.
    fn element_bytes(&self) -> usize {
        if self.bf16 {
            2
        } else {
            4
        }
    }

    /// The bytes of a rank's exchange buffers (part of the memory ledger's communication
    /// buffers): every rank's are as long as the longest.
    pub(crate) fn exchange_bytes(&self) -> u64 {
        if !self.exchanges() {
            return 0;
        }
        ((self.longest.0.max(1) + self.longest.1.max(1)) * self.element_bytes()) as u64
    }

    /// The bytes rank `r` sends in the two all-to-alls: its pieces of other ranks'
    /// matrices, then the pieces of its matrices that other ranks hold.
    pub(crate) fn sent_bytes(&self, r: usize) -> [u64; 2] {
        if !self.exchanges() {
            return [0, 0];
        }
        let own: usize = self.by_worker[r].iter().map(|&k| self.held(r, k).len()).sum();
        let theirs: usize = self.by_worker[r].iter().map(|&k| self.numel[k]).sum();
        let bytes = |n: usize| (n * self.element_bytes()) as u64;
        [bytes(self.input_ranges[r].len() - own), bytes(theirs - own)]
    }

    /// The part of transformed parameter `k`'s input-space range that rank `r` holds.
    fn held(&self, r: usize, k: usize) -> Range<usize> {
        let (range, at) = (&self.input_ranges[r], self.input_at[k]);
        let start = range.start.max(at);
        start..range.end.min(at + self.numel[k]).max(start)
    }

    /// The exchange of one step (collective): gathers the inputs, runs this rank's
    /// transforms, gathers the outputs and writes this rank's pieces of them into `t`.
    pub(crate) fn exchange(&mut self, comm: &Communicator, t: &mut Transforms<'_>) -> Result<()> {
        if self.bf16 {
            let mut buffers = self.buffers.bf16.take();
            let done = self.exchange_as(comm, t, &mut buffers);
            self.buffers.bf16 = buffers;
            done
        } else {
            let mut buffers = self.buffers.f32.take();
            let done = self.exchange_as(comm, t, &mut buffers);
            self.buffers.f32 = buffers;
            done
        }
    }

    /// [`exchange`](Self::exchange) carrying the values as `T` (exact: f32, or bf16 for
    /// rules that read and write bf16 values).
    fn exchange_as<T: Working>(
        &self,
        comm: &Communicator,
        t: &mut Transforms<'_>,
        buffers: &mut Option<(SharedBuf<T>, SharedBuf<T>)>,
    ) -> Result<()> {
        let (me, size) = (comm.rank(), comm.size());
        let (mine, theirs) = match buffers {
            Some(b) => b,
            None => buffers.insert((comm.alloc::<T>(self.longest.0.max(1))?, comm.alloc::<T>(self.longest.1.max(1))?)),
        };
        // Mine: this rank's pieces, grouped by worker (each group in layout order).
        let mut at_mine = vec![0; self.params.len()];
        let mut to_worker = vec![0; size];
        let mut at = 0;
        for (w, ks) in self.by_worker.iter().enumerate() {
            for &k in ks {
                at_mine[k] = at;
                at += self.held(me, k).len();
            }
            to_worker[w] = at - to_worker[..w].iter().sum::<usize>();
        }
        let mine = &mut mine[..at];
        // Where a piece starting `within` its parameter lies in `mine`.
        let place = |k: usize, within: usize| at_mine[k] + self.input_at[k] + within - self.held(me, k).start;
        for p in &t.pieces {
            let k = self.slot(t.layout(), p.param)?;
            let at = place(k, p.range.start - t.layout().param(p.param).offset);
            round_into(&t.values[p.at..p.at + p.range.len()], &mut mine[at..at + p.range.len()]);
        }
        // Theirs: the pieces of this rank's matrices, by sender (each in layout order).
        let ks = &self.by_worker[me];
        let mut at_theirs = vec![vec![0; ks.len()]; size];
        let mut from_sender = vec![0; size];
        let mut at = 0;
        for (r, starts) in at_theirs.iter_mut().enumerate() {
            for (j, &k) in ks.iter().enumerate() {
                starts[j] = at;
                at += self.held(r, k).len();
            }
            from_sender[r] = at - from_sender[..r].iter().sum::<usize>();
        }
        let theirs = &mut theirs[..at];
        comm.all_to_all(mine, &to_worker, theirs, &from_sender)?;
        let mut matrix = Vec::new();
        for (j, &k) in ks.iter().enumerate() {
            matrix.resize(self.numel[k], 0f32);
            let pieces = (0..size).map(|r| (self.held(r, k), at_theirs[r][j])).filter(|(held, _)| !held.is_empty());
            for (held, at) in pieces.clone() {
                let into = held.start - self.input_at[k];
                widen_into(&theirs[at..at + held.len()], &mut matrix[into..into + held.len()]);
            }
            t.transform(self.params[k], &mut matrix)?;
            for (held, at) in pieces {
                let from = held.start - self.input_at[k];
                round_into(&matrix[from..from + held.len()], &mut theirs[at..at + held.len()]);
            }
        }
        comm.all_to_all(theirs, &from_sender, mine, &to_worker)?;
        for p in &t.pieces {
            let k = self.slot(t.layout(), p.param)?;
            let at = place(k, p.range.start - t.layout().param(p.param).offset);
            widen_into(&mine[at..at + p.range.len()], &mut t.values[p.at..p.at + p.range.len()]);
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
        let rs = &plan.input_ranges;
        assert_eq!((rs[0].start, rs[0].end, rs[1].end), (0, rs[1].start, transformed));
        // Each rank's buffers: its range's pieces and its matrices.
        assert_eq!(plan.exchanged(0), rs[0].len() + 1024 + 256);
        assert_eq!(plan.exchanged(1), rs[1].len() + 64 + 1024);
        assert_eq!(plan.longest, (rs[0].len().max(rs[1].len()), 1024 + 256));
        assert_eq!(plan.exchange_bytes(), 2 * (plan.longest.0 + plan.longest.1) as u64, "bf16");
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
                assert!(plan.busiest_with_exchange() < local.busiest(), "{size}");
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
