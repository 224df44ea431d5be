//! The data: the embedded digits set, a synthetic set for the large model, the
//! train/test split and the distributed sampler.

use anyhow::{bail, ensure, Context, Result};

use distoptim::sampler::SeededRng as Rng;

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
    fn synthetic_labels_cover_every_class() {
        let d = Dataset::synthetic(500, 40, 10, 1);
        let mut seen = [false; 10];
        d.labels.iter().for_each(|&l| seen[l as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }
}
