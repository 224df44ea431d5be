//! The learning-rate schedules of HF `transformers`, applied as torch's `LambdaLR` does.
//!
//! A [`Schedule`] is the multiplier λ(t) of HF's `get_*_schedule_with_warmup` functions,
//! evaluated in f64 with the same operations as the Python source. An [`LrScheduler`]
//! holds each group's initial lr and the step count, and yields `initial_lr · λ(t)`:
//! the lr that optimizer step `t` (0-based) uses. With warmup the first step uses lr 0.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// Shape of a warmup or decay phase of [`Schedule::WarmupStableDecay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Curve {
    #[serde(rename = "linear")]
    /// Straight line.
    Linear,
    #[serde(rename = "cosine")]
    /// Half cosine.
    Cosine,
    #[serde(rename = "1-sqrt")]
    /// 1 - sqrt(progress), the decay of WSD papers.
    OneMinusSqrt,
}

impl Curve {
    /// Reads the names FORMAT.md uses (`linear`, `cosine`, `1-sqrt`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Curve::Linear),
            "cosine" => Ok(Curve::Cosine),
            "1-sqrt" => Ok(Curve::OneMinusSqrt),
            other => Err(OptimError::InvalidConfig(format!("unknown curve '{other}' (linear, cosine, 1-sqrt)"))),
        }
    }
}

/// One of the nine HF schedules, with its parameters resolved (defaults filled in, and
/// values HF derives from the optimizer-level lr already computed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Schedule {
    /// The lr as set.
    Constant,
    /// Linear warm-up, then constant.
    ConstantWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
    },
    /// Linear warm-up, then linear decay to 0.
    LinearWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Total training steps.
        total: u64,
    },
    /// Linear warm-up, then cosine decay.
    CosineWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Total training steps.
        total: u64,
        /// Cosine cycles over the decay (HF's `num_cycles`; 0.5 is one half-wave down).
        cycles: f64,
    },
    /// Linear warm-up, then cosine cycles restarting at the peak.
    CosineWithHardRestartsWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Total training steps.
        total: u64,
        /// Hard restarts over the decay.
        cycles: f64,
    },
    /// `lr_init` is the optimizer-level lr (HF reads `optimizer.defaults["lr"]`).
    PolynomialDecayWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Total training steps.
        total: u64,
        /// The lr at the end.
        lr_end: f64,
        /// The polynomial's power.
        power: f64,
        /// The optimizer-level lr it decays from.
        lr_init: f64,
    },
    /// Linear warm-up, then 1/sqrt decay.
    InverseSqrt {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Steps per unit of the decay (HF's default: the warm-up, or 10,000).
        timescale: u64,
    },
    /// Linear warm-up, then cosine decay to a floor.
    CosineWithMinLrWithWarmup {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Total training steps.
        total: u64,
        /// Cosine cycles over the decay (HF's `num_cycles`; 0.5 is one half-wave down).
        cycles: f64,
        /// The floor, as a fraction of the peak.
        min_lr_rate: f64,
    },
    /// Warm-up, a stable phase at the peak, then decay (WSD).
    WarmupStableDecay {
        /// Warm-up steps (the lr rises linearly from 0).
        warmup: u64,
        /// Steps at the peak.
        stable: u64,
        /// Decay steps.
        decay: u64,
        /// The warm-up's shape.
        warmup_curve: Curve,
        /// The decay's shape.
        decay_curve: Curve,
        /// The floor, as a fraction of the peak.
        min_lr_ratio: f64,
        /// Cosine cycles of the decay.
        cycles: f64,
    },
}

/// The nine names HF's `get_scheduler` knows (with the `_with_warmup` spelling of FORMAT.md).
pub const SCHEDULE_NAMES: [&str; 9] = [
    "constant",
    "constant_with_warmup",
    "linear_with_warmup",
    "cosine_with_warmup",
    "cosine_with_hard_restarts_with_warmup",
    "polynomial_decay_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr_with_warmup",
    "warmup_stable_decay",
];

impl Schedule {
    /// HF's polynomial decay; rejects `lr_end >= lr_init` as HF does.
    pub fn polynomial(warmup: u64, total: u64, lr_end: f64, power: f64, lr_init: f64) -> Result<Self> {
        if lr_init.is_nan() || lr_end.is_nan() || lr_init <= lr_end {
            return Err(OptimError::InvalidConfig(format!("lr_end ({lr_end}) must be smaller than initial lr ({lr_init})")));
        }
        Ok(Schedule::PolynomialDecayWithWarmup { warmup, total, lr_end, power, lr_init })
    }

    /// HF's inverse square root; `timescale` defaults to the warmup, or 10 000 without one.
    pub fn inverse_sqrt(warmup: u64, timescale: Option<u64>) -> Result<Self> {
        let timescale = timescale.unwrap_or(if warmup > 0 { warmup } else { 10_000 });
        if timescale == 0 {
            return Err(OptimError::InvalidConfig("inverse_sqrt timescale must be positive".into()));
        }
        Ok(Schedule::InverseSqrt { warmup, timescale })
    }

    /// HF's cosine with a floor: exactly one of `min_lr_rate` or `min_lr` (absolute, turned
    /// into a rate with the optimizer-level lr).
    pub fn cosine_with_min_lr(
        warmup: u64,
        total: u64,
        cycles: f64,
        min_lr_rate: Option<f64>,
        min_lr: Option<f64>,
        lr_init: f64,
    ) -> Result<Self> {
        let min_lr_rate = match (min_lr_rate, min_lr) {
            (Some(_), Some(_)) => return Err(OptimError::InvalidConfig("only one of min_lr or min_lr_rate should be set".into())),
            (None, None) => return Err(OptimError::InvalidConfig("one of min_lr or min_lr_rate should be set".into())),
            (Some(r), None) => r,
            (None, Some(m)) => m / lr_init,
        };
        Ok(Schedule::CosineWithMinLrWithWarmup { warmup, total, cycles, min_lr_rate })
    }

    /// λ(t): the factor of each group's initial lr at 0-based step `t`.
    pub fn lambda(&self, t: u64) -> f64 {
        let warm = |w: u64| t as f64 / (w.max(1) as f64);
        let progress = |w: u64, n: u64| (t as f64 - w as f64) / (n.saturating_sub(w).max(1) as f64);
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup } => {
                if t < warmup {
                    warm(warmup)
                } else {
                    1.0
                }
            }
            Schedule::LinearWithWarmup { warmup, total } => {
                if t < warmup {
                    warm(warmup)
                } else {
                    (0.0f64).max((total as f64 - t as f64) / (total.saturating_sub(warmup).max(1) as f64))
                }
            }
            Schedule::CosineWithWarmup { warmup, total, cycles } => {
                if t < warmup {
                    return warm(warmup);
                }
                let p = progress(warmup, total);
                (0.0f64).max(0.5 * (1.0 + (PI * cycles * 2.0 * p).cos()))
            }
            Schedule::CosineWithHardRestartsWithWarmup { warmup, total, cycles } => {
                if t < warmup {
                    return warm(warmup);
                }
                let p = progress(warmup, total);
                if p >= 1.0 {
                    return 0.0;
                }
                (0.0f64).max(0.5 * (1.0 + (PI * py_mod(cycles * p, 1.0)).cos()))
            }
            Schedule::PolynomialDecayWithWarmup { warmup, total, lr_end, power, lr_init } => {
                if t < warmup {
                    warm(warmup)
                } else if t > total {
                    lr_end / lr_init
                } else {
                    let lr_range = lr_init - lr_end;
                    let decay_steps = total as f64 - warmup as f64;
                    let pct_remaining = 1.0 - (t as f64 - warmup as f64) / decay_steps;
                    let decay = lr_range * pct_remaining.powf(power) + lr_end;
                    decay / lr_init
                }
            }
            Schedule::InverseSqrt { warmup, timescale } => {
                if t < warmup {
                    return warm(warmup);
                }
                let shift = timescale as f64 - warmup as f64;
                1.0 / ((t as f64 + shift) / timescale as f64).sqrt()
            }
            Schedule::CosineWithMinLrWithWarmup { warmup, total, cycles, min_lr_rate } => {
                if t < warmup {
                    return warm(warmup);
                }
                let p = progress(warmup, total);
                let f = 0.5 * (1.0 + (PI * cycles * 2.0 * p).cos());
                (0.0f64).max(f * (1.0 - min_lr_rate) + min_lr_rate)
            }
            Schedule::WarmupStableDecay { warmup, stable, decay, warmup_curve, decay_curve, min_lr_ratio, cycles } => {
                let m = min_lr_ratio;
                if t < warmup {
                    let q = warm(warmup);
                    let f = match warmup_curve {
                        Curve::Linear => q,
                        Curve::Cosine => 0.5 * (1.0 - (PI * q).cos()),
                        Curve::OneMinusSqrt => 1.0 - (1.0 - q).sqrt(),
                    };
                    return (0.0f64).max(f * (1.0 - m) + m);
                }
                if t < warmup + stable {
                    return 1.0;
                }
                if t < warmup + stable + decay {
                    let q = (t - warmup - stable) as f64 / (decay.max(1) as f64);
                    let f = match decay_curve {
                        Curve::Linear => 1.0 - q,
                        Curve::Cosine => 0.5 * (1.0 + (PI * cycles * 2.0 * q).cos()),
                        Curve::OneMinusSqrt => 1.0 - q.sqrt(),
                    };
                    return (0.0f64).max(f * (1.0 - m) + m);
                }
                m
            }
        }
    }
}

/// Python's `%` on floats: the result has the sign of the divisor.
fn py_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && (r < 0.0) != (b < 0.0) {
        r + b
    } else {
        r
    }
}

/// torch's `LambdaLR` over a [`Schedule`]: one initial lr per param group and a step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    /// The schedule.
    pub schedule: Schedule,
    /// Each group's lr when the scheduler was created (torch's `initial_lr`).
    pub base_lrs: Vec<f64>,
    /// Optimizer steps taken so far (torch's `last_epoch`).
    pub step: u64,
}

impl LrScheduler {
    /// A scheduler at step 0 with each group's initial lr.
    pub fn new(schedule: Schedule, base_lrs: Vec<f64>) -> Self {
        LrScheduler { schedule, base_lrs, step: 0 }
    }

    /// The lr of every group for the current step.
    pub fn lrs(&self) -> Vec<f64> {
        let f = self.schedule.lambda(self.step);
        self.base_lrs.iter().map(|lr| lr * f).collect()
    }

    /// Moves to the next step (call after each optimizer step) and returns its lrs.
    pub fn advance(&mut self) -> Vec<f64> {
        self.step += 1;
        self.lrs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lrs(s: Schedule, lr: f64, n: u64) -> Vec<f64> {
        (0..n).map(|t| lr * s.lambda(t)).collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-12 + 1e-9 * y.abs(), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn warmup_starts_at_zero_and_linear_ends_at_zero() {
        close(&lrs(Schedule::LinearWithWarmup { warmup: 2, total: 6 }, 1.0, 8), &[0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        close(&lrs(Schedule::ConstantWithWarmup { warmup: 3 }, 0.3, 4), &[0.0, 0.1, 0.2, 0.3]);
    }

    #[test]
    fn cosine_and_hard_restarts() {
        close(
            &lrs(Schedule::CosineWithWarmup { warmup: 0, total: 4, cycles: 0.5 }, 1.0, 5),
            &[1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0],
        );
        // two cycles over 6 decay steps restart after 3
        let s = Schedule::CosineWithHardRestartsWithWarmup { warmup: 1, total: 7, cycles: 2.0 };
        close(&lrs(s, 0.1, 8), &[0.0, 0.1, 0.075, 0.025, 0.1, 0.075, 0.025, 0.0]);
    }

    #[test]
    fn polynomial_uses_the_optimizer_level_lr() {
        let s = Schedule::polynomial(1, 4, 0.01, 1.0, 0.1).unwrap();
        close(&lrs(s.clone(), 0.05, 6), &[0.0, 0.05, 0.035, 0.02, 0.005, 0.005]);
        assert!(Schedule::polynomial(1, 4, 0.1, 1.0, 0.1).is_err());
    }

    #[test]
    fn inverse_sqrt_and_min_lr() {
        let s = Schedule::inverse_sqrt(2, None).unwrap();
        close(&lrs(s, 1.0, 4), &[0.0, 0.5, 1.0, (2.0f64 / 3.0).sqrt()]);
        let s = Schedule::cosine_with_min_lr(0, 2, 0.5, None, Some(0.02), 0.1).unwrap();
        close(&lrs(s, 0.1, 3), &[0.1, 0.06, 0.02]);
        assert!(Schedule::cosine_with_min_lr(0, 2, 0.5, Some(0.1), Some(0.02), 0.1).is_err());
    }

    #[test]
    fn warmup_stable_decay_phases() {
        let s = Schedule::WarmupStableDecay {
            warmup: 2,
            stable: 1,
            decay: 2,
            warmup_curve: Curve::Linear,
            decay_curve: Curve::Linear,
            min_lr_ratio: 0.0,
            cycles: 0.5,
        };
        close(&lrs(s, 1.0, 6), &[0.0, 0.5, 1.0, 1.0, 0.5, 0.0]);
    }

    #[test]
    fn scheduler_advances() {
        let mut s = LrScheduler::new(Schedule::ConstantWithWarmup { warmup: 2 }, vec![0.2, 0.4]);
        assert_eq!(s.lrs(), vec![0.0, 0.0]);
        assert_eq!(s.advance(), vec![0.1, 0.2]);
        assert_eq!(s.advance(), vec![0.2, 0.4]);
    }
}
