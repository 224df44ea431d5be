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
/// bucket stores its lower code and the index of its threshold (+inf when none): the code
/// is `low + (x > threshold)`. Built from [`nearest`] itself, so the answer is the same
/// for every `x`; a map where some bucket held two steps would fall back to the search.
pub struct Quantizer {
    map: &'static [f32; CODES],
    /// Per bucket: the lower code (low byte) and the threshold's index (high byte).
    entries: Vec<u16>,
    /// The thresholds; index 0 is +inf (no step in the bucket).
    thresholds: Vec<f32>,
    /// Whether every bucket fitted the table.
    tabulated: bool,
    keep_sign: bool,
    zero: u8,
}

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
        let mut thresholds = vec![f32::INFINITY];
        let mut tabulated = true;
        let entries = (0..1u32 << 16)
            .map(|b| {
                // The bucket's values in value order (negative buckets run downwards as
                // their bits grow). An all-ones exponent holds only ±inf and NaNs.
                if b & 0x7f80 == 0x7f80 {
                    let only = f32::from_bits(b << 16);
                    return if b & 0x7fff == 0x7f80 { nearest(map, only, keep_sign) as u16 } else { zero as u16 };
                }
                let value = |k: u32| f32::from_bits(if b & 0x8000 == 0 { (b << 16) | k } else { (b << 16) | (0xffff - k) });
                let (low, high) = (nearest(map, value(0), keep_sign), nearest(map, value(0xffff), keep_sign));
                if low == high {
                    return low as u16;
                }
                if high != low.wrapping_add(1) || thresholds.len() > 255 {
                    tabulated = false;
                    return low as u16;
                }
                // The last value still coding to `low` (codes never fall as x grows).
                let (mut lo, mut hi) = (0u32, 0xffffu32);
                while hi - lo > 1 {
                    let mid = (lo + hi) / 2;
                    if nearest(map, value(mid), keep_sign) == low {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                thresholds.push(value(lo));
                low as u16 | ((thresholds.len() as u16 - 1) << 8)
            })
            .collect();
        Quantizer { map, entries, thresholds, tabulated, keep_sign, zero }
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

    /// The table's answer for a non-NaN `x`: the bucket's lower code, one more past its
    /// threshold.
    #[inline]
    fn lookup(&self, x: f32) -> u8 {
        let e = self.entries[(x.to_bits() >> 16) as usize];
        (e as u8).wrapping_add((x > self.thresholds[(e >> 8) as usize]) as u8)
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
    // The largest magnitude in eight independent lanes (vectorizes; no loop-carried
    // compare chain), then the first value that has it.
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
    let largest = lanes.iter().fold(0f32, |m, &l| if l > m { l } else { m });
    if !signed || largest == 0.0 {
        return largest;
    }
    values.iter().copied().find(|v| v.abs() == largest).unwrap_or(largest)
}

/// Quantizes one block: returns its scale and writes one code per value.
pub fn quantize(values: &[f32], signed: bool, codes: &mut [u8]) -> f32 {
    let scale = scale_of(values, signed);
    quantize_with(Quantizer::get(signed), values, scale, codes);
    scale
}

/// Quantizes `values` against a known `scale` (what the fused 8-bit step does once it
/// has the block's new scale).
#[inline]
pub fn quantize_with(q: &Quantizer, values: &[f32], scale: f32, codes: &mut [u8]) {
    if scale == 0.0 {
        codes.fill(q.zero);
        return;
    }
    if !q.tabulated {
        for (c, &v) in codes.iter_mut().zip(values) {
            *c = q.code(v / scale);
        }
        return;
    }
    // Divide in vectorizable pieces (a NaN becomes +0.0, which codes to zero as NaN
    // does), then look the codes up without branches.
    let mut x = [0f32; 64];
    for (cs, vs) in codes.chunks_mut(64).zip(values.chunks(64)) {
        let x = &mut x[..vs.len()];
        for (x, &v) in x.iter_mut().zip(vs) {
            let y = v / scale;
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
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = map[c as usize] * scale;
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
}
