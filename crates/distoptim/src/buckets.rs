//! [`GradBuckets`]: DDP's gradient buckets, reduced while the backward pass still runs.
//!
//! The flat gradient buffer (one allocation from the communicator) is cut into buckets of
//! whole parameters, at most `bucket_cap_mb` each unless one parameter is larger. As in
//! torch's DDP, buckets are formed from the *last* parameter backwards, because a backward
//! pass produces the last layer's gradients first. Each bucket is a contiguous range of
//! the buffer, split off as a buffer of its own ([`SharedBuf::split_off`]) so it can be
//! handed to a non-blocking all-reduce while the framework is still writing the others.
//!
//! A round: [`start`](GradBuckets::start) with the local batch size (torch: DDP's
//! `prepare_for_backward`), then, as each parameter's gradient is final, write it with
//! [`param_mut`](GradBuckets::param_mut) and call [`mark_ready`](GradBuckets::mark_ready).
//! When every parameter of a bucket is ready its all-reduce starts, but only after the
//! buckets before it: every rank issues the same collectives in the same order, whatever
//! order its backward produced the gradients in. [`ShardedOptimizer::step_buckets`]
//! reduces the buckets nobody marked, waits for all, and steps.
//!
//! The reduction is the same elementwise SUM as [`ShardedOptimizer::step`]'s, so the
//! two give the same parameters to the bit.
//!
//! [`ShardedOptimizer::step_buckets`]: crate::ShardedOptimizer::step_buckets
//! [`ShardedOptimizer::step`]: crate::ShardedOptimizer::step

use crate::config::ReduceMode;
use crate::error::{DistError, Result};
use crate::grad_sync;
use distoptim_collective::{Communicator, ReduceOp, SharedBuf, Work};
use distoptim_optim::Layout;
use std::ops::Range;

/// The flat gradient buffer of a layout, in buckets that reduce as soon as they are ready.
pub struct GradBuckets {
    comm: Communicator,
    mode: ReduceMode,
    /// Each parameter's elements in the flat buffer.
    params: Vec<Range<usize>>,
    /// Bucket b's elements; b is also the launch order (bucket 0 holds the last parameters).
    ranges: Vec<Range<usize>>,
    bucket_of: Vec<usize>,
    parts: Parts,
    round: Option<Round>,
}

/// Where the buffer is: whole between rounds, one part per bucket during one.
enum Parts {
    Whole(SharedBuf<f32>),
    /// The buckets' parts, and the empty remainder at offset 0 they join back onto.
    Split(Vec<Part>, SharedBuf<f32>),
    /// A reduction failed and took its part with it: the buffer is gone.
    Lost,
}

enum Part {
    Writable(SharedBuf<f32>),
    Reducing(Work<SharedBuf<f32>>),
    /// Only while a part moves from writable to reducing.
    Moving,
}

struct Round {
    batch_size: usize,
    ready: Vec<bool>,
    /// Per bucket: its parameters not marked ready yet.
    missing: Vec<usize>,
    /// The next bucket to launch.
    next: usize,
}

impl GradBuckets {
    /// Zeroed gradients for `layout` in buckets of at most `cap` elements (collective: the
    /// buffer comes from the communicator). Built by
    /// [`ShardedOptimizer::grad_buckets`](crate::ShardedOptimizer::grad_buckets).
    pub(crate) fn new(comm: &Communicator, layout: &Layout, mode: ReduceMode, cap: usize) -> Result<GradBuckets> {
        let params: Vec<Range<usize>> = layout.params().iter().map(|p| p.range()).collect();
        let (mut ranges, mut bucket_of) = (Vec::new(), vec![0; params.len()]);
        let mut current: Option<Range<usize>> = None;
        for (i, p) in params.iter().enumerate().rev() {
            match &mut current {
                Some(b) if b.len() + p.len() <= cap || p.is_empty() => b.start = p.start,
                _ => {
                    ranges.extend(current.take());
                    current = Some(p.clone());
                }
            }
            bucket_of[i] = ranges.len();
        }
        ranges.extend(current);
        let buf = comm.alloc::<f32>(layout.numel())?;
        Ok(GradBuckets { comm: comm.clone(), mode, params, ranges, bucket_of, parts: Parts::Whole(buf), round: None })
    }

    /// The buckets' element ranges, in the order they are reduced.
    pub fn bucket_ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// The whole gradient buffer, between rounds (to accumulate micro-batches, or to write
    /// every gradient at once).
    pub fn grads_mut(&mut self) -> Result<&mut [f32]> {
        match &mut self.parts {
            Parts::Whole(buf) => Ok(buf),
            Parts::Split(..) => Err(DistError::Invalid("the gradients are being reduced; step first".into())),
            Parts::Lost => Err(lost()),
        }
    }

    /// Parameter `index`'s gradient, to write or accumulate into; refused once its bucket
    /// has started reducing.
    pub fn param_mut(&mut self, index: usize) -> Result<&mut [f32]> {
        let range = self.param_range(index)?;
        match &mut self.parts {
            Parts::Whole(buf) => Ok(&mut buf[range]),
            Parts::Split(parts, _) => {
                let b = self.bucket_of[index];
                match &mut parts[b] {
                    Part::Writable(buf) => {
                        let start = self.ranges[b].start;
                        Ok(&mut buf[range.start - start..range.end - start])
                    }
                    Part::Reducing(_) | Part::Moving => Err(DistError::Invalid(format!(
                        "parameter {index}'s bucket is already being reduced: its gradient was marked ready"
                    ))),
                }
            }
            Parts::Lost => Err(lost()),
        }
    }

    /// Sets every gradient to zero (between rounds).
    pub fn zero(&mut self) -> Result<()> {
        self.grads_mut()?.fill(0.0);
        Ok(())
    }

    /// Begins a round: the backward pass of the last micro-batch before a step.
    /// `batch_size` is this rank's (weights its gradients under `batch_weighted`).
    pub fn start(&mut self, batch_size: usize) -> Result<()> {
        if self.round.is_some() {
            return Err(DistError::Invalid("a round is already started; step before starting another".into()));
        }
        let Parts::Whole(buf) = std::mem::replace(&mut self.parts, Parts::Lost) else { return Err(lost()) };
        // Bucket 0 lies at the end of the buffer, so splitting off in bucket order peels
        // the buffer from its end; the last bucket starts at 0 and leaves `rest` empty.
        let mut rest = buf;
        let parts = self.ranges.iter().map(|r| Part::Writable(rest.split_off(r.start))).collect();
        self.parts = Parts::Split(parts, rest);
        let mut missing = vec![0; self.ranges.len()];
        self.bucket_of.iter().for_each(|&b| missing[b] += 1);
        self.round = Some(Round { batch_size, ready: vec![false; self.params.len()], missing, next: 0 });
        // Buckets without parameters (none) or all ready are launched at once.
        self.launch_ready()
    }

    /// Parameter `index`'s gradient is final for this round. Its bucket is reduced once all
    /// its parameters are, after the buckets before it.
    pub fn mark_ready(&mut self, index: usize) -> Result<()> {
        self.param_range(index)?;
        let Some(round) = &mut self.round else {
            return Err(DistError::Invalid("mark_ready before start: call start(batch_size) when the backward pass begins".into()));
        };
        if std::mem::replace(&mut round.ready[index], true) {
            return Err(DistError::Invalid(format!("parameter {index} was already marked ready in this round")));
        }
        round.missing[self.bucket_of[index]] -= 1;
        self.launch_ready()
    }

    /// Launches, in order, every bucket whose parameters are all ready.
    fn launch_ready(&mut self) -> Result<()> {
        let (Some(round), Parts::Split(parts, _)) = (&mut self.round, &mut self.parts) else { return Ok(()) };
        while round.next < parts.len() && round.missing[round.next] == 0 {
            let b = round.next;
            round.next += 1;
            let Part::Writable(mut buf) = std::mem::replace(&mut parts[b], Part::Moving) else { unreachable!("launched twice") };
            let w = grad_sync::local_weight(self.mode, round.batch_size);
            if w != 1.0 {
                buf.iter_mut().for_each(|g| *g *= w);
            }
            parts[b] = Part::Reducing(self.comm.all_reduce_async(buf, ReduceOp::Sum));
        }
        Ok(())
    }

    /// Ends the round: reduces the buckets not launched yet (parameters nobody marked keep
    /// what was written), waits for every bucket and returns the whole reduced buffer with
    /// the divisor that turns its sum into the chosen reduction.
    pub(crate) fn finish(&mut self) -> Result<(&mut [f32], f32)> {
        let Some(round) = &mut self.round else {
            return Err(DistError::Invalid("step_buckets without start: no gradients were reduced".into()));
        };
        round.missing.iter_mut().for_each(|m| *m = 0);
        self.launch_ready()?;
        let batch_size = self.round.take().map_or(0, |r| r.batch_size);
        let Parts::Split(parts, mut whole) = std::mem::replace(&mut self.parts, Parts::Lost) else { return Err(lost()) };
        // Wait for every bucket even after a failure, so no work is left running.
        let mut done = Vec::with_capacity(parts.len());
        let mut failure = None;
        for part in parts {
            match part {
                Part::Reducing(w) => match w.wait() {
                    Ok(buf) => done.push(buf),
                    Err(e) => failure = failure.or(Some(e)),
                },
                Part::Writable(_) | Part::Moving => unreachable!("every bucket was launched"),
            }
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
        // Rejoin from the bucket at 0 upwards.
        while let Some(next) = done.pop() {
            whole.unsplit(next).map_err(|_| DistError::Invalid("bucket parts do not join".into()))?;
        }
        self.parts = Parts::Whole(whole);
        let divisor = grad_sync::divisor(&self.comm, self.mode, batch_size)?;
        let Parts::Whole(buf) = &mut self.parts else { unreachable!() };
        Ok((buf, divisor))
    }

    fn param_range(&self, index: usize) -> Result<Range<usize>> {
        self.params
            .get(index)
            .cloned()
            .ok_or_else(|| DistError::Invalid(format!("parameter index {index} is out of range: the layout has {}", self.params.len())))
    }

    pub(crate) fn numel(&self) -> usize {
        self.params.last().map_or(0, |p| p.end)
    }

    pub(crate) fn comm(&self) -> &Communicator {
        &self.comm
    }
}

fn lost() -> DistError {
    DistError::Invalid("a gradient reduction failed earlier and the buffer was lost; build new GradBuckets".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ShardedOptimizer, StepConfig, Strategy};
    use distoptim_collective::CommConfig;
    use distoptim_optim::{AdamConfig, OptimizerConfig, ParamGroup};

    fn layout() -> Layout {
        Layout::new((0..12).map(|i| (format!("p{i}"), vec![(i * 7) % 13 + 1]))).unwrap()
    }

    fn grad(n: usize, r: usize, t: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 31 + r * 17 + t * 7) % 23) as f32 * 0.1 - 1.1).collect()
    }

    /// Three steps, with buckets (each rank marking parameters in its own order) or
    /// without; every rank's parameters at the end.
    fn run(w: usize, strategy: Strategy, mode: ReduceMode, bucketed: bool) -> Vec<Vec<f32>> {
        Communicator::run_threads(w, &CommConfig::default(), |comm| {
            let layout = layout();
            let (n, r) = (layout.numel(), comm.rank());
            let groups = vec![ParamGroup { params: (0..12).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
            // 20 elements a bucket: several buckets, some of one large parameter.
            let config = StepConfig { reduce: mode, bucket_cap_mb: 80.0 / 1048576.0, ..StepConfig::new(strategy) };
            let mut opt = ShardedOptimizer::new(comm.clone(), layout.clone(), groups, None, config).unwrap();
            let mut params: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let mut buckets = opt.grad_buckets().unwrap();
            assert!(buckets.bucket_ranges().len() > 3);
            for t in 0..3 {
                let g = grad(n, r, t);
                // Some rank has batch size 0 at every step (it contributes nothing).
                let batch = if w == 1 { t + 1 } else { (r + t) % 3 };
                if !bucketed {
                    opt.step(&mut params, &mut g.clone(), batch).unwrap();
                    continue;
                }
                buckets.start(batch).unwrap();
                // Rank-specific order: reversed on rank 0, a stride walk elsewhere.
                let order: Vec<usize> = (0..12).map(|k| if r == 0 { 11 - k } else { (k * 5 + r) % 12 }).collect();
                for &i in &order {
                    let p = layout.param(i).range();
                    buckets.param_mut(i).unwrap().copy_from_slice(&g[p]);
                    buckets.mark_ready(i).unwrap();
                }
                opt.step_buckets(&mut params, &mut buckets).unwrap();
            }
            params
        })
        .unwrap()
    }

    #[test]
    fn bucketed_steps_equal_plain_steps_to_the_bit_whatever_order_ranks_mark_in() {
        for w in [1, 2, 3, 4] {
            for mode in [ReduceMode::Mean, ReduceMode::Sum, ReduceMode::BatchWeighted] {
                for strategy in [Strategy::Ddp, Strategy::Zero1] {
                    let (want, got) = (run(w, strategy, mode, false), run(w, strategy, mode, true));
                    for (a, b) in want.iter().zip(&got) {
                        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "w={w} {mode:?} {strategy:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn buckets_hold_whole_parameters_from_the_last_one_back() {
        let comm = Communicator::threads(1, &CommConfig::default()).unwrap().remove(0);
        let layout = Layout::new([("a", vec![3]), ("big", vec![50]), ("c", vec![4]), ("d", vec![5]), ("e", vec![0])]).unwrap();
        let b = GradBuckets::new(&comm, &layout, ReduceMode::Mean, 10).unwrap();
        // 10 elements a bucket: e and d and c together (9), big alone, then a.
        assert_eq!(b.bucket_ranges(), &[53..62, 3..53, 0..3]);
    }

    #[test]
    fn misuse_is_refused_with_a_reason_and_the_round_still_completes() {
        Communicator::run_threads(2, &CommConfig::default(), |comm| {
            let layout = layout();
            let groups = vec![ParamGroup { params: (0..12).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) }];
            let config = StepConfig { bucket_cap_mb: 80.0 / 1048576.0, ..StepConfig::new(Strategy::Ddp) };
            let mut opt = ShardedOptimizer::new(comm.clone(), layout.clone(), groups, None, config).unwrap();
            let mut params = vec![0.5f32; layout.numel()];
            let mut buckets = opt.grad_buckets().unwrap();
            let msg = |e: DistError| e.to_string();
            assert!(msg(buckets.mark_ready(0).unwrap_err()).contains("before start"));
            assert!(msg(buckets.param_mut(12).unwrap_err()).contains("out of range"));
            buckets.grads_mut().unwrap().fill(1.0);
            buckets.start(1).unwrap();
            assert!(msg(buckets.grads_mut().unwrap_err()).contains("being reduced"));
            buckets.mark_ready(11).unwrap();
            assert!(msg(buckets.mark_ready(11).unwrap_err()).contains("already marked"));
            // Bucket 0 is parameters 10 and 11: writable until both are ready.
            buckets.param_mut(11).unwrap();
            buckets.mark_ready(10).unwrap();
            assert!(msg(buckets.param_mut(11).unwrap_err()).contains("already being reduced"));
            // Parameters nobody marked are reduced by the step with what they hold.
            opt.step_buckets(&mut params, &mut buckets).unwrap();
            assert!(buckets.grads_mut().unwrap().iter().all(|&g| g == 1.0), "mean of ones");
            let mut zero2 = ShardedOptimizer::new(
                comm.clone(),
                layout.clone(),
                vec![ParamGroup { params: (0..12).collect(), config: OptimizerConfig::Adam(AdamConfig::adamw()) }],
                None,
                StepConfig::new(Strategy::Zero2),
            )
            .unwrap();
            assert!(msg(zero2.step_buckets(&mut params, &mut buckets).unwrap_err()).contains("ddp or zero1"));
        })
        .unwrap();
    }
}
