//! The data: the embedded digits set, a synthetic set for the large model, the
//! train/test split and the distributed sampler.

use anyhow::{bail, ensure, Context, Result};
use distoptim_collective::shard_range;

use super::rng::Rng;

/// The UCI handwritten digits (see `crates/cli/data/README.md` for the attribution).
const DIGITS_CSV: &str = include_str!("../../data/digits.csv");

/// Samples as rows of `dim` features, each with a class label.
pub struct Dataset {
    pub dim: usize,
    pub classes: usize,
    pub features: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The 1797 digits, pixels scaled from 0..=16 to 0..=1.
    pub fn digits() -> Result<Dataset> {
        let mut lines = DIGITS_CSV.lines();
        let header = lines.next().context("digits.csv is empty")?;
        let dim = header.split(',').count() - 1;
        let (mut features, mut labels) = (Vec::new(), Vec::new());
        for (i, line) in lines.enumerate() {
            let fields: Vec<&str> = line.split(',').collect();
            ensure!(fields.len() == dim + 1, "digits.csv line {}: {} fields, expected {}", i + 2, fields.len(), dim + 1);
            for f in &fields[..dim] {
                let v: f32 = f.parse().with_context(|| format!("digits.csv line {}: pixel {f:?}", i + 2))?;
                features.push(v / 16.0);
            }
            labels.push(fields[dim].parse().with_context(|| format!("digits.csv line {}: label {:?}", i + 2, fields[dim]))?);
        }
        let classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
        Ok(Dataset { dim, classes, features, labels })
    }

    /// `samples` random inputs in [-1, 1); the label is the class whose block of
    /// `dim / classes` features has the largest sum, so the task is learnable.
    pub fn synthetic(samples: usize, dim: usize, classes: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed, 0x5157);
        let features: Vec<f32> = (0..samples * dim).map(|_| rng.unit() * 2.0 - 1.0).collect();
        let block = (dim / classes).max(1);
        let labels = features
            .chunks(dim)
            .map(|x| {
                let sums = (0..classes).map(|c| x[(c * block).min(dim)..((c + 1) * block).min(dim)].iter().sum::<f32>());
                sums.enumerate().fold((0, f32::NEG_INFINITY), |best, (c, s)| if s > best.1 { (c as u32, s) } else { best }).0
            })
            .collect();
        Dataset { dim, classes, features, labels }
    }

    /// A seeded shuffle split into (train, test).
    pub fn split(self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&test_fraction) {
            bail!("--test-fraction must be in [0, 1), got {test_fraction}");
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        Rng::new(seed, 0x7e57).shuffle(&mut order);
        let n_test = (self.len() as f64 * test_fraction).round() as usize;
        let (test, train) = order.split_at(n_test);
        Ok((self.subset(train), self.subset(test)))
    }

    fn subset(&self, indices: &[usize]) -> Dataset {
        let mut out = Dataset { dim: self.dim, classes: self.classes, features: Vec::new(), labels: Vec::new() };
        self.gather(indices, &mut out.features, &mut out.labels);
        out
    }

    /// Copies the given samples into `x` (row-major) and `y`, replacing their contents.
    pub fn gather(&self, indices: &[usize], x: &mut Vec<f32>, y: &mut Vec<u32>) {
        x.clear();
        y.clear();
        for &i in indices {
            x.extend_from_slice(&self.features[i * self.dim..(i + 1) * self.dim]);
            y.push(self.labels[i]);
        }
    }
}

/// A deterministic distributed sampler. Every epoch is a seeded permutation of the
/// training set cut into global batches of `batch_size` (the last one shorter, not
/// dropped); rank r takes the contiguous part `shard_range(batch, W, r)` of each. The
/// union over ranks is the global batch whatever W is, so with batch-weighted gradient
/// reduction any world size computes the same step, and a run can resume at another.
pub struct Sampler {
    pub len: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Sampler {
    pub fn steps_per_epoch(&self) -> u64 {
        self.len.div_ceil(self.batch_size) as u64
    }

    /// The epoch of global step `step`, and this rank's sample indices for it.
    pub fn local_batch(&self, step: u64, world: usize, rank: usize) -> (u64, Vec<usize>) {
        let epoch = step / self.steps_per_epoch();
        let mut order: Vec<usize> = (0..self.len).collect();
        Rng::new(self.seed, 0xE90C ^ epoch.wrapping_mul(0x9E37)).shuffle(&mut order);
        let start = (step % self.steps_per_epoch()) as usize * self.batch_size;
        let batch = &order[start..(start + self.batch_size).min(self.len)];
        (epoch, batch[shard_range(batch.len(), world, rank)].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_parse_with_the_documented_shape() {
        let d = Dataset::digits().unwrap();
        assert_eq!((d.len(), d.dim, d.classes), (1797, 64, 10));
        assert!(d.features.iter().all(|&p| (0.0..=1.0).contains(&p)));
        let (train, test) = d.split(0.2, 0).unwrap();
        assert_eq!((train.len(), test.len()), (1438, 359));
    }

    #[test]
    fn ranks_partition_every_global_batch_including_the_last() {
        let s = Sampler { len: 103, batch_size: 16, seed: 3 };
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
    fn synthetic_labels_cover_every_class() {
        let d = Dataset::synthetic(500, 40, 10, 1);
        let mut seen = [false; 10];
        d.labels.iter().for_each(|&l| seen[l as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }
}
