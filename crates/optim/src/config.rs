//! Optimizer hyperparameters, with torch's defaults and torch's validation.
//!
//! A param group carries a whole [`OptimizerConfig`] of its own (torch's group dict with
//! every key filled in), so overriding a key for one group is just editing its copy.

use crate::error::Result;

/// `x >= 0`, false for NaN: torch's checks are written `not 0.0 <= x`, which NaN fails.
pub(crate) fn non_negative(x: f64) -> bool {
    x >= 0.0
}

pub use crate::kernels::lbfgs::LineSearch;
pub use crate::kernels::muon::AdjustLr;
pub use crate::kernels::{
    AdafactorConfig, AdamConfig, Kernel, LbfgsConfig, LionConfig, MuonConfig, OptimizerConfig, ScheduleFreeConfig, SgdConfig,
};

impl OptimizerConfig {
    /// The name users know it by (`sgd`, `adam`, `adamw`, `lbfgs`, `muon`...).
    pub fn name(&self) -> &'static str {
        self.kernel().name()
    }

    /// Whether a shard may cut a parameter anywhere: not for Adafactor, whose statistics
    /// need whole matrices (Muon may be cut: its transform is assembled by the caller).
    pub fn elementwise(&self) -> bool {
        !self.kernel().whole_params()
    }

    /// The learning rate.
    pub fn lr(&self) -> f64 {
        self.kernel().lr()
    }

    /// Sets the learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.kernel_mut().set_lr(lr)
    }

    /// The checks the reference constructor makes, with its wording. Comparisons are
    /// written so that NaN fails them, as it does in Python.
    pub fn validate(&self) -> Result<()> {
        self.kernel().validate()
    }

    /// Whether two configs run the same rule (a state dict's group may replace a group
    /// only with its own rule).
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
