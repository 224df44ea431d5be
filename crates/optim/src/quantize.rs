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
    /// The map as linear grids, for the vector loop without lookups; `None` when its
    /// proof failed (a map of another shape), and the table serves alone.
    grid: Option<DecadeGrid>,
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
        let grid = DecadeGrid::build(map, keep_sign);
        Quantizer { map, cells, planes, tabulated, grid, keep_sign, zero }
    }

    /// Whether the vector loop computes codes from [`DecadeGrid`] (tests check it does for
    /// both maps).
    #[cfg(test)]
    fn has_grid(&self) -> bool {
        self.grid.is_some()
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

/// The dynamic map as seven linear grids, one per decade, so that a vector loop computes
/// a code with a few multiplies and register permutes instead of a memory lookup per value
/// (a gather of 16 costs as much as the rest of the 8-bit step on some cores, Zen 4).
///
/// Inside decade `i` (scale `L = 10^(i-6)`) the entries are the midpoints of `2^i` (signed
/// map) or `2^(i+1)` (unsigned) equal cells over `[0.1·L, L]`, so the nearest entry of `y`
/// is the cell holding it: `first_i + floor((y/L - 0.1)·cells/0.9)`, one fused multiply-add
/// `u = y·slope - offset`. The decade itself comes from the binade of `y`: each binade
/// holds at most one decade boundary (`cut`, the exact least `y` of the next decade, found
/// by search on [`nearest`]), so the decade is the one at the binade's foot, plus one at
/// or above its cut.
///
/// `u` is held offset by 256, in `[256, 512)`, where its bits are fixed-point: bits 15..23
/// are the code and the low 15 bits its fraction. A fraction within 2^-14 of a whole
/// number marks the value *uncertain* (it lies within rounding of a threshold, where the
/// grid's real arithmetic and the map's `f32` entries may disagree), and the loop takes
/// that value's code from the exact table instead: about one value in eight thousand.
///
/// The rest is exact by construction, and [`DecadeGrid::build`] proves it before the grid
/// is used: at every threshold of the map (each sign), `u` lies within the uncertain band
/// of the right whole number on both sides; `u` is monotone in `y` within a decade, so a
/// value the grid calls certain gets the code of [`nearest`], bit for bit.
#[derive(Debug)]
pub(crate) struct DecadeGrid {
    /// Per binade (index: the low five bits of the biased exponent of `y`, clamped to
    /// [`Self::FLOOR`, `Self::TOP`]), the decade at its foot.
    foot: [i32; 32],
    /// Per binade, the least `y` of the next decade, `+inf` when no boundary falls inside.
    /// For the signed map, the least *negative* value's magnitude: one ulp lower than the
    /// positive one where the positive side ties there (ties go to the lower entry), and
    /// positive values equal to it are marked uncertain.
    cut: [f32; 32],
    /// Per decade, with decade 7 the entry 1.0: `u = y·slope - offset` (both with the 256
    /// offset in), and `ceiling`, the top of the decade's last cell (a `y` between `L` and
    /// the cut codes to the last entry, not the next decade's first).
    slope: [f32; 16],
    offset: [f32; 16],
    ceiling: [f32; 16],
    /// Unsigned map: the least `x` coding above 0.0 (below it, code 0).
    above_zero: f32,
    signed: bool,
}

/// A decade boundary where the positive and negative sides differ: the two cuts.
type Cuts = (f32, f32);

impl DecadeGrid {
    /// The least `y` the grid works with (smaller ones code as it does): 2^-23, below the
    /// map's smallest entries.
    const FLOOR: f32 = f32::from_bits(104 << 23);
    /// The largest `y` the grid works with (larger ones code as it does: 1.0's code).
    const TOP: f32 = 1.5;
    /// Half-width of the uncertain band, in units of the 15-bit fraction (2^-14 of a
    /// cell; the proof holds down to one unit, this keeps a margin).
    const BAND: u32 = 2;
    /// The bits of 256.0, the offset of `u`.
    const BASE: u32 = 0x4380_0000;

    /// The grid of `map`, if it has the dynamic map's shape and the proof holds.
    fn build(map: &[f32; CODES], signed: bool) -> Option<DecadeGrid> {
        // Decade i's first code and its number of cells; decade 7 is the entry 1.0.
        let mut first = [255i32; 8];
        let mut cells = [1i32; 8];
        for i in 0..7 {
            cells[i] = if signed { 1 << i } else { 2 << i };
            first[i] = if signed { 128 + (1 << i) - 1 } else { (2 << i) - 1 };
        }
        let least = |pred: &dyn Fn(f32) -> bool| -> f32 {
            // The least y in (0, 2] with pred(y), for a pred false then true as y grows.
            let (mut lo, mut hi) = (0u32, 2f32.to_bits());
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if pred(f32::from_bits(mid)) {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            f32::from_bits(hi)
        };
        // The least y whose code reaches c: positive x = y, and negative x = -y (where the
        // code falls as y grows, from 254 - c for the same entry's mirror).
        let up_to = |c: i32| least(&|y| i32::from(nearest(map, y, signed)) >= c);
        let down_to = |c: i32| least(&|y| i32::from(nearest(map, -y, signed)) <= 254 - c);
        let mut cuts: [Cuts; 7] = [(0.0, 0.0); 7];
        for (i, cut) in cuts.iter_mut().enumerate() {
            let positive = up_to(first[i + 1]);
            // A negative value never reaches 1.0; past the last cut it codes as -0.99…
            // whichever decade the grid gives it, so decade 6's cut serves both.
            let negative = if signed && i < 6 { down_to(first[i + 1]) } else { positive };
            if negative != positive && negative.to_bits() + 1 != positive.to_bits() {
                return None;
            }
            *cut = (positive, negative);
        }
        let mut grid = DecadeGrid {
            foot: [0; 32],
            cut: [f32::INFINITY; 32],
            slope: [0.0; 16],
            offset: [0.0; 16],
            ceiling: [0.0; 16],
            above_zero: if signed { 0.0 } else { up_to(1) },
            signed,
        };
        for e in 104..=127u32 {
            let (low, high) = (f32::from_bits(e << 23), f32::from_bits((e + 1) << 23));
            let k = (e & 31) as usize;
            grid.foot[k] = cuts.iter().filter(|c| c.1 <= low).count() as i32;
            let inside: Vec<Cuts> = cuts.iter().copied().filter(|c| c.1 > low && c.1 < high).collect();
            match inside[..] {
                [] => {}
                [c] if c.0 < high => grid.cut[k] = c.1,
                _ => return None,
            }
        }
        for i in 0..8 {
            let scale = 10f64.powi(i as i32 - 6);
            let n = f64::from(cells[i]);
            if i < 7 {
                grid.slope[i] = (n / (0.9 * scale)) as f32;
                grid.offset[i] = (0.1 * n / 0.9 - f64::from(first[i]) - 256.0) as f32;
            } else {
                grid.offset[i] = -(255.5 + 256.0);
            }
            grid.ceiling[i] = (first[i] + cells[i]) as f32 - 0.5 + 256.0;
        }
        // The proof: at both sides of every threshold inside a decade, u is within the band
        // of the threshold's code; at each decade's least y, u is at or above the band of
        // its first code.
        let whole = |c: i32| (c as u32) << 15;
        let w = |y: f32| grid.fixed(y).0.wrapping_sub(Self::BASE);
        for i in 0..7 {
            let lowest = match i {
                0 if signed => vec![Self::FLOOR],
                0 => vec![grid.above_zero.max(Self::FLOOR)],
                _ => vec![cuts[i - 1].0, cuts[i - 1].1],
            };
            if lowest.iter().any(|&y| w(y) < whole(first[i]) - Self::BAND) {
                return None;
            }
            for c in first[i] + 1..first[i] + cells[i] {
                let sides = if signed { vec![up_to(c), down_to(c)] } else { vec![up_to(c)] };
                for t in sides {
                    let below = f32::from_bits(t.to_bits() - 1);
                    if w(t) < whole(c) - Self::BAND || w(below) >= whole(c) + Self::BAND {
                        return None;
                    }
                }
            }
        }
        Some(grid)
    }

    /// `u`'s bits for a magnitude `y` (not NaN), and whether `y` sits on its binade's cut
    /// (uncertain on the signed map). The same IEEE operations as the vector loop.
    fn fixed(&self, y: f32) -> (u32, bool) {
        let y = y.clamp(Self::FLOOR, Self::TOP);
        let k = ((y.to_bits() >> 23) & 31) as usize;
        let cut = self.cut[k];
        let decade = (self.foot[k] + i32::from(y >= cut)) as usize;
        let u = y.mul_add(self.slope[decade], -self.offset[decade]).min(self.ceiling[decade]);
        (u.to_bits(), y == cut)
    }

    /// The code of `x` (not NaN), or `None` when the grid is uncertain of it.
    #[cfg(test)]
    fn code(&self, x: f32) -> Option<u8> {
        let (u, on_cut) = self.fixed(x.abs());
        let uncertain = (u.wrapping_add(Self::BAND) & 0x7fff) < 2 * Self::BAND || (self.signed && on_cut);
        let c = (u >> 15) & 0xff;
        let code = if self.signed {
            if x == 0.0 {
                127
            } else if x < 0.0 {
                254 - c.min(254)
            } else {
                c
            }
        } else if x < self.above_zero {
            0
        } else {
            c
        };
        (!uncertain).then_some(code as u8)
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
    if let (Some(grid), Normalize::Times(inv), true) = (&q.grid, norm, x86::has_vbmi()) {
        // SAFETY: the CPU has the features, checked just above.
        return unsafe {
            if grid.signed {
                x86::quantize_grid::<true>(q, grid, values, inv, codes)
            } else {
                x86::quantize_grid::<false>(q, grid, values, inv, codes)
            }
        };
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

/// The block loops in AVX-512, 16 lanes with masked tails, with the portable loops' bits
/// (tested against them). Where the CPU has VBMI a code is computed on the
/// [`DecadeGrid`] and a dequantized value comes from byte permutes in registers; else a
/// code is one gathered cell and a value one gathered entry (lookups the compiler cannot
/// vectorize itself).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{DecadeGrid, Normalize, Quantizer, CODES};

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

    /// [`super::quantize_with`] by the [`DecadeGrid`] (`SIGNED`: its map's), for a block
    /// normalized by `inv`, the scale's reciprocal; 64 values a step: per 16 lanes the
    /// decade from two permutes and a compare, `u` from three more and a fused
    /// multiply-add, the code from `u`'s bits; the four vectors' low bytes packed by two
    /// byte permutes. A value the grid is uncertain of takes its code from the table.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL, DQ and VBMI ([`has_vbmi`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")]
    pub(crate) unsafe fn quantize_grid<const SIGNED: bool>(q: &Quantizer, g: &DecadeGrid, values: &[f32], inv: f32, codes: &mut [u8]) {
        let n = values.len().min(codes.len());
        // SAFETY: each table is 32 or 16 elements: two or one 16-lane loads.
        let (foot, cut, slope, offset, ceiling) = unsafe {
            (
                [_mm512_loadu_si512(g.foot.as_ptr().cast()), _mm512_loadu_si512(g.foot[16..].as_ptr().cast())],
                [_mm512_loadu_ps(g.cut.as_ptr()), _mm512_loadu_ps(g.cut[16..].as_ptr())],
                _mm512_loadu_ps(g.slope.as_ptr()),
                _mm512_loadu_ps(g.offset.as_ptr()),
                _mm512_loadu_ps(g.ceiling.as_ptr()),
            )
        };
        let (floor, top) = (_mm512_set1_ps(DecadeGrid::FLOOR), _mm512_set1_ps(DecadeGrid::TOP));
        let (one, band, fraction) = (_mm512_set1_epi32(1), _mm512_set1_epi32(DecadeGrid::BAND as i32), _mm512_set1_epi32(0x7fff));
        // The mirror of a negative value's code, 254 - c, on c still carrying 256's bits.
        let mirror = _mm512_set1_epi32((254 + (DecadeGrid::BASE >> 15)) as i32);
        let (zero_code, above_zero) = (_mm512_set1_epi32(127), _mm512_set1_ps(g.above_zero));
        let inv_lanes = _mm512_set1_ps(inv);
        let normalize = |x: __m512| _mm512_mul_ps(x, inv_lanes);
        // Codes (low bytes) and uncertain lanes of 16 normalized values.
        let sixteen = |x: __m512| -> (__m512i, __mmask16) {
            // min(|x|, TOP) then max with FLOOR, which also turns a NaN into FLOOR.
            let y = _mm512_max_ps(_mm512_range_ps::<0b1010>(x, top), floor);
            let k = _mm512_srli_epi32::<23>(_mm512_castps_si512(y));
            let cut = _mm512_permutex2var_ps(cut[0], k, cut[1]);
            let foot = _mm512_permutex2var_epi32(foot[0], k, foot[1]);
            let decade = _mm512_mask_add_epi32(foot, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, cut), foot, one);
            let u = _mm512_fmsub_ps(y, _mm512_permutexvar_ps(decade, slope), _mm512_permutexvar_ps(decade, offset));
            let u = _mm512_castps_si512(_mm512_min_ps(u, _mm512_permutexvar_ps(decade, ceiling)));
            let mut uncertain =
                _mm512_cmplt_epu32_mask(_mm512_and_si512(_mm512_add_epi32(u, band), fraction), _mm512_add_epi32(band, band));
            let c = _mm512_srli_epi32::<15>(u);
            let c = if SIGNED {
                uncertain |= _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(y, cut);
                let negative = _mm512_movepi32_mask(_mm512_castps_si512(x));
                let c = _mm512_mask_sub_epi32(c, negative, mirror, _mm512_min_epi32(c, mirror));
                _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask::<_CMP_EQ_UQ>(x, _mm512_setzero_ps()), zero_code)
            } else {
                // Below the first threshold, NaN included: 0.0's code.
                _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, above_zero), c)
            };
            (c, uncertain)
        };
        let exact = |j: usize, mut lanes: u64, codes: &mut [u8]| {
            while lanes != 0 {
                let l = j + lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                let x = values[l] * inv;
                codes[l] = q.lookup(if x.is_nan() { 0.0 } else { x });
            }
        };
        let mut order = [0u8; 64];
        for (p, o) in order.iter_mut().enumerate() {
            *o = (4 * (p % 32)) as u8;
        }
        // SAFETY: 64 bytes.
        let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
        let whole = n / 64 * 64;
        for j in (0..whole).step_by(64) {
            // SAFETY: j + 64 <= n: the loads and the store stay within both slices.
            unsafe {
                let at = |r: usize| sixteen(normalize(_mm512_loadu_ps(values.as_ptr().add(j + 16 * r))));
                let ((c0, u0), (c1, u1), (c2, u2), (c3, u3)) = (at(0), at(1), at(2), at(3));
                let low = _mm512_permutex2var_epi8(c0, order, c1);
                let high = _mm512_permutex2var_epi8(c2, order, c3);
                _mm512_storeu_si512(codes.as_mut_ptr().add(j).cast(), _mm512_mask_blend_epi8(!0u64 << 32, low, high));
                let uncertain = u64::from(u0) | u64::from(u1) << 16 | u64::from(u2) << 32 | u64::from(u3) << 48;
                if uncertain != 0 {
                    exact(j, uncertain, codes);
                }
            }
        }
        for j in (whole..n).step_by(16) {
            let k = lanes(n - j);
            // SAFETY: the masked loads and stores stay below n, within both slices.
            unsafe {
                let (c, uncertain) = sixteen(normalize(load(values.as_ptr().add(j), n - j)));
                _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(j).cast(), k, c);
                exact(j, u64::from(uncertain & k), codes);
            }
        }
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
            assert!(q.has_grid(), "the grid's proof holds");
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

    /// Where the grid is certain it gives [`nearest`]'s code: at every entry, midpoint and
    /// threshold and a few thousand ulps around them, on every bucket edge and on a sweep
    /// of bit patterns; and it is uncertain of few values.
    #[test]
    fn the_grid_is_exact_where_it_is_certain() {
        for signed in [true, false] {
            let (map, q) = (dynamic_map(signed), Quantizer::get(signed));
            let grid = q.grid.as_ref().expect("the grid's proof holds");
            let mut xs: Vec<f32> = Vec::new();
            for w in map.windows(2) {
                for c in [w[0], w[1], (w[0] + w[1]) / 2.0] {
                    xs.extend((-2000i32..=2000).map(|d| f32::from_bits(c.to_bits().wrapping_add(d as u32))));
                }
            }
            xs.extend((0..1u32 << 16).flat_map(|b| [f32::from_bits(b << 16), f32::from_bits((b << 16) | 0xffff)]));
            xs.extend((0..1u32 << 22).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9) | 1)));
            xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1.0, -1.0, 1.5, -1.5, DecadeGrid::FLOOR, f32::MIN_POSITIVE]);
            let (mut uncertain, mut total) = (0usize, 0usize);
            for x in xs.into_iter().filter(|x| !x.is_nan()) {
                total += 1;
                match grid.code(x) {
                    Some(c) => assert_eq!(c, nearest(map, x, signed), "signed={signed} x={x:e} ({:#x})", x.to_bits()),
                    None => uncertain += 1,
                }
            }
            // Uniform values in [-1, 1]: the band is 2^-13 of a cell.
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            let sample: Vec<f32> = (0..1 << 20)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect();
            let unsure = sample.iter().filter(|&&x| grid.code(if signed { x } else { x.abs() }).is_none()).count();
            assert!(unsure * 2000 < sample.len(), "signed={signed}: {unsure} of {} uniform values uncertain", sample.len());
            assert!(uncertain < total, "signed={signed}");
            // And the vector loop, uncertain values included, gives nearest's codes.
            #[cfg(target_arch = "x86_64")]
            if x86::has_vbmi() {
                let mut xs: Vec<f32> = (0..1u32 << 23).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9) >> (i % 3))).collect();
                xs.extend(sample.iter().map(|x| if signed { *x } else { x.abs() }));
                let mut codes = vec![0u8; xs.len()];
                // SAFETY: the CPU has the features, checked just above.
                unsafe {
                    if signed {
                        x86::quantize_grid::<true>(q, grid, &xs, 1.0, &mut codes)
                    } else {
                        x86::quantize_grid::<false>(q, grid, &xs, 1.0, &mut codes)
                    }
                };
                for (x, c) in xs.iter().zip(&codes) {
                    assert_eq!(*c, nearest(map, if x.is_nan() { 0.0 } else { *x }, signed), "signed={signed} x={x:e}");
                }
            }
        }
    }

    /// The proof rejects a map the grid does not fit: one entry moved by a percent.
    #[test]
    fn the_grid_proof_can_fail() {
        for signed in [true, false] {
            let mut moved = *dynamic_map(signed);
            moved[200] *= 1.01;
            assert!(DecadeGrid::build(&moved, signed).is_none(), "signed={signed}");
            assert!(DecadeGrid::build(dynamic_map(signed), signed).is_some(), "signed={signed}");
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
                    if let (true, Some(grid)) = (x86::has_vbmi(), &q.grid) {
                        // The grid loop, whole 64-value steps and 16-lane tails, with a
                        // block long enough for both: the values repeated with their
                        // neighbours one ulp off.
                        let long: Vec<f32> = values.iter().flat_map(|v| [*v, f32::from_bits(v.to_bits() + 1), -*v]).collect();
                        let (mut c, mut d) = (vec![7u8; long.len()], vec![7u8; long.len()]);
                        let Normalize::Times(inv) = Normalize::new(s) else { continue };
                        // SAFETY: the CPU has VBMI, checked just above.
                        unsafe {
                            if signed {
                                x86::quantize_grid::<true>(q, grid, &long, inv, &mut c)
                            } else {
                                x86::quantize_grid::<false>(q, grid, &long, inv, &mut c)
                            }
                        };
                        quantize_portable(q, &long, Normalize::new(s), &mut d);
                        assert_eq!(c, d, "grid signed={signed} trial {trial} scale {s}");
                    }
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
