//! The optimizer kernels: one file per rule, each a config type that implements
//! [`Kernel`], registered by one line in [`registry!`](crate::kernels) below.
//!
//! A kernel is torch's split between a thin stateful class and a functional update
//! (`torch/optim/adamw.py` over `_single_tensor_adamw`): the config says which named
//! state buffers the rule keeps and how it updates one [`Segment`] of the flat buffers;
//! the [`Optimizer`](crate::Optimizer) owns param groups, step counts, state dicts, ZeRO
//! shards, checkpoints and `add_param_group` for every kernel alike, without knowing
//! which one it runs.
//!
//! Elementwise updates read and write every buffer exactly once, element by element, in
//! the operation order of torch's single-tensor code. Because no element depends on
//! another, the result is the same bits whatever the split: [`par_for_each`] cuts the
//! buffers into [`CHUNK`]-aligned pieces and hands them to rayon, so 1 and N threads
//! agree exactly. Kernels that need whole parameters (Adafactor) say so with
//! [`Kernel::whole_params`]; the optimizer then never gives them a cut parameter. Kernels
//! whose update is elementwise around one whole-matrix transform (Muon's Newton–Schulz)
//! say [`Kernel::transforms_whole`] instead: shards may cut them, and the transform runs
//! wherever the caller assembles the matrix.
//!
//! # Adding an optimizer
//!
//! Write `kernels/my_rule.rs` with `pub struct MyRuleConfig` (serde, `Clone`, `Debug`,
//! `PartialEq`) and `impl Kernel for MyRuleConfig`, then add one line to the
//! `registry!` invocation in this file: `MyRule(my_rule::MyRuleConfig),`. The line
//! declares the module, re-exports the config and adds the `OptimizerConfig` variant
//! that param groups, state dicts and checkpoints serialise.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::layout::ParamSpec;

/// What an elementwise update of one element weighs against one flop of a matmul: an
/// AdamW element moves 28 bytes (about 3 ns at this host's 9 GB/s), in which the GEMM
/// kernels do about 200 flops (70 GFLOP/s).
pub const ELEMENT_COST: f64 = 200.0;

/// `lr()` and `set_lr()` of a kernel whose config keeps the lr in a field `lr`.
macro_rules! lr_field {
    () => {
        fn lr(&self) -> f64 {
            self.lr
        }

        fn set_lr(&mut self, lr: f64) {
            self.lr = lr;
        }
    };
}

/// The check every kernel's validation starts with, in torch's words (NaN fails it).
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if crate::config::non_negative(lr) {
        Ok(())
    } else {
        invalid(format!("invalid learning rate: {lr}"))
    }
}

/// torch's Adam checks, in its words: lr, eps and weight decay non-negative, each beta in
/// [0, 1) (shared by every Adam-family rule).
pub(crate) fn check_adam(lr: f64, eps: f64, betas: (f64, f64), weight_decay: f64) -> Result<()> {
    check_lr(lr)?;
    if !crate::config::non_negative(eps) {
        return invalid(format!("invalid epsilon value: {eps}"));
    }
    for (i, b) in [betas.0, betas.1].into_iter().enumerate() {
        if !(0.0..1.0).contains(&b) {
            return invalid(format!("invalid beta parameter at index {i}: {b}"));
        }
    }
    if !crate::config::non_negative(weight_decay) {
        return invalid(format!("invalid weight_decay value: {weight_decay}"));
    }
    Ok(())
}

/// A refused configuration, with the reference implementation's message.
pub(crate) fn invalid(message: String) -> Result<()> {
    Err(OptimError::InvalidConfig(message))
}

/// Declares each kernel module, re-exports its config and builds [`OptimizerConfig`]:
/// the closed set of kernels a param group can name, serialised with an `algorithm` tag.
macro_rules! registry {
    ($( $(#[$doc:meta])* $variant:ident($module:ident :: $config:ident), )*) => {
        $( pub mod $module; pub use $module::$config; )*

        /// One param group's rule and hyperparameters: any registered kernel's config.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "algorithm", rename_all = "lowercase")]
        pub enum OptimizerConfig {
            $( $(#[$doc])* $variant($config), )*
        }

        impl OptimizerConfig {
            /// The kernel behind this config.
            pub fn kernel(&self) -> &dyn Kernel {
                match self { $( OptimizerConfig::$variant(k) => k, )* }
            }

            /// The kernel behind this config, to set its lr or advance its counters.
            pub fn kernel_mut(&mut self) -> &mut dyn Kernel {
                match self { $( OptimizerConfig::$variant(k) => k, )* }
            }
        }

        $( impl From<$config> for OptimizerConfig {
            fn from(config: $config) -> Self {
                OptimizerConfig::$variant(config)
            }
        } )*
    };
}

registry! {
    /// `torch.optim.SGD`.
    Sgd(sgd::SgdConfig),
    /// `torch.optim.Adam`, and `AdamW` with `decoupled_weight_decay`.
    Adam(adam::AdamConfig),
    /// `torch.optim.LBFGS` (closure-driven: run by [`Lbfgs`](crate::Lbfgs), not by `Optimizer`).
    Lbfgs(lbfgs::LbfgsConfig),
    /// `torch.optim.Muon` (2-D parameters; Newton–Schulz on whole matrices).
    Muon(muon::MuonConfig),
    /// `torch.optim.Adafactor` (whole parameters).
    Adafactor(adafactor::AdafactorConfig),
    /// Lion (Chen et al. 2023).
    Lion(lion::LionConfig),
    /// Schedule-Free AdamW (Defazio et al. 2024).
    ScheduleFreeAdamw(schedule_free::ScheduleFreeConfig),
    /// 8-bit AdamW (bitsandbytes' block-wise quantized moments).
    Adamw8bit(adamw8bit::Adamw8bitConfig),
}

/// How the optimizer keeps one state buffer in memory. Either way a state dict carries
/// it as one `f32` per element, so checkpoints, consolidation and resharding treat every
/// buffer alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateStorage {
    /// One `f32` per element.
    F32,
    /// One code byte per element and one `f32` scale per [`Kernel::block`] of a parameter
    /// ([`crate::quantize`]); `signed` picks the code map (a first moment is signed, a
    /// second moment is not).
    Q8 {
        /// Whether the values may be negative.
        signed: bool,
    },
}

/// One optimizer rule. The implementing type is the rule's hyperparameters (one param
/// group's config); the state lives in the optimizer's named buffers, one `f32` per
/// element of its shard, of which the kernel sees a [`Segment`] at a time.
pub trait Kernel: std::fmt::Debug + Send + Sync {
    /// The name users know it by (`sgd`, `adamw`, `muon`...).
    fn name(&self) -> &'static str;

    /// The learning rate.
    fn lr(&self) -> f64;

    /// Sets the learning rate (what a scheduler does after each step).
    fn set_lr(&mut self, lr: f64);

    /// The checks the reference constructor makes, with its wording: a config that fails
    /// them is refused before any state exists.
    fn validate(&self) -> Result<()>;

    /// The state buffers this configuration keeps, by torch's names, in the order
    /// [`Segment::state`] hands them over. A name shared with another kernel
    /// (`exp_avg`) is one buffer: each element belongs to one group, so one rule.
    fn state_buffers(&self) -> Vec<&'static str>;

    /// How each of [`state_buffers`](Self::state_buffers) is stored (all `f32` unless
    /// the rule quantizes its state).
    fn state_storage(&self, _name: &str) -> StateStorage {
        StateStorage::F32
    }

    /// Elements of buffer `name` that a whole parameter `param` needs, kept packed
    /// (Adafactor's row and column statistics: R + C of a matrix's R·C). Read only for a
    /// [`whole_params`](Self::whole_params) rule; the kernel then receives, per buffer,
    /// its parameters' packed state one after another in segment order. Elementwise
    /// rules keep one element per element.
    fn state_len(&self, _name: &str, param: &ParamSpec) -> usize {
        param.numel()
    }

    /// Elements per quantization block: a shard may cut one of this rule's parameters
    /// only at a multiple of it from the parameter's start, so that every block and its
    /// scale stay whole on one rank (1: anywhere).
    fn block(&self) -> usize {
        1
    }

    /// Whether an element's update reads other elements of its parameter (Newton–Schulz,
    /// factored moments): then every segment holds whole parameters and ZeRO gives each
    /// parameter one owner.
    fn whole_params(&self) -> bool {
        false
    }

    /// The work of one step on `param`, in flop-equivalents: what ZeRO balances when it
    /// gives whole parameters to owners. An elementwise update costs [`ELEMENT_COST`] an
    /// element (its memory traffic, at this host's measured kernel speeds).
    fn cost(&self, param: &ParamSpec) -> f64 {
        param.numel() as f64 * ELEMENT_COST
    }

    /// Whether the update runs each parameter through a transform of the whole matrix
    /// between two elementwise passes (Muon: momentum, Newton–Schulz, the step):
    /// [`prepare`](Self::prepare) over any range writes the transform's input,
    /// [`transform`](Self::transform) maps one whole parameter's input to its output
    /// wherever the input was assembled, and [`finish`](Self::finish) applies the output
    /// over the range. Shards may then cut the rule's parameters: only the transform
    /// needs a whole matrix, and a sharded caller chooses which rank runs it
    /// ([`Optimizer::step_with`](crate::Optimizer::step_with)).
    fn transforms_whole(&self) -> bool {
        false
    }

    /// The work of [`transform`](Self::transform) on `param`, in flops: what a sharded
    /// caller balances when it gives each matrix's transform to one rank.
    fn transform_cost(&self, _param: &ParamSpec) -> f64 {
        0.0
    }

    /// Whether [`transform`](Self::transform) reads its input rounded to bf16 and writes
    /// values that bf16 holds exactly (Muon's Newton–Schulz iterates in bf16), so an
    /// exchange may carry both in bf16, half the bytes, without changing a bit.
    fn transform_in_bf16(&self) -> bool {
        false
    }

    /// The first pass of a [`transforms_whole`](Self::transforms_whole) rule over one
    /// segment (its parameters possibly cut): updates the state and writes the
    /// transform's input, one value per element, into `input`.
    fn prepare(&self, _segment: Segment<'_>, _input: &mut [f32]) -> Result<()> {
        Err(OptimError::InvalidConfig(format!("{} has no whole-matrix transform", self.name())))
    }

    /// The transform of whole parameter `param`: `values` holds its input on entry
    /// and its output on return.
    fn transform(&self, _param: &ParamSpec, _values: &mut [f32]) -> Result<()> {
        Err(OptimError::InvalidConfig(format!("{} has no whole-matrix transform", self.name())))
    }

    /// The second pass over the segment [`prepare`](Self::prepare) saw: applies the
    /// transform's `output`, one value per element.
    fn finish(&self, _segment: Segment<'_>, _output: &[f32]) -> Result<()> {
        Err(OptimError::InvalidConfig(format!("{} has no whole-matrix transform", self.name())))
    }

    /// Refuses a parameter this rule cannot update (Muon: not 2-D), naming it.
    fn check_param(&self, _param: &ParamSpec) -> Result<()> {
        Ok(())
    }

    /// Whether the rule needs a closure (LBFGS): the flat-buffer optimizer refuses it.
    fn needs_closure(&self) -> bool {
        false
    }

    /// Called once per optimizer step on every rank, before any segment, whether or not
    /// the rank holds the group's elements: advances group-level counters
    /// (Schedule-Free's `k`, `lr_max`, `weight_sum`).
    fn begin_step(&mut self) {}

    /// Updates one segment in place.
    fn update(&self, segment: Segment<'_>) -> Result<()>;

    /// Whether [`eval_params`](Self::eval_params) differs from the parameters themselves
    /// (Schedule-Free's averaged iterate), so exporters must compute it.
    fn has_eval_view(&self) -> bool {
        false
    }

    /// The parameters to evaluate and ship, from the buffer the gradients are taken at:
    /// `params` itself for most rules (the default), Schedule-Free's averaged iterate x.
    /// `state` is in [`state_buffers`](Self::state_buffers) order; `step` the
    /// parameters' step count (0: no state yet).
    fn eval_params(&self, params: &[f32], _state: &[&[f32]], _step: u64, out: &mut [f32]) {
        out.copy_from_slice(params);
    }
}

/// Neighbouring parameters of one group with the same step count: what one
/// [`Kernel::update`] call sees.
pub struct Segment<'a> {
    /// The parameters' values.
    pub params: &'a mut [f32],
    /// Their gradients (to be multiplied by [`grad_scale`](Self::grad_scale) as read).
    pub grads: &'a [f32],
    /// The kernel's `f32` state buffers over the same elements, in
    /// [`Kernel::state_buffers`] order.
    pub state: Vec<&'a mut [f32]>,
    /// Its quantized ([`StateStorage::Q8`]) buffers, in the same order.
    pub quantized: Vec<Quantized<'a>>,
    /// The segment's quantization blocks, relative to its start, in order (empty unless
    /// [`Kernel::block`] is above 1): scale `k` of every [`Quantized`] belongs to block `k`.
    pub blocks: Vec<Range<usize>>,
    /// The step count the parameters reach with this update (1 on their first).
    pub step: u64,
    /// The clip coefficient, applied as each gradient is read (1: none): the same bits
    /// as clipping the buffer first, one pass less.
    pub grad_scale: f32,
    /// The parameters in the segment, each with its range relative to the segment's
    /// start: whole for a [`Kernel::whole_params`] rule, the pieces the segment holds for
    /// a [`Kernel::transforms_whole`] one, empty for the others.
    pub whole: Vec<(&'a ParamSpec, Range<usize>)>,
}

impl<'a> Segment<'a> {
    /// The segment as fixed buffers for an elementwise pass: `N` state slots, the
    /// kernel's buffers in order, empty past them.
    pub fn buffers<const N: usize>(self) -> Result<Buffers<'a, N>> {
        if self.state.len() > N {
            return Err(OptimError::ShapeMismatch(format!("{} state buffers for a kernel with {N} slots", self.state.len())));
        }
        let mut given = self.state.into_iter();
        let state = std::array::from_fn(|_| given.next().unwrap_or_default());
        Ok(Buffers { params: self.params, grads: self.grads, state })
    }
}

/// A block-wise 8-bit state buffer over a segment.
pub struct Quantized<'a> {
    /// One code per element.
    pub codes: &'a mut [u8],
    /// One scale per block of [`Segment::blocks`].
    pub scales: &'a mut [f32],
}

/// Elements per piece of work: five buffers of 128 KiB stay in a core's L2 cache.
pub const CHUNK: usize = 32 * 1024;

/// The buffers one elementwise pass touches, all covering the same elements. State
/// slots a configuration does not use are empty.
pub struct Buffers<'a, const N: usize> {
    /// The parameters' values.
    pub params: &'a mut [f32],
    /// Their gradients.
    pub grads: &'a [f32],
    /// The state slots.
    pub state: [&'a mut [f32]; N],
}

impl<'a, const N: usize> Buffers<'a, N> {
    /// Elements covered.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether no element is covered.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    fn split_at(self, mid: usize) -> (Buffers<'a, N>, Buffers<'a, N>) {
        let (p0, p1) = self.params.split_at_mut(mid);
        let (g0, g1) = self.grads.split_at(mid);
        let mut right: [&'a mut [f32]; N] = std::array::from_fn(|_| <&mut [f32]>::default());
        let mut slots = self.state.into_iter();
        let left = std::array::from_fn(|i| {
            let (a, b) = split_state(slots.next().unwrap_or_default(), mid);
            right[i] = b;
            a
        });
        (Buffers { params: p0, grads: g0, state: left }, Buffers { params: p1, grads: g1, state: right })
    }
}

fn split_state(s: &mut [f32], mid: usize) -> (&mut [f32], &mut [f32]) {
    if s.is_empty() {
        s.split_at_mut(0)
    } else {
        s.split_at_mut(mid)
    }
}

/// Runs `kernel` over `bufs` in pieces of at most [`CHUNK`] elements, in parallel on the
/// current rayon pool. Splitting is recursive (`rayon::join`), so it allocates nothing.
pub fn par_for_each<const N: usize, F>(bufs: Buffers<'_, N>, kernel: &F)
where
    F: Fn(Buffers<'_, N>) + Sync,
{
    let n = bufs.len();
    if n <= CHUNK {
        kernel(bufs);
        return;
    }
    let mid = (n / CHUNK).div_ceil(2) * CHUNK;
    let (left, right) = bufs.split_at(mid);
    rayon::join(|| par_for_each(left, kernel), || par_for_each(right, kernel));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_every_element_once() {
        let n = 5 * CHUNK + 17;
        let mut p = vec![0.0f32; n];
        let g: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut s = vec![1.0f32; n];
        let bufs = Buffers { params: &mut p, grads: &g, state: [&mut s, &mut [], &mut []] };
        par_for_each(bufs, &|b: Buffers<'_, 3>| {
            assert!(b.len() <= CHUNK);
            for ((p, g), s) in b.params.iter_mut().zip(b.grads).zip(b.state[0].iter_mut()) {
                *p += g + *s;
                *s = 0.0;
            }
        });
        assert!(p.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
        assert!(s.iter().all(|&v| v == 0.0));
    }
}
