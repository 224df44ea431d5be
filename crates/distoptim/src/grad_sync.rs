//! Gradient synchronisation: weighting, the reduction over the group, the division.
//!
//! All modes use one SUM reduction of the (weighted) gradients, plus for
//! `batch_weighted` one of the batch sizes, so the result equals the sequential
//! Σ_r w_r·g_r / d to the bit on the embedded backends (they sum in rank order). `mean`
//! lets the collective divide as it writes each reduced element (AVG: the f32 sum, then
//! one division by the group size, the same bits as dividing afterwards), which saves a
//! pass over memory; for `batch_weighted` the division is left to the caller, which fuses
//! it with the clip's norm pass over the elements it owns.

use crate::config::{ReduceMode, StepConfig};
use crate::error::{DistError, Result};
use crate::precision::{widen_into, FloatDtype, Working};
use distoptim_collective::{bf16, shard_range, Communicator, ReduceOp, SharedBuf};
use distoptim_optim::{Layout, ParamGroup};
use std::ops::Range;

/// Multiplies the local gradient by its weight; returns the divisor once the group's
/// weights are known.
pub(crate) fn weigh(comm: &Communicator, grads: &mut [f32], mode: ReduceMode, batch_size: usize) -> Result<f32> {
    let w = local_weight(mode, batch_size);
    if w != 1.0 {
        grads.iter_mut().for_each(|g| *g *= w);
    }
    divisor(comm, mode, batch_size)
}

/// What this rank's gradient is multiplied by before the SUM: its batch size under
/// `batch_weighted`, else 1.
pub(crate) fn local_weight(mode: ReduceMode, batch_size: usize) -> f32 {
    match mode {
        ReduceMode::BatchWeighted => batch_size as f32,
        ReduceMode::Sum | ReduceMode::Mean => 1.0,
    }
}

/// What the SUM is divided by: 1, the group size, or the group's total batch size (one
/// all-reduce of the counts).
pub(crate) fn divisor(comm: &Communicator, mode: ReduceMode, batch_size: usize) -> Result<f32> {
    match mode {
        ReduceMode::Sum => Ok(1.0),
        ReduceMode::Mean => Ok(comm.size() as f32),
        ReduceMode::BatchWeighted => {
            let mut total = [batch_size as f64];
            comm.all_reduce(&mut total, ReduceOp::Sum)?;
            if total[0] <= 0.0 {
                return Err(DistError::Invalid("batch_weighted reduction: every rank reported batch size 0".into()));
            }
            Ok(total[0] as f32)
        }
    }
}

/// The collective's operator for `mode` and what is left to divide by afterwards: AVG
/// and 1 for `mean` (the collective divides), SUM and `divisor` otherwise.
pub(crate) fn reduction(mode: ReduceMode, divisor: f32) -> (ReduceOp, f32) {
    match mode {
        ReduceMode::Mean => (ReduceOp::Avg, 1.0),
        ReduceMode::Sum | ReduceMode::BatchWeighted => (ReduceOp::Sum, divisor),
    }
}

/// All-reduces `grads` with `op` in buckets of `bucket` elements, in the same order on
/// every rank.
pub(crate) fn all_reduce(comm: &Communicator, grads: &mut [f32], bucket: usize, op: ReduceOp) -> Result<()> {
    all_reduce_observed(comm, grads, bucket, op, &mut |_| {})
}

/// [`all_reduce`] handing this rank's part of each bucket's result to `observe`.
pub(crate) fn all_reduce_observed(
    comm: &Communicator,
    grads: &mut [f32],
    bucket: usize,
    op: ReduceOp,
    observe: &mut dyn FnMut(&[f32]),
) -> Result<()> {
    for chunk in grads.chunks_mut(bucket) {
        comm.all_reduce_observed(chunk, op, observe)?;
    }
    Ok(())
}

/// Divides by the reduction's divisor (a no-op for SUM).
pub(crate) fn divide(grads: &mut [f32], divisor: f32) {
    if divisor != 1.0 {
        grads.iter_mut().for_each(|g| *g /= divisor);
    }
}

/// The mixed-precision reduction: this rank's working-type gradient `grads`, weighted and
/// summed over the group in `reduce_dtype`, divided, into `out` as f32 (per `config`): over the whole
/// buffer (DDP) or over this rank's range `shard_range(numel, W, rank)`
/// (ZeRO). It runs in chunks of about a bucket, so no rank ever holds a full f32
/// copy of the gradient: under ZeRO each chunk gathers the next bucket/W elements of
/// every rank's range into one staging buffer and reduce-scatters it (Megatron pads its
/// buckets to a multiple of the data-parallel size for the same reason).
///
/// `reduce_dtype` f32 gives Σ w_r·g_r / d exactly as the f32 step does. bf16 is DDP's
/// `bf16_compress_hook`: each rank's c_r = bf(g_r) is pre-divided by W (`mean`) or
/// multiplied by its batch size (`batch_weighted`) and rounded, the collective sums the
/// bf16 values (accumulating in f32, one rounding at the end) and the result is widened.
///
/// `observe` sees each finished chunk of `out` (for the clip's norm; over the whole
/// buffer each rank sees its balanced part of every chunk, so partials sum over the
/// group) unless a division is left (`batch_weighted`), which the caller then applies
/// and measures itself; the return value says whether it did.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_working<T: Working>(
    comm: &Communicator,
    grads: &[T],
    config: &StepConfig,
    ranges: &[Range<usize>],
    batch_size: usize,
    staging: &mut Staging,
    out: &mut [f32],
    observe: &mut dyn FnMut(&[f32]),
) -> Result<bool> {
    let (mode, reduce_dtype) = (config.reduce, config.precision.reduce_dtype);
    let sharded = config.strategy.shards_state();
    let w = local_weight(mode, batch_size);
    let d = divisor(comm, mode, batch_size)?;
    let size = comm.size() as f32;
    let observed = mode != ReduceMode::BatchWeighted;
    let mut none = |_: &[f32]| {};
    let observe: &mut dyn FnMut(&[f32]) = if observed { observe } else { &mut none };
    let len = (staging_bytes(config, comm.size(), grads.len()) / reduce_dtype.size() as u64) as usize;
    match reduce_dtype {
        FloatDtype::F32 => {
            let op = if mode == ReduceMode::Mean { ReduceOp::Avg } else { ReduceOp::Sum };
            let buf = staging.f32(comm, len)?;
            reduce_chunks::<T, f32>(comm, grads, sharded.then_some(ranges), buf, op, |g| g.to_f32() * w, out, observe)?;
            if mode == ReduceMode::BatchWeighted {
                divide(out, d);
            }
        }
        FloatDtype::Bf16 | FloatDtype::F16 => {
            let compress = move |g: T| {
                let c = bf16::from_f32(g.to_f32());
                match mode {
                    ReduceMode::Mean => bf16::from_f32(c.to_f32() / size),
                    ReduceMode::BatchWeighted => bf16::from_f32(c.to_f32() * w),
                    ReduceMode::Sum => c,
                }
            };
            let buf = staging.bf16(comm, len)?;
            reduce_chunks::<T, bf16>(comm, grads, sharded.then_some(ranges), buf, ReduceOp::Sum, compress, out, observe)?;
            if mode == ReduceMode::BatchWeighted {
                divide(out, d);
            }
        }
    }
    Ok(observed)
}

/// The staging buffers of [`reduce_working`], from the group's shared memory (so the
/// collective reads peers' chunks in place), allocated at the first mixed-precision step
/// (collectively: every rank steps) and kept.
#[derive(Default)]
pub(crate) struct Staging {
    f32: Option<SharedBuf<f32>>,
    bf16: Option<SharedBuf<bf16>>,
}

impl Staging {
    fn f32(&mut self, comm: &Communicator, len: usize) -> Result<&mut [f32]> {
        if self.f32.as_ref().is_none_or(|b| b.len() != len) {
            self.f32 = Some(comm.alloc(len)?);
        }
        Ok(self.f32.as_mut().map_or(&mut [][..], |b| &mut b[..]))
    }

    fn bf16(&mut self, comm: &Communicator, len: usize) -> Result<&mut [bf16]> {
        if self.bf16.as_ref().is_none_or(|b| b.len() != len) {
            self.bf16 = Some(comm.alloc(len)?);
        }
        Ok(self.bf16.as_mut().map_or(&mut [][..], |b| &mut b[..]))
    }
}

/// The ranges of a sharded layout, one per rank, contiguous and in rank order. Without a
/// whole-parameter rule (Adafactor; with `whole_transforms` also Muon, whose
/// Newton–Schulz then runs on each range's owner instead of where `transforms` sends it)
/// they are the balanced `shard_range`s. With one, every parameter of such a rule must
/// stay whole on one owner, and the owners' work can differ by far more than their
/// element counts (Newton–Schulz grows with m·n·min(m,n)), so two partitions are weighed
/// by the busiest rank's [`Kernel::cost`] (plus [`Kernel::transform_cost`] for Muon):
/// - the balanced ranges with every boundary that would cut a whole parameter moved to
///   its end (the collectives' own partition where no boundary moves);
/// - the contiguous partition that minimises the busiest rank's cost (bisection on that
///   cost, each candidate packed greedily in layout order), elementwise parameters cut
///   anywhere, whole ones never.
///
/// The second is taken when it lowers the busiest rank's cost by more than 5%. Either way
/// no rank holds more than a balanced share plus the largest parameter, the bound the
/// conformance cases check.
///
/// [`Kernel::cost`]: distoptim_optim::kernels::Kernel::cost
/// [`Kernel::transform_cost`]: distoptim_optim::kernels::Kernel::transform_cost
pub(crate) fn partition(layout: &Layout, groups: &[ParamGroup], size: usize, whole_transforms: bool) -> Vec<Range<usize>> {
    let n = layout.numel();
    // Per parameter: whole or not, its quantization block (1: none) and its cost per step.
    let mut whole = vec![false; layout.len()];
    let mut block = vec![1usize; layout.len()];
    let mut cost: Vec<f64> = layout.params().iter().map(|p| p.numel() as f64 * distoptim_optim::kernels::ELEMENT_COST).collect();
    for g in groups {
        for &i in &g.params {
            if let (Some(w), Some(b), Some(c)) = (whole.get_mut(i), block.get_mut(i), cost.get_mut(i)) {
                let (kernel, spec) = (g.config.kernel(), layout.param(i));
                let transform = whole_transforms && kernel.transforms_whole();
                *w = !g.config.elementwise() || transform;
                *b = kernel.block().max(1);
                *c = kernel.cost(spec) + if transform { kernel.transform_cost(spec) } else { 0.0 };
            }
        }
    }
    let mut bounds: Vec<usize> = (0..size).map(|r| shard_range(n, size, r).start).collect();
    bounds.push(n);
    if !whole.contains(&true) && block.iter().all(|&b| b == 1) {
        return bounds.windows(2).map(|w| w[0]..w[1]).collect();
    }
    // A boundary inside a whole parameter moves to its end; inside a quantization block,
    // to the block's end.
    for b in bounds.iter_mut().skip(1) {
        if let Some((i, p)) = layout.params().iter().enumerate().find(|(_, p)| p.range().start < *b && *b < p.range().end) {
            let (start, end) = (p.range().start, p.range().end);
            if whole[i] {
                *b = end;
            } else {
                *b = (start + (*b - start).div_ceil(block[i]) * block[i]).min(end);
            }
        }
    }
    for r in 1..bounds.len() {
        bounds[r] = bounds[r].max(bounds[r - 1]);
    }
    let snapped: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
    if !whole.contains(&true) {
        return snapped;
    }
    let busiest = |ranges: &[Range<usize>]| ranges.iter().map(|r| range_cost(layout, &cost, r)).fold(0.0, f64::max);
    let limit = n.div_ceil(size) + layout.params().iter().map(|p| p.numel()).max().unwrap_or(0);
    let (mut lo, mut hi) = (0.0f64, busiest(&snapped));
    let mut best: Option<Vec<Range<usize>>> = None;
    for _ in 0..60 {
        let c = (lo + hi) / 2.0;
        match pack(layout, &whole, &block, &cost, size, limit, c) {
            Some(ranges) => {
                hi = c;
                best = Some(ranges);
            }
            None => lo = c,
        }
    }
    match best {
        Some(ranges) if busiest(&ranges) < 0.95 * busiest(&snapped) => ranges,
        _ => snapped,
    }
}

/// The cost of the elements `range` (parameters cut by it count in proportion).
fn range_cost(layout: &Layout, cost: &[f64], range: &Range<usize>) -> f64 {
    layout.overlapping(range.clone()).map(|(i, piece)| cost[i] * piece.len() as f64 / layout.param(i).numel().max(1) as f64).sum()
}

/// Packs the layout in order into at most `size` contiguous ranges of cost <= `budget`
/// and at most `limit` elements each, cutting only elementwise parameters, and those only
/// between their quantization blocks; `None` when it does not fit.
fn pack(
    layout: &Layout,
    whole: &[bool],
    block: &[usize],
    cost: &[f64],
    size: usize,
    limit: usize,
    budget: f64,
) -> Option<Vec<Range<usize>>> {
    let mut starts = vec![0usize];
    let (mut used, mut elems) = (0.0f64, 0usize);
    for (i, p) in layout.params().iter().enumerate() {
        let range = p.range();
        if range.is_empty() {
            continue;
        }
        if whole[i] {
            if cost[i] > budget || range.len() > limit {
                return None;
            }
            if used + cost[i] > budget || elems + range.len() > limit {
                starts.push(range.start);
                (used, elems) = (0.0, 0);
            }
            used += cost[i];
            elems += range.len();
            continue;
        }
        let per = cost[i] / range.len() as f64;
        let mut at = range.start;
        while at < range.end {
            let room = if per > 0.0 { ((budget - used) / per).floor().max(0.0) as usize } else { usize::MAX };
            let mut take = room.min(limit - elems).min(range.end - at);
            if at + take < range.end {
                take -= take % block[i];
            }
            if take == 0 {
                if elems == 0 {
                    return None;
                }
                starts.push(at);
                (used, elems) = (0.0, 0);
                continue;
            }
            used += per * take as f64;
            elems += take;
            at += take;
        }
    }
    if starts.len() > size {
        return None;
    }
    starts.resize(size, layout.numel());
    starts.push(layout.numel());
    Some(starts.windows(2).map(|w| w[0]..w[1]).collect())
}

/// All-gathers `buf` whose ranges `ranges[r]` rank r holds (contiguous, tiling the
/// buffer), through equal staging blocks (the collective's own partition is balanced).
pub(crate) fn all_gather_ranges<T: Working>(comm: &Communicator, buf: &mut [T], ranges: &[Range<usize>]) -> Result<()> {
    let (size, me) = (comm.size(), comm.rank());
    let longest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    let block = ((1usize << 20) / size).max(1).min(longest.max(1));
    let mut staging = vec![T::default(); size * block];
    for k in (0..longest).step_by(block) {
        let mine = (ranges[me].start + k).min(ranges[me].end)..(ranges[me].start + k + block).min(ranges[me].end);
        let len = mine.len();
        staging[me * block..me * block + len].copy_from_slice(&buf[mine]);
        comm.all_gather(&mut staging)?;
        for (r, range) in ranges.iter().enumerate() {
            let theirs = (range.start + k).min(range.end)..(range.start + k + block).min(range.end);
            let len = theirs.len();
            buf[theirs].copy_from_slice(&staging[r * block..r * block + len]);
        }
    }
    Ok(())
}

/// Elements of [`reduce_working`]'s staging chunk: a bucket, at most 4 MiB.
pub(crate) fn staging_elems(config: &StepConfig) -> usize {
    config.bucket_elems().min((4 << 20) / config.precision.reduce_dtype.size()).max(1)
}

/// Bytes of the staging buffer [`reduce_working`] allocates on a group of `size` ranks
/// for `numel` elements.
pub(crate) fn staging_bytes(config: &StepConfig, size: usize, numel: usize) -> u64 {
    let chunk = staging_elems(config).min(numel.div_ceil(size) * size);
    let len = if config.strategy.shards_state() { chunk / size * size } else { chunk }.max(size);
    len as u64 * config.precision.reduce_dtype.size() as u64
}

/// [`reduce_working`]'s chunked collective: converts with `convert` into staging buffers
/// of type `R`, reduces with `op`, widens the result into `out`: the whole buffer, or
/// with `ranges` (one contiguous range per rank, tiling the buffer) this rank's range.
#[allow(clippy::too_many_arguments)]
fn reduce_chunks<T: Working, R: Working>(
    comm: &Communicator,
    grads: &[T],
    ranges: Option<&[Range<usize>]>,
    staging: &mut [R],
    op: ReduceOp,
    convert: impl Fn(T) -> R,
    out: &mut [f32],
    observe: &mut dyn FnMut(&[f32]),
) -> Result<()> {
    let (size, me, n) = (comm.size(), comm.rank(), grads.len());
    let Some(ranges) = ranges else {
        let chunk = staging.len().max(1);
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let s = &mut staging[..end - start];
            s.iter_mut().zip(&grads[start..end]).for_each(|(s, g)| *s = convert(*g));
            comm.all_reduce(s, op)?;
            widen_into(s, &mut out[start..end]);
            // Every rank holds the whole chunk: each observes its balanced part of it, so
            // the partial norms sum to the chunk's once.
            let part = shard_range(end - start, size, me);
            observe(&out[start + part.start..start + part.end]);
        }
        return Ok(());
    };
    let longest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    let block = (staging.len() / size).max(1).min(longest.max(1));
    let staging = &mut staging[..size * block];
    for k in (0..longest).step_by(block) {
        for (r, range) in ranges.iter().enumerate() {
            let src = (range.start + k).min(range.end)..(range.start + k + block).min(range.end);
            let dst = &mut staging[r * block..(r + 1) * block];
            let len = src.len();
            dst[..len].iter_mut().zip(&grads[src]).for_each(|(s, g)| *s = convert(*g));
            dst[len..].fill(R::default());
        }
        comm.reduce_scatter(staging, op)?;
        let mine = (ranges[me].len().saturating_sub(k)).min(block);
        if mine > 0 {
            widen_into(&staging[me * block..me * block + mine], &mut out[k..k + mine]);
            observe(&out[k..k + mine]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use distoptim_optim::{AdafactorConfig, AdamConfig, MuonConfig, OptimizerConfig};

    /// Matrices of mixed shapes under `matrices`, each with an AdamW bias.
    fn mixed(matrices: OptimizerConfig) -> (Layout, Vec<ParamGroup>) {
        let shapes = [(1024, 1024), (256, 256), (2048, 512), (512, 512), (1024, 256), (768, 768), (128, 1024), (1536, 1024)];
        let mut named = Vec::new();
        for (i, &(r, c)) in shapes.iter().enumerate() {
            named.push((format!("m{i}.weight"), vec![r, c]));
            named.push((format!("m{i}.bias"), vec![r]));
        }
        let layout = Layout::new(named).unwrap();
        let groups = vec![
            ParamGroup { params: (0..layout.len()).step_by(2).collect(), config: matrices },
            ParamGroup { params: (1..layout.len()).step_by(2).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) },
        ];
        (layout, groups)
    }

    #[test]
    fn owners_are_balanced_by_cost_within_the_element_bound() {
        let (layout, groups) = mixed(OptimizerConfig::Adafactor(AdafactorConfig::default()));
        let n = layout.numel();
        let cost = |range: &Range<usize>| -> f64 {
            layout
                .overlapping(range.clone())
                .map(|(i, piece)| {
                    let p = layout.param(i);
                    groups[i % 2].config.kernel().cost(p) * piece.len() as f64 / p.numel() as f64
                })
                .sum()
        };
        let largest_matrix = (0..layout.len()).step_by(2).map(|i| groups[0].config.kernel().cost(layout.param(i))).fold(0.0, f64::max);
        for size in [2usize, 3, 4, 5] {
            let ranges = partition(&layout, &groups, size, false);
            assert_eq!(ranges.len(), size);
            assert_eq!((ranges[0].start, ranges[size - 1].end), (0, n), "they tile the buffer");
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            let bound = n.div_ceil(size) + layout.params().iter().map(|p| p.numel()).max().unwrap();
            assert!(ranges.iter().all(|r| r.len() <= bound), "{size}: {ranges:?} past {bound}");
            for (i, p) in layout.params().iter().enumerate().step_by(2) {
                assert!(ranges.iter().any(|r| r.start <= p.offset && p.range().end <= r.end), "{size}: matrix {i} is cut");
            }
            // The busiest rank carries no more than the mean plus the largest matrix
            // (greedy's guarantee).
            let costs: Vec<f64> = ranges.iter().map(&cost).collect();
            let (max, mean) = (costs.iter().cloned().fold(0.0, f64::max), costs.iter().sum::<f64>() / size as f64);
            assert!(max <= mean + largest_matrix * 1.01, "{size}: {costs:?}");
        }
        // Elementwise-only layouts keep the collectives' balanced ranges, and so do
        // Muon's: its matrices may be cut, as only Newton–Schulz needs them whole and
        // that runs wherever the exchange assembles them (`transforms`).
        let adam = vec![ParamGroup { params: (0..layout.len()).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
        let (_, muon) = mixed(OptimizerConfig::Muon(MuonConfig::default()));
        for groups in [adam, muon] {
            let ranges = partition(&layout, &groups, 3, false);
            assert!(ranges.iter().enumerate().all(|(r, range)| *range == shard_range(n, 3, r)));
        }
    }
}
