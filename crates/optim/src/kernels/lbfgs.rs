//! `torch.optim.LBFGS` with a closure, including the strong-Wolfe line search.
//!
//! torch's LBFGS mixes Python floats (f64) and 0-dim float32 tensors in its scalar logic:
//! a step length starts as a float, becomes a tensor once multiplied by one, and every
//! comparison with a tensor happens in f32. Line-search decisions are branches, so an
//! all-f64 port would take other branches near ties. [`Scalar`] carries that distinction
//! and the port below follows torch's source line by line, with its promotion rules.
//!
//! LBFGS keeps one global state (history, direction, step length...) over all parameters;
//! it has a single param group, as in torch.

use std::collections::VecDeque;
use std::ops::{Add, Div, Mul, Neg, Sub};

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::kernels::{Kernel, Segment};
use crate::error::{OptimError, Result};

/// The error a closure may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A scalar as torch's LBFGS holds it: a Python float or a 0-dim float32 tensor.
/// Arithmetic with a tensor gives a tensor computed in f32 (the float cast to f32 first).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// A Python float (f64).
    Float(f64),
    /// A 0-dim float32 tensor.
    Tensor(f32),
}

use Scalar::{Float as F, Tensor as T};

impl Scalar {
    /// The value as f32 (a float is rounded).
    pub fn as_f32(self) -> f32 {
        match self {
            F(x) => x as f32,
            T(x) => x,
        }
    }

    /// The value as f64 (a tensor is widened).
    pub fn as_f64(self) -> f64 {
        match self {
            F(x) => x,
            T(x) => x as f64,
        }
    }

    fn binary(self, o: Scalar, f: fn(f64, f64) -> f64, t: fn(f32, f32) -> f32) -> Scalar {
        match (self, o) {
            (F(a), F(b)) => F(f(a, b)),
            _ => T(t(self.as_f32(), o.as_f32())),
        }
    }

    fn compare(self, o: Scalar, f: fn(&f64, &f64) -> bool, t: fn(&f32, &f32) -> bool) -> bool {
        match (self, o) {
            (F(a), F(b)) => f(&a, &b),
            _ => t(&self.as_f32(), &o.as_f32()),
        }
    }

    fn lt(self, o: Scalar) -> bool {
        self.compare(o, f64::lt, f32::lt)
    }
    fn gt(self, o: Scalar) -> bool {
        self.compare(o, f64::gt, f32::gt)
    }
    fn le(self, o: Scalar) -> bool {
        self.compare(o, f64::le, f32::le)
    }
    fn ge(self, o: Scalar) -> bool {
        self.compare(o, f64::ge, f32::ge)
    }

    fn abs(self) -> Scalar {
        match self {
            F(x) => F(x.abs()),
            T(x) => T(x.abs()),
        }
    }

    fn sqrt(self) -> Scalar {
        match self {
            F(x) => F(x.sqrt()),
            T(x) => T(x.sqrt()),
        }
    }
}

macro_rules! scalar_op {
    ($trait:ident, $method:ident, $op:tt) => {
        impl $trait for Scalar {
            type Output = Scalar;
            fn $method(self, o: Scalar) -> Scalar {
                self.binary(o, |a, b| a $op b, |a, b| a $op b)
            }
        }
    };
}
scalar_op!(Add, add, +);
scalar_op!(Sub, sub, -);
scalar_op!(Mul, mul, *);
scalar_op!(Div, div, /);

impl Neg for Scalar {
    type Output = Scalar;
    fn neg(self) -> Scalar {
        match self {
            F(x) => F(-x),
            T(x) => T(-x),
        }
    }
}

/// Python's `min(a, b)`: the first unless the second is strictly smaller.
fn py_min(a: Scalar, b: Scalar) -> Scalar {
    if b.lt(a) {
        b
    } else {
        a
    }
}

/// Python's `max(a, b)`: the first unless the second is strictly larger.
fn py_max(a: Scalar, b: Scalar) -> Scalar {
    if b.gt(a) {
        b
    } else {
        a
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |s, (x, y)| s + x * y)
}

/// `x.abs().max()`, NaN-propagating like torch's reduction.
fn abs_max<'a>(x: impl IntoIterator<Item = &'a f32>) -> f32 {
    abs_max_of(x.into_iter().copied())
}

fn abs_max_of(x: impl Iterator<Item = f32>) -> f32 {
    x.fold(0.0f32, |m, v| if v.is_nan() || m.is_nan() { f32::NAN } else { m.max(v.abs()) })
}

fn abs_sum(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, v| s + v.abs())
}

/// `p.add_(d, alpha=t)`: alpha is cast to f32.
fn add_scaled(p: &mut [f32], t: Scalar, d: &[f32]) {
    let a = t.as_f32();
    p.iter_mut().zip(d).for_each(|(p, d)| *p += a * d);
}

/// LBFGS's global state, carried between `step` calls (torch keeps it on the first param).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LbfgsState {
    /// Closure evaluations so far.
    pub func_evals: u64,
    /// Iterations so far.
    pub n_iter: u64,
    /// The last search direction.
    pub d: Vec<f32>,
    /// The last step length.
    pub t: Option<Scalar>,
    /// Past curvature pairs: gradient differences y.
    pub old_dirs: VecDeque<Vec<f32>>,
    /// Past curvature pairs: steps s.
    pub old_stps: VecDeque<Vec<f32>>,
    /// 1 / (y·s) of each pair.
    pub ro: VecDeque<f32>,
    /// The initial Hessian diagonal (s·y / y·y of the newest pair).
    pub h_diag: Scalar,
    /// The previous iteration's flat gradient.
    pub prev_flat_grad: Vec<f32>,
    /// The previous iteration's loss.
    pub prev_loss: Option<f64>,
}

impl Default for LbfgsState {
    fn default() -> Self {
        LbfgsState {
            func_evals: 0,
            n_iter: 0,
            d: Vec::new(),
            t: None,
            old_dirs: VecDeque::new(),
            old_stps: VecDeque::new(),
            ro: VecDeque::new(),
            h_diag: F(1.0),
            prev_flat_grad: Vec::new(),
            prev_loss: None,
        }
    }
}

/// A state dict of [`Lbfgs`]: its config (with the current lr) and state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LbfgsStateDict {
    /// Elements of the flat parameter buffer.
    pub numel: usize,
    /// The config, with the current lr.
    pub config: LbfgsConfig,
    /// The state between steps.
    pub state: LbfgsState,
}

/// `torch.optim.LBFGS` over one flat parameter buffer of `numel` elements.
#[derive(Clone, Debug)]
pub struct Lbfgs {
    numel: usize,
    config: LbfgsConfig,
    state: LbfgsState,
}

impl Lbfgs {
    /// LBFGS over `numel` elements; the config is validated as torch validates it.
    pub fn new(numel: usize, config: LbfgsConfig) -> Result<Self> {
        config.validate()?;
        Ok(Lbfgs { numel, config, state: LbfgsState::default() })
    }

    /// The config, with the current lr.
    pub fn config(&self) -> &LbfgsConfig {
        &self.config
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate (a scheduler's step).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Closure evaluations so far, over all steps.
    pub fn func_evals(&self) -> u64 {
        self.state.func_evals
    }

    /// Everything needed to continue exactly.
    pub fn state_dict(&self) -> LbfgsStateDict {
        LbfgsStateDict { numel: self.numel, config: self.config.clone(), state: self.state.clone() }
    }

    /// Restores a state dict of an LBFGS over as many elements; nothing changes if it does not fit.
    pub fn load_state_dict(&mut self, sd: &LbfgsStateDict) -> Result<()> {
        if sd.numel != self.numel {
            return Err(OptimError::StateDict(format!("saved for {} elements, this LBFGS has {}", sd.numel, self.numel)));
        }
        let sized = |v: &Vec<f32>| v.is_empty() || v.len() == self.numel;
        let s = &sd.state;
        if !sized(&s.d) || !sized(&s.prev_flat_grad) || !s.old_dirs.iter().chain(&s.old_stps).all(|v| v.len() == self.numel) {
            return Err(OptimError::StateDict("LBFGS state vectors do not match the parameter count".into()));
        }
        if s.old_dirs.len() != s.old_stps.len() || s.old_dirs.len() != s.ro.len() {
            return Err(OptimError::StateDict("LBFGS history lists have different lengths".into()));
        }
        sd.config.validate()?;
        self.config = sd.config.clone();
        self.state = sd.state.clone();
        Ok(())
    }

    /// One `optimizer.step(closure)`. The closure gets the current parameters, writes the
    /// gradient into its second argument and returns the loss. Returns the loss of the
    /// first evaluation, as torch does.
    pub fn step<C>(&mut self, params: &mut [f32], mut closure: C) -> Result<f32>
    where
        C: FnMut(&[f32], &mut [f32]) -> std::result::Result<f32, BoxError>,
    {
        if params.len() != self.numel {
            return Err(OptimError::ShapeMismatch(format!("{} parameters, LBFGS was built for {}", params.len(), self.numel)));
        }
        let c = self.config.clone();
        let max_eval = c.max_eval();
        let tol_grad = F(c.tolerance_grad);
        let tol_change = F(c.tolerance_change);
        let mut evaluate = |p: &[f32], g: &mut [f32]| closure(p, g).map_err(OptimError::Closure);

        let mut flat_grad = vec![0.0f32; self.numel];
        let orig_loss = evaluate(params, &mut flat_grad)?;
        let mut loss = orig_loss as f64;
        let mut current_evals = 1u64;
        let st = &mut self.state;
        st.func_evals += 1;

        let mut opt_cond = T(abs_max(&flat_grad)).le(tol_grad);
        if opt_cond {
            return Ok(orig_loss);
        }

        let mut n_iter = 0u64;
        while n_iter < c.max_iter {
            n_iter += 1;
            st.n_iter += 1;

            // Direction: steepest descent at first, then the two-loop recursion.
            if st.n_iter == 1 {
                st.d = flat_grad.iter().map(|g| -g).collect();
                st.old_dirs.clear();
                st.old_stps.clear();
                st.ro.clear();
                st.h_diag = F(1.0);
            } else {
                let t = st.t.unwrap_or(F(c.lr)).as_f32();
                let y: Vec<f32> = flat_grad.iter().zip(&st.prev_flat_grad).map(|(a, b)| a - b).collect();
                let s: Vec<f32> = st.d.iter().map(|d| d * t).collect();
                let ys = dot(&y, &s);
                if T(ys).gt(F(1e-10)) {
                    if st.old_dirs.len() == c.history_size {
                        st.old_dirs.pop_front();
                        st.old_stps.pop_front();
                        st.ro.pop_front();
                    }
                    let yy = dot(&y, &y);
                    st.old_dirs.push_back(y);
                    st.old_stps.push_back(s);
                    st.ro.push_back(1.0 / ys);
                    st.h_diag = T(ys / yy);
                }
                let num_old = st.old_dirs.len();
                let mut al = vec![0.0f32; num_old];
                let mut q: Vec<f32> = flat_grad.iter().map(|g| -g).collect();
                for i in (0..num_old).rev() {
                    al[i] = dot(&st.old_stps[i], &q) * st.ro[i];
                    add_scaled(&mut q, T(-al[i]), &st.old_dirs[i]);
                }
                let h = st.h_diag.as_f32();
                let mut r: Vec<f32> = q.iter().map(|v| v * h).collect();
                for (i, al_i) in al.iter().enumerate() {
                    let be_i = dot(&st.old_dirs[i], &r) * st.ro[i];
                    add_scaled(&mut r, T(al_i - be_i), &st.old_stps[i]);
                }
                st.d = r;
            }
            st.prev_flat_grad.clone_from(&flat_grad);
            st.prev_loss = Some(loss);

            // Step length: scaled on the very first iteration, lr afterwards.
            let mut t = if st.n_iter == 1 { py_min(F(1.0), T(1.0 / abs_sum(&flat_grad))) * F(c.lr) } else { F(c.lr) };
            let gtd = T(dot(&flat_grad, &st.d));
            if gtd.gt(-tol_change) {
                st.t = Some(t);
                break;
            }

            let mut ls_func_evals = 0u64;
            match c.line_search {
                LineSearch::StrongWolfe => {
                    let x_init = params.to_vec();
                    let d = &st.d;
                    let mut obj = |t: Scalar| -> Result<(f64, Vec<f32>)> {
                        params.copy_from_slice(&x_init);
                        add_scaled(params, t, d);
                        let mut g = vec![0.0f32; x_init.len()];
                        let f = evaluate(params, &mut g)? as f64;
                        params.copy_from_slice(&x_init);
                        Ok((f, g))
                    };
                    let max_ls = max_eval as i64 - current_evals as i64;
                    let r = strong_wolfe(&mut obj, t, d, loss, &flat_grad, gtd, max_ls)?;
                    (loss, flat_grad, t, ls_func_evals) = r;
                    add_scaled(params, t, &st.d);
                    opt_cond = T(abs_max(&flat_grad)).le(tol_grad);
                }
                LineSearch::None => {
                    add_scaled(params, t, &st.d);
                    if n_iter != c.max_iter {
                        loss = evaluate(params, &mut flat_grad)? as f64;
                        opt_cond = T(abs_max(&flat_grad)).le(tol_grad);
                        ls_func_evals = 1;
                    }
                }
            }
            st.t = Some(t);
            current_evals += ls_func_evals;
            st.func_evals += ls_func_evals;

            if n_iter == c.max_iter || current_evals >= max_eval || opt_cond {
                break;
            }
            let ta = t.as_f32();
            if T(abs_max_of(st.d.iter().map(|d| d * ta))).le(tol_change) {
                break;
            }
            if (loss - st.prev_loss.unwrap_or(loss)).abs() < c.tolerance_change {
                break;
            }
        }
        Ok(orig_loss)
    }
}

/// torch's `_cubic_interpolate` (from minFunc's polyinterp): the minimiser of the cubic
/// through two points with values and derivatives, clamped to the bounds.
fn cubic_interpolate(x1: Scalar, f1: Scalar, g1: Scalar, x2: Scalar, f2: Scalar, g2: Scalar, bounds: Option<(Scalar, Scalar)>) -> Scalar {
    let (xmin, xmax) = bounds.unwrap_or(if x1.le(x2) { (x1, x2) } else { (x2, x1) });
    let d1 = g1 + g2 - F(3.0) * (f1 - f2) / (x1 - x2);
    let d2_square = d1 * d1 - g1 * g2;
    if d2_square.ge(F(0.0)) {
        let d2 = d2_square.sqrt();
        let min_pos = if x1.le(x2) {
            x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + F(2.0) * d2))
        } else {
            x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + F(2.0) * d2))
        };
        py_min(py_max(min_pos, xmin), xmax)
    } else {
        (xmin + xmax) / F(2.0)
    }
}

type Evaluation = (f64, Vec<f32>);

/// torch's `_strong_wolfe` (from minFunc's lswolfe): bracket a step satisfying the strong
/// Wolfe conditions, then zoom. At most `max_ls` iterations after the first evaluation;
/// if they run out, the better end of `[0, t]` is returned (possibly a zero step).
/// Returns (loss, gradient, step, evaluations).
#[allow(clippy::too_many_arguments)]
fn strong_wolfe(
    obj: &mut dyn FnMut(Scalar) -> Result<Evaluation>,
    mut t: Scalar,
    d: &[f32],
    f: f64,
    g: &[f32],
    gtd: Scalar,
    max_ls: i64,
) -> Result<(f64, Vec<f32>, Scalar, u64)> {
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    const TOLERANCE_CHANGE: f64 = 1e-9;
    let max_ls = max_ls.max(0);
    let d_norm = T(abs_max(d));
    let armijo = |t: Scalar, f_new: f64| F(f_new).gt(F(f) + F(C1) * t * gtd);
    let curvature = |gtd_new: Scalar| gtd_new.abs().le(F(-C2) * gtd);

    let (mut f_new, mut g_new) = obj(t)?;
    let mut ls_func_evals = 1u64;
    let mut gtd_new = T(dot(&g_new, d));

    let (mut t_prev, mut f_prev, mut g_prev, mut gtd_prev) = (F(0.0), f, g.to_vec(), gtd);
    let mut done = false;
    let mut ls_iter = 0i64;
    let mut bracket: Vec<Scalar> = Vec::new();
    let mut bracket_f: Vec<f64> = Vec::new();
    let mut bracket_g: Vec<Vec<f32>> = Vec::new();
    let mut bracket_gtd: Vec<Scalar> = Vec::new();
    while ls_iter < max_ls {
        if armijo(t, f_new) || (ls_iter > 1 && f_new >= f_prev) || (!curvature(gtd_new) && gtd_new.ge(F(0.0))) {
            bracket = vec![t_prev, t];
            bracket_f = vec![f_prev, f_new];
            bracket_g = vec![g_prev, g_new.clone()];
            bracket_gtd = vec![gtd_prev, gtd_new];
            break;
        }
        if curvature(gtd_new) {
            bracket = vec![t];
            bracket_f = vec![f_new];
            bracket_g = vec![g_new.clone()];
            done = true;
            break;
        }
        // Extrapolate.
        let min_step = t + F(0.01) * (t - t_prev);
        let max_step = t * F(10.0);
        let tmp = t;
        t = cubic_interpolate(t_prev, F(f_prev), gtd_prev, t, F(f_new), gtd_new, Some((min_step, max_step)));
        t_prev = tmp;
        f_prev = f_new;
        g_prev = g_new.clone();
        gtd_prev = gtd_new;
        (f_new, g_new) = obj(t)?;
        ls_func_evals += 1;
        gtd_new = T(dot(&g_new, d));
        ls_iter += 1;
    }
    if ls_iter == max_ls {
        bracket = vec![F(0.0), t];
        bracket_f = vec![f, f_new];
        bracket_g = vec![g.to_vec(), g_new];
    }

    // Zoom: shrink the bracket until a point satisfies the conditions.
    let order = |bf: &[f64]| if bf[0] <= bf[bf.len() - 1] { (0, 1) } else { (1, 0) };
    let (mut low, mut high) = order(&bracket_f);
    let mut insuf_progress = false;
    while !done && ls_iter < max_ls {
        if ((bracket[1] - bracket[0]).abs() * d_norm).lt(F(TOLERANCE_CHANGE)) {
            break;
        }
        t = cubic_interpolate(bracket[0], F(bracket_f[0]), bracket_gtd[0], bracket[1], F(bracket_f[1]), bracket_gtd[1], None);
        let (bmax, bmin) = (py_max(bracket[0], bracket[1]), py_min(bracket[0], bracket[1]));
        let eps = F(0.1) * (bmax - bmin);
        if py_min(bmax - t, t - bmin).lt(eps) {
            if insuf_progress || t.ge(bmax) || t.le(bmin) {
                t = if (t - bmax).abs().lt((t - bmin).abs()) { bmax - eps } else { bmin + eps };
                insuf_progress = false;
            } else {
                insuf_progress = true;
            }
        } else {
            insuf_progress = false;
        }

        (f_new, g_new) = obj(t)?;
        ls_func_evals += 1;
        gtd_new = T(dot(&g_new, d));
        ls_iter += 1;

        if armijo(t, f_new) || f_new >= bracket_f[low] {
            bracket[high] = t;
            bracket_f[high] = f_new;
            bracket_g[high] = g_new;
            bracket_gtd[high] = gtd_new;
            (low, high) = order(&bracket_f);
        } else {
            if curvature(gtd_new) {
                done = true;
            } else if (gtd_new * (bracket[high] - bracket[low])).ge(F(0.0)) {
                bracket[high] = bracket[low];
                bracket_f[high] = bracket_f[low];
                bracket_g[high] = bracket_g[low].clone();
                bracket_gtd[high] = bracket_gtd[low];
            }
            bracket[low] = t;
            bracket_f[low] = f_new;
            bracket_g[low] = g_new;
            bracket_gtd[low] = gtd_new;
        }
    }
    let g_low = std::mem::take(&mut bracket_g[low]);
    Ok((bracket_f[low], g_low, bracket[low], ls_func_evals))
}

/// The line search of LBFGS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineSearch {
    /// Fixed step `t = lr` (after the first iteration).
    None,
    /// The strong-Wolfe search of torch (ported from minFunc).
    StrongWolfe,
}

/// `torch.optim.LBFGS`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LbfgsConfig {
    /// The step length's scale.
    pub lr: f64,
    /// Iterations per `step`.
    pub max_iter: u64,
    /// `None` means torch's default `max_iter * 5 / 4`.
    pub max_eval: Option<u64>,
    /// Stop when the largest gradient magnitude is at most this.
    pub tolerance_grad: f64,
    /// Stop when the loss or the step changes by at most this.
    pub tolerance_change: f64,
    /// Curvature pairs kept.
    pub history_size: usize,
    /// Fixed steps or the strong-Wolfe search.
    pub line_search: LineSearch,
}

impl Default for LbfgsConfig {
    fn default() -> Self {
        LbfgsConfig {
            lr: 1.0,
            max_iter: 20,
            max_eval: None,
            tolerance_grad: 1e-7,
            tolerance_change: 1e-9,
            history_size: 100,
            line_search: LineSearch::None,
        }
    }
}

impl LbfgsConfig {
    /// The evaluation budget per `step` (torch's default: max_iter · 5/4).
    pub fn max_eval(&self) -> u64 {
        self.max_eval.unwrap_or(self.max_iter * 5 / 4)
    }
}

impl Kernel for LbfgsConfig {
    fn name(&self) -> &'static str {
        "lbfgs"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        if self.history_size == 0 {
            return invalid("LBFGS history_size must be at least 1".into());
        }
        if !non_negative(self.tolerance_grad) || !non_negative(self.tolerance_change) {
            return invalid("LBFGS tolerances must be non-negative numbers".into());
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec![]
    }

    fn needs_closure(&self) -> bool {
        true
    }

    fn update(&self, _segment: Segment<'_>) -> Result<()> {
        Err(OptimError::InvalidConfig("LBFGS needs a closure: use distoptim_optim::Lbfgs".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quadratic(p: &[f32], g: &mut [f32]) -> std::result::Result<f32, BoxError> {
        // f = Σ (i+1)·(x_i - 1)²
        let mut f = 0.0;
        for (i, (x, g)) in p.iter().zip(g.iter_mut()).enumerate() {
            let w = (i + 1) as f32;
            f += w * (x - 1.0) * (x - 1.0);
            *g = 2.0 * w * (x - 1.0);
        }
        Ok(f)
    }

    #[test]
    fn strong_wolfe_minimises_a_quadratic() {
        let mut x = vec![0.0f32, 3.0, -2.0];
        let mut opt = Lbfgs::new(3, LbfgsConfig { line_search: LineSearch::StrongWolfe, ..Default::default() }).unwrap();
        for _ in 0..3 {
            opt.step(&mut x, quadratic).unwrap();
        }
        assert!(x.iter().all(|v| (v - 1.0).abs() < 1e-4), "{x:?}");
    }

    #[test]
    fn state_dict_round_trip_continues_identically() {
        let cfg = LbfgsConfig { lr: 0.5, max_iter: 3, ..Default::default() };
        let mut a = Lbfgs::new(3, cfg.clone()).unwrap();
        let mut xa = vec![0.0f32, 3.0, -2.0];
        a.step(&mut xa, quadratic).unwrap();
        let json = serde_json::to_string(&a.state_dict()).unwrap();
        let mut b = Lbfgs::new(3, cfg).unwrap();
        b.load_state_dict(&serde_json::from_str(&json).unwrap()).unwrap();
        let mut xb = xa.clone();
        a.step(&mut xa, quadratic).unwrap();
        b.step(&mut xb, quadratic).unwrap();
        assert_eq!(xa, xb);
        assert_eq!(a.func_evals(), b.func_evals());
    }

    #[test]
    fn closure_errors_surface() {
        let mut opt = Lbfgs::new(1, LbfgsConfig::default()).unwrap();
        let err = opt.step(&mut [0.0], |_, _| Err("peer lost".into())).unwrap_err();
        assert!(err.to_string().contains("peer lost"));
    }

    #[test]
    fn python_promotion_rules() {
        assert_eq!(F(0.1) + F(0.2), F(0.1 + 0.2));
        assert_eq!(F(0.1) + T(0.2), T(0.1f32 + 0.2f32));
        assert!(!F(1.0 + 1e-12).gt(T(1.0))); // compared in f32
        assert!(F(1.0 + 1e-12).gt(F(1.0)));
        assert_eq!(py_min(T(1.0), F(1.0)), T(1.0)); // ties keep the first
    }
}
