//! Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), as the authors'
//! `schedulefree.AdamWScheduleFree` computes it. No torch reference exists.
//!
//! The parameter buffer holds y, the point gradients are taken at; the state holds z (the
//! base iterate, starting at y) and v. The averaged iterate x, which is what to evaluate
//! and ship, is `lerp(y, z, 1 - 1/β1)` ([`eval_view`]). Per step k (0-based, per group):
//!
//! ```text
//! lr_k   = lr · min(1, (k+1)/warmup_steps)         lr_max = max(lr_max, lr_k)
//! weight = (k+1)^r · lr_max^weight_lr_power        weight_sum += weight
//! c      = weight / weight_sum                      bc2 = 1 - β2^(k+1)
//! v      = β2·v + (1-β2)·g²                         ĝ = g / (sqrt(v / bc2) + eps) + wd·y
//! y      = lerp(y, z, c) + lr_k·(β1·(1-c) - 1)·ĝ     z = z - lr_k·ĝ
//! ```
//!
//! which is the paper's y = (1-β1)·z + β1·x, z -= γ·ĝ, x = (1-c)·x + c·z written on y.

use serde::{Deserialize, Serialize};

use crate::config::non_negative;
use crate::kernels::{check_lr, invalid};
use crate::simd::wide_fn;
use crate::error::Result;
use crate::kernels::{par_for_each, Buffers, Kernel, Segment};
use crate::kernels::muon::lerp;

/// The scalars of one step of a group, and the group's running sums after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleFreeStep {
    /// This step's lr (after the warm-up).
    pub lr: f64,
    /// c: the weight of the new z in the average.
    pub ckp1: f64,
    /// 1 - β2^(k+1).
    pub bias_correction2: f64,
}

/// Step `k`'s (0-based) lr after the warm-up, and its weight in the average given the
/// largest lr so far.
fn lr_and_weight(c: &ScheduleFreeConfig, k: u64, lr_max: f64) -> (f64, f64) {
    let sched = if k < c.warmup_steps { (k as f64 + 1.0) / c.warmup_steps as f64 } else { 1.0 };
    (c.lr * sched, (k as f64 + 1.0).powf(c.r) * lr_max.powf(c.weight_lr_power))
}

/// Advances the group's counters (`k`, `lr_max`, `weight_sum` in `c`) and returns the
/// step's scalars: called once per group per step, on every rank.
pub fn advance(c: &mut ScheduleFreeConfig) -> ScheduleFreeStep {
    let (lr, _) = lr_and_weight(c, c.k, c.lr_max);
    c.lr_max = c.lr_max.max(lr);
    let (_, weight) = lr_and_weight(c, c.k, c.lr_max);
    c.weight_sum += weight;
    c.k += 1;
    current(c)
}

/// The scalars of the step [`advance`] last took, from the counters it left (what
/// [`Kernel::update`] runs after [`Kernel::begin_step`]).
pub fn current(c: &ScheduleFreeConfig) -> ScheduleFreeStep {
    let k = c.k.saturating_sub(1);
    let (lr, weight) = lr_and_weight(c, k, c.lr_max);
    let ckp1 = if c.weight_sum > 0.0 { weight / c.weight_sum } else { 0.0 };
    ScheduleFreeStep { lr, ckp1, bias_correction2: 1.0 - c.betas.1.powf(k as f64 + 1.0) }
}

wide_fn! {
    /// One step over a range: `y` the parameters, `z` and `v` the state (`first`: the
    /// parameters' first step, where z starts at y). Gradients are multiplied by
    /// `grad_scale` as they are read.
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        c: &ScheduleFreeConfig,
        s: &ScheduleFreeStep,
        first: bool,
        y: &mut [f32],
        g: &[f32],
        z: &mut [f32],
        v: &mut [f32],
        grad_scale: f32,
    ) {
        let b2 = c.betas.1 as f32;
        let (eps, wd, bc2) = (c.eps as f32, c.weight_decay as f32, s.bias_correction2 as f32);
        let (ckp1, y_lr, z_lr) = (s.ckp1 as f32, (s.lr * (c.betas.0 * (1.0 - s.ckp1) - 1.0)) as f32, s.lr as f32);
        for (((y, &g), z), v) in y.iter_mut().zip(g).zip(z.iter_mut()).zip(v.iter_mut()) {
            if first {
                *z = *y;
            }
            let g = g * grad_scale;
            *v = *v * b2 + (1.0 - b2) * g * g;
            let mut gn = g / ((*v / bc2).sqrt() + eps);
            if wd != 0.0 {
                gn += wd * *y;
            }
            *y = lerp(*y, *z, ckp1);
            *y += y_lr * gn;
            *z -= z_lr * gn;
        }
    }
}

/// x, the averaged iterate, from y and z: what to evaluate and to ship.
pub fn eval_view(c: &ScheduleFreeConfig, y: &[f32], z: &[f32], out: &mut [f32]) {
    let w = (1.0 - 1.0 / c.betas.0) as f32;
    out.iter_mut().zip(y.iter().zip(z)).for_each(|(o, (y, z))| *o = lerp(*y, *z, w));
}

/// Schedule-Free AdamW (Defazio et al. 2024), as `schedulefree.AdamWScheduleFree`. `k`,
/// `lr_max` and `weight_sum` are the group's running counters (the authors keep them in
/// the param group too), so state dicts and checkpoints carry them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFreeConfig {
    /// The peak learning rate (after warm-up).
    pub lr: f64,
    /// β1 (the y/z interpolation) and β2 (the second moment's decay).
    pub betas: (f64, f64),
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Weight decay, applied at y.
    pub weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// The weight's polynomial power in k (0: uniform).
    pub r: f64,
    /// The weight's power of lr_max.
    pub weight_lr_power: f64,
    /// Steps the group has taken.
    pub k: u64,
    /// The largest lr so far.
    pub lr_max: f64,
    /// Σ weights so far.
    pub weight_sum: f64,
}

impl Default for ScheduleFreeConfig {
    /// The authors' defaults: lr 0.0025, betas (0.9, 0.999), eps 1e-8, no warm-up, r 0,
    /// weight_lr_power 2.
    fn default() -> Self {
        ScheduleFreeConfig {
            lr: 0.0025,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
            k: 0,
            lr_max: -1.0,
            weight_sum: 0.0,
        }
    }
}

impl Kernel for ScheduleFreeConfig {
    fn name(&self) -> &'static str {
        "schedule_free_adamw"
    }

    lr_field!();

    fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        let (b1, b2) = self.betas;
        if !(b1 > 0.0 && b1 < 1.0 && (0.0..1.0).contains(&b2)) {
            return invalid(format!("invalid betas {:?}: beta1 in (0, 1), beta2 in [0, 1)", self.betas));
        }
        if !non_negative(self.eps) || !non_negative(self.weight_decay) {
            return invalid(format!("eps ({}) and weight_decay ({}) must be >= 0", self.eps, self.weight_decay));
        }
        Ok(())
    }

    fn state_buffers(&self) -> Vec<&'static str> {
        vec!["z", "exp_avg_sq"]
    }

    fn begin_step(&mut self) {
        advance(self);
    }

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let (s, first, grad_scale) = (current(self), segment.step == 1, segment.grad_scale);
        par_for_each(segment.buffers::<2>()?, &|b: Buffers<'_, 2>| {
            let [z, v] = b.state;
            update(self, &s, first, b.params, b.grads, z, v, grad_scale)
        });
        Ok(())
    }

    fn has_eval_view(&self) -> bool {
        true
    }

    fn eval_params(&self, params: &[f32], state: &[&[f32]], step: u64, out: &mut [f32]) {
        match state.first() {
            Some(z) if step > 0 => eval_view(self, params, z, out),
            _ => out.copy_from_slice(params),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's form in f64 (x and z kept, y derived) against the kernel's (y and z
    /// kept), over five steps with warm-up and weight decay.
    #[test]
    fn the_kernel_is_the_papers_rule() {
        let mut c = ScheduleFreeConfig { lr: 0.1, weight_decay: 0.01, warmup_steps: 2, ..Default::default() };
        let (b1, b2) = c.betas;
        let grads = [0.5f64, -1.0, 0.25, 2.0, -0.75];
        let (mut x, mut z, mut v, mut wsum, mut lr_max) = (0.3f64, 0.3f64, 0.0f64, 0.0f64, 0.0f64);
        let (mut y32, mut z32, mut v32) = ([0.3f32], [0f32], [0f32]);
        for (k, &g) in grads.iter().enumerate() {
            // Paper: y = (1-β1) z + β1 x; the gradient is taken at y.
            let y = (1.0 - b1) * z + b1 * x;
            let lr = 0.1 * if k < 2 { (k as f64 + 1.0) / 2.0 } else { 1.0 };
            lr_max = f64::max(lr_max, lr);
            wsum += lr_max * lr_max;
            let ck = lr_max * lr_max / wsum;
            v = b2 * v + (1.0 - b2) * g * g;
            let gn = g / ((v / (1.0 - b2.powi(k as i32 + 1))).sqrt() + 1e-8) + 0.01 * y;
            z -= lr * gn;
            x = (1.0 - ck) * x + ck * z;
            let s = advance(&mut c);
            update(&c, &s, k == 0, &mut y32, &[g as f32], &mut z32, &mut v32, 1.0);
            let y_next = (1.0 - b1) * z + b1 * x;
            assert!((f64::from(y32[0]) - y_next).abs() < 1e-6, "step {k}: y {} vs {y_next}", y32[0]);
            assert!((f64::from(z32[0]) - z).abs() < 1e-6, "step {k}: z {} vs {z}", z32[0]);
            let mut x32 = [0f32];
            eval_view(&c, &y32, &z32, &mut x32);
            assert!((f64::from(x32[0]) - x).abs() < 1e-5, "step {k}: x {} vs {x}", x32[0]);
        }
        assert_eq!(c.k, 5);
    }
}
