//! Sums whose result does not depend on the order or grouping of their terms: the
//! reduction of deterministic mode, which gives the same bits at any world size, on any
//! backend.
//!
//! Floating-point addition is not associative, so a sum reduced in another order (more
//! ranks, another ring, another engine) rounds differently. Both sums here avoid rounding
//! until the very end, so the order cannot matter:
//!
//! - [`BinnedSum`], per element of a gradient (in the style of ReproBLAS's binned sums):
//!   each f32 term is split exactly at fixed 40-bit boundaries of the absolute scale
//!   (`2^-149` up), and every element keeps the integer sums of the two highest bins any
//!   term reached. Integer sums are exact, and which bins are kept depends only on the
//!   largest term, so the result is the same for any order. Pieces below the two kept
//!   bins are dropped: each term keeps at least 40 significant bits relative to the
//!   element's largest term (an f32 sum keeps 24 relative to its running total).
//! - [`ExactSum`], one scalar over many f64 terms (the squared gradient norm): a Kulisch
//!   accumulator of 32-bit digits in i64 words covering the whole f64 range, exact.
//!
//! Across ranks, [`BinnedSum::reduce`] all-reduces the per-element top bins (MAX, one byte
//! an element), aligns to them and sums the two i64 words (reduce-scatter or all-reduce);
//! [`ExactSum::all_reduce`] sums its digits. Integer MAX and SUM are associative on every
//! backend, so shm, threads and MPI give the same bits.

use crate::comm::Communicator;
use crate::element::ReduceOp;
use crate::error::{CommError, Result};
use crate::partition::shard_range;

/// Bits per bin of [`BinnedSum`]. A 24-bit mantissa shifted within a bin spans at most
/// two bins, and an i64 holds 2^23 pieces of 40 bits without overflow.
const BIN: u32 = 40;
const BIN_MASK: u64 = (1 << BIN) - 1;
/// The top bin of an element that saw an infinity or NaN: its sum is NaN.
const NONFINITE: u8 = u8::MAX;
/// How many terms an element may receive in all (over every rank) before the i64 words
/// could overflow.
pub const MAX_TERMS: u64 = 1 << 22;

/// A reproducible per-element sum of f32 vectors (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct BinnedSum {
    /// Per element: the highest bin any term reached (the window is `top-1..=top`).
    top: Vec<u8>,
    /// The integer sum of the pieces in bin `top`.
    hi: Vec<i64>,
    /// The integer sum of the pieces in bin `top - 1`.
    lo: Vec<i64>,
    /// Terms added on this rank.
    terms: u64,
}

impl BinnedSum {
    /// An empty sum of vectors of `len` elements (17 bytes an element).
    pub fn new(len: usize) -> BinnedSum {
        BinnedSum { top: vec![0; len], hi: vec![0; len], lo: vec![0; len], terms: 0 }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.top.len()
    }

    /// Whether the vectors are empty.
    pub fn is_empty(&self) -> bool {
        self.top.is_empty()
    }

    /// Terms added on this rank since the last [`clear`](Self::clear).
    pub fn terms(&self) -> u64 {
        self.terms
    }

    /// Starts a new sum, keeping the memory.
    pub fn clear(&mut self) {
        self.top.fill(0);
        self.hi.fill(0);
        self.lo.fill(0);
        self.terms = 0;
    }

    /// Adds the vector `x` (exactly, up to the pieces below each element's window).
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        if x.len() != self.len() {
            return Err(CommError::invalid("BinnedSum::add", format!("{} elements, the sum has {}", x.len(), self.len())));
        }
        if self.terms >= MAX_TERMS {
            return Err(CommError::invalid("BinnedSum::add", format!("more than {MAX_TERMS} terms would overflow the bins")));
        }
        self.terms += 1;
        for (((&v, t), h), l) in x.iter().zip(&mut self.top).zip(&mut self.hi).zip(&mut self.lo) {
            deposit(v, t, h, l);
        }
        Ok(())
    }

    /// Sums over the group: afterwards `out` holds the rounded total of the elements
    /// `out_range` (every element for `None`; else this rank's `shard_range` of the
    /// group, the reduce-scatter's, and `out` is that long). Every rank must call it with
    /// the same `len` and the same choice; the result has the same bits whatever the
    /// group's size, the order of the terms and the backend.
    pub fn reduce(&mut self, comm: &Communicator, sharded: bool, out: &mut [f32]) -> Result<()> {
        let range = if sharded { shard_range(self.len(), comm.size(), comm.rank()) } else { 0..self.len() };
        if out.len() != range.len() {
            return Err(CommError::invalid("BinnedSum::reduce", format!("out has {} elements, expected {}", out.len(), range.len())));
        }
        let mut terms = [self.terms as i64];
        comm.all_reduce(&mut terms, ReduceOp::Sum)?;
        if terms[0] as u64 > MAX_TERMS {
            return Err(CommError::invalid("BinnedSum::reduce", format!("{} terms over the group, at most {MAX_TERMS}", terms[0])));
        }
        let mut global = self.top.clone();
        comm.all_reduce(&mut global, ReduceOp::Max)?;
        for (((g, t), h), l) in global.iter().zip(&mut self.top).zip(&mut self.hi).zip(&mut self.lo) {
            align(*g, t, h, l);
        }
        if sharded {
            comm.reduce_scatter(&mut self.hi, ReduceOp::Sum)?;
            comm.reduce_scatter(&mut self.lo, ReduceOp::Sum)?;
        } else {
            comm.all_reduce(&mut self.hi, ReduceOp::Sum)?;
            comm.all_reduce(&mut self.lo, ReduceOp::Sum)?;
        }
        for (i, o) in range.zip(out.iter_mut()) {
            *o = round(self.top[i], self.hi[i], self.lo[i]);
        }
        Ok(())
    }

    /// The rounded total of this rank's terms alone (no communication).
    pub fn local_total(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.len() {
            return Err(CommError::invalid(
                "BinnedSum::local_total",
                format!("out has {} elements, the sum has {}", out.len(), self.len()),
            ));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = round(self.top[i], self.hi[i], self.lo[i]);
        }
        Ok(())
    }
}

/// Splits `x` at the fixed bin boundaries and adds its pieces into the element's window.
#[inline(always)]
fn deposit(x: f32, top: &mut u8, hi: &mut i64, lo: &mut i64) {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xff;
    if exp == 0xff {
        *top = NONFINITE;
        return;
    }
    let mant = (bits & 0x7f_ffff) | (u32::from(exp != 0) << 23);
    if mant == 0 || *top == NONFINITE {
        return;
    }
    // The value is mant * 2^(p - 149): its lowest bit sits p bits above 2^-149.
    let p = exp.max(1) - 1;
    let k = (p / BIN) as u8;
    let v = u64::from(mant) << (p % BIN);
    let (vh, vl) = ((v >> BIN) as i64, (v & BIN_MASK) as i64);
    let t = if vh != 0 { k + 1 } else { k };
    if t > *top {
        *lo = if t == *top + 1 { *hi } else { 0 };
        *hi = 0;
        *top = t;
    }
    let (vh, vl) = if bits >> 31 != 0 { (-vh, -vl) } else { (vh, vl) };
    // Piece vh is in bin k + 1, vl in bin k; only the window top-1..=top is kept.
    if k + 1 == *top {
        *hi += vh;
        *lo += vl;
    } else if k == *top {
        *hi += vl;
    } else if k + 2 == *top {
        *lo += vh;
    }
}

/// Moves an element's window up to the group's top bin `global` (dropping what falls out).
#[inline(always)]
fn align(global: u8, top: &mut u8, hi: &mut i64, lo: &mut i64) {
    if global == *top {
        return;
    }
    if global == NONFINITE || global > *top + 1 {
        *lo = 0;
    } else {
        *lo = *hi;
    }
    *hi = 0;
    *top = global;
}

/// The f32 nearest (by way of f64) to the element's exact total.
#[inline(always)]
fn round(top: u8, hi: i64, lo: i64) -> f32 {
    if top == NONFINITE {
        return f32::NAN;
    }
    let total = (i128::from(hi) << BIN) + i128::from(lo);
    (total as f64 * pow2(i32::from(top) * BIN as i32 - BIN as i32 - 149)) as f32
}

/// 2^e as an f64, exactly (e within the normal range).
fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// Words of [`ExactSum`]: 32-bit digits from 2^-1106 (below the smallest f64) past 2^1024.
const DIGITS: usize = 70;
/// The weight of digit 0.
const LOWEST: i32 = -1106;

/// An exact sum of f64 terms (a Kulisch accumulator; see the module docs).
#[derive(Clone, Debug)]
pub struct ExactSum {
    /// Digit i weighs 2^(32 i + LOWEST); each word holds a 32-bit digit plus carries.
    words: [i64; DIGITS],
    /// Terms added since the carries were last propagated.
    pending: u32,
    /// A NaN or infinite term was added.
    nonfinite: bool,
}

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum { words: [0; DIGITS], pending: 0, nonfinite: false }
    }
}

impl ExactSum {
    /// Zero.
    pub fn new() -> ExactSum {
        ExactSum::default()
    }

    /// Adds `x` exactly.
    #[inline]
    pub fn add(&mut self, x: f64) {
        let bits = x.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i32;
        if exp == 0x7ff {
            self.nonfinite = true;
            return;
        }
        let mant = (bits & ((1 << 52) - 1)) | (u64::from(exp != 0) << 52);
        if mant == 0 {
            return;
        }
        // x = mant * 2^(e - 1075); its lowest bit is `shift` bits above digit 0's weight.
        let shift = (exp.max(1) - 1075 - LOWEST) as u32;
        let (word, offset) = ((shift / 32) as usize, shift % 32);
        let v = u128::from(mant) << offset;
        let sign = if bits >> 63 != 0 { -1 } else { 1 };
        for d in 0..3 {
            self.words[word + d] += sign * ((v >> (32 * d)) as u32 as i64);
        }
        self.pending += 1;
        if self.pending >= 1 << 30 {
            self.normalize();
        }
    }

    /// Adds every term of `xs` after mapping it with `f` (computed the same way anywhere).
    pub fn add_all(&mut self, xs: &[f32], f: impl Fn(f32) -> f64) {
        for &x in xs {
            self.add(f(x));
        }
    }

    /// Adds another exact sum.
    pub fn merge(&mut self, other: &ExactSum) {
        self.normalize();
        let mut other = other.clone();
        other.normalize();
        for (a, b) in self.words.iter_mut().zip(other.words) {
            *a += b;
        }
        self.nonfinite |= other.nonfinite;
        self.normalize();
    }

    /// Propagates carries so each word but the top holds a digit in [0, 2^32).
    fn normalize(&mut self) {
        let mut carry = 0i64;
        for w in self.words.iter_mut() {
            let v = *w + carry;
            carry = v >> 32;
            *w = v & 0xffff_ffff;
        }
        // The top word takes what is left (the sign lives there).
        self.words[DIGITS - 1] += carry << 32;
        self.pending = 0;
    }

    /// Sums over the group (exactly: any group size and order gives the same bits).
    pub fn all_reduce(&mut self, comm: &Communicator) -> Result<()> {
        self.normalize();
        let mut buf = [0i64; DIGITS + 1];
        buf[..DIGITS].copy_from_slice(&self.words);
        buf[DIGITS] = i64::from(self.nonfinite);
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        self.words.copy_from_slice(&buf[..DIGITS]);
        self.nonfinite = buf[DIGITS] != 0;
        self.normalize();
        Ok(())
    }

    /// The sum rounded to f64 (NaN when a term was not finite).
    pub fn value(&self) -> f64 {
        if self.nonfinite {
            return f64::NAN;
        }
        let mut s = self.clone();
        s.normalize();
        // The magnitude in digits (lower words in [0, 2^32) after normalizing), then the sign.
        let negative = s.words[DIGITS - 1] < 0;
        if negative {
            s.words.iter_mut().for_each(|w| *w = -*w);
            s.normalize();
        }
        let Some(top) = s.words.iter().rposition(|&w| w != 0) else { return 0.0 };
        // The top three digits (96 bits) round to the same f64 on every rank, as the
        // digits are the same on every rank.
        let lowest = top.saturating_sub(2);
        let mut acc: u128 = 0;
        for i in (lowest..=top).rev() {
            acc = (acc << 32) | s.words[i] as u32 as u128;
        }
        let e = 32 * lowest as i32 + LOWEST;
        let half = e / 2;
        let magnitude = acc as f64 * pow2(half.clamp(-1022, 1023)) * pow2((e - half).clamp(-1022, 1023));
        if negative {
            -magnitude
        } else {
            magnitude
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CommConfig;

    /// A generator of gradient-like numbers over many magnitudes.
    fn terms(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                let e = ((s >> 3) % 40) as i32 - 30;
                ((u - 0.5) * 2f64.powi(e)) as f32
            })
            .collect()
    }

    #[test]
    fn binned_sums_do_not_depend_on_order_and_beat_f32() {
        let (n, k) = (500, 64);
        let vectors: Vec<Vec<f32>> = (0..k).map(|i| terms(i as u64, n)).collect();
        let total = |order: &[usize]| {
            let mut s = BinnedSum::new(n);
            order.iter().for_each(|&i| s.add(&vectors[i]).unwrap());
            let mut out = vec![0f32; n];
            s.local_total(&mut out).unwrap();
            out
        };
        let forward: Vec<usize> = (0..k).collect();
        let reverse: Vec<usize> = (0..k).rev().collect();
        let mut shuffled = forward.clone();
        shuffled.sort_by_key(|&i| (i * 37) % k);
        let a = total(&forward);
        assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), total(&reverse).iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), total(&shuffled).iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        // Against the f64 reference, element by element: never worse than the f32 sum by
        // more than the final rounding.
        let (mut err_binned, mut err_f32) = (0f64, 0f64);
        for j in 0..n {
            let exact: f64 = vectors.iter().map(|v| f64::from(v[j])).sum();
            let f32_sum: f32 = vectors.iter().map(|v| v[j]).sum();
            let e = (f64::from(a[j]) - exact).abs();
            assert!(e <= (exact.abs() * 2f64.powi(-24)).max(1e-45), "element {j}: {} vs {exact}", a[j]);
            err_binned += e;
            err_f32 += (f64::from(f32_sum) - exact).abs();
        }
        assert!(err_binned <= err_f32, "binned error {err_binned} vs f32 {err_f32}");
    }

    #[test]
    fn binned_handles_cancellation_extremes_and_nonfinite() {
        let mut s = BinnedSum::new(4);
        s.add(&[1e10, f32::MIN_POSITIVE * 1e-3, 3.0, 1.0]).unwrap();
        s.add(&[2.5, f32::MIN_POSITIVE * 1e-3, -3.0, f32::INFINITY]).unwrap();
        s.add(&[-1e10, 0.0, 1e-8, 0.0]).unwrap();
        let mut out = [0f32; 4];
        s.local_total(&mut out).unwrap();
        assert_eq!(1e10f32 + 2.5 - 1e10, 0.0);
        assert_eq!(out[0], 2.5, "1e10 + 2.5 - 1e10 loses 2.5 in f32, not here");
        assert_eq!(out[1], 2.0 * (f32::MIN_POSITIVE * 1e-3));
        assert_eq!(out[2], 1e-8);
        assert!(out[3].is_nan());
    }

    #[test]
    fn group_sums_are_the_same_bits_at_any_world_size() {
        let (n, k) = (1001, 12);
        let vectors: Vec<Vec<f32>> = (0..k).map(|i| terms(100 + i as u64, n)).collect();
        let mut reference: Option<Vec<u32>> = None;
        for world in [1usize, 2, 3, 5, 7] {
            for sharded in [false, true] {
                let outs = Communicator::run_threads(world, &CommConfig::default(), |comm| {
                    let mut s = BinnedSum::new(n);
                    for i in shard_range(k, comm.size(), comm.rank()) {
                        s.add(&vectors[i]).unwrap();
                    }
                    let range = if sharded { shard_range(n, comm.size(), comm.rank()) } else { 0..n };
                    let mut out = vec![0f32; range.len()];
                    s.reduce(&comm, sharded, &mut out).unwrap();
                    out
                })
                .unwrap();
                let bits: Vec<u32> = if sharded { outs.concat() } else { outs[world - 1].clone() }.iter().map(|x| x.to_bits()).collect();
                match &reference {
                    None => reference = Some(bits),
                    Some(r) => assert_eq!(&bits, r, "world {world} sharded {sharded}"),
                }
            }
        }
    }

    #[test]
    fn exact_sums_are_exact_and_group_invariant() {
        let xs = terms(7, 10_000);
        let mut forward = ExactSum::new();
        xs.iter().for_each(|&x| forward.add(f64::from(x) * f64::from(x)));
        let mut backward = ExactSum::new();
        xs.iter().rev().for_each(|&x| backward.add(f64::from(x) * f64::from(x)));
        assert_eq!(forward.value().to_bits(), backward.value().to_bits());
        let reference: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((forward.value() - reference).abs() <= reference * 1e-12);
        let mut c = ExactSum::new();
        [1e300, 1.0, -1e300, 1e-300].iter().for_each(|&x| c.add(x));
        assert_eq!(c.value(), 1.0 + 1e-300);
        let mut d = ExactSum::new();
        [-2.5, 1.0].iter().for_each(|&x| d.add(x));
        assert_eq!(d.value(), -1.5);
        for world in [2usize, 3] {
            let got = Communicator::run_threads(world, &CommConfig::default(), |comm| {
                let mut s = ExactSum::new();
                shard_range(xs.len(), comm.size(), comm.rank()).for_each(|i| s.add(f64::from(xs[i]) * f64::from(xs[i])));
                s.all_reduce(&comm).unwrap();
                s.value().to_bits()
            })
            .unwrap();
            assert!(got.iter().all(|&b| b == forward.value().to_bits()), "world {world}");
        }
    }
}
