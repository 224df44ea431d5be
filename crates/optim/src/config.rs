//! Optimizer hyperparameters, with torch's defaults and torch's validation.
//!
//! A param group carries a whole [`OptimizerConfig`] of its own (torch's group dict with
//! every key filled in), so overriding a key for one group is just editing its copy.

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// `x >= 0`, false for NaN: torch's checks are written `not 0.0 <= x`, which NaN fails.
fn non_negative(x: f64) -> bool {
    x >= 0.0
}

/// `torch.optim.SGD`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig { lr: 1e-3, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0, maximize: false }
    }
}

/// `torch.optim.Adam` and, with `decoupled_weight_decay`, `torch.optim.AdamW`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
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
    pub lr: f64,
    pub max_iter: u64,
    /// `None` means torch's default `max_iter * 5 / 4`.
    pub max_eval: Option<u64>,
    pub tolerance_grad: f64,
    pub tolerance_change: f64,
    pub history_size: usize,
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
    pub fn max_eval(&self) -> u64 {
        self.max_eval.unwrap_or(self.max_iter * 5 / 4)
    }
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
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub nesterov: bool,
    /// (a, b, c) of the quintic Newton–Schulz iteration.
    pub ns_coefficients: [f64; 3],
    pub eps: f64,
    pub ns_steps: u64,
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

/// Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LionConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for LionConfig {
    /// The paper's (and lucidrains' lion-pytorch) defaults: lr 1e-4, betas (0.9, 0.99).
    fn default() -> Self {
        LionConfig { lr: 1e-4, betas: (0.9, 0.99), weight_decay: 0.0, maximize: false }
    }
}

/// Schedule-Free AdamW (Defazio et al. 2024), as `schedulefree.AdamWScheduleFree`. `k`,
/// `lr_max` and `weight_sum` are the group's running counters (the authors keep them in
/// the param group too), so state dicts and checkpoints carry them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleFreeConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub r: f64,
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

/// `torch.optim.Adafactor`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdafactorConfig {
    pub lr: f64,
    pub beta2_decay: f64,
    /// eps1 (`None`: f32's machine epsilon, 2^-23) and eps2.
    pub eps: (Option<f64>, f64),
    pub d: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig { lr: 1e-2, beta2_decay: -0.8, eps: (None, 1e-3), d: 1.0, weight_decay: 0.0, maximize: false }
    }
}

/// One optimizer's hyperparameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Sgd(SgdConfig),
    Adam(AdamConfig),
    Lbfgs(LbfgsConfig),
    Muon(MuonConfig),
    Adafactor(AdafactorConfig),
    Lion(LionConfig),
    ScheduleFreeAdamw(ScheduleFreeConfig),
}

impl OptimizerConfig {
    /// The name torch users know it by (`sgd`, `adam`, `adamw`, `lbfgs`).
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::Adam(c) if c.decoupled_weight_decay => "adamw",
            OptimizerConfig::Adam(_) => "adam",
            OptimizerConfig::Lbfgs(_) => "lbfgs",
            OptimizerConfig::Muon(_) => "muon",
            OptimizerConfig::Adafactor(_) => "adafactor",
            OptimizerConfig::Lion(_) => "lion",
            OptimizerConfig::ScheduleFreeAdamw(_) => "schedule_free_adamw",
        }
    }

    /// Whether the update of each element depends only on that element (so a shard may
    /// cut a parameter anywhere): not for Muon and Adafactor, which need whole matrices.
    pub fn elementwise(&self) -> bool {
        !matches!(self, OptimizerConfig::Muon(_) | OptimizerConfig::Adafactor(_))
    }

    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Sgd(c) => c.lr,
            OptimizerConfig::Adam(c) => c.lr,
            OptimizerConfig::Lbfgs(c) => c.lr,
            OptimizerConfig::Muon(c) => c.lr,
            OptimizerConfig::Adafactor(c) => c.lr,
            OptimizerConfig::Lion(c) => c.lr,
            OptimizerConfig::ScheduleFreeAdamw(c) => c.lr,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            OptimizerConfig::Sgd(c) => c.lr = lr,
            OptimizerConfig::Adam(c) => c.lr = lr,
            OptimizerConfig::Lbfgs(c) => c.lr = lr,
            OptimizerConfig::Muon(c) => c.lr = lr,
            OptimizerConfig::Adafactor(c) => c.lr = lr,
            OptimizerConfig::Lion(c) => c.lr = lr,
            OptimizerConfig::ScheduleFreeAdamw(c) => c.lr = lr,
        }
    }

    /// The checks torch's constructors make, with torch's wording. Comparisons are written
    /// so that NaN fails them, as it does in Python.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(OptimError::InvalidConfig(msg));
        let lr = self.lr();
        if !non_negative(lr) {
            return bad(format!("invalid learning rate: {lr}"));
        }
        match self {
            OptimizerConfig::Sgd(c) => {
                if !non_negative(c.momentum) {
                    return bad(format!("invalid momentum value: {}", c.momentum));
                }
                if !non_negative(c.weight_decay) {
                    return bad(format!("invalid weight_decay value: {}", c.weight_decay));
                }
                if !c.dampening.is_finite() {
                    return bad(format!("invalid dampening value: {}", c.dampening));
                }
                if c.nesterov && (c.momentum <= 0.0 || c.dampening != 0.0) {
                    return bad("nesterov momentum requires a momentum and zero dampening".into());
                }
            }
            OptimizerConfig::Adam(c) => {
                if !non_negative(c.eps) {
                    return bad(format!("invalid epsilon value: {}", c.eps));
                }
                let (b1, b2) = c.betas;
                if !(0.0..1.0).contains(&b1) {
                    return bad(format!("invalid beta parameter at index 0: {b1}"));
                }
                if !(0.0..1.0).contains(&b2) {
                    return bad(format!("invalid beta parameter at index 1: {b2}"));
                }
                if !non_negative(c.weight_decay) {
                    return bad(format!("invalid weight_decay value: {}", c.weight_decay));
                }
            }
            OptimizerConfig::Muon(c) => {
                if !non_negative(c.weight_decay) {
                    return bad(format!("invalid weight decay value: {}", c.weight_decay));
                }
                if !non_negative(c.momentum) {
                    return bad(format!("invalid momentum value: {}", c.momentum));
                }
                if !non_negative(c.eps) {
                    return bad(format!("invalid epsilon value: {}", c.eps));
                }
                if c.ns_steps >= 100 {
                    return bad(format!("number of steps must be less than 100 for computational efficiency, got {}", c.ns_steps));
                }
                if c.nesterov && c.momentum <= 0.0 {
                    return bad("nesterov momentum requires a momentum".into());
                }
                if c.ns_coefficients.iter().any(|x| !x.is_finite()) {
                    return bad(format!("ns_coefficients must be finite, got {:?}", c.ns_coefficients));
                }
            }
            OptimizerConfig::Adafactor(c) => {
                if c.beta2_decay > 0.0 || c.beta2_decay.is_nan() {
                    return bad(format!("beta2_decay should be <= 0 but is: {}", c.beta2_decay));
                }
                if c.d.is_nan() || c.d < 1.0 {
                    return bad(format!("clipping threshold d should be >= 1 but is: {}", c.d));
                }
                if c.eps.0.is_some_and(|e| !non_negative(e)) || !non_negative(c.eps.1) {
                    return bad(format!("epsilon values should be >= 0 but are: {:?}", c.eps));
                }
                if !non_negative(c.weight_decay) {
                    return bad(format!("weight_decay should be >= 0 but is: {}", c.weight_decay));
                }
            }
            OptimizerConfig::Lion(c) => {
                let (b1, b2) = c.betas;
                if !(0.0..=1.0).contains(&b1) || !(0.0..=1.0).contains(&b2) {
                    return bad(format!("invalid betas {:?}: each in [0, 1]", c.betas));
                }
                if !non_negative(c.weight_decay) {
                    return bad(format!("invalid weight_decay value: {}", c.weight_decay));
                }
            }
            OptimizerConfig::ScheduleFreeAdamw(c) => {
                let (b1, b2) = c.betas;
                if !(b1 > 0.0 && b1 < 1.0 && (0.0..1.0).contains(&b2)) {
                    return bad(format!("invalid betas {:?}: beta1 in (0, 1), beta2 in [0, 1)", c.betas));
                }
                if !non_negative(c.eps) || !non_negative(c.weight_decay) {
                    return bad(format!("eps ({}) and weight_decay ({}) must be >= 0", c.eps, c.weight_decay));
                }
            }
            OptimizerConfig::Lbfgs(c) => {
                if c.history_size == 0 {
                    return bad("LBFGS history_size must be at least 1".into());
                }
                if !non_negative(c.tolerance_grad) || !non_negative(c.tolerance_change) {
                    return bad("LBFGS tolerances must be non-negative numbers".into());
                }
            }
        }
        Ok(())
    }

    /// Whether two configs can be groups of one optimizer (torch has one class per optimizer).
    pub fn same_algorithm(&self, other: &OptimizerConfig) -> bool {
        self.name() == other.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_rejects_what_we_reject() {
        let sgd = |f: fn(&mut SgdConfig)| {
            let mut c = SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() };
            f(&mut c);
            OptimizerConfig::Sgd(c).validate()
        };
        assert!(sgd(|_| {}).is_ok());
        assert!(sgd(|c| c.lr = -1.0).is_err());
        assert!(sgd(|c| c.lr = f64::NAN).is_err());
        assert!(sgd(|c| c.momentum = -0.1).is_err());
        assert!(sgd(|c| c.weight_decay = -0.1).is_err());
        assert!(sgd(|c| c.nesterov = true).is_ok());
        assert!(sgd(|c| {
            c.nesterov = true;
            c.momentum = 0.0
        })
        .is_err());
        assert!(sgd(|c| {
            c.nesterov = true;
            c.dampening = 0.1
        })
        .is_err());

        let adam = |f: fn(&mut AdamConfig)| {
            let mut c = AdamConfig::adamw();
            f(&mut c);
            OptimizerConfig::Adam(c).validate()
        };
        assert!(adam(|_| {}).is_ok());
        assert!(adam(|c| c.betas.0 = 1.0).is_err());
        assert!(adam(|c| c.betas.1 = -0.1).is_err());
        assert!(adam(|c| c.eps = -1e-8).is_err());
        assert!(adam(|c| c.weight_decay = -1.0).is_err());
        assert!(OptimizerConfig::Lbfgs(LbfgsConfig { history_size: 0, ..Default::default() }).validate().is_err());
    }

    #[test]
    fn names_and_defaults() {
        assert_eq!(OptimizerConfig::Adam(AdamConfig::adamw()).name(), "adamw");
        assert_eq!(AdamConfig::adamw().weight_decay, 1e-2);
        assert_eq!(LbfgsConfig::default().max_eval(), 25);
    }
}
