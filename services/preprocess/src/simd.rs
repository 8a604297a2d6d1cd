//! Wider vectors where the CPU has them, chosen at run time.
//!
//! The hot loops (HU conversion, resampling, accumulating planes, rounding to int16) are
//! written once, as plain Rust the compiler vectorizes. [`with_avx2`] compiles the code it
//! is given a second time for AVX2's 8-lane vectors and runs that copy when the CPU has
//! AVX2. FMA is left off, so every sum rounds as on any other x86-64 CPU and a tensor does
//! not depend on the machine that made it.

/// Runs `work`, compiled for AVX2 when the CPU has it. Only what is inlined into the AVX2
/// copy is compiled for it: pass a closure marked `#[inline(always)]` that calls
/// `#[inline(always)]` functions. (HU conversion in a closure without the mark ran at the
/// baseline's speed, 45% slower.)
#[inline(always)]
pub(crate) fn with_avx2<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(work: impl FnOnce() -> R) -> R {
            work()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked on the line above.
            return unsafe { avx2(work) };
        }
    }
    work()
}
