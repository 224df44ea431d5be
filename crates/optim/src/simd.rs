//! Run-time CPU dispatch for the element-wise loops. The default build targets baseline
//! x86-64 (SSE2), so a loop the compiler would vectorize 16 wide with AVX-512 runs 4 wide;
//! [`wide_fn!`] compiles a loop a second time for AVX-512 and picks that copy when the CPU
//! has it. Rust never fuses a multiply and an add on its own, so both copies perform the
//! same IEEE operations in the same order: the same bits, in wider registers.

/// Whether this CPU runs AVX-512 F, BW and VL code (std caches the answer).
#[inline]
pub(crate) fn has_avx512() -> bool {
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
