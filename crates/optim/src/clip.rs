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
    P(f64),
    Inf,
}

impl NormType {
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
    fn term(self, g: f32) -> f64 {
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

/// The partial norm of one buffer: Σ|g|^p, or max|g| for inf.
pub fn partial_norm(grads: &[f32], norm: NormType) -> f64 {
    let chunk = |c: &[f32]| c.iter().fold(norm.zero(), |acc, &g| norm.combine(acc, norm.term(g)));
    if grads.len() <= NORM_CHUNK {
        return chunk(grads);
    }
    let partials: Vec<f64> = grads.par_chunks(NORM_CHUNK).map(chunk).collect();
    partials.into_iter().fold(norm.zero(), |a, b| norm.combine(a, b))
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
/// calling [`partial_norm`] (same chunks, same order).
pub fn divide_and_partial_norm(grads: &mut [f32], divisor: f32, norm: NormType) -> f64 {
    let chunk = |c: &mut [f32]| {
        c.iter_mut().fold(norm.zero(), |acc, g| {
            *g /= divisor;
            norm.combine(acc, norm.term(*g))
        })
    };
    if grads.len() <= NORM_CHUNK {
        return chunk(grads);
    }
    let partials: Vec<f64> = grads.par_chunks_mut(NORM_CHUNK).map(chunk).collect();
    partials.into_iter().fold(norm.zero(), |a, b| norm.combine(a, b))
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
