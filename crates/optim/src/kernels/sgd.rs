//! `torch.optim.SGD`, single-tensor code, one fused pass.
//!
//! Per element: `g = -g` if maximize; `g += wd·p`; with momentum μ: `buf = g` on the
//! parameter's first step, else `buf = μ·buf + (1 - dampening)·g`; `g = g + μ·buf`
//! (nesterov) or `buf`; `p += -lr·g`. Scalars are cast to f32 as torch casts `alpha`.

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::simd::wide_fn;
use crate::error::Result;
use crate::kernels::{par_for_each, Buffers, Kernel, Segment};

/// The per-step scalars of one SGD update, computed once per segment.
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    neg_lr: f32,
    weight_decay: f32,
    momentum: f32,
    one_minus_dampening: f32,
    nesterov: bool,
    maximize: bool,
    /// The clip coefficient, applied as the gradient is read (1: none).
    grad_scale: f32,
    has_momentum: bool,
    first_step: bool,
}

impl SgdStep {
    /// `first_step`: the parameter has no momentum buffer yet (torch's `buf is None`).
    pub fn new(c: &SgdConfig, first_step: bool) -> Self {
        SgdStep {
            neg_lr: (-c.lr) as f32,
            weight_decay: c.weight_decay as f32,
            momentum: c.momentum as f32,
            one_minus_dampening: (1.0 - c.dampening) as f32,
            nesterov: c.nesterov,
            maximize: c.maximize,
            grad_scale: 1.0,
            has_momentum: c.momentum != 0.0,
            first_step,
        }
    }

    /// Multiplies every gradient by `scale` as it is read: clipping fused into the step
    /// (bit-identical to scaling the buffer first, and one pass less).
    pub fn with_grad_scale(mut self, scale: f32) -> Self {
        self.grad_scale = scale;
        self
    }

    /// Whether this step reads and writes `momentum_buffer`.
    pub fn uses_momentum_buffer(&self) -> bool {
        self.has_momentum
    }
}

wide_fn! {
    /// Updates `params` in place. `momentum_buffer` has the same length as `params` when the
    /// step uses momentum and is ignored otherwise.
    pub fn update(s: &SgdStep, params: &mut [f32], grads: &[f32], momentum_buffer: &mut [f32]) {
        debug_assert_eq!(params.len(), grads.len());
        let wd = s.weight_decay != 0.0;
        if !s.has_momentum {
            match (s.maximize, wd) {
                (false, false) => plain::<false, false>(s, params, grads),
                (false, true) => plain::<false, true>(s, params, grads),
                (true, false) => plain::<true, false>(s, params, grads),
                (true, true) => plain::<true, true>(s, params, grads),
            }
            return;
        }
        debug_assert_eq!(params.len(), momentum_buffer.len());
        let b = momentum_buffer;
        match (s.maximize, wd, s.first_step, s.nesterov) {
            (false, false, false, false) => momentum::<false, false, false, false>(s, params, grads, b),
            (false, false, false, true) => momentum::<false, false, false, true>(s, params, grads, b),
            (false, false, true, false) => momentum::<false, false, true, false>(s, params, grads, b),
            (false, false, true, true) => momentum::<false, false, true, true>(s, params, grads, b),
            (false, true, false, false) => momentum::<false, true, false, false>(s, params, grads, b),
            (false, true, false, true) => momentum::<false, true, false, true>(s, params, grads, b),
            (false, true, true, false) => momentum::<false, true, true, false>(s, params, grads, b),
            (false, true, true, true) => momentum::<false, true, true, true>(s, params, grads, b),
            (true, false, false, false) => momentum::<true, false, false, false>(s, params, grads, b),
            (true, false, false, true) => momentum::<true, false, false, true>(s, params, grads, b),
            (true, false, true, false) => momentum::<true, false, true, false>(s, params, grads, b),
            (true, false, true, true) => momentum::<true, false, true, true>(s, params, grads, b),
            (true, true, false, false) => momentum::<true, true, false, false>(s, params, grads, b),
            (true, true, false, true) => momentum::<true, true, false, true>(s, params, grads, b),
            (true, true, true, false) => momentum::<true, true, true, false>(s, params, grads, b),
            (true, true, true, true) => momentum::<true, true, true, true>(s, params, grads, b),
        }
    }
}

#[inline(always)]
fn direction<const MAXIMIZE: bool, const WD: bool>(s: &SgdStep, p: f32, g: f32) -> f32 {
    let g = g * s.grad_scale;
    let g = if MAXIMIZE { -g } else { g };
    if WD {
        g + s.weight_decay * p
    } else {
        g
    }
}

#[inline(always)]
fn plain<const MAXIMIZE: bool, const WD: bool>(s: &SgdStep, params: &mut [f32], grads: &[f32]) {
    for (p, &g) in params.iter_mut().zip(grads) {
        let d = direction::<MAXIMIZE, WD>(s, *p, g);
        *p += s.neg_lr * d;
    }
}

#[inline(always)]
fn momentum<const MAXIMIZE: bool, const WD: bool, const FIRST: bool, const NESTEROV: bool>(
    s: &SgdStep,
    params: &mut [f32],
    grads: &[f32],
    bufs: &mut [f32],
) {
    for ((p, &g), buf) in params.iter_mut().zip(grads).zip(bufs.iter_mut()) {
        let d = direction::<MAXIMIZE, WD>(s, *p, g);
        let b = if FIRST { d } else { *buf * s.momentum + s.one_minus_dampening * d };
        *buf = b;
        let d = if NESTEROV { d + s.momentum * b } else { b };
        *p += s.neg_lr * d;
    }
}

/// `torch.optim.SGD`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// The learning rate.
    pub lr: f64,
    /// Momentum μ (0: none, and no buffer).
    pub momentum: f64,
    /// Dampening of the momentum's new gradient.
    pub dampening: f64,
    /// Nesterov momentum (needs μ > 0 and no dampening).
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 1e-3, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0, maximize: false }
    }
}

impl Kernel for SgdConfig {
    fn name(&self) -> &'static str {
        "sgd"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        if !non_negative(self.momentum) {
            return invalid(format!("invalid momentum value: {}", self.momentum));
        }
        if !non_negative(self.weight_decay) {
            return invalid(format!("invalid weight_decay value: {}", self.weight_decay));
        }
        if !self.dampening.is_finite() {
            return invalid(format!("invalid dampening value: {}", self.dampening));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return invalid("nesterov momentum requires a momentum and zero dampening".into());
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        if self.momentum != 0.0 {
            vec!["momentum_buffer"]
        } else {
            vec![]
        }
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let s = SgdStep::new(self, segment.step == 1).with_grad_scale(segment.grad_scale);
        par_for_each(segment.buffers::<1>()?, &|b: Buffers<'_, 1>| {
            let [buf] = b.state;
            update(&s, b.params, b.grads, buf)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_momentum_nesterov_weight_decay() {
        let c = SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 0.5, maximize: false };
        let mut p = [1.0f32, -2.0];
        let mut buf = [0.0f32; 2];
        update(&SgdStep::new(&c, true), &mut p, &[0.5, 1.0], &mut buf);
        // g = 0.5 + 0.5·1 = 1; buf = 1; d = 1 + 0.9·1 = 1.9; p = 1 - 0.19
        assert!((p[0] - 0.81).abs() < 1e-7);
        assert_eq!(buf[0], 1.0);
        update(&SgdStep::new(&c, false), &mut p, &[0.5, 1.0], &mut buf);
        // g = 0.5 + 0.405 = 0.905; buf = 0.9 + 0.905 = 1.805; d = 0.905 + 1.6245 = 2.5295
        assert!((buf[0] - 1.805).abs() < 1e-6);
        assert!((p[0] - (0.81 - 0.25295)).abs() < 1e-6);
    }

    #[test]
    fn maximize_and_dampening() {
        let c = SgdConfig { lr: 1.0, momentum: 0.5, dampening: 0.5, maximize: true, ..Default::default() };
        let mut p = [0.0f32];
        let mut buf = [0.0f32];
        update(&SgdStep::new(&c, true), &mut p, &[2.0], &mut buf);
        assert_eq!((p[0], buf[0]), (2.0, -2.0)); // first step: no dampening
        update(&SgdStep::new(&c, false), &mut p, &[2.0], &mut buf);
        assert_eq!((p[0], buf[0]), (4.0, -2.0)); // buf = 0.5·(-2) + 0.5·(-2)
    }
}
