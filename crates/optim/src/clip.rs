//! Gradient clipping by global norm, exactly `torch.nn.utils.clip_grad_norm_`.
//!
//! Split in three as torch 2.6+ splits it, because a distributed caller must combine the
//! partial norms of its shards (an all-reduce) between the first and the last part:
//! 1. [`partial_norm`] of each local buffer (Σ|g|^p, or max|g| for inf), combined with
//!    [`NormType::combine`];
//! 2. [`NormType::total`] turns the combined partial into the norm n (an f32, as torch's);
//! 3. [`clip_with_norm`] multiplies every gradient by `min(max_norm / (n + 1e-6), 1)`.
//!
//! Partials are accumulated in f64 over fixed-size chunks, so the norm is the same bits
//! with any number of threads and closer to the exact value than an f32 sum.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// Elements per partial sum; fixed so results do not depend on the thread count.
const NORM_CHUNK: usize = 64 * 1024;

/// The `norm_type` of `clip_grad_norm_`: a finite p > 0, or infinity (max |g|).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum NormType {
    /// The p-norm, p finite and > 0.
    P(f64),
    /// The largest magnitude.
    Inf,
}

impl NormType {
    /// `p` as torch's `norm_type` (`f64::INFINITY` for the max norm); refuses p <= 0 and NaN.
    pub fn new(p: f64) -> Result<Self> {
        if p == f64::INFINITY {
            Ok(NormType::Inf)
        } else if p.is_finite() && p > 0.0 {
            Ok(NormType::P(p))
        } else {
            Err(OptimError::InvalidConfig(format!("norm_type must be a positive number or inf, got {p}")))
        }
    }

    /// The contribution of one element.
    #[inline(always)]
    pub fn term(self, g: f32) -> f64 {
        let a = (g as f64).abs();
        match self {
            NormType::Inf => a,
            NormType::P(1.0) => a,
            NormType::P(2.0) => a * a,
            NormType::P(p) => a.powf(p),
        }
    }

    /// Combines two partials (a sum, or a max that propagates NaN as torch's does).
    pub fn combine(self, a: f64, b: f64) -> f64 {
        match self {
            NormType::Inf => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            }
            NormType::P(_) => a + b,
        }
    }

    /// The partial of nothing: the identity of [`combine`](Self::combine).
    pub fn zero(self) -> f64 {
        0.0
    }

    /// The norm n from the combined partial of every element.
    pub fn total(self, partial: f64) -> f32 {
        let n = match self {
            NormType::Inf => partial,
            NormType::P(1.0) => partial,
            NormType::P(2.0) => partial.sqrt(),
            NormType::P(p) => partial.powf(1.0 / p),
        };
        n as f32
    }
}

/// Independent accumulators per chunk. Element i of a chunk always goes to lane i % LANES
/// and the lanes are combined in one fixed tree, so the result does not depend on the
/// thread count; with no dependency between neighbouring elements the compiler keeps
/// several vector accumulators in flight and the pass runs at memory speed instead of
/// one f64 add latency per element.
const LANES: usize = 16;

/// A lane accumulator of one norm: Σ|g|^p in f64 lanes, or max|g| in f32 lanes (max is
/// exact, so its lanes change nothing but the speed; NaN is remembered apart and wins,
/// as in torch).
trait Lanes: Default + Clone {
    /// Adds `block[j]` to lane j (a block of at most LANES elements starting at lane 0).
    fn add(&mut self, block: &[f32]);
    /// Adds one element to lane `lane`.
    fn add_one(&mut self, lane: usize, g: f32);
    fn finish(self) -> f64;
}

#[derive(Clone, Debug, Default)]
struct SumLanes<const P2: bool, const P1: bool> {
    lanes: [f64; LANES],
    p: f64,
}

impl<const P2: bool, const P1: bool> SumLanes<P2, P1> {
    /// Monomorphic for the common norms, so the term folds to g² or |g|.
    #[inline(always)]
    fn norm(&self) -> NormType {
        if P2 {
            NormType::P(2.0)
        } else if P1 {
            NormType::P(1.0)
        } else {
            NormType::P(self.p)
        }
    }
}

impl<const P2: bool, const P1: bool> Lanes for SumLanes<P2, P1> {
    #[inline(always)]
    fn add(&mut self, block: &[f32]) {
        let norm = self.norm();
        for (acc, &g) in self.lanes.iter_mut().zip(block) {
            *acc += norm.term(g);
        }
    }

    fn add_one(&mut self, lane: usize, g: f32) {
        self.lanes[lane] += self.norm().term(g);
    }

    fn finish(self) -> f64 {
        // Pairwise (0+1, 2+3, …, then the pairs): one fixed order.
        let mut lanes = self.lanes;
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                lanes[i] = lanes[2 * i] + lanes[2 * i + 1];
            }
        }
        lanes[0]
    }
}

#[derive(Clone, Debug, Default)]
struct MaxLanes {
    lanes: [f32; LANES],
    nan: bool,
}

impl Lanes for MaxLanes {
    #[inline(always)]
    fn add(&mut self, block: &[f32]) {
        for (m, &g) in self.lanes.iter_mut().zip(block) {
            let a = g.abs();
            self.nan |= a.is_nan();
            *m = if a > *m { a } else { *m };
        }
    }

    fn add_one(&mut self, lane: usize, g: f32) {
        let a = g.abs();
        self.nan |= a.is_nan();
        let m = &mut self.lanes[lane];
        *m = if a > *m { a } else { *m };
    }

    fn finish(self) -> f64 {
        if self.nan {
            return f64::NAN;
        }
        f64::from(self.lanes.into_iter().fold(0f32, f32::max))
    }
}

/// One chunk's partial after dividing it in place, block by block: element i goes to lane
/// i % LANES, so this has the bits of dividing the whole buffer and then reading it.
#[inline(always)]
fn chunk_with<L: Lanes>(mut acc: L, c: &mut [f32], divisor: f32) -> f64 {
    let mut blocks = c.chunks_exact_mut(LANES);
    for block in &mut blocks {
        // A fixed-size block: the compiler unrolls and vectorises both loops.
        let block: &mut [f32; LANES] = block.try_into().expect("chunks_exact gives LANES");
        block.iter_mut().for_each(|g| *g /= divisor);
        acc.add(block);
    }
    let tail = blocks.into_remainder();
    tail.iter_mut().for_each(|g| *g /= divisor);
    acc.add(tail);
    acc.finish()
}

/// One chunk's partial: element i goes to lane i % LANES.
#[inline(always)]
fn chunk_read<L: Lanes>(acc: L, c: &[f32]) -> f64 {
    feed_aligned(acc, c).finish()
}

/// The partial norm of one buffer: Σ|g|^p, or max|g| for inf. Fixed chunks, each in
/// fixed lanes, combined in chunk order: the same bits with any number of threads.
pub fn partial_norm(grads: &[f32], norm: NormType) -> f64 {
    let read = |c: &[f32]| chunk_norm_read(c, norm);
    if grads.len() <= NORM_CHUNK {
        return read(grads);
    }
    let partials: Vec<f64> = grads.par_chunks(NORM_CHUNK).map(read).collect();
    partials.into_iter().fold(norm.zero(), |a, b| norm.combine(a, b))
}

fn chunk_norm_read(c: &[f32], norm: NormType) -> f64 {
    match norm {
        NormType::Inf => chunk_read(MaxLanes::default(), c),
        NormType::P(2.0) => chunk_read(SumLanes::<true, false>::default(), c),
        NormType::P(1.0) => chunk_read(SumLanes::<false, true>::default(), c),
        NormType::P(p) => chunk_read(SumLanes::<false, false> { p, ..Default::default() }, c),
    }
}

/// [`partial_norm`] of a buffer that arrives in pieces (a collective hands over each
/// block it has reduced): fed the pieces in order, it returns the same bits as
/// `partial_norm` of their concatenation, whatever the pieces' sizes.
#[derive(Clone, Debug)]
pub struct NormAccumulator {
    norm: NormType,
    state: AccState,
    /// Elements of the current chunk seen so far.
    pos: usize,
    /// The finished chunks, combined in order.
    total: f64,
    /// Whether any chunk was finished.
    chunks: bool,
}

#[derive(Clone, Debug)]
enum AccState {
    Sum2(SumLanes<true, false>),
    Sum1(SumLanes<false, true>),
    SumP(SumLanes<false, false>),
    Max(MaxLanes),
}

impl NormAccumulator {
    /// An empty accumulator of `norm`.
    pub fn new(norm: NormType) -> NormAccumulator {
        NormAccumulator { norm, state: Self::fresh(norm), pos: 0, total: norm.zero(), chunks: false }
    }

    fn fresh(norm: NormType) -> AccState {
        match norm {
            NormType::Inf => AccState::Max(MaxLanes::default()),
            NormType::P(2.0) => AccState::Sum2(SumLanes::default()),
            NormType::P(1.0) => AccState::Sum1(SumLanes::default()),
            NormType::P(p) => AccState::SumP(SumLanes { p, ..Default::default() }),
        }
    }

    /// Adds the next piece of the buffer.
    pub fn add(&mut self, mut piece: &[f32]) {
        while !piece.is_empty() {
            let take = (NORM_CHUNK - self.pos).min(piece.len());
            let (now, rest) = piece.split_at(take);
            match &mut self.state {
                AccState::Sum2(l) => *l = feed(l.clone(), self.pos, now),
                AccState::Sum1(l) => *l = feed(l.clone(), self.pos, now),
                AccState::SumP(l) => *l = feed(l.clone(), self.pos, now),
                AccState::Max(l) => *l = feed(l.clone(), self.pos, now),
            }
            self.pos += take;
            if self.pos == NORM_CHUNK {
                self.close_chunk();
            }
            piece = rest;
        }
    }

    fn close_chunk(&mut self) {
        let done = std::mem::replace(&mut self.state, Self::fresh(self.norm));
        let partial = match done {
            AccState::Sum2(l) => l.finish(),
            AccState::Sum1(l) => l.finish(),
            AccState::SumP(l) => l.finish(),
            AccState::Max(l) => l.finish(),
        };
        self.total = if self.chunks { self.norm.combine(self.total, partial) } else { partial };
        self.chunks = true;
        self.pos = 0;
    }

    /// The partial norm of everything added.
    pub fn finish(mut self) -> f64 {
        if self.pos > 0 || !self.chunks {
            self.close_chunk();
        }
        self.total
    }
}

/// Adds `piece` to lanes that have seen `pos` elements of their chunk: the head one by
/// one up to a lane boundary, then whole blocks, then the tail. Takes and returns the
/// lanes by value, in a function of its own, so they stay in registers through the loop.
#[inline(never)]
fn feed<L: Lanes>(lanes: L, pos: usize, piece: &[f32]) -> L {
    if pos.is_multiple_of(LANES) {
        // Aligned (the collectives hand over blocks of a multiple of LANES): the same
        // loop as a whole chunk's.
        return feed_aligned(lanes, piece);
    }
    feed_unaligned(lanes, pos, piece)
}

#[inline(always)]
fn feed_aligned<L: Lanes>(mut lanes: L, piece: &[f32]) -> L {
    let mut blocks = piece.chunks_exact(LANES);
    for block in &mut blocks {
        let block: &[f32; LANES] = block.try_into().expect("chunks_exact gives LANES");
        lanes.add(block);
    }
    lanes.add(blocks.remainder());
    lanes
}

fn feed_unaligned<L: Lanes>(mut lanes: L, pos: usize, piece: &[f32]) -> L {
    let head = ((LANES - pos % LANES) % LANES).min(piece.len());
    for (j, &g) in piece[..head].iter().enumerate() {
        lanes.add_one((pos + j) % LANES, g);
    }
    feed_aligned(lanes, &piece[head..])
}

/// torch's clip coefficient: `max_norm / (n + 1e-6)` in f32, clamped to at most 1
/// (NaN stays NaN, as `torch.clamp` keeps it).
pub fn clip_coefficient(max_norm: f64, total_norm: f32) -> f32 {
    let c = max_norm as f32 / (total_norm + 1e-6f32);
    if c > 1.0 {
        1.0
    } else {
        c
    }
}

/// Divides every gradient by `divisor` (the mean of a reduction) and returns the
/// partial norm of the result, in one pass, with the same bits as dividing and then
/// calling [`partial_norm`] (same chunks, same lanes, same order). A divisor of 1 (SUM,
/// or one rank) only reads: x / 1 == x, so nothing is written back.
pub fn divide_and_partial_norm(grads: &mut [f32], divisor: f32, norm: NormType) -> f64 {
    if divisor == 1.0 {
        return partial_norm(grads, norm);
    }
    if grads.len() <= NORM_CHUNK {
        return chunk_divide(grads, norm, divisor);
    }
    let partials: Vec<f64> = grads.par_chunks_mut(NORM_CHUNK).map(|c| chunk_divide(c, norm, divisor)).collect();
    partials.into_iter().fold(norm.zero(), |a, b| norm.combine(a, b))
}

fn chunk_divide(c: &mut [f32], norm: NormType, d: f32) -> f64 {
    match norm {
        NormType::Inf => chunk_with(MaxLanes::default(), c, d),
        NormType::P(2.0) => chunk_with(SumLanes::<true, false>::default(), c, d),
        NormType::P(1.0) => chunk_with(SumLanes::<false, true>::default(), c, d),
        NormType::P(p) => chunk_with(SumLanes::<false, false> { p, ..Default::default() }, c, d),
    }
}

/// Scales `grads` by the clip coefficient of `total_norm`.
pub fn clip_with_norm(grads: &mut [f32], max_norm: f64, total_norm: f32) {
    let c = clip_coefficient(max_norm, total_norm);
    if c == 1.0 {
        return; // x·1 == x: skip the pass
    }
    grads.par_chunks_mut(NORM_CHUNK).for_each(|chunk| chunk.iter_mut().for_each(|g| *g *= c));
}

/// Fails with [`OptimError::NonFinite`] if `error_if_nonfinite` and n is NaN or ±inf.
pub fn check_finite(total_norm: f32, error_if_nonfinite: bool) -> Result<()> {
    if error_if_nonfinite && !total_norm.is_finite() {
        return Err(OptimError::NonFinite(total_norm));
    }
    Ok(())
}

/// `clip_grad_norm_` on one process: returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64, norm: NormType, error_if_nonfinite: bool) -> Result<f32> {
    let n = norm.total(partial_norm(grads, norm));
    check_finite(n, error_if_nonfinite)?;
    clip_with_norm(grads, max_norm, n);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_of_a_known_vector() {
        let g = [3.0f32, -4.0, 0.0];
        assert_eq!(NormType::P(2.0).total(partial_norm(&g, NormType::P(2.0))), 5.0);
        assert_eq!(NormType::P(1.0).total(partial_norm(&g, NormType::P(1.0))), 7.0);
        assert_eq!(NormType::Inf.total(partial_norm(&g, NormType::Inf)), 4.0);
        let p3 = NormType::P(3.0).total(partial_norm(&g, NormType::P(3.0)));
        assert!((p3 - 91f32.cbrt()).abs() < 1e-5);
    }

    #[test]
    fn clipping_scales_to_max_norm_and_returns_the_old_norm() {
        let mut g = [3.0f32, -4.0];
        let n = clip_grad_norm(&mut g, 1.0, NormType::P(2.0), false).unwrap();
        assert_eq!(n, 5.0);
        let c = 1.0f32 / (5.0 + 1e-6);
        assert_eq!(g, [3.0 * c, -4.0 * c]);
        let mut small = [0.1f32, 0.1];
        clip_grad_norm(&mut small, 1.0, NormType::P(2.0), false).unwrap();
        assert_eq!(small, [0.1, 0.1]);
    }

    #[test]
    fn nonfinite_is_reported_only_when_asked() {
        let mut g = [1.0f32, f32::NAN];
        assert!(matches!(clip_grad_norm(&mut g.clone(), 1.0, NormType::Inf, true), Err(OptimError::NonFinite(_))));
        assert!(clip_grad_norm(&mut g, 1.0, NormType::Inf, false).unwrap().is_nan());
        let mut g = [f32::INFINITY];
        assert!(clip_grad_norm(&mut g, 1.0, NormType::P(2.0), true).is_err());
    }

    #[test]
    fn partials_combine_like_one_buffer() {
        let g: Vec<f32> = (0..200_000).map(|i| ((i * 7919) % 1000) as f32 / 333.0 - 1.5).collect();
        for norm in [NormType::P(1.0), NormType::P(2.0), NormType::Inf] {
            let whole = partial_norm(&g, norm);
            let (a, b) = g.split_at(77_777);
            let split = norm.combine(partial_norm(a, norm), partial_norm(b, norm));
            assert!((whole - split).abs() <= 1e-9 * whole.abs(), "{norm:?}");
        }
    }
}

#[cfg(test)]
mod fused_tests {
    use super::*;

    #[test]
    fn lanes_give_the_same_bits_on_any_thread_count_and_stay_accurate() {
        let n = NORM_CHUNK * 5 + 1234;
        let g: Vec<f32> = (0..n).map(|i| ((i * 7919) % 10007) as f32 * 1e-3 - 5.0).collect();
        for norm in [NormType::P(1.0), NormType::P(2.0), NormType::Inf, NormType::P(3.0)] {
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| (partial_norm(&g, norm), divide_and_partial_norm(&mut g.clone(), 3.0, norm)))
            };
            let one = on(1);
            for threads in [2, 3, 4] {
                let got = on(threads);
                assert_eq!((got.0.to_bits(), got.1.to_bits()), (one.0.to_bits(), one.1.to_bits()), "{norm:?} on {threads} threads");
            }
            // As accurate as an f64 sum in element order (both are f64 accumulations).
            let exact: f64 = match norm {
                NormType::Inf => g.iter().map(|x| f64::from(x.abs())).fold(0.0, f64::max),
                _ => g.iter().map(|&x| norm.term(x)).sum(),
            };
            assert!((one.0 - exact).abs() <= 1e-12 * exact, "{norm:?}: {} vs {exact}", one.0);
        }
        // Fed in pieces of any size, the accumulator gives the same bits.
        for norm in [NormType::P(1.0), NormType::P(2.0), NormType::Inf, NormType::P(3.0)] {
            for piece in [1, 7, 16, 1000, 1024, NORM_CHUNK - 5, NORM_CHUNK, 3 * NORM_CHUNK + 1] {
                let mut acc = NormAccumulator::new(norm);
                g.chunks(piece).for_each(|p| acc.add(p));
                assert_eq!(acc.finish().to_bits(), partial_norm(&g, norm).to_bits(), "{norm:?} in pieces of {piece}");
            }
            assert_eq!(NormAccumulator::new(norm).finish().to_bits(), partial_norm(&[], norm).to_bits());
            let mut small = NormAccumulator::new(norm);
            small.add(&g[..100]);
            assert_eq!(small.finish().to_bits(), partial_norm(&g[..100], norm).to_bits());
        }
        let mut with_nan = g.clone();
        with_nan[NORM_CHUNK + 3] = f32::NAN;
        assert!(partial_norm(&with_nan, NormType::Inf).is_nan() && partial_norm(&with_nan, NormType::P(2.0)).is_nan());
    }

    #[test]
    fn fused_divide_and_norm_has_the_bits_of_the_two_passes() {
        let n = NORM_CHUNK * 3 + 17;
        let base: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.013 - 6.0).collect();
        for norm in [NormType::P(1.0), NormType::P(2.0), NormType::Inf, NormType::P(2.5)] {
            let mut fused = base.clone();
            let got = divide_and_partial_norm(&mut fused, 3.0, norm);
            let mut plain = base.clone();
            plain.iter_mut().for_each(|g| *g /= 3.0);
            assert_eq!(got.to_bits(), partial_norm(&plain, norm).to_bits(), "{norm:?}");
            assert_eq!(fused, plain);
        }
    }
}
