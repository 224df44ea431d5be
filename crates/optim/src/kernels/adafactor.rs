//! Adafactor (torch 2.15's `torch.optim.Adafactor`): second moments factored into row and
//! column statistics for every parameter of two or more dimensions (over its last two,
//! batched over the others), a per-element one for the rest, and an update clipped by
//! its RMS.
//!
//! With s the parameter's step, ω = s^beta2_decay, ρ = min(lr, 1/sqrt(s)),
//! α = max(eps2, RMS(p))·ρ (p before the decay):
//!
//! ```text
//! p  *= 1 - lr·wd
//! R×C: row = lerp(row, mean_C(g²), ω); col = lerp(col, mean_R(g²), ω)
//!      V_ij = row_i·col_j / max(mean(row), eps1)
//! else: v = lerp(v, g², ω); V = v
//! U = g / sqrt(max(V, eps1²));  p -= α / max(1, RMS(U)/d) · U
//! ```
//!
//! The statistics span the whole parameter, so it runs on whole parameters.

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::error::{OptimError, Result};
use crate::kernels::{Kernel, Segment};
use crate::layout::ParamSpec;
use crate::kernels::muon::lerp;
use rayon::prelude::*;

use crate::simd::wide_fn;

/// f32's machine epsilon, torch's `finfo(float32).eps`: eps1's default.
pub const F32_EPS: f64 = f32::EPSILON as f64;

/// How many state elements a parameter of `shape` needs in each of the three buffers
/// (`row_var`, `col_var`, `variance`): factored for two or more dimensions.
pub fn state_sizes(shape: &[usize]) -> [usize; 3] {
    if shape.len() >= 2 {
        let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let batch: usize = shape[..shape.len() - 2].iter().product();
        [batch * r, batch * c, 0]
    } else {
        [0, 0, shape.iter().product()]
    }
}

/// Row blocks (at most) of a factored matrix's statistics pass: each keeps one partial
/// sum per column, so the partial sums cost at most this many rows of f64.
const ROW_BLOCKS: usize = 64;
/// Rows per block (at least): the partial sums stay under 1/16 of the matrix's elements.
const MIN_BLOCK_ROWS: usize = 16;
/// Columns per tile of that pass (16 KiB of each row).
const COL_CHUNK: usize = 4096;

/// Elements per partial sum: sums are taken chunk by chunk in a fixed order, so the
/// result is the same bits on any number of threads.
const SUM_CHUNK: usize = 1 << 14;

/// torch's RMS: the f64 2-norm rounded to f32, over sqrt(numel).
fn rms_of(sum_sq: f64, n: usize) -> f64 {
    (sum_sq.sqrt() as f32) as f64 / (n as f64).sqrt()
}

/// One Adafactor step of a whole parameter of `shape` taking its `step`-th step (from 1);
/// `row`, `col`, `v` are its state (sized by [`state_sizes`]). Gradients are multiplied by
/// `grad_scale` as they are read (the clip coefficient).
///
/// Passes, each parallel over fixed pieces: a matrix's row and column statistics (one
/// streaming pass over g); then Σp² with Σ U², U computed piece by piece from g and the
/// new moments (never stored whole; a vector's v is updated in this pass); then the
/// update with U computed again: re-reading g costs less than writing and reading a
/// stored U. The pieces are fixed by the shape, so the bits do not depend on threads.
#[allow(clippy::too_many_arguments)]
pub fn update(
    c: &AdafactorConfig,
    shape: &[usize],
    step: u64,
    p: &mut [f32],
    g: &[f32],
    row: &mut [f32],
    col: &mut [f32],
    v: &mut [f32],
    grad_scale: f32,
) {
    // -(x·s) and x·(-s) are the same bits; one multiplier keeps the loops branch-free.
    let scale = if c.maximize { -grad_scale } else { grad_scale };
    let eps1 = c.eps.0.unwrap_or(F32_EPS) as f32;
    let eps1_sq = eps1 * eps1;
    
    let s = step as f64;
    let omega = s.powf(c.beta2_decay) as f32;
    let rho = c.lr.min(1.0 / s.sqrt());
    let decay = (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32);
    let n = g.len();
    let factored = shape.len() >= 2;
    let (r, cn) = if factored { (shape[shape.len() - 2], shape[shape.len() - 1]) } else { (1, n) };
    let mut means = Vec::new();
    if factored {
        let batch = n / (r * cn).max(1);
        for bi in 0..batch {
            let gm = &g[bi * r * cn..(bi + 1) * r * cn];
            let (rows, cols) = (&mut row[bi * r..(bi + 1) * r], &mut col[bi * cn..(bi + 1) * cn]);
            // One streaming pass over the gradient in tiles of rows × columns: each tile
            // adds its rows' Σg² over its columns (eight lanes) and its columns' Σg²
            // over its rows (rows in order). A row then adds its tiles left to right, a
            // column its tiles top to bottom. The tiling depends on the shape only, so
            // the bits do not depend on the number of threads; the partial sums cost at
            // most ROW_BLOCKS rows and 1/MIN_BLOCK_ROWS of the matrix in f64.
            let per = r.div_ceil(ROW_BLOCKS).max(MIN_BLOCK_ROWS).min(r).max(1);
            let width = COL_CHUNK.min(cn).max(1);
            let (blocks, chunks) = (r.div_ceil(per), cn.div_ceil(width));
            let mut col_part = vec![0f64; blocks * cn];
            let mut row_part = vec![0f64; blocks * chunks * per];
            col_part.par_chunks_mut(cn.max(1)).zip(row_part.par_chunks_mut(chunks * per)).enumerate().for_each(|(b, (cols_b, rows_b))| {
                cols_b.par_chunks_mut(width).zip(rows_b.par_chunks_mut(per)).enumerate().for_each(|(c, (acc, sums))| {
                    let (j0, rows) = (c * width, (r - b * per).min(per));
                    for (k, sum) in sums[..rows].iter_mut().enumerate() {
                        let at = (b * per + k) * cn + j0;
                        *sum = row_col_squares(acc, &gm[at..at + acc.len()], scale);
                    }
                });
            });
            rows.par_iter_mut().enumerate().for_each(|(i, ri)| {
                let (b, k) = (i / per, i % per);
                let sum = (0..chunks).fold(0f64, |t, c| t + row_part[(b * chunks + c) * per + k]);
                let norm = sum.sqrt() as f32;
                *ri = lerp(*ri, norm * norm / cn as f32, omega);
            });
            let col_part = &col_part;
            cols.par_chunks_mut(256).enumerate().for_each(|(bj, cb)| {
                let j0 = bj * 256;
                let mut acc = vec![0f64; cb.len()];
                for block in col_part.chunks(cn) {
                    add(&mut acc, &block[j0..j0 + cb.len()]);
                }
                cb.iter_mut().zip(&acc).for_each(|(cj, a)| {
                    let norm = a.sqrt() as f32;
                    *cj = lerp(*cj, norm * norm / r as f32, omega);
                });
            });
            means.push(((rows.iter().map(|&x| f64::from(x)).sum::<f64>() / r as f64) as f32).max(eps1));
        }
        let (row, col, means) = (&*row, &*col, &means);
        // One of the two passes over the elements k0.. of a piece, row segment by row
        // segment (a segment shares its row statistic).
        let pass = |k0: usize, gc: &[f32], mut pass: UPass<'_>| {
            let mut k = k0;
            while k < k0 + gc.len() {
                let (bi, i, j) = (k / (r * cn), k / cn % r, k % cn);
                let len = (cn - j).min(k0 + gc.len() - k);
                let (ri, mean) = (row[bi * r + i], means[bi]);
                let cols = &col[bi * cn + j..bi * cn + j + len];
                let (at, gs) = (k - k0..k - k0 + len, &gc[k - k0..k - k0 + len]);
                match &mut pass {
                    UPass::Measure { u, p, p_lanes } => {
                        factored_u_p_sq(&mut u[at.clone()], gs, cols, &p[at], ri, mean, eps1_sq, scale, p_lanes, k % 8)
                    }
                    UPass::Step { p, step_size, decay } => factored_step(&mut p[at], gs, cols, ri, mean, eps1_sq, scale, *step_size, *decay),
                }
                k += len;
            }
        };
        let alpha = |sum_sq_p: f64| c.eps.1.max(rms_of(sum_sq_p, n)) * rho;
        apply(p, g, pass, alpha, c.d, decay);
    } else {
        // Two passes over pieces: Σp², the new v and ΣU² in the first (RMS(p) is of p
        // before the step, which only the second changes); the update in the second, U
        // computed again from g and v. Each piece's sums are the ones the separate passes
        // took, added up in the same order.
        let sums: Vec<(f64, f64)> = p
            .par_chunks(SUM_CHUNK)
            .zip(g.par_chunks(SUM_CHUNK))
            .zip(v.par_chunks_mut(SUM_CHUNK))
            .map_init(|| vec![0f32; SUM_CHUNK], |u, ((pc, gc), vc)| variance_piece(pc, gc, vc, &mut u[..gc.len()], scale, omega, eps1_sq))
            .collect();
        let alpha = c.eps.1.max(rms_of(sums.iter().map(|s| s.0).sum(), n)) * rho;
        let step_size = (-alpha / (rms_of(sums.iter().map(|s| s.1).sum(), n) / c.d).max(1.0)) as f32;
        // A decay of 1 when there is none: x·1 + s·u is x + s·u, bit for bit.
        let decay = decay.unwrap_or(1.0);
        p.par_chunks_mut(SUM_CHUNK).zip(g.par_chunks(SUM_CHUNK)).zip(v.par_chunks(SUM_CHUNK)).for_each(|((pc, gc), vc)| {
            update_piece(pc, gc, vc, scale, eps1_sq, step_size, decay);
        });
    }
}

wide_fn! {
    /// The first pass over a piece of an unfactored parameter: `v = lerp(v, g², ω)`, then
    /// U = g / sqrt(max(v, eps1²)) into `u`; returns (Σp², ΣU²).
    fn variance_piece(p: &[f32], g: &[f32], v: &mut [f32], u: &mut [f32], scale: f32, omega: f32, eps1_sq: f32) -> (f64, f64) {
        // torch's lerp, its branch on the weight taken once for the piece.
        if omega.abs() < 0.5 {
            for (vk, &gk) in v.iter_mut().zip(g) {
                let gk = gk * scale;
                *vk += omega * (gk * gk - *vk);
            }
        } else {
            for (vk, &gk) in v.iter_mut().zip(g) {
                let gk = gk * scale;
                *vk = gk * gk - (gk * gk - *vk) * (1.0 - omega);
            }
        }
        for ((o, &gk), &vk) in u.iter_mut().zip(g).zip(v.iter()) {
            *o = 1.0 / vk.max(eps1_sq).sqrt() * (gk * scale);
        }
        (sum_sq(p, 1.0), sum_sq(u, 1.0))
    }
}

wide_fn! {
    /// The second pass over a piece of an unfactored parameter: `p = p·decay + s·U`.
    fn update_piece(p: &mut [f32], g: &[f32], v: &[f32], scale: f32, eps1_sq: f32, step_size: f32, decay: f32) {
        for ((x, &gk), &vk) in p.iter_mut().zip(g).zip(v) {
            let u = 1.0 / vk.max(eps1_sq).sqrt() * (gk * scale);
            *x = *x * decay + step_size * u;
        }
    }
}

/// Σ (x·scale)² in f64 over a piece, in 8 lanes added up in order (a scale of 1 is
/// exact).
fn sum_sq(x: &[f32], scale: f32) -> f64 {
    let mut lanes = [0f64; 8];
    let rest = add_sq_lanes(&mut lanes, x, scale);
    lanes.iter().sum::<f64>() + rest
}

wide_fn! {
    /// [`sum_sq`] taken piece by piece: element k of `x` adds its (x·scale)² to lane k % 8
    /// up to the last multiple of 8; returns the sum of the rest. A sum over pieces whose
    /// lengths are multiples of 8 (but the last) is [`sum_sq`] over the whole, bit for bit.
    fn add_sq_lanes(lanes: &mut [f64; 8], x: &[f32], scale: f32) -> f64 {
        let mut pieces = x.chunks_exact(8);
        for piece in pieces.by_ref() {
            for (l, &v) in lanes.iter_mut().zip(piece) {
                let v = f64::from(v * scale);
                *l += v * v;
            }
        }
        pieces.remainder().iter().map(|&v| f64::from(v * scale) * f64::from(v * scale)).sum::<f64>()
    }
}

/// How far ahead of the element being read the statistics pass asks for its cache line:
/// 16 KiB. The pass reads g too slowly for the hardware prefetcher to keep ahead of it
/// (4096x2442 at 1 thread: 8.6 -> 7.6 ms; 16384 ahead measured the same, 1024 less).
const AHEAD: usize = 4096;

/// Asks for the cache line at `at` (any address: a prefetch is a hint).
#[inline(always)]
fn prefetch(at: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address; nothing is read.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

wide_fn! {
    /// One row's piece of a factored matrix's statistics: `acc[j] += (x[j]·scale)²` (its
    /// share of the column sums, in f64), and returns its own Σ (x·scale)², the bits of
    /// [`sum_sq`]. Each square is taken once for both.
    fn row_col_squares(acc: &mut [f64], x: &[f32], scale: f32) -> f64 {
        let mut lanes = [0f64; 8];
        let whole = x.len() / 8 * 8;
        for (j, (a, piece)) in acc[..whole].chunks_exact_mut(8).zip(x[..whole].chunks_exact(8)).enumerate() {
            if j % 2 == 0 {
                prefetch(piece.as_ptr().wrapping_add(AHEAD));
            }
            for ((l, a), &v) in lanes.iter_mut().zip(a).zip(piece) {
                let v = f64::from(v * scale);
                let sq = v * v;
                *l += sq;
                *a += sq;
            }
        }
        let mut rest = 0f64;
        for (a, &v) in acc[whole..].iter_mut().zip(&x[whole..]) {
            let v = f64::from(v * scale);
            let sq = v * v;
            rest += sq;
            *a += sq;
        }
        lanes.iter().sum::<f64>() + rest
    }
}

wide_fn! {
    /// `acc[j] += x[j]`: one row block's column sums into the total.
    fn add(acc: &mut [f64], x: &[f64]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
    }
}

/// U along one row of a factored parameter: g / sqrt(max(row·col/mean, eps1²)).
#[inline(always)]
fn factored_u(gk: f32, cj: f32, row: f32, mean: f32, eps1_sq: f32, scale: f32) -> f32 {
    1.0 / (row * cj / mean).max(eps1_sq).sqrt() * (gk * scale)
}

wide_fn! {
    /// The step along one row segment of a factored parameter: `p = p·decay + s·U`, U
    /// computed as it goes.
    fn factored_step(p: &mut [f32], g: &[f32], cols: &[f32], row: f32, mean: f32, eps1_sq: f32, scale: f32, step_size: f32, decay: f32) {
        for ((x, &gk), &cj) in p.iter_mut().zip(g).zip(cols) {
            *x = *x * decay + step_size * factored_u(gk, cj, row, mean, eps1_sq, scale);
        }
    }
}

wide_fn! {
    /// U along one row segment into `out` ([`factored_u`]), adding each p² of the segment
    /// to lane `(lane0 + i) % 8` as it goes: Σp² rides in the loop whose divisions and
    /// roots leave the memory idle, where a loop of its own would wait on it.
    fn factored_u_p_sq(
        out: &mut [f32],
        g: &[f32],
        cols: &[f32],
        p: &[f32],
        row: f32,
        mean: f32,
        eps1_sq: f32,
        scale: f32,
        lanes: &mut [f64; 8],
        lane0: usize,
    ) {
        let u = |gk: f32, cj: f32| factored_u(gk, cj, row, mean, eps1_sq, scale);
        let head = ((8 - lane0 % 8) % 8).min(out.len());
        for (i, (((o, &gk), &cj), &pk)) in out.iter_mut().zip(g).zip(cols).zip(p).take(head).enumerate() {
            *o = u(gk, cj);
            lanes[(lane0 + i) % 8] += f64::from(pk) * f64::from(pk);
        }
        // From here element i goes to lane i % 8.
        let (out, g, cols, p) = (&mut out[head..], &g[head..], &cols[head..], &p[head..]);
        // Sixteen at a time, so that U is computed sixteen lanes wide.
        let whole = out.len().min(g.len()).min(cols.len()).min(p.len()) / 16 * 16;
        let (o16, g16, c16, p16) = (out[..whole].chunks_exact_mut(16), g[..whole].chunks_exact(16), cols[..whole].chunks_exact(16), p[..whole].chunks_exact(16));
        for (((o16, g16), c16), p16) in o16.zip(g16).zip(c16).zip(p16) {
            for ((o, &gk), &cj) in o16.iter_mut().zip(g16).zip(c16) {
                *o = u(gk, cj);
            }
            for p8 in p16.chunks_exact(8) {
                for (l, &pk) in lanes.iter_mut().zip(p8) {
                    *l += f64::from(pk) * f64::from(pk);
                }
            }
        }
        for (i, (((o, &gk), &cj), &pk)) in out.iter_mut().zip(g).zip(cols).zip(p).enumerate().skip(whole) {
            *o = u(gk, cj);
            lanes[i % 8] += f64::from(pk) * f64::from(pk);
        }
    }
}

/// Elements of U held at a time inside a [`SUM_CHUNK`] piece of the first pass: 4 KiB,
/// so U stays in L1 between the loop that computes it and the one that squares it (a
/// multiple of 8, so the piece's Σ U² keeps its lanes).
const U_PIECE: usize = 1024;

/// What a pass over a factored matrix does with U, computed from g and the statistics.
enum UPass<'a> {
    /// Writes U into `u` and adds Σp² of the same elements into `p_lanes` (element k of
    /// the matrix into lane k % 8).
    Measure { u: &'a mut [f32], p: &'a [f32], p_lanes: &'a mut [f64; 8] },
    /// `p = p·decay + step_size·U`.
    Step { p: &'a mut [f32], step_size: f32, decay: f32 },
}

/// The update `p = p·decay - α / max(1, RMS(U)/d) · U`, where α = `alpha(Σp²)` and
/// `pass(k0, g_piece, what)` runs one of the two passes over the elements `k0..` of a
/// piece: the first measures Σp² and Σ U² ([`U_PIECE`] elements of U at a time, never the
/// whole of it), the second steps p, U computed again in the same loop. Σp² rides along
/// with the first pass, whose divisions and square roots leave the memory idle, and the
/// step writes p in the loop that computes U.
///
/// Σp² per [`SUM_CHUNK`] piece is 8 lanes over it (element k to lane k % 8), added up in
/// order; Σ U² the bits of `sum_sq` over the piece.
fn apply(
    p: &mut [f32],
    g: &[f32],
    pass: impl Fn(usize, &[f32], UPass<'_>) + Sync,
    alpha: impl FnOnce(f64) -> f64,
    d: f64,
    decay: Option<f32>,
) {
    let partials: Vec<(f64, f64)> = p
        .par_chunks(SUM_CHUNK)
        .zip(g.par_chunks(SUM_CHUNK))
        .enumerate()
        .map_init(
            || vec![0f32; U_PIECE],
            |u, (ci, (pc, gc))| {
                let (mut lanes, mut rest, mut p_lanes) = ([0f64; 8], 0f64, [0f64; 8]);
                for (k, (gs, ps)) in gc.chunks(U_PIECE).zip(pc.chunks(U_PIECE)).enumerate() {
                    let u = &mut u[..gs.len()];
                    pass(ci * SUM_CHUNK + k * U_PIECE, gs, UPass::Measure { u, p: ps, p_lanes: &mut p_lanes });
                    rest += add_sq_lanes(&mut lanes, u, 1.0);
                }
                (p_lanes.iter().sum::<f64>(), lanes.iter().sum::<f64>() + rest)
            },
        )
        .collect();
    let alpha = alpha(partials.iter().map(|s| s.0).sum());
    let step_size = (-alpha / (rms_of(partials.iter().map(|s| s.1).sum(), g.len()) / d).max(1.0)) as f32;
    // A decay of 1 when there is none: x·1 + s·u is x + s·u, bit for bit.
    let decay = decay.unwrap_or(1.0);
    p.par_chunks_mut(SUM_CHUNK).zip(g.par_chunks(SUM_CHUNK)).enumerate().for_each(|(ci, (pc, gc))| {
        pass(ci * SUM_CHUNK, gc, UPass::Step { p: pc, step_size, decay });
    });
}

/// `torch.optim.Adafactor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdafactorConfig {
    /// The learning rate (ρ's upper bound).
    pub lr: f64,
    /// The exponent of ω = step^beta2_decay (torch's default -0.8).
    pub beta2_decay: f64,
    /// eps1 (`None`: f32's machine epsilon, 2^-23) and eps2.
    pub eps: (Option<f64>, f64),
    /// The update's RMS clipping threshold (>= 1).
    pub d: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig { lr: 1e-2, beta2_decay: -0.8, eps: (None, 1e-3), d: 1.0, weight_decay: 0.0, maximize: false }
    }
}

impl Kernel for AdafactorConfig {
    fn name(&self) -> &'static str {
        "adafactor"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        if self.beta2_decay > 0.0 || self.beta2_decay.is_nan() {
            return invalid(format!("beta2_decay should be <= 0 but is: {}", self.beta2_decay));
        }
        if self.d.is_nan() || self.d < 1.0 {
            return invalid(format!("clipping threshold d should be >= 1 but is: {}", self.d));
        }
        if self.eps.0.is_some_and(|e| !non_negative(e)) || !non_negative(self.eps.1) {
            return invalid(format!("epsilon values should be >= 0 but are: {:?}", self.eps));
        }
        if !non_negative(self.weight_decay) {
            return invalid(format!("weight_decay should be >= 0 but is: {}", self.weight_decay));
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec!["row_var", "col_var", "variance"]
    }

    fn whole_params(&self) -> bool {
        true
    }

    fn state_len(&self, name: &str, param: &ParamSpec) -> usize {
        let [rows, cols, variance] = state_sizes(&param.shape);
        match name {
            "row_var" => rows,
            "col_var" => cols,
            _ => variance,
        }
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let Segment { params, grads, state, step, grad_scale, whole, .. } = segment;
        let [row, col, var]: [&mut [f32]; 3] =
            state.try_into().map_err(|_| OptimError::ShapeMismatch("adafactor runs without its three buffers".into()))?;
        // Each buffer holds the parameters' packed statistics one after another. The
        // parameters are independent: cut everything into per-parameter pieces and step
        // them in parallel (a layout of many small tensors has no parallelism inside one).
        type Piece<'a> = (&'a ParamSpec, &'a mut [f32], &'a [f32], [&'a mut [f32]; 3]);
        let mut pieces: Vec<Piece<'_>> = Vec::with_capacity(whole.len());
        let (mut p_rest, mut g_rest, mut at) = (params, grads, 0usize);
        let mut stats = [row, col, var];
        for (spec, l) in whole {
            let too_short = || OptimError::ShapeMismatch(format!("adafactor segment or state too short for '{}'", spec.name));
            let skip = l.start.checked_sub(at).filter(|&k| k + l.len() <= p_rest.len().min(g_rest.len())).ok_or_else(too_short)?;
            let (p, g);
            (p, p_rest) = std::mem::take(&mut p_rest)[skip..].split_at_mut(l.len());
            (g, g_rest) = g_rest[skip..].split_at(l.len());
            at = l.end;
            let sizes = state_sizes(&spec.shape);
            if stats.iter().zip(&sizes).any(|(b, &k)| b.len() < k) {
                return Err(too_short());
            }
            let mut take = |b: usize| {
                let (mine, rest) = std::mem::take(&mut stats[b]).split_at_mut(sizes[b]);
                stats[b] = rest;
                mine
            };
            let (rows, cols, vars) = (take(0), take(1), take(2));
            pieces.push((spec, p, g, [rows, cols, vars]));
        }
        pieces.into_par_iter().for_each(|(spec, p, g, [rows, cols, vars])| {
            update(self, &spec.shape, step, p, g, rows, cols, vars, grad_scale);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_factored_for_matrices_only() {
        assert_eq!(state_sizes(&[4, 5]), [4, 5, 0]);
        assert_eq!(state_sizes(&[2, 4, 5]), [8, 10, 0]);
        assert_eq!(state_sizes(&[5]), [0, 0, 5]);
        assert_eq!(state_sizes(&[]), [0, 0, 1]);
    }

    /// A scalar's first step: v = g² (ω = 1), U = sign(g), RMS(U) = 1, so p moves by
    /// α = max(eps2, |p|)·min(lr, 1) against the gradient.
    #[test]
    fn a_scalar_moves_by_alpha() {
        let c = AdafactorConfig::default();
        let (mut p, mut v) = ([0.5f32], [0f32]);
        update(&c, &[], 1, &mut p, &[2.0], &mut [], &mut [], &mut v, 1.0);
        assert_eq!(v[0], 4.0);
        assert!((p[0] - (0.5 - 0.5 * 0.01)).abs() < 1e-7, "{}", p[0]);
    }

    /// Σx² as the kernel takes it: pieces of SUM_CHUNK, eight lanes each, in order.
    fn plain_sum_sq(x: &[f32]) -> f64 {
        let piece = |x: &[f32]| {
            let mut lanes = [0f64; 8];
            let whole = x.len() / 8 * 8;
            for (k, &v) in x[..whole].iter().enumerate() {
                lanes[k % 8] += f64::from(v) * f64::from(v);
            }
            lanes.iter().sum::<f64>() + x[whole..].iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()
        };
        x.chunks(SUM_CHUNK).map(piece).collect::<Vec<f64>>().iter().sum()
    }

    /// The fused passes over an unfactored parameter give the bits of the rule taken a
    /// pass at a time (torch's order: RMS(p), v, U whole, RMS(U), the update), at every
    /// branch of the lerp, with and without decay, maximizing or not, over several pieces
    /// and a ragged end.
    #[test]
    fn the_fused_passes_equal_the_rule_pass_by_pass() {
        let n = 3 * SUM_CHUNK + 77;
        let wave = |k: f32, a: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * a).collect() };
        for (weight_decay, maximize) in [(0.0, false), (0.1, true)] {
            let c = AdafactorConfig { weight_decay, maximize, ..AdafactorConfig::default() };
            let (mut p, mut v) = (wave(0.013, 2.0), vec![0f32; n]);
            let (mut want_p, mut want_v) = (p.clone(), v.clone());
            for step in 1..=4u64 {
                let g = wave(0.7 + step as f32, 0.3);
                update(&c, &[n], step, &mut p, &g, &mut [], &mut [], &mut v, 0.5);
                // By the rule, a pass at a time.
                let scale = if maximize { -0.5f32 } else { 0.5 };
                let eps1_sq = (F32_EPS as f32) * (F32_EPS as f32);
                let omega = (step as f64).powf(c.beta2_decay) as f32;
                let alpha = c.eps.1.max(rms_of(plain_sum_sq(&want_p), n)) * c.lr.min(1.0 / (step as f64).sqrt());
                for (vk, &gk) in want_v.iter_mut().zip(&g) {
                    *vk = lerp(*vk, (gk * scale) * (gk * scale), omega);
                }
                let u: Vec<f32> = want_v.iter().zip(&g).map(|(&vk, &gk)| 1.0 / vk.max(eps1_sq).sqrt() * (gk * scale)).collect();
                let step_size = (-alpha / (rms_of(plain_sum_sq(&u), n) / c.d).max(1.0)) as f32;
                let decay = (1.0 - c.lr * c.weight_decay) as f32;
                for (x, &uk) in want_p.iter_mut().zip(&u) {
                    *x = if weight_decay != 0.0 { *x * decay + step_size * uk } else { *x + step_size * uk };
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&v), bits(&want_v), "v, step {step}");
                assert_eq!(bits(&p), bits(&want_p), "p, step {step}");
            }
        }
    }

    /// The factored statistics pass is tiled by shape only: the same bits on 1 and 3
    /// threads, and each row's and column's mean of g² as a plain sum gives it. The
    /// update is the rule's, U taken whole, to the bit, with Σp² as `apply` defines it.
    #[test]
    fn the_factored_statistics_are_tiled_by_shape_only() {
        let c = AdafactorConfig::default();
        for shape in [vec![37usize, 29], vec![100, 4100], vec![2, 17, 5000]] {
            let n: usize = shape.iter().product();
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32)).collect();
            let p0: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32 * 0.011).cos()).collect();
            let run = |threads: usize| {
                let [nr, nc, _] = state_sizes(&shape);
                let (mut p, mut row, mut col) = (p0.clone(), vec![0f32; nr], vec![0f32; nc]);
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| update(&c, &shape, 1, &mut p, &g, &mut row, &mut col, &mut [], 1.0));
                (p, row, col)
            };
            let (one, three) = (run(1), run(3));
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&one.0), bits(&one.1), bits(&one.2)), (bits(&three.0), bits(&three.1), bits(&three.2)), "{shape:?}");
            // Step 1 (ω = 1): the statistics are the means of g² themselves.
            let (r, cn) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            for (m, block) in g.chunks(r * cn).enumerate() {
                for i in 0..r {
                    let want = block[i * cn..(i + 1) * cn].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / cn as f64;
                    let got = f64::from(one.1[m * r + i]);
                    assert!((got - want).abs() <= 1e-6 * want, "{shape:?} row {i}: {got} vs {want}");
                }
                for j in 0..cn {
                    let want = (0..r).map(|i| f64::from(block[i * cn + j]).powi(2)).sum::<f64>() / r as f64;
                    let got = f64::from(one.2[m * cn + j]);
                    assert!((got - want).abs() <= 1e-6 * want, "{shape:?} column {j}: {got} vs {want}");
                }
            }
            // The update by the rule from those statistics, a pass at a time.
            let eps1_sq = (F32_EPS as f32) * (F32_EPS as f32);
            let mut u = vec![0f32; n];
            for (m, (ub, gb)) in u.chunks_mut(r * cn).zip(g.chunks(r * cn)).enumerate() {
                let rows = &one.1[m * r..(m + 1) * r];
                let mean = ((rows.iter().map(|&x| f64::from(x)).sum::<f64>() / r as f64) as f32).max(F32_EPS as f32);
                for (k, (uk, &gk)) in ub.iter_mut().zip(gb).enumerate() {
                    *uk = 1.0 / (rows[k / cn] * one.2[m * cn + k % cn] / mean).max(eps1_sq).sqrt() * gk;
                }
            }
            // Σp² per SUM_CHUNK piece: element k to lane k % 8, lanes added up in order.
            let p_sq: f64 = p0
                .chunks(SUM_CHUNK)
                .map(|piece| {
                    let mut lanes = [0f64; 8];
                    piece.iter().enumerate().for_each(|(k, &x)| lanes[k % 8] += f64::from(x) * f64::from(x));
                    lanes.iter().sum::<f64>()
                })
                .collect::<Vec<f64>>()
                .iter()
                .sum();
            let alpha = c.eps.1.max(rms_of(p_sq, n)) * c.lr.min(1.0);
            let step_size = (-alpha / (rms_of(plain_sum_sq(&u), n) / c.d).max(1.0)) as f32;
            let want: Vec<u32> = u.iter().zip(&p0).map(|(&uk, &x)| (x + step_size * uk).to_bits()).collect();
            assert_eq!(bits(&one.0), want, "{shape:?}: the update");
        }
    }
}
