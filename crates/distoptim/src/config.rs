//! What a distributed step does: which strategy, how gradients are reduced, whether and
//! how they are clipped.

use distoptim_optim::clip::NormType;

/// How the replicas share the work of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Every rank holds everything; gradients are all-reduced in buckets.
    Ddp,
    /// Gradients all-reduced; optimizer state only for the rank's range; params all-gathered.
    Zero1,
    /// Gradients reduce-scattered (a rank never holds the full reduced gradient); state
    /// for the rank's range; params all-gathered after the step.
    Zero2,
    /// As ZeRO-2, and params stay sharded: all-gathered on demand with `gather_params`.
    Zero3,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ddp => "ddp",
            Strategy::Zero1 => "zero1",
            Strategy::Zero2 => "zero2",
            Strategy::Zero3 => "zero3",
        }
    }

    /// Whether optimizer state is sharded over the group.
    pub fn shards_state(self) -> bool {
        !matches!(self, Strategy::Ddp)
    }
}

/// How the ranks' gradients are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceMode {
    /// Σ g_r / W (DDP's default).
    Mean,
    /// Σ g_r.
    Sum,
    /// Σ b_r·g_r / Σ b_r: exact for uneven shards (the seeds' CrossShardOptimizer); a
    /// rank with batch size 0 takes part and contributes nothing.
    BatchWeighted,
}

/// `torch.nn.utils.clip_grad_norm_` over the whole (distributed) gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipConfig {
    pub max_norm: f64,
    pub norm: NormType,
    pub error_if_nonfinite: bool,
}

/// Everything about a distributed step except the optimizer itself.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    pub strategy: Strategy,
    pub reduce: ReduceMode,
    pub clip: Option<ClipConfig>,
    /// DDP bucket size in MiB of f32 gradients (torch's `bucket_cap_mb`, default 25).
    pub bucket_cap_mb: f64,
}

impl StepConfig {
    pub fn new(strategy: Strategy) -> StepConfig {
        StepConfig { strategy, reduce: ReduceMode::Mean, clip: None, bucket_cap_mb: 25.0 }
    }

    pub(crate) fn bucket_elems(&self) -> usize {
        ((self.bucket_cap_mb * 1048576.0 / 4.0) as usize).max(1)
    }
}

/// What one step did, for logs and the conformance output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The lr of every param group used by this step.
    pub lrs: Vec<f64>,
    /// The global gradient norm before clipping (when clipping).
    pub grad_norm: Option<f32>,
}
