//! Run-time CPU dispatch for the element-wise loops. The default build targets baseline
//! x86-64 (SSE2), so a loop the compiler would vectorize 16 wide with AVX-512 runs 4 wide;
//! [`wide_fn!`] compiles a loop a second time for AVX-512 and picks that copy when the CPU
//! has it. Rust never fuses a multiply and an add on its own, so both copies perform the
//! same IEEE operations in the same order: the same bits, in wider registers.

/// Whether this CPU runs AVX-512 F, BW and VL code.
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(test)]
    if PORTABLE.get() {
        return false;
    }
    features() & AVX512 != 0
}

/// Whether this CPU also has AVX-512 VBMI, for byte permutes across a register, and DQ
/// (every core with VBMI has it: Ice Lake, Zen 4 and later), for its range and mask moves.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_vbmi() -> bool {
    has_avx512() && features() & VBMI != 0
}

/// [`features`]' bits.
const KNOWN: u8 = 1;
const AVX512: u8 = 2;
const VBMI: u8 = 4;

/// The CPU's features as one byte, detected once: the 8-bit step asks per 256-element
/// block, where std's several detections per question showed in profiles.
#[inline(always)]
fn features() -> u8 {
    use std::sync::atomic::Ordering;
    match FEATURES.load(Ordering::Relaxed) {
        0 => detect(),
        known => known,
    }
}

static FEATURES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cold]
fn detect() -> u8 {
    let mut found = KNOWN;
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            found |= AVX512;
            if has!("avx512vbmi") && has!("avx512dq") {
                found |= VBMI;
            }
        }
    }
    FEATURES.store(found, std::sync::atomic::Ordering::Relaxed);
    found
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
