//! Runtime dispatch to AVX2 code. The library is built for baseline x86-64 so one wheel runs on
//! every CPU; the hot loops run inside [`simd!`], whose AVX2 copy recompiles the closure (and
//! every `#[inline(always)]` kernel it calls) with wider vectors, picked once per process when the
//! CPU has them. Results do not depend on the copy taken: Rust neither fuses `a * b + c` into an
//! FMA nor reorders float sums, so every lane width performs the same IEEE operations. Setting
//! `WEIGHTWEAVE_SIMD=baseline` forces the baseline copy (the tests compare the two).

use std::sync::OnceLock;

/// Evaluates an expression, compiled for AVX2 when this CPU supports it. A macro rather than a
/// function taking a closure: each expansion makes a closure with one call site, which LLVM then
/// always inlines into the AVX2 wrapper (a closure called from two places stays out of line, at
/// baseline width).
#[macro_export]
macro_rules! simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        let value = if $crate::simd::wide() {
            // SAFETY: `wide()` checked at run time that the CPU has every enabled feature.
            unsafe { $crate::simd::with_avx2(|| $body) }
        } else {
            $body
        };
        #[cfg(not(target_arch = "x86_64"))]
        let value = $body;
        value
    }};
}

/// Whether [`simd!`] takes the AVX2 copy.
pub fn wide() -> bool {
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        let forced_off = std::env::var("WEIGHTWEAVE_SIMD").is_ok_and(|v| v == "baseline");
        !forced_off && detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("lzcnt")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,f16c")]
pub unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
