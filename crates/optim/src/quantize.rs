//! Block-wise dynamic 8-bit quantization (Dettmers et al. 2022, "8-bit Optimizers via
//! Block-wise Quantization"; bitsandbytes' `quantize_blockwise`), the storage of 8-bit
//! optimizer state.
//!
//! A block of values is divided by its scale (the value of largest magnitude) and each
//! quotient, in [-1, 1], is stored as the index of the nearest entry of a 256-entry code
//! map: the dynamic map of bitsandbytes' `create_dynamic_map`, whose entries are spread
//! over seven decades so that small moments keep their relative precision.
//!
//! One deviation from bitsandbytes, on purpose: the scale keeps the **sign** of the
//! block's largest-magnitude value (bitsandbytes stores its absolute value). The signed
//! map holds +1.0 but not -1.0, so with an unsigned absmax a block led by a negative value
//! stores that value as -0.993·absmax and re-quantizing the dequantized block gives another
//! absmax. With a signed scale the leading value is always the code +1.0, stored exactly,
//! and [`quantize`]∘[`dequantize`] is the identity on quantized blocks. That is what lets a
//! state dict carry the moments as plain `f32` (readable, reshardable element by element)
//! and still resume with the same bits. The stored error is the same or smaller.

use std::sync::OnceLock;

/// Entries of a code map.
pub const CODES: usize = 256;

/// The dynamic map of bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7,
/// total_bits=8)`, sorted: for each of the seven decades 1e-6..1, the midpoints of a
/// linear grid over [0.1, 1] scaled by the decade (2^i midpoints signed, 2^(i+1)
/// unsigned), then 0 and 1.0. Computed in `f32` as torch computes it.
pub fn dynamic_map(signed: bool) -> &'static [f32; CODES] {
    static SIGNED: OnceLock<[f32; CODES]> = OnceLock::new();
    static UNSIGNED: OnceLock<[f32; CODES]> = OnceLock::new();
    let cell = if signed { &SIGNED } else { &UNSIGNED };
    cell.get_or_init(|| build_map(signed))
}

/// [`nearest`] by table instead of binary search, without branches: the top 16 bits of
/// `x` (sign, exponent, 7 bits of mantissa) pick a bucket narrower than the gap between
/// any two map entries, so the nearest code is constant over a bucket or steps up once at
/// a threshold inside it (a midpoint between two entries, or 0 for the kept sign). Each
/// bucket is one `u32` cell: its lower code in the low byte, and above it the *cut*, the
/// first key that codes one higher, where the key is the low 16 bits of `x` counted in
/// value order (flipped for negative `x`); `0x10000` when the bucket has no step. One
/// load and one compare per code, the same for the scalar and the vector lookups. Built
/// from [`nearest`] itself, so the answer is the same for every `x`; a map where some
/// bucket held two steps would fall back to the search.
pub struct Quantizer {
    map: &'static [f32; CODES],
    /// Per bucket: `lower code | cut << 8`.
    cells: Vec<u32>,
    /// The map's entries as four byte planes (plane j holds byte j of every entry), the
    /// form the in-register dequantization looks up.
    planes: [[u8; CODES]; 4],
    /// Whether every bucket fitted the table.
    tabulated: bool,
    keep_sign: bool,
    zero: u8,
}

/// The cut of a bucket without a step (no 16-bit key reaches it).
const NO_STEP: u32 = 0x1_0000;

impl Quantizer {
    /// The quantizer of the signed (first moment, sign kept) or unsigned map.
    pub fn get(signed: bool) -> &'static Quantizer {
        static SIGNED: OnceLock<Quantizer> = OnceLock::new();
        static UNSIGNED: OnceLock<Quantizer> = OnceLock::new();
        let cell = if signed { &SIGNED } else { &UNSIGNED };
        cell.get_or_init(|| Quantizer::build(dynamic_map(signed), signed))
    }

    fn build(map: &'static [f32; CODES], keep_sign: bool) -> Quantizer {
        let zero = zero_code(map);
        let mut tabulated = true;
        let flat = |code: u8| code as u32 | NO_STEP << 8;
        let cells = (0..1u32 << 16)
            .map(|b| {
                // The bucket's value at key k, in value order (negative buckets run
                // downwards as their bits grow). An all-ones exponent holds only ±inf and
                // NaNs.
                if b & 0x7f80 == 0x7f80 {
                    let only = f32::from_bits(b << 16);
                    return flat(if b & 0x7fff == 0x7f80 { nearest(map, only, keep_sign) } else { zero });
                }
                let value = |k: u32| f32::from_bits(if b & 0x8000 == 0 { (b << 16) | k } else { (b << 16) | (0xffff - k) });
                let (low, high) = (nearest(map, value(0), keep_sign), nearest(map, value(0xffff), keep_sign));
                if low == high {
                    return flat(low);
                }
                if high != low.wrapping_add(1) {
                    tabulated = false;
                    return flat(low);
                }
                // The last key still coding to `low` (codes never fall as x grows).
                let (mut lo, mut hi) = (0u32, 0xffffu32);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if nearest(map, value(mid), keep_sign) == low {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                low as u32 | (lo + 1) << 8
            })
            .collect();
        let mut planes = [[0u8; CODES]; 4];
        for (c, v) in map.iter().enumerate() {
            for (j, b) in v.to_le_bytes().into_iter().enumerate() {
                planes[j][c] = b;
            }
        }
        Quantizer { map, cells, planes, tabulated, keep_sign, zero }
    }

    /// The code of `x` (already divided by its block's scale).
    #[inline]
    pub fn code(&self, x: f32) -> u8 {
        if !self.tabulated {
            return nearest(self.map, x, self.keep_sign);
        }
        if x.is_nan() {
            return self.zero;
        }
        self.lookup(x)
    }

    /// The table's answer for a non-NaN `x`: the bucket's lower code, one more from its
    /// cut on.
    #[inline]
    fn lookup(&self, x: f32) -> u8 {
        let bits = x.to_bits();
        let cell = self.cells[(bits >> 16) as usize];
        let key = (bits ^ ((bits as i32 >> 31) as u32)) & 0xffff;
        (cell as u8).wrapping_add((key >= cell >> 8) as u8)
    }
}

fn build_map(signed: bool) -> [f32; CODES] {
    const EXPONENTS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(CODES);
    for i in 0..EXPONENTS {
        let items = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
        let bounds = linspace(0.1, 1.0, items);
        let decade = 10f64.powi(i - (EXPONENTS - 1)) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(decade * mean);
            if signed {
                data.push(-decade * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; CODES];
    map.copy_from_slice(&data);
    map
}

/// torch's `linspace` in `f32`: the first half counted up from `start`, the second down
/// from `end`, so both ends are exact.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 }).collect()
}

/// The index of the map entry nearest `x` (ties to the lower entry, NaN to 0.0). With
/// `keep_sign` (the signed first moment), a nonzero `x` never gets an entry of the other
/// sign or zero, as bitsandbytes ensures: a momentum that underflows its block keeps its
/// direction.
#[inline]
pub fn nearest(map: &[f32; CODES], x: f32, keep_sign: bool) -> u8 {
    if x.is_nan() {
        return zero_code(map);
    }
    // The last index whose entry is <= x (0 when x is below every entry).
    let (mut lo, mut len) = (0usize, CODES);
    while len > 1 {
        let half = len / 2;
        if map[lo + half] <= x {
            lo += half;
        }
        len -= half;
    }
    let mut code = if lo + 1 < CODES && map[lo + 1] - x < x - map[lo] { lo + 1 } else { lo };
    if keep_sign {
        if x < 0.0 && map[code] >= 0.0 && code > 0 {
            code -= 1;
        } else if x > 0.0 && map[code] <= 0.0 && code + 1 < CODES {
            code += 1;
        }
    }
    code as u8
}

/// The index of 0.0 in `map` (the code of an empty moment).
pub fn zero_code(map: &[f32; CODES]) -> u8 {
    map.iter().position(|&v| v == 0.0).unwrap_or(0) as u8
}

/// The scale of a block: its value of largest magnitude, with its sign for a signed map
/// (the first such value when two differ only in sign); 0 for an empty or zero block, NaN
/// when the block holds a NaN.
#[inline]
pub fn scale_of(values: &[f32], signed: bool) -> f32 {
    scale_from_largest(values, largest_magnitude(values), signed)
}

/// The largest magnitude in `values` (0 when empty), NaN when one of them is NaN.
#[inline]
pub fn largest_magnitude(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe { x86::largest_magnitude(values) };
    }
    largest_portable(values)
}

/// [`scale_of`] for a block whose [`largest_magnitude`] is known (the fused 8-bit step
/// tracks it while it computes the moments).
#[inline]
pub fn scale_from_largest(values: &[f32], largest: f32, signed: bool) -> f32 {
    if largest.is_nan() || !signed || largest == 0.0 {
        return largest;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe { x86::first_of_magnitude(values, largest) }.unwrap_or(largest);
    }
    values.iter().copied().find(|v| v.abs() == largest).unwrap_or(largest)
}

/// [`largest_magnitude`] without SIMD intrinsics.
fn largest_portable(values: &[f32]) -> f32 {
    // Eight independent lanes (vectorizes; no loop-carried compare chain).
    let mut lanes = [0f32; 8];
    let mut nan = false;
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            nan |= a.is_nan();
            *l = if a > *l { a } else { *l };
        }
    }
    for &v in chunks.remainder() {
        nan |= v.is_nan();
        lanes[0] = if v.abs() > lanes[0] { v.abs() } else { lanes[0] };
    }
    if nan {
        return f32::NAN;
    }
    lanes.iter().fold(0f32, |m, &l| if l > m { l } else { m })
}

/// Quantizes one block: returns its scale and writes one code per value.
pub fn quantize(values: &[f32], signed: bool, codes: &mut [u8]) -> f32 {
    let scale = scale_of(values, signed);
    quantize_with(Quantizer::get(signed), values, scale, codes);
    scale
}

/// How a block's values are brought into [-1, 1] before the table: times the scale's
/// reciprocal, one multiply per value instead of a division, as bitsandbytes does (its
/// kernels multiply by `1/absmax` or divide with the approximate `__fdividef`); divided by
/// a scale so small (under 2^-128) that its reciprocal overflows. The rounding of the
/// reciprocal moves a quotient by an ulp or two, never across a threshold of the map for
/// a dequantized value (entries lie percents apart), so re-quantizing a dequantized block
/// still gives its codes back.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Normalize {
    /// Multiply by the reciprocal.
    Times(f32),
    /// Divide by the scale.
    Over(f32),
}

impl Normalize {
    /// The normalization of a block of `scale`.
    pub(crate) fn new(scale: f32) -> Self {
        let inv = 1.0 / scale;
        if inv.is_infinite() {
            Normalize::Over(scale)
        } else {
            Normalize::Times(inv)
        }
    }

    #[inline]
    fn apply(self, v: f32) -> f32 {
        match self {
            Normalize::Times(r) => v * r,
            Normalize::Over(s) => v / s,
        }
    }
}

/// Quantizes `values` against a known `scale` (what the fused 8-bit step does once it
/// has the block's new scale).
#[inline]
pub fn quantize_with(q: &Quantizer, values: &[f32], scale: f32, codes: &mut [u8]) {
    if scale == 0.0 {
        codes.fill(q.zero);
        return;
    }
    let norm = Normalize::new(scale);
    if !q.tabulated {
        for (c, &v) in codes.iter_mut().zip(values) {
            *c = q.code(norm.apply(v));
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe { x86::quantize_with(q, values, norm, codes) };
    }
    quantize_portable(q, values, norm, codes);
}

/// The table loop of [`quantize_with`] without SIMD intrinsics.
fn quantize_portable(q: &Quantizer, values: &[f32], norm: Normalize, codes: &mut [u8]) {
    // Normalize in vectorizable pieces (a NaN becomes +0.0, which codes to zero as NaN
    // does), then look the codes up without branches.
    let mut x = [0f32; 64];
    for (cs, vs) in codes.chunks_mut(64).zip(values.chunks(64)) {
        let x = &mut x[..vs.len()];
        for (x, &v) in x.iter_mut().zip(vs) {
            let y = norm.apply(v);
            *x = if y.is_nan() { 0.0 } else { y };
        }
        for (c, &x) in cs.iter_mut().zip(x.iter()) {
            *c = q.lookup(x);
        }
    }
}

/// Dequantizes one block: `out[i] = map[codes[i]] · scale`.
pub fn dequantize(codes: &[u8], scale: f32, signed: bool, out: &mut [f32]) {
    let map = dynamic_map(signed);
    #[cfg(target_arch = "x86_64")]
    if x86::has_vbmi() {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe { x86::dequantize_vbmi(Quantizer::get(signed), codes, scale, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx512() {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe { x86::dequantize(map, codes, scale, out) };
    }
    dequantize_portable(map, codes, scale, out);
}

/// [`dequantize`] without SIMD intrinsics.
fn dequantize_portable(map: &[f32; CODES], codes: &[u8], scale: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = map[c as usize] * scale;
    }
}

/// The block loops in AVX-512, 16 lanes with masked tails: the same IEEE operations and
/// the same tables as the portable loops, so the same bits (tested against them). A code
/// is one gathered cell; a dequantized value comes from byte permutes in registers where
/// the CPU has VBMI, else from a gather (lookups the compiler cannot vectorize itself).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Normalize, Quantizer, CODES};

    pub(crate) use crate::simd::{has_avx512, has_vbmi};

    /// The mask of the first `n` lanes (all 16 from 16 on).
    #[inline]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// Loads the first `left` (at most 16) floats at `p`, zeros past them: a plain load
    /// for a whole vector, as masked loads are slower on some cores (Zen 4).
    ///
    /// # Safety
    /// `p` must be valid for `left.min(16)` floats; the CPU must have AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn load(p: *const f32, left: usize) -> __m512 {
        // SAFETY: the caller's guarantee.
        unsafe {
            if left >= 16 {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(lanes(left), p)
            }
        }
    }

    /// Stores the first `left` (at most 16) lanes of `v` at `p`.
    ///
    /// # Safety
    /// `p` must be valid for `left.min(16)` floats; the CPU must have AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store(p: *mut f32, left: usize, v: __m512) {
        // SAFETY: the caller's guarantee.
        unsafe {
            if left >= 16 {
                _mm512_storeu_ps(p, v)
            } else {
                _mm512_mask_storeu_ps(p, lanes(left), v)
            }
        }
    }

    /// `out[i] = map[codes[i]] · scale`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL ([`has_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn dequantize(map: &[f32; CODES], codes: &[u8], scale: f32, out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let s = _mm512_set1_ps(scale);
        for j in (0..n).step_by(16) {
            let k = lanes(n - j);
            // SAFETY: the masked lanes stay below n, within both slices; a code is below
            // 256, within the map.
            unsafe {
                let c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes.as_ptr().add(j).cast()));
                let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), k, c, map.as_ptr());
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), k, _mm512_mul_ps(v, s));
            }
        }
    }

    /// Where [`dequantize_vbmi`] puts each of 64 codes before its lookups: the unpacks
    /// that turn four byte planes into `f32` lanes work within 128-bit lanes, so position
    /// `16L + 4r + t` must hold element `16r + 4L + t` for output `r` to come out in order.
    const ORDER: [u8; 64] = {
        let mut order = [0u8; 64];
        let mut p = 0;
        while p < 64 {
            let (lane, r, t) = (p / 16, p % 16 / 4, p % 4);
            order[p] = (16 * r + 4 * lane + t) as u8;
            p += 1;
        }
        order
    };

    /// [`dequantize`] without gathers, 64 codes at a time: each byte of the 256 `f32`
    /// entries is looked up in registers (two 128-entry byte permutes and a blend on the
    /// code's top bit, per byte plane), and the four planes are interleaved into `f32`s.
    /// About 26 instructions per 64 values, where a gather of 16 costs tens of cycles on
    /// some cores (Zen 4).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VBMI ([`has_vbmi`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(crate) unsafe fn dequantize_vbmi(q: &Quantizer, codes: &[u8], scale: f32, out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let s = _mm512_set1_ps(scale);
        // SAFETY: each plane is 256 bytes, four 64-byte loads; ORDER is 64 bytes.
        let (t, order) = unsafe {
            let at = |j: usize, k: usize| _mm512_loadu_si512(q.planes[j].as_ptr().add(64 * k).cast());
            let t = [
                [at(0, 0), at(0, 1), at(0, 2), at(0, 3)],
                [at(1, 0), at(1, 1), at(1, 2), at(1, 3)],
                [at(2, 0), at(2, 1), at(2, 2), at(2, 3)],
                [at(3, 0), at(3, 1), at(3, 2), at(3, 3)],
            ];
            (t, _mm512_loadu_si512(ORDER.as_ptr().cast()))
        };
        for j in (0..n).step_by(64) {
            let left = n - j;
            let k: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
            // SAFETY: the masked bytes stay below n, within `codes`.
            let c = unsafe {
                if left >= 64 {
                    _mm512_loadu_si512(codes.as_ptr().add(j).cast())
                } else {
                    _mm512_maskz_loadu_epi8(k, codes.as_ptr().add(j).cast())
                }
            };
            let c = _mm512_permutexvar_epi8(order, c);
            let high = _mm512_movepi8_mask(c);
            let plane = |p: &[__m512i; 4]| {
                _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(p[0], c, p[1]), _mm512_permutex2var_epi8(p[2], c, p[3]))
            };
            let (b0, b1, b2, b3) = (plane(&t[0]), plane(&t[1]), plane(&t[2]), plane(&t[3]));
            let (low01, high01) = (_mm512_unpacklo_epi8(b0, b1), _mm512_unpackhi_epi8(b0, b1));
            let (low23, high23) = (_mm512_unpacklo_epi8(b2, b3), _mm512_unpackhi_epi8(b2, b3));
            let words = [
                _mm512_unpacklo_epi16(low01, low23),
                _mm512_unpackhi_epi16(low01, low23),
                _mm512_unpacklo_epi16(high01, high23),
                _mm512_unpackhi_epi16(high01, high23),
            ];
            for (r, w) in words.into_iter().enumerate() {
                if left <= 16 * r {
                    break;
                }
                let v = _mm512_mul_ps(_mm512_castsi512_ps(w), s);
                // SAFETY: the masked lanes stay below n, within `out`.
                unsafe { store(out.as_mut_ptr().add(j + 16 * r), left - 16 * r, v) };
            }
        }
    }

    /// [`super::largest_magnitude`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL ([`has_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn largest_magnitude(values: &[f32]) -> f32 {
        let n = values.len();
        let (mut largest, mut nan) = (_mm512_setzero_ps(), 0u16);
        for j in (0..n).step_by(16) {
            // SAFETY: `load` reads lanes below n only.
            let a = _mm512_abs_ps(unsafe { load(values.as_ptr().add(j), n - j) });
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
            largest = _mm512_max_ps(largest, a);
        }
        if nan != 0 {
            return f32::NAN;
        }
        _mm512_reduce_max_ps(largest)
    }

    /// The first value of magnitude `largest`, if any.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL ([`has_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn first_of_magnitude(values: &[f32], largest: f32) -> Option<f32> {
        let (n, want) = (values.len(), _mm512_set1_ps(largest));
        for j in (0..n).step_by(16) {
            // SAFETY: `load` reads lanes below n only.
            let a = _mm512_abs_ps(unsafe { load(values.as_ptr().add(j), n - j) });
            let hit = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(lanes(n - j), a, want);
            if hit != 0 {
                return Some(values[j + hit.trailing_zeros() as usize]);
            }
        }
        None
    }

    /// [`super::quantize_with`] for a tabulated quantizer and a nonzero scale:
    /// normalize, NaN to +0.0, then each code from one gathered cell.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL ([`has_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn quantize_with(q: &Quantizer, values: &[f32], norm: Normalize, codes: &mut [u8]) {
        let n = values.len().min(codes.len());
        let (low16, one) = (_mm512_set1_epi32(0xffff), _mm512_set1_epi32(1));
        let normalize = |x: __m512| match norm {
            Normalize::Times(r) => _mm512_mul_ps(x, _mm512_set1_ps(r)),
            Normalize::Over(s) => _mm512_div_ps(x, _mm512_set1_ps(s)),
        };
        let cells: *const i32 = q.cells.as_ptr().cast();
        for j in (0..n).step_by(16) {
            // SAFETY: the loads and stores stay below n, within both slices; a bucket
            // index is a 16-bit number, within the 65536 cells.
            unsafe {
                let y = normalize(load(values.as_ptr().add(j), n - j));
                let bits = _mm512_castps_si512(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y), y));
                // Lanes past n hold +0.0, whose bucket is in the table too.
                let negative = _mm512_srai_epi32::<31>(bits);
                let cell = _mm512_i32gather_epi32::<4>(_mm512_srli_epi32::<16>(bits), cells);
                let key = _mm512_and_si512(_mm512_xor_si512(bits, negative), low16);
                let up = _mm512_cmpge_epu32_mask(key, _mm512_srli_epi32::<8>(cell));
                let code = _mm512_mask_add_epi32(cell, up, cell, one);
                if n - j >= 16 {
                    _mm_storeu_si128(codes.as_mut_ptr().add(j).cast(), _mm512_cvtepi32_epi8(code));
                } else {
                    _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(j).cast(), lanes(n - j), code);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_have_bitsandbytes_entries() {
        for signed in [true, false] {
            let map = dynamic_map(signed);
            assert!(map.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
            assert_eq!(map[CODES - 1], 1.0);
            assert!(map.contains(&0.0));
        }
        // Signed: 127 entries each side; the smallest magnitude is 1e-6·(0.1+1)/2.
        let s = dynamic_map(true);
        assert_eq!(s.iter().filter(|&&v| v < 0.0).count(), 127);
        assert!((s[128] - 5.5e-7).abs() < 1e-12, "{}", s[128]);
        assert!((s[0] + 0.99296875).abs() < 1e-6, "{}", s[0]);
        // Unsigned: 254 positive entries, then 0 and 1.
        let u = dynamic_map(false);
        assert_eq!(u[0], 0.0);
        assert!((u[1] - 1e-6 * 0.325).abs() < 1e-12, "{}", u[1]);
    }

    #[test]
    fn nearest_picks_the_closest_entry_and_keeps_signs() {
        let map = dynamic_map(true);
        for x in [-1.0f32, -0.5, -1e-3, 0.0, 2e-7, 0.3, 0.999, 1.0] {
            let c = nearest(map, x, false) as usize;
            let best = map.iter().map(|m| (m - x).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!((map[c] - x).abs(), best, "{x}");
        }
        // A tiny negative value is nearest 0 but keeps its sign.
        assert!(map[nearest(map, -1e-9, true) as usize] < 0.0);
        assert_eq!(map[nearest(map, -1e-9, false) as usize], 0.0);
        assert_eq!(map[nearest(map, f32::NAN, true) as usize], 0.0);
    }

    /// The table agrees with the binary search everywhere: on every entry, every
    /// midpoint and their neighbours, every bucket edge, and a sweep of bit patterns.
    #[test]
    fn the_table_quantizer_equals_the_search() {
        for signed in [true, false] {
            let (map, q) = (dynamic_map(signed), Quantizer::get(signed));
            assert!(q.tabulated, "every bucket fits the table");
            let mut xs: Vec<f32> = Vec::new();
            for w in map.windows(2) {
                for x in [w[0], w[1], (w[0] + w[1]) / 2.0] {
                    xs.extend([x, f32::from_bits(x.to_bits().wrapping_add(1)), f32::from_bits(x.to_bits().wrapping_sub(1))]);
                }
            }
            xs.extend((0..1u32 << 16).flat_map(|b| [f32::from_bits(b << 16), f32::from_bits((b << 16) | 0xffff)]));
            xs.extend((0..1u32 << 22).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9) | 1)));
            for x in xs.into_iter().filter(|x| !x.is_nan()) {
                assert_eq!(q.code(x), nearest(map, x, signed), "signed={signed} x={x:e} ({:#x})", x.to_bits());
            }
        }
    }

    /// Quantizing a dequantized block gives back its codes and scale, bit for bit: the
    /// property that makes an f32 state dict resume exactly.
    #[test]
    fn quantize_after_dequantize_is_the_identity() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for signed in [true, false] {
            for trial in 0..300 {
                let n = 1 + trial % 300;
                let magnitude = 10f32.powi(trial as i32 % 9 - 6);
                let values: Vec<f32> = (0..n)
                    .map(|_| {
                        let v = (next() * 2.0 - 1.0) * magnitude * next().powi(6);
                        if signed {
                            v
                        } else {
                            v.abs()
                        }
                    })
                    .collect();
                let mut codes = vec![0u8; n];
                let scale = quantize(&values, signed, &mut codes);
                let mut back = vec![0f32; n];
                dequantize(&codes, scale, signed, &mut back);
                let mut again = vec![0u8; n];
                let scale2 = quantize(&back, signed, &mut again);
                assert_eq!(scale.to_bits(), scale2.to_bits(), "signed={signed} trial {trial}");
                assert_eq!(codes, again, "signed={signed} trial {trial}");
                // And the error is within half a code step of the scale.
                for (v, b) in values.iter().zip(&back) {
                    assert!((v - b).abs() <= scale.abs() * 0.05 + 1e-30, "{v} vs {b}");
                }
            }
        }
    }

    /// The AVX-512 loops give the portable loops' bits: codes, scales and dequantized
    /// values, at every tail length, with zeros, infinities and NaNs in the blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_loops_equal_the_portable_ones() {
        if !x86::has_avx512() {
            eprintln!("skipped: this CPU lacks AVX-512 (the portable loops run instead)");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for signed in [true, false] {
            let (map, q) = (dynamic_map(signed), Quantizer::get(signed));
            for trial in 0..2000 {
                let n = trial % 70;
                let magnitude = 10f32.powi((trial % 13) as i32 - 9);
                let mut values: Vec<f32> = (0..n)
                    .map(|_| {
                        let r = next();
                        let v = ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * magnitude;
                        if signed {
                            v
                        } else {
                            v.abs()
                        }
                    })
                    .collect();
                if n > 3 {
                    match trial % 5 {
                        0 => values[n / 2] = f32::NAN,
                        1 => values[n - 1] = f32::INFINITY,
                        2 => values[1] = -values[0],
                        3 => values[..n / 2].fill(0.0),
                        _ => {}
                    }
                }
                // SAFETY: the CPU has the features, checked at the top.
                let largest = unsafe { x86::largest_magnitude(&values) };
                assert_eq!(largest.to_bits(), largest_portable(&values).to_bits(), "trial {trial}");
                let scale = scale_of(&values, signed);
                let first = values.iter().copied().find(|v| v.abs() == largest).unwrap_or(largest);
                assert_eq!(scale.to_bits(), if largest.is_nan() || !signed { largest } else { first }.to_bits(), "trial {trial}");
                for s in [scale, magnitude, f32::INFINITY, f32::NAN, 1e-39] {
                    let (mut a, mut b) = (vec![7u8; n], vec![7u8; n]);
                    // SAFETY: as above.
                    unsafe { x86::quantize_with(q, &values, Normalize::new(s), &mut a) };
                    quantize_portable(q, &values, Normalize::new(s), &mut b);
                    assert_eq!(a, b, "signed={signed} trial {trial} scale {s}");
                    let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
                    // SAFETY: as above.
                    unsafe { x86::dequantize(map, &a, s, &mut x) };
                    dequantize_portable(map, &a, s, &mut y);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&x), bits(&y), "signed={signed} trial {trial}");
                    if x86::has_vbmi() {
                        // Every code, at every offset of a 64-wide step.
                        let every: Vec<u8> = (0..n as u32 * 5 + 300).map(|i| (i * 7 + trial as u32) as u8).collect();
                        let (mut x, mut y) = (vec![0f32; every.len()], vec![0f32; every.len()]);
                        // SAFETY: the CPU has VBMI, checked just above.
                        unsafe { x86::dequantize_vbmi(q, &every, s, &mut x) };
                        dequantize_portable(map, &every, s, &mut y);
                        assert_eq!(bits(&x), bits(&y), "vbmi signed={signed} trial {trial}");
                    }
                }
            }
        }
    }
}
