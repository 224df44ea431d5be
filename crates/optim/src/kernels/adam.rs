//! `torch.optim.Adam` / `AdamW`, single-tensor code, one fused pass.
//!
//! Per element, in torch's order: `g = -g` if maximize; AdamW: `p *= 1 - lr·wd`, Adam:
//! `g += wd·p`; `m = lerp(m, g, 1 - β1)`; `v = v·β2 + (1 - β2)·g·g`; amsgrad:
//! `v̂ = max(v̂, v)`; `p += (-lr / (1 - β1^s))·m / (sqrt(v or v̂) / sqrt(1 - β2^s) + eps)`.
//! The bias corrections are computed in f64 as Python floats, then cast to f32.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::kernels::{check_adam, par_for_each, Buffers, Kernel, Segment};
use crate::simd::wide_fn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decay {
    None,
    Coupled,
    Decoupled,
}

/// The per-step scalars of one Adam update, computed once per segment.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    decay: Decay,
    weight_decay: f32,
    decay_factor: f32,
    lerp_weight: f32,
    one_minus_lerp_weight: f32,
    lerp_small: bool,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
    amsgrad: bool,
    maximize: bool,
    /// The clip coefficient, applied as the gradient is read (1: none).
    grad_scale: f32,
}

impl AdamStep {
    /// `step` is the parameter's step count after this update (1 on the first step).
    pub fn new(c: &AdamConfig, step: u64) -> Self {
        let (beta1, beta2) = c.betas;
        let s = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(s);
        let bias_correction2 = 1.0 - beta2.powf(s);
        let decay = match (c.weight_decay != 0.0, c.decoupled_weight_decay) {
            (false, _) => Decay::None,
            (true, false) => Decay::Coupled,
            (true, true) => Decay::Decoupled,
        };
        let w = (1.0 - beta1) as f32;
        AdamStep {
            decay,
            weight_decay: c.weight_decay as f32,
            decay_factor: (1.0 - c.lr * c.weight_decay) as f32,
            lerp_weight: w,
            one_minus_lerp_weight: 1.0 - w,
            // torch's lerp switches formula at |weight| < 0.5 for accuracy.
            lerp_small: w.abs() < 0.5,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-(c.lr / bias_correction1)) as f32,
            amsgrad: c.amsgrad,
            maximize: c.maximize,
            grad_scale: 1.0,
        }
    }
}

/// Updates `params`, `exp_avg` and `exp_avg_sq` in place; `max_exp_avg_sq` is used (same
/// length) only with amsgrad.
impl AdamStep {
    /// Multiplies every gradient by `scale` as it is read: clipping fused into the step
    /// (bit-identical to scaling the buffer first, and one pass less).
    pub fn with_grad_scale(mut self, scale: f32) -> Self {
        self.grad_scale = scale;
        self
    }
}

wide_fn! {
    /// One fused pass over a range: updates `params`, `exp_avg` and `exp_avg_sq` in place;
    /// `max_exp_avg_sq` (same length) only with amsgrad.
    pub fn update(s: &AdamStep, params: &mut [f32], grads: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], max_exp_avg_sq: &mut [f32]) {
        debug_assert_eq!(params.len(), grads.len());
        debug_assert_eq!(params.len(), exp_avg.len());
        debug_assert_eq!(params.len(), exp_avg_sq.len());
        if s.maximize {
            with_decay::<true>(s, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq)
        } else {
            with_decay::<false>(s, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq)
        }
    }
}

const NONE: u8 = 0;
const COUPLED: u8 = 1;
const DECOUPLED: u8 = 2;

#[inline(always)]
fn with_decay<const MAX: bool>(s: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], vm: &mut [f32]) {
    match s.decay {
        Decay::None => with_lerp::<MAX, NONE>(s, p, g, m, v, vm),
        Decay::Coupled => with_lerp::<MAX, COUPLED>(s, p, g, m, v, vm),
        Decay::Decoupled => with_lerp::<MAX, DECOUPLED>(s, p, g, m, v, vm),
    }
}

#[inline(always)]
fn with_lerp<const MAX: bool, const DECAY: u8>(s: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], vm: &mut [f32]) {
    match (s.lerp_small, s.amsgrad) {
        (true, false) => plain::<MAX, DECAY, true>(s, p, g, m, v),
        (false, false) => plain::<MAX, DECAY, false>(s, p, g, m, v),
        (true, true) => amsgrad::<MAX, DECAY, true>(s, p, g, m, v, vm),
        (false, true) => amsgrad::<MAX, DECAY, false>(s, p, g, m, v, vm),
    }
}

/// Weight decay and both moments for one element.
#[inline(always)]
fn moments<const MAX: bool, const DECAY: u8, const SMALL: bool>(s: &AdamStep, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
    let g = g * s.grad_scale;
    let mut g = if MAX { -g } else { g };
    if DECAY == DECOUPLED {
        *p *= s.decay_factor;
    } else if DECAY == COUPLED {
        g += s.weight_decay * *p;
    }
    *m = if SMALL { *m + s.lerp_weight * (g - *m) } else { g - (g - *m) * s.one_minus_lerp_weight };
    *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
}

#[inline(always)]
fn apply(s: &AdamStep, p: &mut f32, m: f32, v: f32) {
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    *p += s.neg_step_size * m / denom;
}

#[inline(always)]
fn plain<const MAX: bool, const DECAY: u8, const SMALL: bool>(s: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        moments::<MAX, DECAY, SMALL>(s, p, g, m, v);
        apply(s, p, *m, *v);
    }
}

#[inline(always)]
fn amsgrad<const MAX: bool, const DECAY: u8, const SMALL: bool>(
    s: &AdamStep,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    vm: &mut [f32],
) {
    debug_assert_eq!(p.len(), vm.len());
    for ((((p, &g), m), v), vm) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()).zip(vm.iter_mut()) {
        moments::<MAX, DECAY, SMALL>(s, p, g, m, v);
        // torch.maximum propagates NaN; f32::max would drop it.
        *vm = if *vm >= *v || vm.is_nan() { *vm } else { *v };
        apply(s, p, *m, *vm);
    }
}

/// `torch.optim.Adam` and, with `decoupled_weight_decay`, `torch.optim.AdamW`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// The learning rate.
    pub lr: f64,
    /// β1 and β2, the moments' decay rates.
    pub betas: (f64, f64),
    /// Added to the root of the second moment.
    pub eps: f64,
    /// L2 penalty (Adam) or decoupled decay (AdamW).
    pub weight_decay: f64,
    /// Keep and use the largest second moment seen (AMSGrad).
    pub amsgrad: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// AdamW: decay the parameter (`p *= 1 - lr·wd`) instead of adding `wd·p` to the gradient.
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// torch's `Adam()` defaults.
    pub fn adam() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: false,
        }
    }

    /// torch's `AdamW()` defaults (weight decay 1e-2, decoupled).
    pub fn adamw() -> Self {
        AdamConfig { weight_decay: 1e-2, decoupled_weight_decay: true, ..Self::adam() }
    }
}

impl Kernel for AdamConfig {
    fn name(&self) -> &'static str {
        if self.decoupled_weight_decay {
            "adamw"
        } else {
            "adam"
        }
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_adam(self.lr, self.eps, self.betas, self.weight_decay)
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        let mut names = vec!["exp_avg", "exp_avg_sq"];
        if self.amsgrad {
            names.push("max_exp_avg_sq");
        }
        names
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let s = AdamStep::new(self, segment.step).with_grad_scale(segment.grad_scale);
        par_for_each(segment.buffers::<3>()?, &|b: Buffers<'_, 3>| {
            let [m, v, vmax] = b.state;
            update(&s, b.params, b.grads, m, v, vmax)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adam's first step moves every element by about lr·sign(g), whatever |g| is.
    #[test]
    fn first_step_is_lr_times_sign() {
        let c = AdamConfig { lr: 0.01, ..AdamConfig::adam() };
        let mut p = [1.0f32, 1.0, 1.0];
        let (mut m, mut v) = ([0.0f32; 3], [0.0f32; 3]);
        update(&AdamStep::new(&c, 1), &mut p, &[3.0, -0.2, 1e-3], &mut m, &mut v, &mut []);
        for (x, want) in p.iter().zip([0.99f32, 1.01, 0.99]) {
            assert!((x - want).abs() < 1e-5, "{x} vs {want}");
        }
        assert!((m[0] - 0.3).abs() < 1e-7 && (v[0] - 0.009).abs() < 1e-7);
    }

    #[test]
    fn adamw_decays_the_parameter_not_the_gradient() {
        let c = AdamConfig { lr: 0.1, weight_decay: 0.5, ..AdamConfig::adamw() };
        let mut p = [2.0f32];
        let (mut m, mut v) = ([0.0f32], [0.0f32]);
        update(&AdamStep::new(&c, 1), &mut p, &[0.0], &mut m, &mut v, &mut []);
        // zero gradient: only the decay p·(1 - 0.05) acts
        assert!((p[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn amsgrad_keeps_the_largest_second_moment() {
        let c = AdamConfig { amsgrad: true, ..AdamConfig::adam() };
        let mut p = [0.0f32];
        let (mut m, mut v, mut vm) = ([0.0f32], [0.0f32], [0.0f32]);
        update(&AdamStep::new(&c, 1), &mut p, &[10.0], &mut m, &mut v, &mut vm);
        let big = vm[0];
        update(&AdamStep::new(&c, 2), &mut p, &[0.0], &mut m, &mut v, &mut vm);
        assert_eq!(vm[0], big);
        assert!(v[0] < big);
    }
}
