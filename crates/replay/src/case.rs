//! A conformance case, parsed and validated.
//!
//! Parsing is by hand over `serde_json::Value` rather than derived, because every problem
//! must map to one of FORMAT.md's error classes with a message naming the field: a typo in
//! a key is `invalid_config`, a gradient of the wrong length `shape_mismatch`, and so on.

use std::collections::BTreeSet;

use distoptim::{FloatDtype, Precision, ReduceMode, Strategy};
use distoptim_optim::config::{AdafactorConfig, AdamConfig, AdjustLr, LbfgsConfig, LineSearch, MuonConfig, OptimizerConfig, SgdConfig};
use distoptim_optim::schedule::{Curve, Schedule, SCHEDULE_NAMES};
use distoptim_optim::{Layout, NormType, ParamGroup};
use serde_json::{Map, Value};

use crate::error::{ErrorClass, ReplayError};

/// `clip_grad_norm` of a case.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    /// The largest total norm let through.
    pub max_norm: f64,
    /// The norm's p.
    pub norm: NormType,
    /// Fail on a non-finite total norm.
    pub error_if_nonfinite: bool,
}

/// `local_sgd` of a `post_local_sgd` case.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalSgd {
    /// Synchronous steps before local SGD.
    pub warmup_steps: u64,
    /// Steps between averagings.
    pub period: u64,
}

/// `diloco` of a `diloco` case.
#[derive(Clone, Debug, PartialEq)]
pub struct Diloco {
    /// Local steps between outer steps.
    pub inner_steps: u64,
    /// The outer SGD's lr.
    pub outer_lr: f64,
    /// The outer SGD's momentum.
    pub outer_momentum: f64,
    /// Nesterov outer momentum.
    pub nesterov: bool,
}

/// `reshard`: after step `after_step`, continue on `world_size` ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct Reshard {
    /// Steps taken before the reshard.
    pub after_step: usize,
    /// Ranks after it.
    pub world_size: usize,
}

/// One optimizer step: per rank, its micro-batch gradients (flat, in layout order; plain
/// `grads` is one micro-batch), and the batch sizes for `batch_weighted`.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Per rank, its micro-batch gradients.
    pub micro_grads: Vec<Vec<Vec<f32>>>,
    /// Per rank, its batch size (`batch_weighted` only).
    pub batch_sizes: Option<Vec<u64>>,
}

impl Step {
    /// Rank `r`'s gradient: its micro-batch gradients summed in order (zero if none), as
    /// repeated `backward()` calls accumulate into `.grad`.
    pub fn rank_grad(&self, r: usize, numel: usize) -> Vec<f32> {
        let mut g = vec![0.0f32; numel];
        for micro in &self.micro_grads[r] {
            g.iter_mut().zip(micro).for_each(|(a, b)| *a += b);
        }
        g
    }

    /// Ranks in this step.
    pub fn world_size(&self) -> usize {
        self.micro_grads.len()
    }
}

/// What an LBFGS case minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// The Rosenbrock function of the parameters (LBFGS cases).
    Rosenbrock,
}

/// A validated case.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case's name.
    pub name: String,
    /// Ranks.
    pub world_size: usize,
    /// The strategy; `None` is FORMAT.md's `single`, the one-process reference.
    pub strategy: Option<Strategy>,
    /// How the ranks' gradients combine into one.
    pub grad_reduce: ReduceMode,
    /// Names and shapes of the parameters.
    pub layout: Layout,
    /// Initial parameters, flat in layout order.
    pub init: Vec<f32>,
    /// The optimizer-level config (torch's `defaults`).
    pub optimizer: OptimizerConfig,
    /// Param groups, each with its full config (overrides applied).
    pub groups: Vec<ParamGroup>,
    /// The lr schedule.
    pub schedule: Option<Schedule>,
    /// Clipping by the global norm.
    pub clip: Option<Clip>,
    /// Post-local SGD's settings.
    pub local_sgd: Option<LocalSgd>,
    /// DiLoCo's settings.
    pub diloco: Option<Diloco>,
    /// A change of world size mid-run (through a checkpoint).
    pub reshard: Option<Reshard>,
    /// The closure's objective (LBFGS cases).
    pub objective: Option<Objective>,
    /// Steps to run (the objective's, for LBFGS cases).
    pub num_steps: usize,
    /// The steps' gradients.
    pub steps: Vec<Step>,
    /// Mixed precision (the gradients in `steps` are already rounded to `param_dtype`).
    pub precision: Option<Precision>,
}

type Result<T> = std::result::Result<T, ReplayError>;

fn err<T>(class: ErrorClass, msg: impl Into<String>) -> Result<T> {
    Err(ReplayError::new(class, msg))
}

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    err(ErrorClass::InvalidConfig, msg)
}

fn shape<T>(msg: String) -> Result<T> {
    err(ErrorClass::ShapeMismatch, msg)
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().map_or_else(|| invalid(format!("{what} must be a JSON object")), Ok)
}

fn check_keys(m: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<()> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => invalid(format!("unknown key '{k}' in {what} (allowed: {})", allowed.join(", "))),
        None => Ok(()),
    }
}

fn number(v: &Value, what: &str) -> Result<f64> {
    match v {
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        _ => invalid(format!("{what} must be a number, got {v}")),
    }
}

fn uint(v: &Value, what: &str, class: ErrorClass) -> Result<u64> {
    v.as_u64().map_or_else(|| err(class, format!("{what} must be a non-negative integer, got {v}")), Ok)
}

fn boolean(v: &Value, what: &str) -> Result<bool> {
    v.as_bool().map_or_else(|| invalid(format!("{what} must be true or false, got {v}")), Ok)
}

/// A number array of exactly `len` values, non-finite values written as strings.
fn numbers(v: &Value, len: usize, what: &str) -> Result<Vec<f32>> {
    let Some(items) = v.as_array() else {
        return shape(format!("{what} must be an array of numbers"));
    };
    if items.len() != len {
        return shape(format!("{what} has {} values, expected {len}", items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN) as f32),
            Value::String(s) if s == "NaN" => Ok(f32::NAN),
            Value::String(s) if s == "Infinity" => Ok(f32::INFINITY),
            Value::String(s) if s == "-Infinity" => Ok(f32::NEG_INFINITY),
            _ => shape(format!("{what}[{i}] is not a number: {x}")),
        })
        .collect()
}

/// Most ranks a replayed case may have: every rank is a thread of this process on the
/// shared-memory engine, whose groups hold at most this many ranks.
pub const MAX_REPLAY_WORLD_SIZE: u64 = 512;
/// Most `num_steps` of an LBFGS case: each step's record is kept for the output.
pub const MAX_REPLAY_STEPS: u64 = 100_000;

fn world_size(v: Option<&Value>, what: &str) -> Result<usize> {
    match v.and_then(Value::as_u64) {
        Some(w) if (1..=MAX_REPLAY_WORLD_SIZE).contains(&w) => Ok(w as usize),
        Some(w) if w > MAX_REPLAY_WORLD_SIZE => err(
            ErrorClass::Unsupported,
            format!(
                "{what} {w} is over this replay's limit of {MAX_REPLAY_WORLD_SIZE} ranks (one thread per rank, one shared-memory group)"
            ),
        ),
        _ => err(ErrorClass::InvalidWorldSize, format!("{what} must be an integer >= 1, got {}", v.unwrap_or(&Value::Null))),
    }
}

const CASE_KEYS: &[&str] = &[
    "name",
    "description",
    "world_size",
    "strategy",
    "grad_reduce",
    "params",
    "param_groups",
    "optimizer",
    "optimizers",
    "scheduler",
    "clip_grad_norm",
    "local_sgd",
    "diloco",
    "reshard",
    "precision",
    "objective",
    "num_steps",
    "steps",
    "expected",
    "tolerance",
];

impl Case {
    /// Parses a case from JSON text; malformed JSON is `invalid_config`.
    pub fn from_json(text: &str) -> Result<Case> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| ReplayError::new(ErrorClass::InvalidConfig, format!("malformed JSON: {e}")))?;
        Case::from_value(&v)
    }

    /// Parses and validates a case already read as JSON.
    pub fn from_value(v: &Value) -> Result<Case> {
        let top = object(v, "the case")?;
        check_keys(top, CASE_KEYS, "the case")?;
        let name = top.get("name").and_then(Value::as_str).unwrap_or("case").to_string();

        let ws = world_size(top.get("world_size"), "world_size")?;
        let reshard = match top.get("reshard") {
            None | Some(Value::Null) => None,
            Some(r) => {
                let m = object(r, "reshard")?;
                check_keys(m, &["after_step", "world_size"], "reshard")?;
                let world_size = world_size(m.get("world_size"), "reshard.world_size")?;
                let after_step =
                    uint(m.get("after_step").unwrap_or(&Value::Null), "reshard.after_step", ErrorClass::InvalidConfig)? as usize;
                Some(Reshard { after_step, world_size })
            }
        };

        let strategy_name = top.get("strategy").and_then(Value::as_str).unwrap_or("");
        let strategy = match strategy_name {
            "single" => None,
            name => Some(name.parse::<Strategy>().map_err(|e| ReplayError::new(ErrorClass::InvalidConfig, format!("{e} or single")))?),
        };
        if strategy.is_none() && ws != 1 {
            return err(ErrorClass::InvalidWorldSize, format!("strategy 'single' needs world_size 1, got {ws}"));
        }

        let sched_value = top.get("scheduler").filter(|s| !s.is_null());
        if let Some(s) = sched_value {
            let sname = object(s, "scheduler")?.get("name").and_then(Value::as_str).unwrap_or("");
            if !SCHEDULE_NAMES.contains(&sname) {
                return err(ErrorClass::UnknownScheduler, format!("unknown scheduler '{sname}' ({})", SCHEDULE_NAMES.join(", ")));
            }
        }
        let (optimizer, groups, layout, init, schedule) = match top.get("optimizers").filter(|v| !v.is_null()) {
            Some(list) => {
                if top.contains_key("optimizer") || top.contains_key("param_groups") {
                    return invalid("a case gives either optimizers or optimizer (with param_groups), not both");
                }
                // Names are checked before the params, as torch builds the optimizers after the model.
                let list = list.as_array().filter(|l| !l.is_empty()).map_or_else(|| invalid("optimizers must be a non-empty list"), Ok)?;
                for (oi, entry) in list.iter().enumerate() {
                    let name = object(entry, &format!("optimizers[{oi}]"))?.get("name").and_then(Value::as_str).unwrap_or("");
                    new_optimizer(name)?;
                }
                let (layout, init) = parse_params(top.get("params"))?;
                let (optimizer, groups, schedule) = parse_optimizers(list, &layout, sched_value)?;
                (optimizer, groups, layout, init, schedule)
            }
            None => {
                let opt = object(top.get("optimizer").unwrap_or(&Value::Null), "optimizer")?;
                let opt_name = opt.get("name").and_then(Value::as_str).unwrap_or("");
                let mut optimizer = new_optimizer(opt_name)?;
                let (layout, init) = parse_params(top.get("params"))?;
                if opt_name == "adamw" && opt.contains_key("decoupled_weight_decay") {
                    return invalid("adamw always decouples weight decay: use adam with decoupled_weight_decay");
                }
                for (k, val) in opt.iter().filter(|(k, _)| k.as_str() != "name") {
                    apply_key(&mut optimizer, k, val, "optimizer")?;
                }
                optimizer.validate()?;
                let groups = parse_groups(top.get("param_groups"), &layout, &optimizer)?;
                if matches!(optimizer, OptimizerConfig::Lbfgs(_)) && groups.len() != 1 {
                    return invalid("LBFGS doesn't support per-parameter options (parameter groups)");
                }
                let schedule = sched_value.map(|s| parse_schedule(s, optimizer.lr())).transpose()?;
                (optimizer, groups, layout, init, schedule)
            }
        };
        check_shapes(&layout, &groups)?;
        let lbfgs = matches!(optimizer, OptimizerConfig::Lbfgs(_));

        let grad_reduce = match top.get("grad_reduce").map(|g| g.as_str()) {
            None | Some(Some("mean")) => ReduceMode::Mean,
            Some(Some("sum")) => ReduceMode::Sum,
            Some(Some("batch_weighted")) => ReduceMode::BatchWeighted,
            Some(_) => return invalid(format!("grad_reduce must be mean, sum or batch_weighted, got {}", top["grad_reduce"])),
        };
        let clip = top.get("clip_grad_norm").filter(|c| !c.is_null()).map(parse_clip).transpose()?;
        let local_sgd = parse_strategy_field(top, "local_sgd", strategy == Some(Strategy::PostLocalSgd), parse_local_sgd)?;
        let diloco = parse_strategy_field(top, "diloco", strategy == Some(Strategy::Diloco), parse_diloco)?;
        let label = strategy.map_or("single", Strategy::name);
        if reshard.is_some() && !strategy.is_some_and(Strategy::is_synchronous) {
            return invalid(format!("reshard is for ddp and zero strategies, not {label}"));
        }

        let precision = top.get("precision").filter(|p| !p.is_null()).map(parse_precision).transpose()?;
        if precision.is_some() && (lbfgs || !strategy.is_none_or(Strategy::is_synchronous)) {
            let what = if lbfgs { "lbfgs" } else { label };
            return invalid(format!("precision is for single, ddp and zero strategies with first-order optimizers, not {what}"));
        }

        let (objective, num_steps, mut steps) = if lbfgs {
            if ws != 1 {
                return err(ErrorClass::InvalidWorldSize, format!("lbfgs cases run on one rank, got world_size {ws}"));
            }
            if clip.is_some() {
                return invalid("clip_grad_norm does not apply to lbfgs cases");
            }
            if top.get("steps").is_some_and(|s| s.as_array().is_none_or(|a| !a.is_empty())) {
                return invalid("lbfgs cases give objective and num_steps, not steps");
            }
            let obj = object(top.get("objective").unwrap_or(&Value::Null), "objective")?;
            check_keys(obj, &["name"], "objective")?;
            if obj.get("name").and_then(Value::as_str) != Some("rosenbrock") {
                return invalid(format!("unknown objective {} (rosenbrock)", obj.get("name").unwrap_or(&Value::Null)));
            }
            if layout.numel() < 2 {
                return err(ErrorClass::ShapeMismatch, "rosenbrock needs at least 2 elements");
            }
            let n = uint(top.get("num_steps").unwrap_or(&Value::Null), "num_steps", ErrorClass::InvalidConfig)?;
            if n > MAX_REPLAY_STEPS {
                return err(ErrorClass::Unsupported, format!("num_steps {n} is over this replay's limit of {MAX_REPLAY_STEPS}"));
            }
            (Some(Objective::Rosenbrock), n as usize, Vec::new())
        } else {
            if top.contains_key("objective") || top.contains_key("num_steps") {
                return invalid("objective and num_steps are for lbfgs cases only");
            }
            let steps = parse_steps(top.get("steps"), &layout, ws, reshard.as_ref(), grad_reduce)?;
            (None, steps.len(), steps)
        };

        if let Some(p) = precision.filter(|p| p.param_dtype != FloatDtype::F32) {
            // Each gradient entry is the model's gradient, of the working type.
            for step in &mut steps {
                step.micro_grads.iter_mut().flatten().flatten().for_each(|g| *g = p.param_dtype.round(*g));
            }
        }

        Ok(Case {
            name,
            precision,
            world_size: ws,
            strategy,
            grad_reduce,
            layout,
            init,
            optimizer,
            groups,
            schedule,
            clip,
            local_sgd,
            diloco,
            reshard,
            objective,
            num_steps,
            steps,
        })
    }

    /// The world size in force at step `t`.
    pub fn world_size_at(&self, t: usize) -> usize {
        match &self.reshard {
            Some(r) if t >= r.after_step => r.world_size,
            _ => self.world_size,
        }
    }
}

fn parse_params(v: Option<&Value>) -> Result<(Layout, Vec<f32>)> {
    let Some(list) = v.and_then(Value::as_array) else {
        return invalid("params must be a list of {name, shape, data}");
    };
    if list.is_empty() {
        return invalid("optimizer got an empty parameter list");
    }
    let mut layout = Layout::default();
    let mut init = Vec::new();
    for (i, p) in list.iter().enumerate() {
        let m = object(p, &format!("params[{i}]"))?;
        check_keys(m, &["name", "shape", "data"], &format!("params[{i}]"))?;
        let Some(name) = m.get("name").and_then(Value::as_str) else {
            return invalid(format!("params[{i}] has no name"));
        };
        let shape: Vec<usize> = match m.get("shape").and_then(Value::as_array) {
            Some(dims) => dims
                .iter()
                .map(|d| uint(d, &format!("a dimension of '{name}'"), ErrorClass::ShapeMismatch).map(|d| d as usize))
                .collect::<Result<_>>()?,
            None => return err(ErrorClass::ShapeMismatch, format!("param '{name}' has no shape list")),
        };
        let index = layout.push(name.to_string(), shape)?;
        let numel = layout.param(index).numel();
        init.extend(numbers(m.get("data").unwrap_or(&Value::Null), numel, &format!("data of '{name}'"))?);
    }
    Ok((layout, init))
}

/// A config with torch's defaults for the optimizer `name`.
fn new_optimizer(name: &str) -> Result<OptimizerConfig> {
    Ok(match name {
        "sgd" => OptimizerConfig::Sgd(SgdConfig::default()),
        "adam" => OptimizerConfig::Adam(AdamConfig::adam()),
        "adamw" => OptimizerConfig::Adam(AdamConfig::adamw()),
        "lbfgs" => OptimizerConfig::Lbfgs(LbfgsConfig::default()),
        "muon" => OptimizerConfig::Muon(MuonConfig::default()),
        "adafactor" => OptimizerConfig::Adafactor(AdafactorConfig::default()),
        other => {
            return err(ErrorClass::UnknownOptimizer, format!("unknown optimizer '{other}' (sgd, adam, adamw, lbfgs, muon, adafactor)"))
        }
    })
}

/// Muon takes 2-D parameters only (torch refuses the others when it is built).
fn check_shapes(layout: &Layout, groups: &[ParamGroup]) -> Result<()> {
    for g in groups.iter().filter(|g| matches!(g.config, OptimizerConfig::Muon(_))) {
        if let Some(p) = g.params.iter().map(|&i| layout.param(i)).find(|p| p.shape.len() != 2) {
            return invalid(format!("muon only supports 2-D parameters, '{}' has shape {:?}", p.name, p.shape));
        }
    }
    Ok(())
}

/// `optimizers`: each entry a torch optimizer over its own params (or param groups), all
/// merged into one list of groups in entry order (the order their lrs are reported in).
/// Each entry has its own LambdaLR; the schedule's λ may depend on the entry's lr (`L`),
/// which then must be the same for all entries.
fn parse_optimizers(
    list: &[Value],
    layout: &Layout,
    sched: Option<&Value>,
) -> Result<(OptimizerConfig, Vec<ParamGroup>, Option<Schedule>)> {
    let mut seen = BTreeSet::new();
    let mut groups = Vec::new();
    let mut schedules = Vec::new();
    let mut first = None;
    for (oi, entry) in list.iter().enumerate() {
        let what = format!("optimizers[{oi}]");
        let m = object(entry, &what)?;
        let name = m.get("name").and_then(Value::as_str).unwrap_or("");
        let mut config = new_optimizer(name)?;
        if matches!(config, OptimizerConfig::Lbfgs(_)) {
            return invalid(format!("{what}: lbfgs cannot be one of several optimizers (it needs a closure)"));
        }
        let (params_key, groups_key) = (m.get("params"), m.get("param_groups"));
        if params_key.is_some() == groups_key.is_some() {
            return invalid(format!("{what} needs exactly one of params and param_groups"));
        }
        for (k, val) in m.iter().filter(|(k, _)| !["name", "params", "param_groups"].contains(&k.as_str())) {
            apply_key(&mut config, k, val, &what)?;
        }
        config.validate()?;
        let group_list: Vec<Value> = match (params_key, groups_key) {
            (Some(p), _) => vec![serde_json::json!({ "params": p })],
            (_, Some(g)) => g
                .as_array()
                .filter(|l| !l.is_empty())
                .cloned()
                .map_or_else(|| invalid(format!("{what}.param_groups must be a non-empty list")), Ok)?,
            _ => Vec::new(),
        };
        for (gi, g) in group_list.iter().enumerate() {
            groups.push(parse_group(g, &format!("{what}.param_groups[{gi}]"), layout, &config, &mut seen)?);
        }
        schedules.push(sched.map(|s| parse_schedule(s, config.lr())).transpose()?);
        first.get_or_insert(config);
    }
    if let Some(missing) = (0..layout.len()).find(|i| !seen.contains(i)) {
        return invalid(format!("param '{}' is in no optimizer", layout.param(missing).name));
    }
    if schedules.windows(2).any(|w| w[0] != w[1]) {
        return err(
            ErrorClass::Unsupported,
            "the schedule's lambda depends on each optimizer's lr (lr_end, min_lr) and they differ: one shared schedule is supported",
        );
    }
    let optimizer = first.map_or_else(|| invalid("optimizers must be a non-empty list"), Ok)?;
    Ok((optimizer, groups, schedules.into_iter().next().flatten()))
}

/// Applies one optimizer key (from the optimizer or a param group) onto a config.
fn apply_key(cfg: &mut OptimizerConfig, key: &str, v: &Value, what: &str) -> Result<()> {
    let w = format!("{what}.{key}");
    match cfg {
        OptimizerConfig::Sgd(c) => match key {
            "lr" => c.lr = number(v, &w)?,
            "momentum" => c.momentum = number(v, &w)?,
            "dampening" => c.dampening = number(v, &w)?,
            "nesterov" => c.nesterov = boolean(v, &w)?,
            "weight_decay" => c.weight_decay = number(v, &w)?,
            "maximize" => c.maximize = boolean(v, &w)?,
            _ => return invalid(format!("unknown sgd option '{key}' in {what}")),
        },
        OptimizerConfig::Adam(c) => match key {
            "lr" => c.lr = number(v, &w)?,
            "betas" => {
                let b = v.as_array().filter(|b| b.len() == 2);
                let Some(b) = b else { return invalid(format!("{w} must be a list of two numbers")) };
                c.betas = (number(&b[0], &w)?, number(&b[1], &w)?);
            }
            "eps" => c.eps = number(v, &w)?,
            "weight_decay" => c.weight_decay = number(v, &w)?,
            "amsgrad" => c.amsgrad = boolean(v, &w)?,
            "maximize" => c.maximize = boolean(v, &w)?,
            "decoupled_weight_decay" => c.decoupled_weight_decay = boolean(v, &w)?,
            _ => return invalid(format!("unknown adam option '{key}' in {what}")),
        },
        OptimizerConfig::Lbfgs(c) => match key {
            "lr" => c.lr = number(v, &w)?,
            "max_iter" => c.max_iter = uint(v, &w, ErrorClass::InvalidConfig)?,
            "max_eval" => c.max_eval = if v.is_null() { None } else { Some(uint(v, &w, ErrorClass::InvalidConfig)?) },
            "tolerance_grad" => c.tolerance_grad = number(v, &w)?,
            "tolerance_change" => c.tolerance_change = number(v, &w)?,
            "history_size" => c.history_size = uint(v, &w, ErrorClass::InvalidConfig)? as usize,
            "line_search_fn" => {
                c.line_search = match v {
                    Value::Null => LineSearch::None,
                    Value::String(s) if s == "strong_wolfe" => LineSearch::StrongWolfe,
                    _ => return invalid(format!("{w}: only 'strong_wolfe' is supported, got {v}")),
                }
            }
            _ => return invalid(format!("unknown lbfgs option '{key}' in {what}")),
        },
        OptimizerConfig::Muon(c) => match key {
            "lr" => c.lr = number(v, &w)?,
            "weight_decay" => c.weight_decay = number(v, &w)?,
            "momentum" => c.momentum = number(v, &w)?,
            "nesterov" => c.nesterov = boolean(v, &w)?,
            "eps" => c.eps = number(v, &w)?,
            "ns_steps" => c.ns_steps = uint(v, &w, ErrorClass::InvalidConfig)?,
            "ns_coefficients" => {
                let Some(list) = v.as_array().filter(|l| l.len() == 3) else {
                    return invalid(format!("{w} must be a list of three numbers"));
                };
                for (slot, x) in c.ns_coefficients.iter_mut().zip(list) {
                    *slot = number(x, &w)?;
                }
            }
            "adjust_lr_fn" => {
                c.adjust_lr = match v {
                    Value::Null => AdjustLr::Original,
                    Value::String(s) if s == "original" => AdjustLr::Original,
                    Value::String(s) if s == "match_rms_adamw" => AdjustLr::MatchRmsAdamw,
                    Value::String(s) if s == "spectral_unclamped" => AdjustLr::SpectralUnclamped,
                    _ => return invalid(format!("{w}: unknown adjust_lr_fn {v} (null, original, match_rms_adamw, spectral_unclamped)")),
                }
            }
            _ => return invalid(format!("unknown muon option '{key}' in {what}")),
        },
        OptimizerConfig::Adafactor(c) => match key {
            "lr" => c.lr = number(v, &w)?,
            "beta2_decay" => c.beta2_decay = number(v, &w)?,
            "eps" => {
                let Some(list) = v.as_array().filter(|l| l.len() == 2) else {
                    return invalid(format!("{w} must be a list [eps1 or null, eps2]"));
                };
                let eps1 = if list[0].is_null() { None } else { Some(number(&list[0], &w)?) };
                c.eps = (eps1, number(&list[1], &w)?);
            }
            "d" => c.d = number(v, &w)?,
            "weight_decay" => c.weight_decay = number(v, &w)?,
            "maximize" => c.maximize = boolean(v, &w)?,
            _ => return invalid(format!("unknown adafactor option '{key}' in {what}")),
        },
        // Not one of the conformance format's optimizers (no torch reference: Lion,
        // Schedule-Free, 8-bit AdamW and any kernel registered later): `new_optimizer`
        // never builds it.
        _ => return err(ErrorClass::UnknownOptimizer, format!("{} is not one of the six optimizers of the format", cfg.name())),
    }
    Ok(())
}

/// One param group: `{"params": [names], <overrides>}` over `base`; each name must be a
/// param of the case not already in `seen` (which it joins).
fn parse_group(g: &Value, what: &str, layout: &Layout, base: &OptimizerConfig, seen: &mut BTreeSet<usize>) -> Result<ParamGroup> {
    let m = object(g, what)?;
    let Some(names) = m.get("params").and_then(Value::as_array) else {
        return invalid(format!("{what} has no params list"));
    };
    let mut params = Vec::new();
    for n in names {
        let Some(i) = n.as_str().and_then(|n| layout.index_of(n)) else {
            return invalid(format!("{what} names {n}, which is not a param of the case"));
        };
        if !seen.insert(i) {
            return invalid(format!("param '{}' is in two param groups or optimizers", layout.param(i).name));
        }
        params.push(i);
    }
    let mut config = base.clone();
    for (k, val) in m.iter().filter(|(k, _)| k.as_str() != "params") {
        apply_key(&mut config, k, val, what)?;
    }
    config.validate()?;
    Ok(ParamGroup { params, config })
}

fn parse_groups(v: Option<&Value>, layout: &Layout, base: &OptimizerConfig) -> Result<Vec<ParamGroup>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(vec![ParamGroup { params: (0..layout.len()).collect(), config: base.clone() }]);
    };
    let Some(list) = v.as_array().filter(|l| !l.is_empty()) else {
        return invalid("param_groups must be a non-empty list");
    };
    let mut seen = BTreeSet::new();
    let mut groups = Vec::new();
    for (gi, g) in list.iter().enumerate() {
        groups.push(parse_group(g, &format!("param_groups[{gi}]"), layout, base, &mut seen)?);
    }
    if let Some(missing) = (0..layout.len()).find(|i| !seen.contains(i)) {
        return invalid(format!("param '{}' is in no param group", layout.param(missing).name));
    }
    Ok(groups)
}

fn parse_schedule(v: &Value, lr_init: f64) -> Result<Schedule> {
    let m = object(v, "scheduler")?;
    let name = m.get("name").and_then(Value::as_str).unwrap_or("");
    let specific: &[&str] = match name {
        "cosine_with_warmup" | "cosine_with_hard_restarts_with_warmup" => &["num_cycles"],
        "polynomial_decay_with_warmup" => &["lr_end", "power"],
        "inverse_sqrt" => &["timescale"],
        "cosine_with_min_lr_with_warmup" => &["num_cycles", "min_lr", "min_lr_rate"],
        "warmup_stable_decay" => &["num_stable_steps", "num_decay_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"],
        _ => &[],
    };
    let mut allowed = vec!["name", "num_warmup_steps", "num_training_steps"];
    allowed.extend_from_slice(specific);
    check_keys(m, &allowed, &format!("scheduler '{name}'"))?;

    let get = |k: &str| m.get(k).filter(|v| !v.is_null());
    let steps =
        |k: &str| -> Result<Option<u64>> { get(k).map(|v| uint(v, &format!("scheduler.{k}"), ErrorClass::InvalidConfig)).transpose() };
    let required = |k: &str| -> Result<u64> { steps(k)?.map_or_else(|| invalid(format!("scheduler '{name}' requires {k}")), Ok) };
    let float = |k: &str, default: f64| -> Result<f64> { get(k).map_or(Ok(default), |v| number(v, &format!("scheduler.{k}"))) };
    let curve = |k: &str, default: Curve| -> Result<Curve> {
        match get(k) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(Curve::parse(s)?),
            Some(v) => invalid(format!("scheduler.{k} must be a string, got {v}")),
        }
    };

    Ok(match name {
        "constant" => Schedule::Constant,
        "constant_with_warmup" => Schedule::ConstantWithWarmup { warmup: required("num_warmup_steps")? },
        "linear_with_warmup" => {
            Schedule::LinearWithWarmup { warmup: required("num_warmup_steps")?, total: required("num_training_steps")? }
        }
        "cosine_with_warmup" => Schedule::CosineWithWarmup {
            warmup: required("num_warmup_steps")?,
            total: required("num_training_steps")?,
            cycles: float("num_cycles", 0.5)?,
        },
        "cosine_with_hard_restarts_with_warmup" => Schedule::CosineWithHardRestartsWithWarmup {
            warmup: required("num_warmup_steps")?,
            total: required("num_training_steps")?,
            cycles: float("num_cycles", 1.0)?,
        },
        "polynomial_decay_with_warmup" => Schedule::polynomial(
            required("num_warmup_steps")?,
            required("num_training_steps")?,
            float("lr_end", 1e-7)?,
            float("power", 1.0)?,
            lr_init,
        )?,
        "inverse_sqrt" => Schedule::inverse_sqrt(required("num_warmup_steps")?, steps("timescale")?)?,
        "cosine_with_min_lr_with_warmup" => Schedule::cosine_with_min_lr(
            required("num_warmup_steps")?,
            required("num_training_steps")?,
            float("num_cycles", 0.5)?,
            get("min_lr_rate").map(|v| number(v, "scheduler.min_lr_rate")).transpose()?,
            get("min_lr").map(|v| number(v, "scheduler.min_lr")).transpose()?,
            lr_init,
        )?,
        "warmup_stable_decay" => {
            let warmup = required("num_warmup_steps")?;
            let decay = required("num_decay_steps")?;
            let stable = match (steps("num_stable_steps")?, steps("num_training_steps")?) {
                (Some(s), _) => s,
                (None, Some(total)) => match total.checked_sub(warmup + decay) {
                    Some(s) => s,
                    None => return invalid("num_training_steps is shorter than warmup and decay together"),
                },
                (None, None) => return invalid("warmup_stable_decay requires num_stable_steps or num_training_steps"),
            };
            Schedule::WarmupStableDecay {
                warmup,
                stable,
                decay,
                warmup_curve: curve("warmup_type", Curve::Linear)?,
                decay_curve: curve("decay_type", Curve::Cosine)?,
                min_lr_ratio: float("min_lr_ratio", 0.0)?,
                cycles: float("num_cycles", 0.5)?,
            }
        }
        other => return err(ErrorClass::UnknownScheduler, format!("unknown scheduler '{other}'")),
    })
}

fn parse_clip(v: &Value) -> Result<Clip> {
    let m = object(v, "clip_grad_norm")?;
    check_keys(m, &["max_norm", "norm_type", "error_if_nonfinite"], "clip_grad_norm")?;
    let max_norm = number(m.get("max_norm").unwrap_or(&Value::Null), "clip_grad_norm.max_norm")?;
    let norm = match m.get("norm_type") {
        None => NormType::P(2.0),
        Some(Value::String(s)) if matches!(s.as_str(), "inf" | "Infinity") => NormType::Inf,
        Some(v) => NormType::new(number(v, "clip_grad_norm.norm_type")?)?,
    };
    let error_if_nonfinite = m.get("error_if_nonfinite").map_or(Ok(false), |v| boolean(v, "clip_grad_norm.error_if_nonfinite"))?;
    Ok(Clip { max_norm, norm, error_if_nonfinite })
}

/// A field that belongs to one strategy: required there, rejected elsewhere.
fn parse_strategy_field<T>(
    top: &Map<String, Value>,
    key: &str,
    wanted: bool,
    parse: fn(&Map<String, Value>) -> Result<T>,
) -> Result<Option<T>> {
    match (top.get(key).filter(|v| !v.is_null()), wanted) {
        (Some(v), true) => parse(object(v, key)?).map(Some),
        (None, true) => invalid(format!("this strategy requires '{key}'")),
        (Some(_), false) => invalid(format!("'{key}' does not apply to this strategy")),
        (None, false) => Ok(None),
    }
}

/// `precision`: `param_dtype` f32/bf16/f16 and `reduce_dtype` f32/bf16 (missing: f32).
fn parse_precision(v: &Value) -> Result<Precision> {
    let m = object(v, "precision")?;
    check_keys(m, &["param_dtype", "reduce_dtype"], "precision")?;
    let dtype = |key: &str, allowed: &[FloatDtype]| -> Result<FloatDtype> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(FloatDtype::F32),
            Some(Value::String(name)) => match name.parse::<FloatDtype>() {
                Ok(d) if allowed.contains(&d) => Ok(d),
                _ => {
                    let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
                    invalid(format!("precision.{key} '{name}' is not one of {}", names.join(", ")))
                }
            },
            Some(other) => invalid(format!("precision.{key} must be a dtype name, got {other}")),
        }
    };
    let param_dtype = dtype("param_dtype", &FloatDtype::ALL)?;
    let reduce_dtype = dtype("reduce_dtype", &[FloatDtype::F32, FloatDtype::Bf16])?;
    Ok(Precision { param_dtype, reduce_dtype, loss_scale: None })
}

fn parse_local_sgd(m: &Map<String, Value>) -> Result<LocalSgd> {
    check_keys(m, &["warmup_steps", "period"], "local_sgd")?;
    let warmup_steps = m.get("warmup_steps").map_or(Ok(0), |v| uint(v, "local_sgd.warmup_steps", ErrorClass::InvalidConfig))?;
    let period = uint(m.get("period").unwrap_or(&Value::Null), "local_sgd.period", ErrorClass::InvalidConfig)?;
    if period == 0 {
        return invalid("local_sgd.period must be a positive value");
    }
    Ok(LocalSgd { warmup_steps, period })
}

fn parse_diloco(m: &Map<String, Value>) -> Result<Diloco> {
    check_keys(m, &["inner_steps", "outer_lr", "outer_momentum", "nesterov"], "diloco")?;
    let inner_steps = uint(m.get("inner_steps").unwrap_or(&Value::Null), "diloco.inner_steps", ErrorClass::InvalidConfig)?;
    if inner_steps == 0 {
        return invalid("diloco.inner_steps must be positive");
    }
    let outer_lr = number(m.get("outer_lr").unwrap_or(&Value::Null), "diloco.outer_lr")?;
    let outer_momentum = m.get("outer_momentum").map_or(Ok(0.0), |v| number(v, "diloco.outer_momentum"))?;
    let nesterov = m.get("nesterov").map_or(Ok(false), |v| boolean(v, "diloco.nesterov"))?;
    // The outer optimizer is torch's SGD: same checks.
    OptimizerConfig::Sgd(SgdConfig { lr: outer_lr, momentum: outer_momentum, nesterov, ..Default::default() }).validate()?;
    Ok(Diloco { inner_steps, outer_lr, outer_momentum, nesterov })
}

fn parse_steps(v: Option<&Value>, layout: &Layout, ws: usize, reshard: Option<&Reshard>, reduce: ReduceMode) -> Result<Vec<Step>> {
    let Some(list) = v.and_then(Value::as_array) else {
        return shape("steps must be a list".into());
    };
    let mut steps = Vec::with_capacity(list.len());
    for (t, s) in list.iter().enumerate() {
        let w = match reshard {
            Some(r) if t >= r.after_step => r.world_size,
            _ => ws,
        };
        let what = format!("steps[{t}]");
        let m = object(s, &what)?;
        check_keys(m, &["grads", "micro_grads", "batch_sizes"], &what)?;
        let micro_grads: Vec<Vec<Vec<f32>>> = match (m.get("grads"), m.get("micro_grads")) {
            (Some(g), None) => ranks(g, w, &format!("{what}.grads"))?
                .iter()
                .enumerate()
                .map(|(r, g)| grad_map(g, layout, &format!("{what}.grads[{r}]")).map(|g| vec![g]))
                .collect::<Result<_>>()?,
            (None, Some(g)) => ranks(g, w, &format!("{what}.micro_grads"))?
                .iter()
                .enumerate()
                .map(|(r, micro)| {
                    let Some(micro) = micro.as_array() else {
                        return shape(format!("{what}.micro_grads[{r}] must be a list of gradient maps"));
                    };
                    micro.iter().enumerate().map(|(k, g)| grad_map(g, layout, &format!("{what}.micro_grads[{r}][{k}]"))).collect()
                })
                .collect::<Result<_>>()?,
            _ => return shape(format!("{what} needs exactly one of grads or micro_grads")),
        };
        let batch_sizes = match m.get("batch_sizes") {
            None => None,
            Some(b) => {
                let sizes: Vec<u64> = ranks(b, w, &format!("{what}.batch_sizes"))?
                    .iter()
                    .map(|x| uint(x, &format!("{what}.batch_sizes"), ErrorClass::ShapeMismatch))
                    .collect::<Result<_>>()?;
                match sizes.iter().try_fold(0u64, |a, &b| a.checked_add(b)) {
                    Some(0) => return invalid(format!("{what}.batch_sizes are all zero: nothing to average")),
                    None => return shape(format!("{what}.batch_sizes overflow when summed")),
                    Some(_) => {}
                }
                Some(sizes)
            }
        };
        if reduce == ReduceMode::BatchWeighted && batch_sizes.is_none() {
            return shape(format!("{what} has no batch_sizes, which batch_weighted reduction needs"));
        }
        steps.push(Step { micro_grads, batch_sizes });
    }
    Ok(steps)
}

/// A list with one entry per rank.
fn ranks<'a>(v: &'a Value, w: usize, what: &str) -> Result<&'a Vec<Value>> {
    match v.as_array() {
        Some(a) if a.len() == w => Ok(a),
        Some(a) => err(ErrorClass::ShapeMismatch, format!("{what} has {} entries for {w} ranks", a.len())),
        None => err(ErrorClass::ShapeMismatch, format!("{what} must be a list with one entry per rank")),
    }
}

/// A `{param name: gradient}` map naming exactly the case's params, flattened.
fn grad_map(v: &Value, layout: &Layout, what: &str) -> Result<Vec<f32>> {
    let Some(m) = v.as_object() else {
        return err(ErrorClass::ShapeMismatch, format!("{what} must map param names to gradients"));
    };
    if let Some(k) = m.keys().find(|k| layout.index_of(k).is_none()) {
        return err(ErrorClass::ShapeMismatch, format!("{what} has a gradient for '{k}', which is not a param"));
    }
    let mut flat = Vec::with_capacity(layout.numel());
    for p in layout.params() {
        let Some(g) = m.get(&p.name) else {
            return err(ErrorClass::ShapeMismatch, format!("{what} has no gradient for '{}'", p.name));
        };
        flat.extend(numbers(g, p.numel(), &format!("{what}.{}", p.name))?);
    }
    Ok(flat)
}
