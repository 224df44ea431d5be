//! The toy problem the examples train: a noiseless linear regression, shared so each
//! example shows only what it is about.

use distoptim::sampler::SeededRng;

/// Input features.
pub const FEATURES: usize = 16;
/// Samples in the data set.
pub const SAMPLES: usize = 512;

/// The data set: y = x·w* + 0.5 for a seeded w*.
pub fn data() -> (Vec<[f32; FEATURES]>, Vec<f32>) {
    let mut rng = SeededRng::new(7, 0);
    let w_true: Vec<f32> = (0..FEATURES).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let xs: Vec<[f32; FEATURES]> = (0..SAMPLES).map(|_| std::array::from_fn(|_| rng.unit() * 2.0 - 1.0)).collect();
    let ys = xs.iter().map(|x| x.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() + 0.5).collect();
    (xs, ys)
}

/// Adds `scale` × the gradient of the halved mean squared error over `samples` to
/// `grad`; returns their summed loss. Parameters: FEATURES weights, then the bias.
pub fn accumulate(params: &[f32], xs: &[[f32; FEATURES]], ys: &[f32], samples: &[usize], scale: f32, grad: &mut [f32]) -> f32 {
    let mut loss = 0.0;
    for &i in samples {
        let pred = xs[i].iter().zip(params).map(|(a, b)| a * b).sum::<f32>() + params[FEATURES];
        let err = pred - ys[i];
        loss += 0.5 * err * err;
        let g = scale * err / samples.len() as f32;
        grad[..FEATURES].iter_mut().zip(&xs[i]).for_each(|(gw, x)| *gw += g * x);
        grad[FEATURES] += g;
    }
    loss
}
