//! The optimizer core of distoptim: no communication, only arithmetic on flat buffers.
//!
//! Every model is described by a [`Layout`]: named parameters laid end to end in one
//! contiguous `f32` buffer. Gradients and every optimizer state buffer (`exp_avg`,
//! `exp_avg_sq`, `max_exp_avg_sq`, `momentum_buffer`) share that layout, so a ZeRO shard
//! is nothing but an element range of these buffers (Megatron/DeepSpeed's design). For
//! that reason every kernel here works on an arbitrary element range, never on whole
//! tensors.
//!
//! The numbers are PyTorch's: each update follows torch's single-tensor code operation by
//! operation in `f32`, with hyperparameters and schedules in `f64` as Python floats are.
//!
//! - [`layout`]: parameters, shapes and offsets over one flat buffer.
//! - [`kernels`]: one file per rule (SGD, Adam/AdamW, Muon, Adafactor, Lion,
//!   Schedule-Free AdamW, 8-bit AdamW, LBFGS), each a config implementing the [`Kernel`] trait, and the
//!   one-line-per-rule registry that makes [`OptimizerConfig`].
//! - [`config`]: what every config shares (name, lr, validation through its kernel).
//! - [`optimizer`]: param groups of any kernels over a range of the flat buffers, with
//!   state dicts; the kernels never see groups, shards or checkpoints.
//! - [`lbfgs`]: LBFGS with a closure and the strong-Wolfe line search.
//! - [`quantize`]: block-wise dynamic 8-bit quantization (8-bit AdamW's state).
//! - [`schedule`]: the HF `transformers` learning-rate schedules.
//! - [`clip`]: `clip_grad_norm_`, split into partial norms, total norm and scaling.
//!
//! ```
//! use distoptim_optim::{clip, AdamConfig, Layout, NormType, Optimizer, OptimizerConfig};
//!
//! let layout = Layout::new([("fc.weight", vec![10, 64]), ("fc.bias", vec![10])])?;
//! let mut params = vec![0.5f32; layout.numel()];
//! let mut grads = vec![0.01f32; layout.numel()]; // from a backward pass, same layout
//! let adamw = AdamConfig { lr: 1e-3, ..AdamConfig::adamw() };
//! let mut opt = Optimizer::new(layout, OptimizerConfig::Adam(adamw))?;
//! let norm = clip::clip_grad_norm(&mut grads, 1.0, NormType::P(2.0), true)?;
//! opt.step(&mut params, &grads)?;
//! assert!((norm - (650.0f32).sqrt() * 0.01).abs() < 1e-5);
//! assert!(params.iter().all(|&p| p < 0.5)); // every weight moved against its gradient
//! # Ok::<(), distoptim_optim::OptimError>(())
//! ```

// Every public item says what it is for (the docs are the API's contract).
#![deny(missing_docs)]

pub mod clip;
pub mod config;
pub mod error;
pub mod kernels;
pub mod layout;
pub mod optimizer;
pub mod quantize;
pub mod schedule;
mod simd;

pub use clip::{clip_grad_norm, NormType};
pub use config::{
    AdafactorConfig, AdamConfig, AdjustLr, Kernel, LbfgsConfig, LineSearch, LionConfig, MuonConfig, OptimizerConfig, ScheduleFreeConfig,
    SgdConfig,
};
pub use error::OptimError;
pub use kernels::lbfgs::{self, Lbfgs};
pub use layout::{Layout, ParamSpec};
pub use optimizer::{Optimizer, OptimizerStateDict, ParamGroup, TransformPiece, Transforms};
pub use schedule::{LrScheduler, Schedule};
