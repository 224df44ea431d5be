//! Run-time CPU dispatch for the element-wise loops. The default build targets baseline
//! x86-64 (SSE2), so a loop the compiler would vectorize 16 wide with AVX-512 runs 4 wide;
//! [`wide_fn!`] compiles a loop a second time for AVX-512 and picks that copy when the CPU
//! has it. Rust never fuses a multiply and an add on its own, so both copies perform the
//! same IEEE operations in the same order: the same bits, in wider registers.

/// Whether this CPU runs AVX-512 F, BW and VL code (std caches the answer).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(test)]
    if PORTABLE.get() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU also has AVX-512 VBMI, for byte permutes across a register.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && std::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
thread_local! {
    /// Set while a test runs the portable copies on this thread.
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Defines a (non-generic) function whose body is compiled twice, for AVX-512 and for the
/// baseline, and runs the AVX-512 copy when [`has_avx512`] says the CPU has it.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            fn wide($($arg: $ty),*) $(-> $ret)? $body
            #[allow(clippy::too_many_arguments)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if $crate::simd::has_avx512() {
                // SAFETY: the CPU has the features `wide` is compiled for, checked just above.
                return unsafe { wide($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::adamw8bit::Adamw8bitConfig;
    use crate::{AdafactorConfig, AdamConfig, Layout, LionConfig, Optimizer, OptimizerConfig, ScheduleFreeConfig, SgdConfig};

    /// Three steps of `config` over odd-sized parameters, on this thread only.
    fn run(pool: &rayon::ThreadPool, config: &OptimizerConfig, portable: bool) -> (Vec<u32>, String) {
        let layout = Layout::new([("w", vec![37, 29]), ("b", vec![1000]), ("t", vec![3, 7, 11]), ("s", vec![])]).unwrap();
        let n = layout.numel();
        let wave = |k: f32, a: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * a).collect() };
        PORTABLE.set(portable);
        let mut params = wave(0.37, 1.5);
        let mut opt = Optimizer::new(layout, config.clone()).unwrap();
        pool.install(|| {
            for step in 0..3 {
                opt.step(&mut params, &wave(0.11 + step as f32, 0.2)).unwrap();
            }
        });
        PORTABLE.set(false);
        (params.iter().map(|x| x.to_bits()).collect(), serde_json::to_string(&opt.state_dict()).unwrap())
    }

    /// Every element-wise kernel's AVX-512 copy gives its portable copy's bits, state
    /// included (on a CPU without AVX-512 both runs take the portable copy).
    #[test]
    fn the_wide_copies_equal_the_portable_ones() {
        if !has_avx512() {
            eprintln!("skipped: this CPU lacks AVX-512 (only the portable copies run)");
        }
        let configs = [
            OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01, ..Default::default() }),
            OptimizerConfig::Sgd(SgdConfig { lr: 0.1, maximize: true, ..Default::default() }),
            OptimizerConfig::Adam(AdamConfig::adamw()),
            OptimizerConfig::Adam(AdamConfig { amsgrad: true, weight_decay: 0.1, ..AdamConfig::adam() }),
            OptimizerConfig::Lion(LionConfig { weight_decay: 0.1, ..LionConfig::default() }),
            OptimizerConfig::ScheduleFreeAdamw(ScheduleFreeConfig { weight_decay: 0.01, ..ScheduleFreeConfig::default() }),
            OptimizerConfig::Adafactor(AdafactorConfig { weight_decay: 0.1, ..AdafactorConfig::default() }),
            OptimizerConfig::Adamw8bit(Adamw8bitConfig::default()),
            OptimizerConfig::Adamw8bit(Adamw8bitConfig { block_size: 4, maximize: true, ..Adamw8bitConfig::default() }),
        ];
        // One worker, this thread: the kernels see this thread's setting.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).use_current_thread().build().unwrap();
        for config in &configs {
            let (wide, portable) = (run(&pool, config, false), run(&pool, config, true));
            assert_eq!(wide.0, portable.0, "params, {config:?}");
            assert_eq!(wide.1, portable.1, "state, {config:?}");
        }
    }
}
