//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2),
//! one fused pass. No torch reference exists; this is the paper's rule:
//!
//! ```text
//! c = β1·m + (1 - β1)·g            (the update direction's interpolation)
//! p = p·(1 - lr·λ) - lr·sign(c)     (decoupled weight decay λ)
//! m = β2·m + (1 - β2)·g
//! ```
//!
//! `sign(0) = 0`. Elementwise, so a shard may cut a parameter anywhere; one state buffer
//! (`exp_avg`, 4 bytes per parameter).

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::error::Result;
use crate::kernels::{par_for_each, Buffers, Kernel, Segment};
use crate::simd::wide_fn;

wide_fn! {
    /// Updates `params` and `exp_avg` in place, with every gradient multiplied by
    /// `grad_scale` as it is read (the clip coefficient).
    pub fn update(c: &LionConfig, params: &mut [f32], grads: &[f32], exp_avg: &mut [f32], grad_scale: f32) {
        let (b1, b2) = (c.betas.0 as f32, c.betas.1 as f32);
        let decay = (1.0 - c.lr * c.weight_decay) as f32;
        let lr = c.lr as f32;
        for ((p, &g), m) in params.iter_mut().zip(grads).zip(exp_avg.iter_mut()) {
            let g = if c.maximize { -g * grad_scale } else { g * grad_scale };
            let u = b1 * *m + (1.0 - b1) * g;
            let sign = if u > 0.0 {
                1.0
            } else if u < 0.0 {
                -1.0
            } else {
                0.0
            };
            *p = *p * decay - lr * sign;
            *m = b2 * *m + (1.0 - b2) * g;
        }
    }
}

/// Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LionConfig {
    /// The learning rate (typically 3-10× under AdamW's).
    pub lr: f64,
    /// β1 interpolates the update direction, β2 decays the momentum.
    pub betas: (f64, f64),
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for LionConfig {
    /// The paper's (and lucidrains' lion-pytorch) defaults: lr 1e-4, betas (0.9, 0.99).
    fn default() -> Self {
        LionConfig { lr: 1e-4, betas: (0.9, 0.99), weight_decay: 0.0, maximize: false }
    }
}

impl Kernel for LionConfig {
    fn name(&self) -> &'static str {
        "lion"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        let (b1, b2) = self.betas;
        if !(0.0..=1.0).contains(&b1) || !(0.0..=1.0).contains(&b2) {
            return invalid(format!("invalid betas {:?}: each in [0, 1]", self.betas));
        }
        if !non_negative(self.weight_decay) {
            return invalid(format!("invalid weight_decay value: {}", self.weight_decay));
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec!["exp_avg"]
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let grad_scale = segment.grad_scale;
        par_for_each(segment.buffers::<1>()?, &|b: Buffers<'_, 1>| {
            let [m] = b.state;
            update(self, b.params, b.grads, m, grad_scale)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps worked by hand: β = (0.9, 0.99), lr 0.1, λ 0.5.
    #[test]
    fn the_papers_rule_by_hand() {
        let c = LionConfig { lr: 0.1, betas: (0.9, 0.99), weight_decay: 0.5, maximize: false };
        let (mut p, mut m) = (vec![1.0f32, -2.0, 0.5], vec![0.0f32; 3]);
        // Step 1: c = 0.1·g → sign(g); p = p·0.95 - 0.1·sign(g); m = 0.01·g.
        update(&c, &mut p, &[2.0, -4.0, 0.0], &mut m, 1.0);
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&p, &[0.95 - 0.1, -1.9 + 0.1, 0.475]), "{p:?}");
        assert!(close(&m, &[0.02, -0.04, 0.0]), "{m:?}");
        // Step 2, g = (-1, 1, 3): c = 0.9·m + 0.1·g = (-0.082, 0.064, 0.3) → signs (-, +, +).
        update(&c, &mut p, &[-1.0, 1.0, 3.0], &mut m, 1.0);
        let want = [(0.95f32 - 0.1) * 0.95 + 0.1, (-1.9f32 + 0.1) * 0.95 - 0.1, 0.475f32 * 0.95 - 0.1];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!((m[0] - (0.99 * 0.02 - 0.01)).abs() < 1e-7 && (m[2] - 0.03).abs() < 1e-7, "{m:?}");
    }
}
