//! Objectives that LBFGS cases minimise, as closures over the flat parameters.

use distoptim_optim::lbfgs::BoxError;

/// Rosenbrock's function f(x) = Σ_{i<n-1} 100(x_{i+1} - x_i²)² + (1 - x_i)², in f32 as
/// torch evaluates it, with its gradient.
pub fn rosenbrock(x: &[f32], grad: &mut [f32]) -> Result<f32, BoxError> {
    grad.fill(0.0);
    let mut f = 0.0f32;
    for i in 0..x.len().saturating_sub(1) {
        let a = x[i + 1] - x[i] * x[i];
        let b = 1.0 - x[i];
        f += 100.0 * (a * a) + b * b;
        grad[i] += 100.0 * (2.0 * a) * (-2.0 * x[i]) - 2.0 * b;
        grad[i + 1] += 100.0 * (2.0 * a);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_and_gradient() {
        let mut g = [9.0f32; 3];
        assert_eq!(rosenbrock(&[1.0, 1.0, 1.0], &mut g).unwrap(), 0.0);
        assert_eq!(g, [0.0; 3]);
        // central differences at a generic point
        let x = [0.3f32, -0.7, 1.2];
        rosenbrock(&x, &mut g).unwrap();
        for i in 0..3 {
            let h = 1e-2f32;
            let (mut xp, mut xm) = (x, x);
            xp[i] += h;
            xm[i] -= h;
            let mut s = [0.0; 3];
            let fd = (rosenbrock(&xp, &mut s).unwrap() - rosenbrock(&xm, &mut s).unwrap()) / (2.0 * h);
            assert!((fd - g[i]).abs() < 0.05 * g[i].abs().max(1.0), "{i}: {fd} vs {}", g[i]);
        }
    }
}
