//! What a distributed step does: which strategy, how gradients are reduced, whether and
//! how they are clipped.

use distoptim_optim::clip::NormType;

use crate::precision::Precision;

/// The data-parallel algorithm: how the replicas share the work of a step. One type for
/// all of them; `"zero2".parse::<Strategy>()` reads the names the CLI and checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// torch's post-local SGD: synchronous warm-up, then local steps and periodic
    /// parameter averaging ([`crate::PostLocalSgd`]).
    PostLocalSgd,
    /// DiLoCo: local inner steps, an outer Nesterov step on the averaged delta
    /// ([`crate::Diloco`]).
    Diloco,
}

impl Strategy {
    /// Every strategy, in the order the CLI lists them.
    pub const ALL: [Strategy; 6] =
        [Strategy::Ddp, Strategy::Zero1, Strategy::Zero2, Strategy::Zero3, Strategy::PostLocalSgd, Strategy::Diloco];

    /// The name the CLI, the conformance cases and checkpoints use.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ddp => "ddp",
            Strategy::Zero1 => "zero1",
            Strategy::Zero2 => "zero2",
            Strategy::Zero3 => "zero3",
            Strategy::PostLocalSgd => "post_local_sgd",
            Strategy::Diloco => "diloco",
        }
    }

    /// Whether every step synchronises the gradients (DDP, ZeRO): the strategies of
    /// [`crate::ShardedOptimizer`], whose checkpoints reload at any world size.
    pub fn is_synchronous(self) -> bool {
        matches!(self, Strategy::Ddp | Strategy::Zero1 | Strategy::Zero2 | Strategy::Zero3)
    }

    /// Whether optimizer state is sharded over the group.
    pub fn shards_state(self) -> bool {
        matches!(self, Strategy::Zero1 | Strategy::Zero2 | Strategy::Zero3)
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = crate::DistError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL.into_iter().find(|st| st.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Strategy::ALL.iter().map(|st| st.name()).collect();
            crate::DistError::Invalid(format!("unknown strategy {s:?} (one of {})", names.join(", ")))
        })
    }
}

#[cfg(feature = "clap")]
impl clap::ValueEnum for Strategy {
    fn value_variants<'a>() -> &'a [Self] {
        &Strategy::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
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

/// `torch.nn.utils.clip_grad_norm_` over the whole (distributed) gradient:
/// `ClipConfig::new(1.0)` is torch's `clip_grad_norm_(params, 1.0)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipConfig {
    /// The largest total norm let through; gradients are scaled by
    /// `max_norm / (norm + 1e-6)` when the norm is larger.
    pub max_norm: f64,
    /// The norm's p (default 2; `inf` for the largest magnitude).
    pub norm: NormType,
    /// Fail the step when the total norm is NaN or infinite (default false, as torch).
    pub error_if_nonfinite: bool,
}

impl ClipConfig {
    /// Clipping to `max_norm` by the 2-norm, non-finite norms let through (torch's defaults).
    pub fn new(max_norm: f64) -> ClipConfig {
        ClipConfig { max_norm, norm: NormType::P(2.0), error_if_nonfinite: false }
    }

    /// With another norm.
    pub fn with_norm(mut self, norm: NormType) -> ClipConfig {
        self.norm = norm;
        self
    }

    /// Failing the step on a non-finite total norm, or not.
    pub fn with_error_if_nonfinite(mut self, error: bool) -> ClipConfig {
        self.error_if_nonfinite = error;
        self
    }
}

/// Everything about a synchronous distributed step except the optimizer itself:
/// `StepConfig::new(Strategy::Zero2).with_clip(Some(ClipConfig::new(1.0)))`. Clipping is
/// off unless asked for, as in torch.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    /// DDP or a ZeRO stage.
    pub strategy: Strategy,
    /// How the ranks' gradients combine (default: mean, DDP's).
    pub reduce: ReduceMode,
    /// Clipping by the global norm (default: none).
    pub clip: Option<ClipConfig>,
    /// DDP bucket size in MiB of f32 gradients (torch's `bucket_cap_mb`, default 25).
    pub bucket_cap_mb: f64,
    /// The working and reduction types, and loss scaling (default: all f32).
    pub precision: Precision,
}

impl StepConfig {
    /// `strategy` with the defaults: mean reduction, no clipping, 25 MiB buckets, all f32.
    pub fn new(strategy: Strategy) -> StepConfig {
        StepConfig { strategy, reduce: ReduceMode::Mean, clip: None, bucket_cap_mb: 25.0, precision: Precision::f32() }
    }

    /// With this reduction.
    pub fn with_reduce(mut self, reduce: ReduceMode) -> StepConfig {
        self.reduce = reduce;
        self
    }

    /// With clipping (`None`: off).
    pub fn with_clip(mut self, clip: Option<ClipConfig>) -> StepConfig {
        self.clip = clip;
        self
    }

    /// With DDP buckets of `mb` MiB.
    pub fn with_bucket_cap_mb(mut self, mb: f64) -> StepConfig {
        self.bucket_cap_mb = mb;
        self
    }

    /// With this precision policy.
    pub fn with_precision(mut self, precision: Precision) -> StepConfig {
        self.precision = precision;
        self
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
    /// The step found a non-finite gradient under loss scaling and changed nothing but
    /// the scale (torch's `GradScaler` skipping `optimizer.step`).
    pub skipped: bool,
}
