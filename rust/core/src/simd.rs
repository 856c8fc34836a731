//! Runtime dispatch to AVX2 and AVX-512 code. The library is built for baseline x86-64 so one
//! wheel runs on every CPU; the hot loops run inside [`simd!`](crate::simd!), whose AVX2 and AVX-512 copies
//! recompile the closure (and every `#[inline(always)]` kernel it calls) with wider vectors, the
//! widest the CPU has picked once per process. Results do not depend on the copy taken: Rust neither fuses `a * b + c` into an
//! FMA nor reorders float sums, so every lane width performs the same IEEE operations. Setting
//! `WEIGHTWEAVE_SIMD=baseline` forces the baseline copy (the tests compare the two).
//!
//! Where the CPU has AVX-512 (`avx512f`, `avx512dq`, `avx512vl`), a third copy takes it: the
//! random draws (DARE's masks, DELLA's) are 64-bit multiplies (two per draw, the counter
//! carried), which AVX2 lacks (LLVM emulates one with three 32-bit multiplies and shifts) and
//! AVX-512DQ has (`vpmullq`), 1.9× faster on the draws' loop; the other loops gain from twice the lanes (task arithmetic and
//! mergekit's TIES 15–20 % faster end to end, measured on Sapphire Rapids). The operations are
//! the same IEEE ones, so the bits are too. `WEIGHTWEAVE_SIMD=avx2` stops at the AVX2 copy (the
//! tests compare all three).

use std::sync::OnceLock;

/// Evaluates an expression, compiled for AVX-512 or AVX2 when this CPU supports it. A macro
/// rather than a function taking a closure: each expansion makes a closure with one call site,
/// marked `#[inline(always)]` so that it is compiled into the wide wrapper. Without the mark
/// LLVM left large closures out of line (the engine's per-chunk load, DELLA's pruning,
/// `karcher`'s emulated iteration: 16 of the wrappers were a bare jump), where they ran at
/// baseline width.
#[macro_export]
macro_rules! simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        let value = match $crate::simd::tier() {
            // SAFETY: `tier()` checked at run time that the CPU has every enabled feature.
            $crate::simd::Tier::Avx512 => unsafe {
                $crate::simd::with_avx512(
                    #[inline(always)]
                    || $body,
                )
            },
            // SAFETY: as above.
            $crate::simd::Tier::Avx2 => unsafe {
                $crate::simd::with_avx2(
                    #[inline(always)]
                    || $body,
                )
            },
            $crate::simd::Tier::Baseline => $body,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let value = $body;
        value
    }};
}

/// The widest copy this process takes, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Baseline,
    Avx2,
    Avx512,
}

/// The copy [`simd!`](crate::simd!) takes: the CPU's widest, capped by `WEIGHTWEAVE_SIMD`
/// (`baseline` or `avx2`).
pub fn tier() -> Tier {
    static TIER: OnceLock<Tier> = OnceLock::new();
    *TIER.get_or_init(|| {
        let cap = match std::env::var("WEIGHTWEAVE_SIMD").as_deref() {
            Ok("baseline") => Tier::Baseline,
            Ok("avx2") => Tier::Avx2,
            _ => Tier::Avx512,
        };
        cap.min(detect())
    })
}

/// Whether [`simd!`](crate::simd!) takes a copy with AVX2 (the AVX-512 one has it too).
pub fn wide() -> bool {
    tier() >= Tier::Avx2
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Tier {
    let avx2 = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("bmi1")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("lzcnt")
        && std::is_x86_feature_detected!("f16c");
    let avx512 = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl");
    match (avx2, avx512) {
        (true, true) => Tier::Avx512,
        (true, false) => Tier::Avx2,
        _ => Tier::Baseline,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Tier {
    Tier::Baseline
}

#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,f16c")]
pub unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,bmi1,bmi2,lzcnt,f16c,avx512f,avx512dq,avx512vl")]
pub unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
