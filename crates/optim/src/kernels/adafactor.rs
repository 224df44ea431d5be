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
use crate::kernels::muon::lerp;

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

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32) as f64 / (x.len() as f64).sqrt()
}

/// One Adafactor step of a whole parameter of `shape` taking its `step`-th step (from 1);
/// `row`, `col`, `v` are its state (sized by [`state_sizes`]). Gradients are multiplied by
/// `grad_scale` as they are read (the clip coefficient).
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
    let g: Vec<f32> = g.iter().map(|&x| if c.maximize { -x * grad_scale } else { x * grad_scale }).collect();
    let eps1 = c.eps.0.unwrap_or(F32_EPS) as f32;
    let s = step as f64;
    let omega = s.powf(c.beta2_decay) as f32;
    let rho = c.lr.min(1.0 / s.sqrt());
    let alpha = c.eps.1.max(rms(p)) * rho;
    if c.weight_decay != 0.0 {
        let decay = (1.0 - c.lr * c.weight_decay) as f32;
        p.iter_mut().for_each(|x| *x *= decay);
    }
    let mut u = vec![0f32; g.len()];
    if shape.len() >= 2 {
        let (r, cn) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let batch = g.len() / (r * cn).max(1);
        for bi in 0..batch {
            let gm = &g[bi * r * cn..(bi + 1) * r * cn];
            let (rows, cols) = (&mut row[bi * r..(bi + 1) * r], &mut col[bi * cn..(bi + 1) * cn]);
            for i in 0..r {
                let norm = gm[i * cn..(i + 1) * cn].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt() as f32;
                rows[i] = lerp(rows[i], norm * norm / cn as f32, omega);
            }
            for j in 0..cn {
                let norm = (0..r).map(|i| f64::from(gm[i * cn + j]).powi(2)).sum::<f64>().sqrt() as f32;
                cols[j] = lerp(cols[j], norm * norm / r as f32, omega);
            }
            let mean = ((rows.iter().map(|&x| f64::from(x)).sum::<f64>() / r as f64) as f32).max(eps1);
            for (i, row_i) in rows.iter().enumerate() {
                for (j, col_j) in cols.iter().enumerate() {
                    let var = row_i * col_j / mean;
                    let k = bi * r * cn + i * cn + j;
                    u[k] = 1.0 / var.max(eps1 * eps1).sqrt() * g[k];
                }
            }
        }
    } else {
        for (k, (v, &gk)) in v.iter_mut().zip(&g).enumerate() {
            *v = lerp(*v, gk * gk, omega);
            u[k] = 1.0 / v.max(eps1 * eps1).sqrt() * gk;
        }
    }
    let denom = (rms(&u) / c.d).max(1.0);
    let step_size = (-alpha / denom) as f32;
    p.iter_mut().zip(&u).for_each(|(p, u)| *p += step_size * u);
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

    fn update(&self, segment: Segment<'_>) -> Result<()> {
        let Segment { params, grads, state, step, grad_scale, whole } = segment;
        let [row, col, var]: [&mut [f32]; 3] =
            state.try_into().map_err(|_| OptimError::ShapeMismatch("adafactor runs without its three buffers".into()))?;
        for (spec, l) in whole {
            // The factored statistics are kept at the start of the parameter's own range
            // in each buffer.
            let [nr, nc, nv] = state_sizes(&spec.shape);
            update(
                self,
                &spec.shape,
                step,
                &mut params[l.clone()],
                &grads[l.clone()],
                &mut row[l.start..l.start + nr],
                &mut col[l.start..l.start + nc],
                &mut var[l.start..l.start + nv],
                grad_scale,
            );
        }
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
}
