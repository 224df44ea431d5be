//! Sums whose result does not depend on the order or grouping of their terms: the
//! reduction of deterministic mode, which gives the same bits at any world size, on any
//! backend.
//!
//! Floating-point addition is not associative, so a sum reduced in another order (more
//! ranks, another ring, another engine) rounds differently. Both sums here avoid rounding
//! until the very end, so the order cannot matter:
//!
//! - [`ReproducibleSum`], per element of a gradient: every term of an element is turned
//!   into an integer on a fixed-point scale set by the element's largest term over the
//!   whole group (an all-reduce MAX of one exponent byte per element), the integers are
//!   summed (locally, then by an integer reduce-scatter or all-reduce), and the total is
//!   rounded back to f32 once. The scale keeps 51 bits below the largest term's leading
//!   bit (an f32 sum keeps 24 relative to its running total) and depends only on that
//!   term, so it is the same at every world size.
//! - [`ExactSum`], one scalar over many terms (the squared gradient norm): a Kulisch
//!   accumulator of 32-bit digits in i64 words covering the whole f64 range, exact.
//!
//! Integer MAX and SUM are associative on every backend, so shm, threads and MPI give
//! the same bits.

use crate::comm::Communicator;
use crate::element::ReduceOp;
use crate::error::{CommError, Result};
use crate::partition::shard_range;
use crate::shared::buffer::SharedBuf;

/// The exponent byte of an element that saw an infinity or NaN: summed plainly.
const NONFINITE: u8 = u8::MAX;
/// Elements per block of the fixed-point pass (its i64 sums stay in L1).
const BLOCK: usize = 4096;
/// The most terms a sum may have in all (their fixed-point integers, each below 2^51,
/// must sum below 2^63).
pub const MAX_TERMS: usize = 1 << 12;

/// A reproducible per-element sum of f32 vectors (see the module docs). It keeps the
/// terms it is given (4 bytes an element each) until [`reduce`](Self::reduce), which
/// needs the group's largest term of each element before any term is scaled.
#[derive(Debug, Default)]
pub struct ReproducibleSum {
    len: usize,
    /// The number of terms over the group the scale is set for.
    total_terms: usize,
    /// Buffers of the terms added since the last reduce (the first `used`), kept for reuse.
    terms: Vec<Vec<f32>>,
    used: usize,
    /// Per element, in the group's shared memory (reduced in place): the largest biased
    /// exponent of any term over the group, and the fixed-point sum.
    shared: Option<(SharedBuf<u8>, SharedBuf<i64>)>,
}

impl ReproducibleSum {
    /// An empty sum of vectors of `len` elements that will have `total_terms` terms over
    /// the whole group (at most; 1..=[`MAX_TERMS`]). Keep `total_terms` the same in the
    /// runs to compare: it sets the fixed-point scale.
    pub fn new(len: usize, total_terms: usize) -> Result<ReproducibleSum> {
        scale_bits(total_terms, 0)?;
        Ok(ReproducibleSum { len, total_terms, ..Default::default() })
    }

    /// The number of terms over the group the sum is set for.
    pub fn total_terms(&self) -> usize {
        self.total_terms
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the vectors are empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Terms added on this rank since the last reduce.
    pub fn terms(&self) -> usize {
        self.used
    }

    /// Forgets the terms added (keeping the memory).
    pub fn clear(&mut self) {
        self.used = 0;
    }

    /// The bytes this sum holds (its term buffers and the per-element scratch).
    pub fn bytes(&self) -> u64 {
        let scratch = self.shared.as_ref().map_or(0, |(e, a)| e.len() + a.len() * 8);
        (self.terms.iter().map(|t| t.capacity() * 4).sum::<usize>() + scratch) as u64
    }

    /// The buffer of the next term, to be filled whole by the caller (its old contents
    /// are left over from an earlier term): writing a gradient here saves the copy
    /// [`add`](Self::add) makes.
    pub fn next_term(&mut self) -> Result<&mut [f32]> {
        if self.used >= self.total_terms {
            return Err(CommError::invalid(
                "ReproducibleSum::next_term",
                format!("more than the {} terms the sum was set for", self.total_terms),
            ));
        }
        if self.terms.len() == self.used {
            self.terms.push(vec![0.0; self.len]);
        }
        self.used += 1;
        Ok(&mut self.terms[self.used - 1])
    }

    /// Adds the vector `x` as a term.
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        if x.len() != self.len {
            return Err(CommError::invalid("ReproducibleSum::add", format!("{} elements, the sum has {}", x.len(), self.len)));
        }
        self.next_term()?.copy_from_slice(x);
        Ok(())
    }

    /// Sums the terms of every rank of the group (at most `total_terms` in all).
    /// Afterwards `out` holds the rounded total of every element (`sharded` false) or of
    /// this rank's `shard_range` of the group (the reduce-scatter's). Every rank calls
    /// it; the result has the same bits whatever the group's size, the order of the
    /// terms and the backend. The terms are forgotten.
    pub fn reduce(&mut self, comm: &Communicator, sharded: bool, out: &mut [f32]) -> Result<()> {
        let range = if sharded { shard_range(self.len, comm.size(), comm.rank()) } else { 0..self.len };
        if out.len() != range.len() {
            return Err(CommError::invalid("ReproducibleSum::reduce", format!("out has {} elements, expected {}", out.len(), range.len())));
        }
        let mut count = [self.used as i64];
        comm.all_reduce(&mut count, ReduceOp::Sum)?;
        let q = scale_bits(self.total_terms, count[0] as usize)?;
        if self.shared.is_none() {
            self.shared = Some((comm.alloc(self.len)?, comm.alloc(self.len)?));
        }
        let Some((exps, acc)) = self.shared.as_mut() else { unreachable!("allocated above") };
        let terms = &self.terms[..self.used];
        local_exponents(terms, exps);
        comm.all_reduce(&mut exps[..], ReduceOp::Max)?;
        fixed_point(terms, exps, acc, q);
        if sharded {
            comm.reduce_scatter(&mut acc[..], ReduceOp::Sum)?;
        } else {
            comm.all_reduce(&mut acc[..], ReduceOp::Sum)?;
        }
        round_all(&exps[range.clone()], &acc[range.clone()], q, out);
        // An element with an infinite or NaN term: its f32 sum is +inf, -inf or NaN in any
        // order, so those few elements are summed plainly, as torch would.
        if exps.contains(&NONFINITE) {
            let nonfinite: Vec<usize> = exps.iter().enumerate().filter(|&(_, &e)| e == NONFINITE).map(|(i, _)| i).collect();
            let mut sums: Vec<f32> = nonfinite.iter().map(|&i| terms.iter().map(|t| t[i]).sum()).collect();
            comm.all_reduce(&mut sums, ReduceOp::Sum)?;
            for (&i, v) in nonfinite.iter().zip(sums) {
                if range.contains(&i) {
                    out[i - range.start] = v;
                }
            }
        }
        self.used = 0;
        Ok(())
    }

    /// The rounded total of this rank's terms alone (no communication; the terms are
    /// forgotten).
    pub fn local_total(&mut self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.len {
            return Err(CommError::invalid(
                "ReproducibleSum::local_total",
                format!("out has {} elements, the sum has {}", out.len(), self.len),
            ));
        }
        let q = scale_bits(self.total_terms, self.used)?;
        let (mut exps, mut acc) = (vec![0u8; self.len], vec![0i64; self.len]);
        let terms = &self.terms[..self.used];
        local_exponents(terms, &mut exps);
        fixed_point(terms, &exps, &mut acc, q);
        round_all(&exps, &acc, q, out);
        for (i, o) in out.iter_mut().enumerate().filter(|&(i, _)| exps[i] == NONFINITE) {
            *o = terms.iter().map(|t| t[i]).sum();
        }
        self.used = 0;
        Ok(())
    }
}

/// Runs `$body` compiled for AVX2 when the CPU has it (the loops vectorise there: they
/// need per-lane 64-bit shifts, which SSE2 lacks), else as portable code.
macro_rules! with_avx2 {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2($($arg: $ty),*) $body
        fn portable($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { avx2($($arg),*) };
        }
        portable($($arg),*)
    }};
}

/// Each element's largest biased exponent over `terms`, block by block (the block's
/// bytes stay in L1 while every term's block is read).
fn local_exponents(terms: &[Vec<f32>], exps: &mut [u8]) {
    with_avx2!(local_exponents(terms: &[Vec<f32>], exps: &mut [u8]) {
        for (b, block) in exps.chunks_mut(BLOCK).enumerate() {
            block.fill(0);
            let span = b * BLOCK..b * BLOCK + block.len();
            for t in terms {
                for (e, x) in block.iter_mut().zip(&t[span.clone()]) {
                    *e = (*e).max((x.to_bits() >> 23) as u8);
                }
            }
        }
    })
}

/// Each element's terms on the fixed-point scale of its group-wide exponent, summed.
fn fixed_point(terms: &[Vec<f32>], exps: &[u8], acc: &mut [i64], q: i32) {
    with_avx2!(fixed_point(terms: &[Vec<f32>], exps: &[u8], acc: &mut [i64], q: i32) {
        let mut scales = [0f64; BLOCK];
        for (b, block) in acc.chunks_mut(BLOCK).enumerate() {
            block.fill(0);
            let span = b * BLOCK..b * BLOCK + block.len();
            for (s, &e) in scales.iter_mut().zip(&exps[span.clone()]) {
                *s = pow2(150 + q - i32::from(e).max(1));
            }
            for t in terms {
                for ((a, &s), &x) in block.iter_mut().zip(&scales).zip(&t[span.clone()]) {
                    *a = a.wrapping_add(fixed(x, s));
                }
            }
        }
    })
}

/// The rounded totals of `exps`/`acc` into `out`.
fn round_all(exps: &[u8], acc: &[i64], q: i32, out: &mut [f32]) {
    with_avx2!(round_all(exps: &[u8], acc: &[i64], q: i32, out: &mut [f32]) {
        for ((o, &e), &a) in out.iter_mut().zip(exps).zip(acc) {
            *o = round(e, a, q);
        }
    })
}

/// The scale's bits below the largest term's exponent: a term is below 2^(24 + 27) on
/// the scale, which [`fixed`] needs, and [`MAX_TERMS`] of them sum below 2^63. A term
/// keeps 51 bits relative to the element's largest term (an f32 sum keeps 24 relative to
/// its running total). Checks that `seen` terms fit the `total_terms` the sum is set for.
fn scale_bits(total_terms: usize, seen: usize) -> Result<i32> {
    if total_terms == 0 || total_terms > MAX_TERMS || seen > total_terms {
        return Err(CommError::invalid(
            "ReproducibleSum::reduce",
            format!("{seen} terms over the group for a sum set for {total_terms} (1..={MAX_TERMS})"),
        ));
    }
    Ok(27)
}

/// 1.5 * 2^52: adding it to an f64 below 2^51 in magnitude rounds it to an integer (to
/// nearest, ties to even) held in the low bits of the sum.
const ROUNDER: f64 = 6755399441055744.0;

/// `x` as the nearest integer multiple of 2^(E - 150 - q), E = the group's exponent of
/// the element (at least 1), given `scale` = 2^(150 + q - E). `x * scale` is exact in
/// f64 and below 2^(24 + q) <= 2^51, so adding [`ROUNDER`] rounds it (ties to even) and
/// leaves the integer in the low bits: a few vector instructions, no branch.
#[inline(always)]
fn fixed(x: f32, scale: f64) -> i64 {
    let r = f64::from(x) * scale + ROUNDER;
    // Non-finite terms make the element NaN when rounded: their bits here do not matter.
    (r.to_bits() as i64).wrapping_sub(ROUNDER.to_bits() as i64)
}

/// The f32 nearest (by way of f64) to an element's fixed-point total. The i64 is taken
/// as two 32-bit halves (exact in f64) added with one rounding, which vectorises where a
/// direct i64 conversion does not.
#[inline(always)]
fn round(e: u8, acc: i64, q: i32) -> f32 {
    let (hi, lo) = ((acc >> 32) as i32, acc as u32);
    let total = f64::from(hi) * 4294967296.0 + f64::from(lo);
    let value = (total * pow2(i32::from(e).max(1) - 150 - q)) as f32;
    if e == NONFINITE {
        f32::NAN
    } else {
        value
    }
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

    /// Adds the integer `v` times 2^`exp2`, exactly (`exp2` >= -1106).
    #[inline]
    fn add_int(&mut self, v: u64, exp2: i32) {
        let shift = (exp2 - LOWEST) as u32;
        let (word, offset) = ((shift / 32) as usize, shift % 32);
        let v = u128::from(v) << offset;
        for d in 0..3 {
            self.words[word + d] += (v >> (32 * d)) as u32 as i64;
        }
        self.pending += 1;
        if self.pending >= 1 << 30 {
            self.normalize();
        }
    }

    /// Adds Σ x² over `xs`, exactly. The square of an f32 is a 48-bit integer times a
    /// power of two its exponent fixes, so the squares are summed per exponent in u64
    /// (at most 2^16 of them between deposits) and only the exponents' sums deposited:
    /// about as fast as a plain f32 sum.
    pub fn add_squares(&mut self, xs: &[f32]) {
        self.add_by_exponent(xs, true);
    }

    /// Adds Σ |x| over `xs`, exactly (as [`add_squares`](Self::add_squares)).
    pub fn add_abs(&mut self, xs: &[f32]) {
        self.add_by_exponent(xs, false);
    }

    fn add_by_exponent(&mut self, xs: &[f32], square: bool) {
        let mut sums = [0u64; 256];
        for block in xs.chunks(1 << 16) {
            for &x in block {
                let bits = x.to_bits();
                let e = ((bits >> 23) & 0xff) as usize;
                let m = u64::from((bits & 0x7f_ffff) | (u32::from(e != 0) << 23));
                sums[e] += if square { m * m } else { m };
            }
            if sums[255] != 0 {
                self.nonfinite = true;
                sums[255] = 0;
            }
            for (e, v) in sums.iter_mut().enumerate() {
                if *v != 0 {
                    let unit = (e as i32).max(1) - 150;
                    self.add_int(*v, if square { 2 * unit } else { unit });
                    *v = 0;
                }
            }
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
    fn sums_do_not_depend_on_order_and_beat_f32() {
        let (n, k) = (5000, 64);
        let vectors: Vec<Vec<f32>> = (0..k).map(|i| terms(i as u64, n)).collect();
        let total = |order: &[usize]| {
            let mut s = ReproducibleSum::new(n, k).unwrap();
            order.iter().for_each(|&i| s.add(&vectors[i]).unwrap());
            let mut out = vec![0f32; n];
            s.local_total(&mut out).unwrap();
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let forward: Vec<usize> = (0..k).collect();
        let reverse: Vec<usize> = (0..k).rev().collect();
        let mut shuffled = forward.clone();
        shuffled.sort_by_key(|&i| (i * 37) % k);
        let a = total(&forward);
        assert_eq!(a, total(&reverse));
        assert_eq!(a, total(&shuffled));
        // Against the f64 reference, element by element: the f32 nearest the exact sum
        // (up to the scale's resolution, 2^-56 of the largest term here), and overall
        // never less accurate than the f32 sum in this order.
        let (mut err_exact, mut err_f32) = (0f64, 0f64);
        for j in 0..n {
            let exact: f64 = vectors.iter().map(|v| f64::from(v[j])).sum();
            let largest = vectors.iter().map(|v| f64::from(v[j]).abs()).fold(0.0, f64::max);
            let f32_sum: f32 = vectors.iter().map(|v| v[j]).sum();
            let got = f64::from(f32::from_bits(a[j]));
            let e = (got - exact).abs();
            let ulp_half = (exact.abs() * 2f64.powi(-24)).max(f64::from(f32::from_bits(1)) / 2.0);
            assert!(e <= ulp_half + largest * 2f64.powi(-50), "element {j}: {got} vs {exact}");
            err_exact += e;
            err_f32 += (f64::from(f32_sum) - exact).abs();
        }
        assert!(err_exact <= err_f32, "error {err_exact} vs f32's {err_f32}");
    }

    #[test]
    fn cancellation_extremes_and_nonfinite_terms() {
        let mut s = ReproducibleSum::new(5, 3).unwrap();
        s.add(&[1e10, f32::MIN_POSITIVE * 1e-3, 3.0, 1.0, f32::MAX]).unwrap();
        s.add(&[2.5, f32::MIN_POSITIVE * 1e-3, -3.0, f32::INFINITY, f32::MAX]).unwrap();
        s.add(&[-1e10, 0.0, 1e-3, 0.0, -f32::MAX]).unwrap();
        let mut out = [0f32; 5];
        s.local_total(&mut out).unwrap();
        assert_eq!(1e10f32 + 2.5 - 1e10, 0.0);
        assert_eq!(out[0], 2.5, "1e10 + 2.5 - 1e10 loses 2.5 in f32, not here");
        assert_eq!(out[1], 2.0 * (f32::MIN_POSITIVE * 1e-3));
        assert_eq!(out[2], 1e-3);
        assert_eq!(out[3], f32::INFINITY, "1 + inf + 0, as in f32");
        assert_eq!(out[4], f32::MAX, "MAX + MAX - MAX overflows in f32 order, not here");
        let mut s = ReproducibleSum::new(1, 2).unwrap();
        (0..2).for_each(|_| s.add(&[1.0]).unwrap());
        assert!(s.add(&[1.0]).is_err(), "more terms than the sum was set for");
        assert!(ReproducibleSum::new(1, 0).is_err() && ReproducibleSum::new(1, MAX_TERMS + 1).is_err());
    }

    #[test]
    fn group_sums_are_the_same_bits_at_any_world_size() {
        let (n, k) = (1001, 12);
        let vectors: Vec<Vec<f32>> = (0..k).map(|i| terms(100 + i as u64, n)).collect();
        let mut reference: Option<Vec<u32>> = None;
        for world in [1usize, 2, 3, 5, 7] {
            for sharded in [false, true] {
                let outs = Communicator::run_threads(world, &CommConfig::default(), |comm| {
                    let mut s = ReproducibleSum::new(n, k).unwrap();
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
        // The per-exponent path gives the same exact sum as term by term.
        let mut squares = ExactSum::new();
        squares.add_squares(&xs);
        assert_eq!(squares.value().to_bits(), forward.value().to_bits());
        let mut abs = ExactSum::new();
        abs.add_abs(&xs);
        let mut abs_terms = ExactSum::new();
        xs.iter().for_each(|&x| abs_terms.add(f64::from(x.abs())));
        assert_eq!(abs.value().to_bits(), abs_terms.value().to_bits());
        let mut bad = ExactSum::new();
        bad.add_squares(&[1.0, f32::NAN]);
        assert!(bad.value().is_nan());
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
