//! A worker's state: its parameters, its local optimizers and the gradient contexts.
//!
//! Concurrency follows torch's `DistributedOptimizer`: gradients from any number of
//! clients accumulate concurrently, each under its own context; applying a context is
//! serialised on the worker (one `apply` lock, torch's `_LocalOptimizer.global_lock`), so
//! every parameter sees the contexts one after the other, in some order. Each
//! (context, optimizer) pair is applied at most once: a retried step is recognised and
//! answered without applying again.
//!
//! Lock order (never the reverse): `apply` → an optimizer → a parameter; the maps are
//! held only to look an entry up.

use crate::pool::BufferPool;
use crate::protocol::{GroupSpec, ParamMeta, Stats};
use distoptim_optim::{Layout, LrScheduler, Optimizer, Schedule};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// How many applied (context, optimizer) pairs a worker remembers to recognise retries.
const APPLIED_MEMORY: usize = 1 << 16;

pub(crate) struct Param {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

struct Context {
    grads: HashMap<String, Vec<f32>>,
    touched: Instant,
}

/// A client's optimizer on this worker: one core optimizer per parameter (so a context
/// that carries gradients for some parameters steps exactly those, as torch skips
/// parameters whose `.grad` is None), a schedule over the groups, a step count.
pub(crate) struct LocalOptimizer {
    pub groups: Vec<GroupSpec>,
    pub schedule: Option<LrScheduler>,
    pub per_param: BTreeMap<String, Optimizer>,
    pub steps: u64,
}

#[derive(Default)]
pub(crate) struct Applied {
    order: VecDeque<(u64, String)>,
    set: HashSet<(u64, String)>,
}

impl Applied {
    fn contains(&self, context: u64, optimizer: &str) -> bool {
        self.set.contains(&(context, optimizer.to_string()))
    }

    fn insert(&mut self, context: u64, optimizer: &str) {
        let key = (context, optimizer.to_string());
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > APPLIED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct WorkerState {
    pub params: RwLock<BTreeMap<String, Arc<Mutex<Param>>>>,
    pub optimizers: Mutex<BTreeMap<String, Arc<Mutex<LocalOptimizer>>>>,
    contexts: Mutex<HashMap<u64, Arc<Mutex<Context>>>>,
    pub apply: Mutex<Applied>,
    steps_applied: AtomicU64,
    contexts_expired: AtomicU64,
    pub requests_refused: AtomicU64,
    /// Connections closed at once because every slot was taken by authenticated ones.
    pub connections_refused: AtomicU64,
    /// Gradient buffers of applied contexts, for the next ones.
    pub pool: BufferPool,
}

/// Locks, ignoring poisoning: every critical section below leaves its data consistent
/// before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) type OpResult<T> = Result<T, String>;

impl WorkerState {
    fn param(&self, name: &str) -> OpResult<Arc<Mutex<Param>>> {
        self.params.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned().ok_or_else(|| format!("unknown parameter '{name}'"))
    }

    /// Creates parameters from `values` (concatenated in order). All or nothing.
    pub fn create_params(&self, metas: &[ParamMeta], values: Vec<f32>, if_absent: bool) -> OpResult<Vec<ParamMeta>> {
        let mut sizes = Vec::with_capacity(metas.len());
        let mut total = 0usize;
        for m in metas {
            let n = m.numel().ok_or_else(|| format!("parameter '{}': shape {:?} has more elements than fit in memory", m.name, m.shape))?;
            total = total.checked_add(n).ok_or_else(|| "the parameters' sizes overflow".to_string())?;
            sizes.push(n);
        }
        if total != values.len() {
            return Err(format!("{} values sent for parameters of {total} elements", values.len()));
        }
        let mut map = self.params.write().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashSet::new();
        for m in metas {
            if m.name.is_empty() || !seen.insert(&m.name) {
                return Err(format!("parameter name '{}' is empty or repeated", m.name));
            }
            if let Some(p) = map.get(&m.name) {
                let shape = lock(p).shape.clone();
                if !if_absent || shape != m.shape {
                    return Err(format!("parameter '{}' already exists with shape {shape:?}", m.name));
                }
            }
        }
        let mut offset = 0;
        for (m, &n) in metas.iter().zip(&sizes) {
            map.entry(m.name.clone())
                .or_insert_with(|| Arc::new(Mutex::new(Param { shape: m.shape.clone(), values: values[offset..offset + n].to_vec() })));
            offset += n;
        }
        Ok(metas.to_vec())
    }

    /// Names and shapes of `names`, or of every parameter when `names` is empty.
    pub fn describe(&self, names: &[String]) -> OpResult<Vec<ParamMeta>> {
        let map = self.params.read().unwrap_or_else(PoisonError::into_inner);
        let meta = |(name, p): (&String, &Arc<Mutex<Param>>)| ParamMeta { name: name.clone(), shape: lock(p).shape.clone() };
        if names.is_empty() {
            return Ok(map.iter().map(meta).collect());
        }
        names.iter().map(|n| map.get_key_value(n).map(meta).ok_or_else(|| format!("unknown parameter '{n}'"))).collect()
    }

    pub fn fetch(&self, names: &[String]) -> OpResult<(Vec<ParamMeta>, Vec<f32>)> {
        let metas = self.describe(names)?;
        let mut out = Vec::new();
        for m in &metas {
            out.extend_from_slice(&lock(&*self.param(&m.name)?).values);
        }
        Ok((metas, out))
    }

    /// Adds `grad` to `name`'s gradient under `context` (opening the context).
    pub fn send_grads(&self, context: u64, name: &str, grad: Vec<f32>) -> OpResult<()> {
        let (shape, numel) = {
            let p = self.param(name)?;
            let p = lock(&*p);
            (p.shape.clone(), p.values.len())
        };
        if grad.len() != numel {
            return Err(format!("gradient for '{name}' has {} elements, the parameter has shape {shape:?} ({numel})", grad.len()));
        }
        let ctx = lock(&self.contexts)
            .entry(context)
            .or_insert_with(|| Arc::new(Mutex::new(Context { grads: HashMap::new(), touched: Instant::now() })))
            .clone();
        let mut ctx = lock(&ctx);
        ctx.touched = Instant::now();
        match ctx.grads.get_mut(name) {
            Some(acc) => {
                acc.iter_mut().zip(&grad).for_each(|(a, g)| *a += g);
                self.pool.give(grad);
            }
            None => {
                ctx.grads.insert(name.to_string(), grad);
            }
        }
        Ok(())
    }

    /// Creates optimizer `name`, or attaches to an identical one.
    pub fn create_optimizer(&self, name: &str, groups: Vec<GroupSpec>, schedule: Option<Schedule>) -> OpResult<()> {
        let mut optimizers = lock(&self.optimizers);
        if let Some(existing) = optimizers.get(name) {
            let existing = lock(existing);
            let same_schedule = existing.schedule.as_ref().map(|s| &s.schedule) == schedule.as_ref();
            return if existing.groups == groups && same_schedule {
                Ok(())
            } else {
                Err(format!("optimizer '{name}' already exists with other param groups or schedule"))
            };
        }
        if name.is_empty() {
            return Err("an optimizer needs a name".into());
        }
        let mut per_param = BTreeMap::new();
        for (gi, g) in groups.iter().enumerate() {
            for p in &g.params {
                let shape = lock(&*self.param(p)?).shape.clone();
                let layout = Layout::new([(p.clone(), shape)]).map_err(|e| e.to_string())?;
                let opt = Optimizer::new(layout, g.config.clone()).map_err(|e| format!("param group {gi}: {e}"))?;
                if per_param.insert(p.clone(), opt).is_some() {
                    return Err(format!("parameter '{p}' is in two param groups"));
                }
            }
        }
        let base_lrs = groups.iter().map(|g| g.config.lr()).collect();
        let mut local = LocalOptimizer { groups, schedule: schedule.map(|s| LrScheduler::new(s, base_lrs)), per_param, steps: 0 };
        local.apply_lrs();
        optimizers.insert(name.to_string(), Arc::new(Mutex::new(local)));
        Ok(())
    }

    /// Applies `context`'s gradients with optimizer `name` and releases the context.
    /// Returns whether it applied (false: this context was already applied by it) and
    /// the lrs of the step.
    pub fn step(&self, context: u64, name: &str) -> OpResult<(bool, Vec<f64>)> {
        let opt = lock(&self.optimizers).get(name).cloned().ok_or_else(|| format!("unknown optimizer '{name}'"))?;
        let mut applied = lock(&self.apply);
        let mut opt = lock(&opt);
        if applied.contains(context, name) {
            return Ok((false, opt.lrs()));
        }
        let grads = lock(&self.contexts).remove(&context).map(|c| std::mem::take(&mut lock(&c).grads)).unwrap_or_default();
        let lrs = opt.lrs();
        for (pname, o) in opt.per_param.iter_mut() {
            if let Some(g) = grads.get(pname) {
                let param = self.param(pname)?;
                o.step(&mut lock(&param).values, g).map_err(|e| format!("'{pname}': {e}"))?;
            }
        }
        grads.into_values().for_each(|g| self.pool.give(g));
        opt.steps += 1;
        if let Some(s) = &mut opt.schedule {
            s.advance();
        }
        opt.apply_lrs();
        applied.insert(context, name);
        self.steps_applied.fetch_add(1, Ordering::Relaxed);
        Ok((true, lrs))
    }

    pub fn release(&self, context: u64) {
        if let Some(c) = lock(&self.contexts).remove(&context) {
            std::mem::take(&mut lock(&c).grads).into_values().for_each(|g| self.pool.give(g));
        }
    }

    /// Drops contexts untouched for `timeout` (their client is gone); returns how many.
    pub fn expire(&self, timeout: Duration) -> usize {
        let mut contexts = lock(&self.contexts);
        let before = contexts.len();
        contexts.retain(|_, c| lock(c).touched.elapsed() < timeout);
        let dropped = before - contexts.len();
        self.contexts_expired.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    pub fn stats(&self) -> Stats {
        let params = self.params.read().unwrap_or_else(PoisonError::into_inner);
        Stats {
            params: params.len(),
            elements: params.values().map(|p| lock(p).values.len()).sum(),
            optimizers: lock(&self.optimizers).len(),
            open_contexts: lock(&self.contexts).len(),
            steps_applied: self.steps_applied.load(Ordering::Relaxed),
            contexts_expired: self.contexts_expired.load(Ordering::Relaxed),
            requests_refused: self.requests_refused.load(Ordering::Relaxed),
            connections_refused: self.connections_refused.load(Ordering::Relaxed),
        }
    }
}

impl LocalOptimizer {
    /// The current lr of every group.
    pub fn lrs(&self) -> Vec<f64> {
        match &self.schedule {
            Some(s) => s.lrs(),
            None => self.groups.iter().map(|g| g.config.lr()).collect(),
        }
    }

    /// Gives every parameter's optimizer its group's current lr.
    pub fn apply_lrs(&mut self) {
        let lrs = self.lrs();
        for (g, lr) in self.groups.iter().zip(lrs) {
            for p in &g.params {
                if let Some(o) = self.per_param.get_mut(p) {
                    let _ = o.set_lrs(&[lr]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distoptim_optim::{OptimizerConfig, SgdConfig};

    fn meta(name: &str, n: usize) -> ParamMeta {
        ParamMeta { name: name.into(), shape: vec![n] }
    }

    #[test]
    fn a_context_is_applied_once_and_only_to_the_parameters_it_has_gradients_for() {
        let s = WorkerState::default();
        s.create_params(&[meta("a", 2), meta("b", 2)], vec![1.0, 1.0, 1.0, 1.0], false).unwrap();
        let sgd = OptimizerConfig::Sgd(SgdConfig { lr: 0.5, weight_decay: 0.5, ..Default::default() });
        s.create_optimizer("o", vec![GroupSpec { params: vec!["a".into(), "b".into()], config: sgd }], None).unwrap();
        s.send_grads(9, "a", vec![1.0, 2.0]).unwrap();
        s.send_grads(9, "a", vec![1.0, 2.0]).unwrap();
        assert!(s.step(9, "o").unwrap().0);
        assert!(!s.step(9, "o").unwrap().0, "a retry does not apply again");
        // a: 1 - 0.5 * (g + 0.5 * 1); b had no gradient: untouched, weight decay included.
        assert_eq!(s.fetch(&[]).unwrap().1, vec![-0.25, -1.25, 1.0, 1.0]);
        assert_eq!(s.stats().open_contexts, 0);
    }

    #[test]
    fn bad_requests_change_nothing() {
        let s = WorkerState::default();
        s.create_params(&[meta("a", 2)], vec![1.0, 2.0], false).unwrap();
        assert!(s.create_params(&[meta("c", 1), meta("a", 2)], vec![0.0; 3], false).unwrap_err().contains("already exists"));
        assert!(s.create_params(&[meta("c", 1)], vec![0.0; 2], false).unwrap_err().contains("2 values sent"));
        assert_eq!(s.stats().params, 1);
        s.create_params(&[meta("a", 2)], vec![5.0, 5.0], true).unwrap();
        assert_eq!(s.fetch(&["a".into()]).unwrap().1, vec![1.0, 2.0], "if_absent keeps the existing values");
        assert!(s.send_grads(1, "a", vec![1.0]).unwrap_err().contains("has 1 elements"));
        assert!(s.send_grads(1, "zz", vec![1.0]).unwrap_err().contains("unknown parameter 'zz'"));
        assert!(s.step(1, "nope").unwrap_err().contains("unknown optimizer"));
        let sgd = |lr| OptimizerConfig::Sgd(SgdConfig { lr, ..Default::default() });
        s.create_optimizer("o", vec![GroupSpec { params: vec!["a".into()], config: sgd(0.1) }], None).unwrap();
        s.create_optimizer("o", vec![GroupSpec { params: vec!["a".into()], config: sgd(0.1) }], None).unwrap();
        assert!(s.create_optimizer("o", vec![GroupSpec { params: vec!["a".into()], config: sgd(0.2) }], None).is_err());
        assert!(s.create_optimizer("p", vec![GroupSpec { params: vec!["a".into()], config: sgd(-1.0) }], None).is_err());
    }
}
