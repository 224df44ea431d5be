//! [`DistributedOptimizer`]: torch's `torch.distributed.optim.DistributedOptimizer`.
//!
//! Built from remote parameters spread over any workers, it creates (or attaches to) a
//! local optimizer named `name` on every worker that owns some of them, holding that
//! worker's share of the param groups. [`step`](DistributedOptimizer::step) asks every
//! owning worker, in parallel, to apply the gradients recorded under a context, and
//! returns when all have answered.
//!
//! Guarantees, as torch documents them: concurrent steps, from this client or others, are
//! serialised on each worker (it applies one context at a time), with no ordering across
//! workers; each context is applied at most once per optimizer (a retried step is
//! recognised and not applied again) and released on the worker after its step.
//!
//! Optimizers with the same name share their state: clients that attach to one optimizer
//! form one parameter server (one Adam moment per parameter). Clients that want torch's
//! per-trainer optimizer state use distinct names.
//!
//! A failed step ([`PsError::Step`]) names each worker that failed. The workers that
//! answered applied the context; a worker that failed either never applied it (down,
//! refused) or applied it and the reply was lost (timeout) — retrying the step with the
//! same context is safe in both cases, as applied contexts are remembered.

use crate::client::{ContextId, RemoteParam, WorkerClient};
use crate::error::{PsError, Result};
use crate::protocol::{GroupSpec, Op};
use distoptim_optim::{OptimizerConfig, Schedule};

/// torch's RPC `DistributedOptimizer`: one local optimizer per worker over the remote
/// parameters it owns, stepped together with one gradient context.
pub struct DistributedOptimizer {
    name: String,
    workers: Vec<WorkerClient>,
}

impl DistributedOptimizer {
    /// One param group of all `params` with `config`.
    pub fn new(name: &str, config: OptimizerConfig, params: &[RemoteParam], schedule: Option<Schedule>) -> Result<Self> {
        Self::with_groups(name, vec![(params.to_vec(), config)], schedule)
    }

    /// Param groups with their own hyperparameters; the schedule scales every group's lr.
    pub fn with_groups(name: &str, groups: Vec<(Vec<RemoteParam>, OptimizerConfig)>, schedule: Option<Schedule>) -> Result<Self> {
        let mut workers: Vec<WorkerClient> = Vec::new();
        for (params, _) in &groups {
            for p in params {
                if !workers.iter().any(|w| w.addr() == p.worker().addr()) {
                    workers.push(p.worker().clone());
                }
            }
        }
        if workers.is_empty() {
            return Err(PsError::Invalid("a distributed optimizer needs at least one remote parameter".into()));
        }
        for w in &workers {
            // Every worker gets every group (empty where it owns none of its parameters),
            // so group indices and the schedule's lrs agree everywhere.
            let local = groups
                .iter()
                .map(|(params, config)| GroupSpec {
                    params: params.iter().filter(|p| p.worker().addr() == w.addr()).map(|p| p.name().to_string()).collect(),
                    config: config.clone(),
                })
                .collect();
            w.call(Op::CreateOptimizer { name: name.to_string(), groups: local, schedule: schedule.clone() }, &[])?;
        }
        Ok(DistributedOptimizer { name: name.to_string(), workers })
    }

    /// The workers that own this optimizer's parameters.
    pub fn workers(&self) -> &[WorkerClient] {
        &self.workers
    }

    /// Applies `context`'s gradients on every owning worker, in parallel; blocks until all
    /// answer. Returns the lrs of the step per group.
    pub fn step(&self, context: ContextId) -> Result<Vec<f64>> {
        let results: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .workers
                .iter()
                .map(|w| s.spawn(move || w.call(Op::Step { context: context.0, optimizer: self.name.clone() }, &[]).map(|(r, _)| r.lrs)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(PsError::Invalid("a step thread panicked".into())))).collect()
        });
        let mut lrs = Vec::new();
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(l) => lrs = l,
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.is_empty() {
            Ok(lrs)
        } else {
            Err(PsError::Step { context: context.0, total: self.workers.len(), failures })
        }
    }
}
