//! 8-bit AdamW: bitsandbytes' `AdamW8bit` (Dettmers et al. 2022, "8-bit Optimizers via
//! Block-wise Quantization"), both moments block-wise quantized with the dynamic map
//! ([`crate::quantize`]): 2 bytes of state per parameter, plus one `f32` scale per block
//! and moment, instead of AdamW's 8.
//!
//! Per block, as bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` does it, in `f32`:
//!
//! ```text
//! c1 = 1 - β1^t,  c2 = sqrt(1 - β2^t),  step_size = -lr·c2/c1
//! for each element (g = -g if maximize; g·grad_scale):
//!     if g is finite:  m = dequant(m)·β1 + (1-β1)·g;  v = dequant(v)·β2 + (1-β2)·g·g
//!     else:            m = 0;  v = 0                    (the step skips the element)
//!     p = p + step_size · m / (sqrt(v) + c2·eps)      (finite g only)
//!     p = p · (1 - lr·λ)                                (λ > 0, finite g only)
//! scale_m, scale_v = the block's new largest |m|, |v| (m's keeps its sign, see quantize)
//! m, v = nearest codes of m/scale_m (signed map, sign kept), v/scale_v (unsigned map)
//! ```
//!
//! The parameter update reads the fresh `f32` moments, before they are re-quantized.
//! The weight decay follows the Adam update, as in bitsandbytes (torch's AdamW applies it
//! first). Not implemented: bitsandbytes' `min_8bit_size` (tensors under 4096 elements
//! kept in 32 bits: here every parameter is quantized), `percentile_clipping`,
//! `max_unorm`, paged state.
//!
//! Blocks start at each parameter's first element, as bitsandbytes quantizes each tensor
//! alone. [`Kernel::block`] makes ZeRO cut a parameter only between blocks, so a block
//! and its scale are always whole on one rank and a sharded run has the bits of one
//! process.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::kernels::{check_adam, invalid, Kernel, Quantized, Segment, StateStorage, CHUNK};
use crate::quantize::{dequantize, largest_magnitude, quantize_with, scale_from_largest, Quantizer};

/// bitsandbytes' `AdamW8bit` hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adamw8bitConfig {
    /// The learning rate.
    pub lr: f64,
    /// β1 and β2, the moments' decay rates.
    pub betas: (f64, f64),
    /// Added to the second moment's root (scaled by `sqrt(1 - β2^t)`, as bitsandbytes).
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Elements per quantization block: bitsandbytes uses 256 (its default) or 2048.
    pub block_size: usize,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for Adamw8bitConfig {
    /// bitsandbytes' `AdamW8bit` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    /// weight decay 1e-2, blocks of 256.
    fn default() -> Self {
        Adamw8bitConfig { lr: 1e-3, betas: (0.9, 0.999), eps: 1e-8, weight_decay: 1e-2, block_size: 256, maximize: false }
    }
}

/// The largest block accepted (a block's fresh moments are held in a scratch buffer
/// until its new scale is known).
pub const MAX_BLOCK: usize = 4096;

/// The per-step scalars, computed once per segment in `f32` as bitsandbytes does.
#[derive(Clone, Copy, Debug)]
struct Step {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    step_size: f32,
    eps: f32,
    decay: Option<f32>,
    sign: f32,
}

impl Step {
    fn new(c: &Adamw8bitConfig, step: u64, grad_scale: f32) -> Self {
        let (beta1, beta2) = (c.betas.0 as f32, c.betas.1 as f32);
        let t = step as f32;
        let correction1 = 1.0 - beta1.powf(t);
        let correction2 = (1.0 - beta2.powf(t)).sqrt();
        let lr = c.lr as f32;
        let wd = c.weight_decay as f32;
        Step {
            beta1,
            beta2,
            one_minus_beta1: 1.0 - beta1,
            one_minus_beta2: 1.0 - beta2,
            step_size: -lr * correction2 / correction1,
            eps: correction2 * c.eps as f32,
            decay: (wd > 0.0).then_some(1.0 - lr * wd),
            sign: if c.maximize { -grad_scale } else { grad_scale },
        }
    }

    /// Steps one block: `params`, `grads` and the codes cover it; `scratch` holds the
    /// fresh moments until the new scales are known. Returns the new scales.
    fn block(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: (&mut [u8], f32),
        v: (&mut [u8], f32),
        scratch: &mut (Vec<f32>, Vec<f32>),
    ) -> (f32, f32) {
        let (q1, q2) = (Quantizer::get(true), Quantizer::get(false));
        let n = params.len();
        let params = &mut params[..n];
        scratch.0.resize(n, 0.0);
        scratch.1.resize(n, 0.0);
        let (s1, s2) = (&mut scratch.0[..n], &mut scratch.1[..n]);
        let (codes1, scale1) = m;
        let (codes2, scale2) = v;
        let (codes1, codes2, grads) = (&mut codes1[..n], &mut codes2[..n], &grads[..n]);
        // Dequantize (table lookups), the arithmetic, the new scales, the codes.
        dequantize(codes1, scale1, true, s1);
        dequantize(codes2, scale2, false, s2);
        let [new1, new2] = self.moments(params, grads, s1, s2);
        quantize_with(q1, s1, new1, codes1);
        quantize_with(q2, s2, new2, codes2);
        (new1, new2)
    }
}

impl Step {
    /// The arithmetic of one block: `s1`, `s2` hold the dequantized moments on entry and
    /// the fresh ones on exit; returns their new scales ([`scale_from_largest`]), which
    /// the AVX-512 loop tracks on the way. With AVX-512 sixteen lanes at a time, else
    /// four with SSE2 (part of the x86-64 baseline; the compiler does not vectorize the
    /// masked loop itself); the same IEEE operations in the same order as the scalar
    /// loop, so the same bits.
    fn moments(&self, params: &mut [f32], grads: &[f32], s1: &mut [f32], s2: &mut [f32]) -> [f32; 2] {
        let n = params.len().min(grads.len()).min(s1.len()).min(s2.len());
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            // SAFETY: the CPU has the features, checked just above.
            return unsafe { self.moments_avx512(&mut params[..n], &grads[..n], &mut s1[..n], &mut s2[..n]) };
        }
        #[cfg(target_arch = "x86_64")]
        let done = self.moments_sse2(&mut params[..n], &grads[..n], &mut s1[..n], &mut s2[..n]);
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        self.moments_scalar(&mut params[done..n], &grads[done..n], &mut s1[done..n], &mut s2[done..n]);
        scales(&s1[..n], &s2[..n])
    }

    /// The scalar loop (a decay of 1 when there is none: multiplying by 1 is exact).
    fn moments_scalar(&self, params: &mut [f32], grads: &[f32], s1: &mut [f32], s2: &mut [f32]) {
        let Step { beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps, decay, sign } = *self;
        let decay = decay.unwrap_or(1.0);
        for (((p, &g), a), b) in params.iter_mut().zip(grads).zip(s1.iter_mut()).zip(s2.iter_mut()) {
            let g = g * sign;
            if g.is_finite() {
                let m = *a * beta1 + one_minus_beta1 * g;
                let v = *b * beta2 + one_minus_beta2 * g * g;
                *p = (*p + step_size * (m / (v.sqrt() + eps))) * decay;
                (*a, *b) = (m, v);
            } else {
                (*a, *b) = (0.0, 0.0);
            }
        }
    }

    /// The SSE2 loop over whole groups of four; returns how many elements it did.
    #[cfg(target_arch = "x86_64")]
    fn moments_sse2(&self, params: &mut [f32], grads: &[f32], s1: &mut [f32], s2: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let n = params.len() / 4 * 4;
        let decay = self.decay.unwrap_or(1.0);
        // SAFETY: SSE2 is part of the x86-64 baseline; every load and store covers
        // elements j..j+4 with j + 4 <= n <= the length of each slice.
        unsafe {
            let set = |x: f32| _mm_set1_ps(x);
            let (b1, b2, ob1, ob2) = (set(self.beta1), set(self.beta2), set(self.one_minus_beta1), set(self.one_minus_beta2));
            let (step, eps, dec, sign, inf) = (set(self.step_size), set(self.eps), set(decay), set(self.sign), set(f32::INFINITY));
            let abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fff_ffff));
            let select = |mask: __m128, yes: __m128, no: __m128| _mm_or_ps(_mm_and_ps(mask, yes), _mm_andnot_ps(mask, no));
            for j in (0..n).step_by(4) {
                let g = _mm_mul_ps(_mm_loadu_ps(grads.as_ptr().add(j)), sign);
                let finite = _mm_cmplt_ps(_mm_and_ps(g, abs_mask), inf);
                let m = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(s1.as_ptr().add(j)), b1), _mm_mul_ps(ob1, g));
                let v = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(s2.as_ptr().add(j)), b2), _mm_mul_ps(_mm_mul_ps(ob2, g), g));
                let p = _mm_loadu_ps(params.as_ptr().add(j));
                let stepped = _mm_mul_ps(_mm_add_ps(p, _mm_mul_ps(step, _mm_div_ps(m, _mm_add_ps(_mm_sqrt_ps(v), eps)))), dec);
                _mm_storeu_ps(params.as_mut_ptr().add(j), select(finite, stepped, p));
                _mm_storeu_ps(s1.as_mut_ptr().add(j), _mm_and_ps(finite, m));
                _mm_storeu_ps(s2.as_mut_ptr().add(j), _mm_and_ps(finite, v));
            }
        }
        n
    }

    /// The loop in AVX-512, 16 lanes with a masked tail: the same operations as the SSE2
    /// and scalar loops (no fused multiply-adds), so the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL (`simd::has_avx512`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn moments_avx512(&self, params: &mut [f32], grads: &[f32], s1: &mut [f32], s2: &mut [f32]) -> [f32; 2] {
        use std::arch::x86_64::*;

        use crate::quantize::x86::{load, store};
        let n = params.len().min(grads.len()).min(s1.len()).min(s2.len());
        let set = |x: f32| _mm512_set1_ps(x);
        let (b1, b2, ob1, ob2) = (set(self.beta1), set(self.beta2), set(self.one_minus_beta1), set(self.one_minus_beta2));
        let (step, eps, dec, sign, inf) =
            (set(self.step_size), set(self.eps), set(self.decay.unwrap_or(1.0)), set(self.sign), set(f32::INFINITY));
        // The first moment's largest and smallest values so far (its scale is the one of
        // larger magnitude, with its sign: no second pass to find which came first unless
        // they tie), the second's largest magnitude, and the lanes that met a NaN (a
        // dequantized NaN, or inf·0 from an infinite scale); lanes past n load zeros and
        // stay 0.
        let (mut high1, mut low1, mut largest2, mut nan) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), 0u16);
        for j in (0..n).step_by(16) {
            let left = n - j;
            // SAFETY: `load`/`store` touch lanes below n only, within every slice.
            unsafe {
                let g = _mm512_mul_ps(load(grads.as_ptr().add(j), left), sign);
                let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(g), inf);
                let m = _mm512_add_ps(_mm512_mul_ps(load(s1.as_ptr().add(j), left), b1), _mm512_mul_ps(ob1, g));
                let v = _mm512_add_ps(_mm512_mul_ps(load(s2.as_ptr().add(j), left), b2), _mm512_mul_ps(_mm512_mul_ps(ob2, g), g));
                let p = load(params.as_ptr().add(j), left);
                let update = _mm512_mul_ps(step, _mm512_div_ps(m, _mm512_add_ps(_mm512_sqrt_ps(v), eps)));
                let stepped = _mm512_mul_ps(_mm512_add_ps(p, update), dec);
                store(params.as_mut_ptr().add(j), left, _mm512_mask_blend_ps(finite, p, stepped));
                let (m, v) = (_mm512_maskz_mov_ps(finite, m), _mm512_maskz_mov_ps(finite, v));
                store(s1.as_mut_ptr().add(j), left, m);
                store(s2.as_mut_ptr().add(j), left, v);
                let b = _mm512_abs_ps(v);
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(m, m) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b);
                high1 = _mm512_max_ps(high1, m);
                low1 = _mm512_min_ps(low1, m);
                largest2 = _mm512_max_ps(largest2, b);
            }
        }
        let (high, low) = (_mm512_reduce_max_ps(high1), _mm512_reduce_min_ps(low1));
        match nan {
            0 if high > -low => [high, _mm512_reduce_max_ps(largest2)],
            0 if -low > high => [low, _mm512_reduce_max_ps(largest2)],
            // Rare: a tie in magnitude (or an all-zero moment), or a NaN.
            _ => scales(&s1[..n], &s2[..n]),
        }
    }
}

/// The new scales of a block's fresh moments: the first's signed, the second's not.
fn scales(s1: &[f32], s2: &[f32]) -> [f32; 2] {
    [scale_from_largest(s1, largest_magnitude(s1), true), largest_magnitude(s2)]
}

/// The buffers of a run of whole blocks.
struct Part<'a> {
    params: &'a mut [f32],
    grads: &'a [f32],
    m: Quantized<'a>,
    v: Quantized<'a>,
    /// The blocks, relative to `params`' start.
    blocks: &'a [Range<usize>],
}

/// How far ahead of the block being stepped its streams are prefetched, in elements:
/// the block after next (at 10M parameters, 1 thread: 7.2–7.4 ms a step against 8.3–8.8
/// with 1024, 7.5–7.7 without prefetching, 8.6 with the next block).
const PREFETCH_AHEAD: usize = 256;

/// Asks for the cache lines at element `at` of the part's four streams (a block touches
/// each stream for only a few lines before moving to the next, too briefly for the
/// hardware prefetcher to run ahead on its own).
#[inline]
fn prefetch(part: &Part<'_>, at: usize, len: usize) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (part, at, len);
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = (at + len).min(part.params.len());
        // SAFETY: a prefetch is a hint that never faults; the addresses are in bounds.
        unsafe {
            for e in (at..end).step_by(16) {
                _mm_prefetch::<_MM_HINT_T0>(part.params.as_ptr().add(e).cast());
                _mm_prefetch::<_MM_HINT_T0>(part.grads.as_ptr().add(e).cast());
            }
            for e in (at..end).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(part.m.codes.as_ptr().add(e).cast());
                _mm_prefetch::<_MM_HINT_T0>(part.v.codes.as_ptr().add(e).cast());
            }
        }
    }
}

/// Runs the blocks in parallel pieces of about [`CHUNK`] elements (blocks are
/// independent, so any split gives the same bits).
fn run(s: &Step, part: Part<'_>, base: usize) {
    let elems = part.blocks.last().map_or(0, |b| b.end) - part.blocks.first().map_or(0, |b| b.start);
    if elems <= CHUNK || part.blocks.len() < 2 {
        let mut scratch = (Vec::new(), Vec::new());
        for (k, r) in part.blocks.iter().enumerate() {
            let r = r.start - base..r.end - base;
            prefetch(&part, r.end + PREFETCH_AHEAD, r.len());
            let scales = (part.m.scales[k], part.v.scales[k]);
            (part.m.scales[k], part.v.scales[k]) = s.block(
                &mut part.params[r.clone()],
                &part.grads[r.clone()],
                (&mut part.m.codes[r.clone()], scales.0),
                (&mut part.v.codes[r.clone()], scales.1),
                &mut scratch,
            );
        }
        return;
    }
    let mid = part.blocks.len() / 2;
    let at = part.blocks[mid].start;
    let (left, right) = part.split(mid, base);
    rayon::join(|| run(s, left, base), || run(s, right, at));
}

impl<'a> Part<'a> {
    /// Splits before block `k`; the part's slices start at segment offset `base`.
    fn split(self, k: usize, base: usize) -> (Part<'a>, Part<'a>) {
        let at = self.blocks[k].start - base;
        let (p0, p1) = self.params.split_at_mut(at);
        let (g0, g1) = self.grads.split_at(at);
        let (mc0, mc1) = self.m.codes.split_at_mut(at);
        let (vc0, vc1) = self.v.codes.split_at_mut(at);
        let (ms0, ms1) = self.m.scales.split_at_mut(k);
        let (vs0, vs1) = self.v.scales.split_at_mut(k);
        let (b0, b1) = self.blocks.split_at(k);
        (
            Part { params: p0, grads: g0, m: Quantized { codes: mc0, scales: ms0 }, v: Quantized { codes: vc0, scales: vs0 }, blocks: b0 },
            Part { params: p1, grads: g1, m: Quantized { codes: mc1, scales: ms1 }, v: Quantized { codes: vc1, scales: vs1 }, blocks: b1 },
        )
    }
}

impl Kernel for Adamw8bitConfig {
    fn name(&self) -> &'static str {
        "adamw8bit"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_adam(self.lr, self.eps, self.betas, self.weight_decay)?;
        if !self.block_size.is_power_of_two() || !(2..=MAX_BLOCK).contains(&self.block_size) {
            return invalid(format!(
                "invalid block_size: {} (a power of two from 2 to {MAX_BLOCK}; bitsandbytes uses 256 or 2048)",
                self.block_size
            ));
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec!["state1", "state2"]
    }

    fn state_storage(&self, name: &str) -> StateStorage {
        StateStorage::Q8 { signed: name == "state1" }
    }

    fn block(&self) -> usize {
        self.block_size
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let Segment { params, grads, quantized, blocks, step, grad_scale, .. } = segment;
        let [m, v]: [Quantized<'_>; 2] = quantized
            .try_into()
            .map_err(|q: Vec<_>| OptimError::ShapeMismatch(format!("{} quantized buffers for adamw8bit, which keeps 2", q.len())))?;
        let covered = blocks.last().map_or(0, |b| b.end);
        if covered != params.len() || m.scales.len() != blocks.len() || v.scales.len() != blocks.len() {
            return Err(OptimError::ShapeMismatch(format!(
                "adamw8bit segment of {} elements with blocks covering {covered} and {}/{} scales for {} blocks",
                params.len(),
                m.scales.len(),
                v.scales.len(),
                blocks.len()
            )));
        }
        let s = Step::new(self, step, grad_scale);
        run(&s, Part { params, grads, m, v, blocks: &blocks }, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::{dequantize, dynamic_map, quantize};

    /// One block of four elements, two steps, against the rule written out by hand with
    /// the dequantized moments.
    #[test]
    fn the_published_rule_by_hand() {
        let c = Adamw8bitConfig { lr: 0.1, betas: (0.9, 0.99), eps: 1e-8, weight_decay: 0.5, block_size: 4, maximize: false };
        let mut p = vec![1.0f32, -0.5, 0.25, 2.0];
        let (mut m, mut v) = (vec![0u8; 4], vec![0u8; 4]);
        let zero1 = crate::quantize::zero_code(dynamic_map(true));
        m.fill(zero1);
        let (mut sm, mut sv) = ([0f32], [0f32]);
        let grads = [[0.5f32, -1.0, 0.0, 2.0], [-0.25, 0.5, 1.0, f32::NAN]];
        let (mut want_p, mut want_m, mut want_v) = (p.clone(), [0f32; 4], [0f32; 4]);
        for (t, g) in grads.iter().enumerate() {
            let step = t as u64 + 1;
            // By hand: the moments from the dequantized state, then the update.
            let (c1, c2) = (1.0 - 0.9f32.powf(step as f32), (1.0 - 0.99f32.powf(step as f32)).sqrt());
            let mut fresh = ([0f32; 4], [0f32; 4]);
            for j in 0..4 {
                if g[j].is_finite() {
                    fresh.0[j] = want_m[j] * 0.9 + (1.0 - 0.9f32) * g[j];
                    fresh.1[j] = want_v[j] * 0.99 + (1.0 - 0.99f32) * g[j] * g[j];
                    want_p[j] = (want_p[j] + (-0.1 * c2 / c1) * (fresh.0[j] / (fresh.1[j].sqrt() + c2 * 1e-8))) * (1.0 - 0.1 * 0.5);
                }
            }
            // The state the kernel keeps is the quantized fresh moments.
            let (mut q1, mut q2) = ([0u8; 4], [0u8; 4]);
            let (a, b) = (quantize(&fresh.0, true, &mut q1), quantize(&fresh.1, false, &mut q2));
            dequantize(&q1, a, true, &mut want_m);
            dequantize(&q2, b, false, &mut want_v);

            let blocks: Vec<Range<usize>> = std::iter::once(0..4).collect();
            let seg = Segment {
                params: &mut p,
                grads: g,
                state: vec![],
                quantized: vec![Quantized { codes: &mut m, scales: &mut sm }, Quantized { codes: &mut v, scales: &mut sv }],
                blocks,
                step,
                grad_scale: 1.0,
                whole: vec![],
            };
            c.update(seg).unwrap();
            for j in 0..4 {
                assert!((p[j] - want_p[j]).abs() <= 1e-6 * want_p[j].abs().max(1.0), "step {step} p[{j}]: {} vs {}", p[j], want_p[j]);
            }
            let (mut got_m, mut got_v) = ([0f32; 4], [0f32; 4]);
            dequantize(&m, sm[0], true, &mut got_m);
            dequantize(&v, sv[0], false, &mut got_v);
            assert_eq!(got_m, want_m, "step {step}");
            assert_eq!(got_v, want_v, "step {step}");
        }
        // Step 1 by the numbers: m = 0.1·g, v = 0.01·g², c2/c1 = 0.1/0.1 = 1, so an
        // element with g ≠ 0 moves by lr·sign(g), then decays; step 2's NaN gradient left
        // element 3 where step 1 put it.
        assert!((want_p[3] - ((2.0 - 0.1) * 0.95)).abs() < 1e-5, "{}", want_p[3]);
    }

    /// The vector loop gives the scalar loop's bits, nonfinite gradients included.
    #[test]
    fn the_vector_moments_equal_the_scalar_ones() {
        for maximize in [false, true] {
            let c = Adamw8bitConfig { maximize, ..Adamw8bitConfig::default() };
            let s = Step::new(&c, 3, 0.7);
            let n = 1003;
            let wave = |k: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 * k).sin() * 3.0).powi(3)).collect() };
            let mut g = wave(0.37);
            (g[5], g[100], g[1001]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
            let (mut p, mut a, mut b) = (wave(0.11), wave(0.23), wave(0.05).iter().map(|x| x.abs()).collect::<Vec<_>>());
            let (mut p2, mut a2, mut b2) = (p.clone(), a.clone(), b.clone());
            let (mut p3, mut a3, mut b3) = (p.clone(), a.clone(), b.clone());
            s.moments(&mut p, &g, &mut a, &mut b);
            s.moments_scalar(&mut p2, &g, &mut a2, &mut b2);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p), bits(&p2));
            assert_eq!(bits(&a), bits(&a2));
            assert_eq!(bits(&b), bits(&b2));
            // The SSE2 loop too, when `moments` took the AVX-512 one.
            #[cfg(target_arch = "x86_64")]
            {
                let done = s.moments_sse2(&mut p3, &g, &mut a3, &mut b3);
                s.moments_scalar(&mut p3[done..], &g[done..], &mut a3[done..], &mut b3[done..]);
                assert_eq!(bits(&p3), bits(&p2));
                assert_eq!(bits(&a3), bits(&a2));
                assert_eq!(bits(&b3), bits(&b2));
            }
        }
    }

    #[test]
    fn bad_configs_are_refused_with_their_value() {
        let bad = |f: fn(&mut Adamw8bitConfig)| {
            let mut c = Adamw8bitConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.block_size = 100).contains("block_size: 100"));
        assert!(bad(|c| c.block_size = 8192).contains("8192"));
        assert!(bad(|c| c.betas.1 = 1.0).contains("index 1"));
        assert!(bad(|c| c.lr = f64::NAN).contains("learning rate"));
    }
}
