//! Muon (torch 2.15's `torch.optim.Muon`): momentum, then the update orthogonalised by a
//! quintic Newton–Schulz iteration run in bf16, scaled by the matrix shape.
//!
//! For a parameter p of shape A×B with gradient g and momentum buffer `buf` (zero at
//! first), momentum μ:
//!
//! ```text
//! buf = lerp(buf, g, 1 - μ)                       (μ·buf + (1-μ)·g)
//! U   = lerp(g, buf, μ) if nesterov else buf
//! O   = NS(U)                                     (bf16, see `newton_schulz`)
//! p  *= 1 - lr·wd
//! p  -= lr'·O,   lr' = lr·sqrt(max(1, A/B))  | lr·0.2·sqrt(max(A, B))  | lr·sqrt(A/B)
//! ```
//!
//! Only NS needs the whole matrix: the momentum and the step are elementwise, so shards
//! may cut a parameter ([`Kernel::transforms_whole`]) and NS runs wherever its input U
//! was assembled.

use half::bf16;

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::error::{OptimError, Result};
use crate::kernels::{Kernel, Segment};
use crate::layout::ParamSpec;

/// torch's `lerp` on f32: `start + w·(end - start)` for |w| < 0.5, else
/// `end - (end - start)·(1 - w)` (the form torch's kernel uses for accuracy).
pub fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

fn bf(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// A matrix inside a slice: element (i, j) at `data[i·row_stride + j·col_stride]`, so a
/// row-major buffer is seen transposed by swapping the strides.
#[derive(Clone, Copy)]
pub struct MatrixView<'a> {
    /// The elements.
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatrixView<'a> {
    /// A row-major `rows`×`cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatrixView { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The same elements seen transposed.
    pub fn t(self) -> Self {
        MatrixView { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Whether every element the view names lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `out = a·b` (row-major, `a.rows`×`b.cols`) in f32 by the `gemm` crate's kernels on the
/// current rayon pool: each output element's sum runs in one fixed order, so the result
/// does not depend on the thread count. Products of bf16 values are exact in f32 and the
/// sums are f32, as torch's bf16 matmul accumulates.
pub fn matmul(a: MatrixView<'_>, b: MatrixView<'_>, out: &mut [f32]) {
    assert!(a.cols == b.rows && out.len() == a.rows * b.cols, "matmul: {}x{} · {}x{} into {}", a.rows, a.cols, b.rows, b.cols, out.len());
    assert!(a.in_bounds() && b.in_bounds(), "matmul: a view reaches past its data");
    if out.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every index the strides name inside `a.data`,
    // `b.data` and `out` (row-major, `a.rows`×`b.cols`); `out` is borrowed mutably, so it
    // aliases neither input; `read_dst` is false, so `out`'s old values are never read.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            out.as_mut_ptr(),
            1,
            b.cols as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The floating-point operations of [`newton_schulz`]'s products for a `rows`×`cols`
/// matrix: per step, X·Xᵀ and T·X (2·m·m·n each) and S·S (2·m³), m the smaller side.
pub fn newton_schulz_flops(rows: usize, cols: usize, steps: u64) -> f64 {
    let (m, n) = (rows.min(cols) as f64, rows.max(cols) as f64);
    steps as f64 * (4.0 * m * m * n + 2.0 * m * m * m)
}

/// `NS(U)` for U of shape `rows`×`cols`, torch's `_zeropower_via_newtonschulz`: X = bf(U)
/// (transposed if rows > cols), X = bf(X / bf(max(bf(‖X‖_F), eps))), then `ns_steps` times
/// S = bf(X·Xᵀ), T = bf(b·S + c·S·S), X = bf(a·X + T·X), each op rounded once.
pub fn newton_schulz(u: &[f32], rows: usize, cols: usize, c: &MuonConfig) -> Vec<f32> {
    let transpose = rows > cols;
    let (m, n) = if transpose { (cols, rows) } else { (rows, cols) };
    let mut x: Vec<f32> = if transpose {
        (0..m).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| bf(u[j * cols + i])).collect()
    } else {
        u.iter().map(|&v| bf(v)).collect()
    };
    let norm = bf(x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32);
    let denom = bf(norm.max(c.eps as f32));
    x.iter_mut().for_each(|v| *v = bf(*v / denom));
    let [a, b, cc] = c.ns_coefficients.map(|v| v as f32);
    let (mut s, mut ss, mut t, mut tx) = (vec![0f32; m * m], vec![0f32; m * m], vec![0f32; m * m], vec![0f32; m * n]);
    for _ in 0..c.ns_steps {
        let xv = MatrixView::row_major(&x, m, n);
        matmul(xv, xv.t(), &mut s);
        s.iter_mut().for_each(|v| *v = bf(*v));
        let sv = MatrixView::row_major(&s, m, m);
        matmul(sv, sv, &mut ss);
        t.iter_mut().zip(s.iter().zip(&ss)).for_each(|(t, (s, ss))| *t = bf(b * s + cc * ss));
        matmul(MatrixView::row_major(&t, m, m), xv, &mut tx);
        x.iter_mut().zip(&tx).for_each(|(x, tx)| *x = bf(a * *x + tx));
    }
    if transpose {
        (0..rows).flat_map(|i| (0..cols).map(move |j| (i, j))).map(|(i, j)| x[j * rows + i]).collect()
    } else {
        x
    }
}

/// The learning rate for a `rows`×`cols` matrix.
pub fn adjusted_lr(c: &MuonConfig, rows: usize, cols: usize) -> f64 {
    let (a, b) = (rows as f64, cols as f64);
    c.lr * match c.adjust_lr {
        AdjustLr::Original => (a / b).max(1.0).sqrt(),
        AdjustLr::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
        AdjustLr::SpectralUnclamped => (a / b).sqrt(),
    }
}

/// One Muon step of a whole `rows`×`cols` parameter; gradients are multiplied by
/// `grad_scale` as they are read (the clip coefficient).
pub fn update(c: &MuonConfig, rows: usize, cols: usize, p: &mut [f32], g: &[f32], buf: &mut [f32], grad_scale: f32) {
    let mut u = vec![0f32; p.len()];
    momentum(c, g, buf, grad_scale, &mut u);
    let o = newton_schulz(&u, rows, cols, c);
    apply(c, rows, cols, p, &o);
}

/// The elementwise first part of the step, on any piece of a parameter: the momentum
/// buffer's update and the Newton–Schulz input U (Nesterov's or the buffer).
pub fn momentum(c: &MuonConfig, g: &[f32], buf: &mut [f32], grad_scale: f32, u: &mut [f32]) {
    let mu = c.momentum as f32;
    let scaled = |x: f32| if grad_scale == 1.0 { x } else { x * grad_scale };
    for ((b, &g), u) in buf.iter_mut().zip(g).zip(u) {
        let g = scaled(g);
        *b = lerp(*b, g, 1.0 - mu);
        *u = if c.nesterov { lerp(g, *b, mu) } else { *b };
    }
}

/// The elementwise last part, on any piece of a `rows`×`cols` parameter: decay, then the
/// step along the orthogonalised `o`.
pub fn apply(c: &MuonConfig, rows: usize, cols: usize, p: &mut [f32], o: &[f32]) {
    let decay = (1.0 - c.lr * c.weight_decay) as f32;
    let step = -adjusted_lr(c, rows, cols) as f32;
    p.iter_mut().zip(o).for_each(|(p, o)| {
        *p *= decay;
        *p += step * o;
    });
}

/// How Muon scales its learning rate by the matrix shape A×B (torch's `adjust_lr_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// lr·sqrt(max(1, A/B)) (torch's default, `None` or `"original"`).
    Original,
    /// lr·0.2·sqrt(max(A, B)): the update's RMS of AdamW's.
    MatchRmsAdamw,
    /// lr·sqrt(A/B).
    SpectralUnclamped,
}

/// `torch.optim.Muon` (2-D parameters only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MuonConfig {
    /// The learning rate, before `adjust_lr`.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Momentum μ.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// (a, b, c) of the quintic Newton–Schulz iteration.
    pub ns_coefficients: [f64; 3],
    /// Added to the Frobenius norm before normalising.
    pub eps: f64,
    /// Newton–Schulz iterations (< 100).
    pub ns_steps: u64,
    /// How the lr scales with the matrix shape.
    pub adjust_lr: AdjustLr,
}

impl Default for MuonConfig {
    fn default() -> Self {
        MuonConfig {
            lr: 1e-3,
            weight_decay: 0.1,
            momentum: 0.95,
            nesterov: true,
            ns_coefficients: [3.4445, -4.775, 2.0315],
            eps: 1e-7,
            ns_steps: 5,
            adjust_lr: AdjustLr::Original,
        }
    }
}

impl Kernel for MuonConfig {
    fn name(&self) -> &'static str {
        "muon"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        if !non_negative(self.weight_decay) {
            return invalid(format!("invalid weight decay value: {}", self.weight_decay));
        }
        if !non_negative(self.momentum) {
            return invalid(format!("invalid momentum value: {}", self.momentum));
        }
        if !non_negative(self.eps) {
            return invalid(format!("invalid epsilon value: {}", self.eps));
        }
        if self.ns_steps >= 100 {
            return invalid(format!("number of steps must be less than 100 for computational efficiency, got {}", self.ns_steps));
        }
        if self.nesterov && self.momentum <= 0.0 {
            return invalid("nesterov momentum requires a momentum".into());
        }
        if self.ns_coefficients.iter().any(|x| !x.is_finite()) {
            return invalid(format!("ns_coefficients must be finite, got {:?}", self.ns_coefficients));
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec!["momentum_buffer"]
    }

    fn transforms_whole(&self) -> bool {
        true
    }

    fn transform_cost(&self, param: &ParamSpec) -> f64 {
        match param.shape[..] {
            [rows, cols] => newton_schulz_flops(rows, cols, self.ns_steps),
            _ => 0.0,
        }
    }

    /// NS starts by rounding U to bf16 and ends on a bf16 rounding.
    fn transform_in_bf16(&self) -> bool {
        true
    }

    fn prepare(&self, segment: Segment<'_>, input: &mut [f32]) -> Result<()> {
        let Segment { grads, mut state, grad_scale, .. } = segment;
        let buf = state.pop().ok_or_else(|| OptimError::ShapeMismatch("muon runs without its momentum buffer".into()))?;
        momentum(self, grads, buf, grad_scale, input);
        Ok(())
    }

    fn transform(&self, param: &ParamSpec, values: &mut [f32]) -> Result<()> {
        let [rows, cols] = param.shape[..] else { return self.check_param(param) };
        if values.len() != rows * cols {
            return Err(OptimError::ShapeMismatch(format!("{} values for '{}' of shape {:?}", values.len(), param.name, param.shape)));
        }
        let o = newton_schulz(values, rows, cols, self);
        values.copy_from_slice(&o);
        Ok(())
    }

    fn finish(&self, segment: Segment<'_>, output: &[f32]) -> Result<()> {
        let Segment { params, whole, .. } = segment;
        for (spec, l) in whole {
            let [rows, cols] = spec.shape[..] else { return self.check_param(spec) };
            apply(self, rows, cols, &mut params[l.clone()], &output[l]);
        }
        Ok(())
    }

    fn check_param(&self, param: &ParamSpec) -> Result<()> {
        if param.shape.len() != 2 {
            return Err(OptimError::InvalidConfig(format!(
                "muon only supports 2-D parameters, '{}' has shape {:?}: give it to another optimizer (adamw)",
                param.name, param.shape
            )));
        }
        Ok(())
    }

    /// The three passes on a segment of whole parameters (the optimizer itself calls
    /// them apart, so that shards may cut a matrix).
    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let Segment { params, grads, mut state, grad_scale, whole, .. } = segment;
        let buf = state.pop().ok_or_else(|| OptimError::ShapeMismatch("muon runs without its momentum buffer".into()))?;
        for (spec, l) in whole {
            let [rows, cols] = spec.shape[..] else { return self.check_param(spec) };
            if l.len() != spec.numel() {
                return Err(OptimError::InvalidConfig(format!("muon's update needs '{}' whole", spec.name)));
            }
            update(self, rows, cols, &mut params[l.clone()], &grads[l.clone()], &mut buf[l], grad_scale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NS pushes the singular values into Muon's band around 1 (about 0.7 to 1.2 for these
    /// coefficients): the result's Gram matrix is near I.
    #[test]
    fn newton_schulz_orthogonalises() {
        let (r, c) = (3, 5);
        let u: Vec<f32> = (0..r * c).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let o = newton_schulz(&u, r, c, &MuonConfig::default());
        for i in 0..r {
            for j in 0..r {
                let dot: f32 = (0..c).map(|k| o[i * c + k] * o[j * c + k]).sum();
                let ok = if i == j { (0.4..1.5).contains(&dot) } else { dot.abs() < 0.3 };
                assert!(ok, "({i},{j}) = {dot}");
            }
        }
        // Transposed shapes give the transpose.
        let ut: Vec<f32> = (0..c).flat_map(|j| (0..r).map(move |i| (i, j))).map(|(i, j)| u[i * c + j]).collect();
        let ot = newton_schulz(&ut, c, r, &MuonConfig::default());
        for i in 0..r {
            for j in 0..c {
                assert_eq!(ot[j * r + i], o[i * c + j]);
            }
        }
    }

    /// The GEMM products equal an f64 reference to f32 accuracy, through transposed and
    /// plain views, and Newton–Schulz gives the same bits on 1 and 2 threads.
    #[test]
    fn products_are_exact_to_f32_and_do_not_depend_on_threads() {
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.0625).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.125).collect();
        let mut out = vec![0f32; m * n];
        // a (m×k) times bᵀ, b stored row-major n×k.
        matmul(MatrixView::row_major(&a, m, k), MatrixView::row_major(&b, n, k).t(), &mut out);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[j * k + p])).sum();
                assert!((f64::from(out[i * n + j]) - want).abs() <= 1e-5 * want.abs().max(1.0), "({i},{j})");
            }
        }
        let u: Vec<f32> = (0..96 * 160).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.01).collect();
        let on = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| newton_schulz(&u, 96, 160, &MuonConfig::default()))
        };
        assert_eq!(on(1), on(2));
    }

    #[test]
    fn lerp_is_torchs() {
        assert_eq!(lerp(1.0, 3.0, 0.25), 1.5);
        assert_eq!(lerp(1.0, 3.0, 0.75), 2.5);
        assert_eq!(adjusted_lr(&MuonConfig { lr: 1.0, ..Default::default() }, 8, 2), 2.0);
    }
}
