//! The distributed sampler: which samples each rank trains on at each step, the same on
//! every rank and at any world size.
//!
//! Every epoch is a seeded permutation of the data set cut into global batches of
//! `batch_size`. The last batch of an epoch is kept, shorter, not dropped. Rank r of W
//! takes the contiguous part `shard_range(batch, W, r)` of each global batch, so the
//! union over the ranks is the global batch whatever W is, and a rank may get no sample
//! of a short batch.
//!
//! The weighting rule that makes this exact: hand the optimizer the **mean** gradient over
//! the rank's own samples (with micro-batches, scale each micro-batch's mean loss by its
//! share of the rank's samples) and step with `ReduceMode::BatchWeighted` and the rank's
//! sample count. The reduced gradient is then the mean over the global batch for any W,
//! the short last batch and empty ranks included, so the loss curve does not depend on
//! the number of ranks and a run can resume at another.

use distoptim_collective::shard_range;

use crate::error::{DistError, Result};

/// A tiny seeded generator (SplitMix64): the same numbers on every rank, every run and
/// every platform, which is all a sampler and a deterministic initialisation need.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    /// A stream for `seed` and a purpose (`stream`), independent of the others.
    pub fn new(seed: u64, stream: u64) -> SeededRng {
        let mut rng = SeededRng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// The deterministic distributed sampler (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistributedSampler {
    len: usize,
    batch_size: usize,
    seed: u64,
}

impl DistributedSampler {
    /// A sampler over `len` samples in global batches of `batch_size`, shuffled by `seed`.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<DistributedSampler> {
        if len == 0 || batch_size == 0 {
            return Err(DistError::Invalid(format!(
                "a sampler needs samples and a batch size >= 1, got {len} samples, batch {batch_size}"
            )));
        }
        Ok(DistributedSampler { len, batch_size, seed })
    }

    /// Global batches per epoch (the last may be shorter).
    pub fn steps_per_epoch(&self) -> u64 {
        self.len.div_ceil(self.batch_size) as u64
    }

    /// The epoch of global step `step`, and rank `rank` of `world`'s sample indices for it.
    pub fn local_batch(&self, step: u64, world: usize, rank: usize) -> (u64, Vec<usize>) {
        let (epoch, batch) = self.global_batch(step);
        (epoch, batch[shard_range(batch.len(), world.max(1), rank.min(world.max(1) - 1))].to_vec())
    }

    /// The epoch of global step `step`, and the whole global batch's sample indices.
    pub fn global_batch(&self, step: u64) -> (u64, Vec<usize>) {
        let epoch = step / self.steps_per_epoch();
        let mut order: Vec<usize> = (0..self.len).collect();
        SeededRng::new(self.seed, 0xE90C ^ epoch.wrapping_mul(0x9E37)).shuffle(&mut order);
        let start = (step % self.steps_per_epoch()) as usize * self.batch_size;
        (epoch, order[start..(start + self.batch_size).min(self.len)].to_vec())
    }

    /// Deterministic mode's cut of a global batch of `batch_len` samples into
    /// `micro_shards` fixed pieces (positions in the batch), and the pieces rank `rank` of
    /// `world` computes: the pieces do not depend on the world size, only which rank
    /// computes them does.
    pub fn micro_shards(batch_len: usize, micro_shards: usize, world: usize, rank: usize) -> Vec<std::ops::Range<usize>> {
        let m = micro_shards.max(1);
        shard_range(m, world.max(1), rank.min(world.max(1) - 1)).map(|i| shard_range(batch_len, m, i)).filter(|r| !r.is_empty()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SeededRng::new(7, 1);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = SeededRng::new(7, 1);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        assert_ne!(a[0], SeededRng::new(7, 2).next_u64());
        let mut v: Vec<usize> = (0..100).collect();
        SeededRng::new(1, 0).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted);
        assert!((0..1000).map(|_| r.unit()).all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn ranks_partition_every_global_batch_including_the_last() {
        let s = DistributedSampler::new(103, 16, 3).unwrap();
        assert_eq!(s.steps_per_epoch(), 7);
        for step in [0u64, 6, 7, 13] {
            let whole = s.local_batch(step, 1, 0).1;
            assert_eq!(whole.len(), if step % 7 == 6 { 7 } else { 16 });
            for world in [2, 3, 5] {
                let joined: Vec<usize> = (0..world).flat_map(|r| s.local_batch(step, world, r).1).collect();
                assert_eq!(joined, whole, "step {step} world {world}");
            }
        }
        let epoch0: std::collections::BTreeSet<usize> = (0..7).flat_map(|t| s.local_batch(t, 1, 0).1).collect();
        assert_eq!(epoch0.len(), 103);
        assert_ne!(s.local_batch(0, 1, 0).1, s.local_batch(7, 1, 0).1, "epochs are reshuffled");
    }

    #[test]
    fn empty_samplers_are_refused() {
        assert!(DistributedSampler::new(0, 4, 1).is_err() && DistributedSampler::new(4, 0, 1).is_err());
    }
}
