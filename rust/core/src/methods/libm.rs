//! e^x and ln x of f32, giving the bits of the C library's `expf` and `logf` as glibc computes
//! them on CPUs with FMA (its `__expf_fma`/`__logf_fma`, which every x86-64 machine of the
//! last decade runs), written as branch-free loop bodies so that they vectorize.
//!
//! Why: `f32::exp` and `f32::ln` call the C library element by element. arcee_fusion's row
//! statistics take two exponentials and a logarithm per element, and those calls were half its
//! time. Functions of our own with other bits would move its importances, and so its output,
//! wherever an element sits at the threshold; these give the same bits as before on such
//! machines, and the same bits on every machine (they do not depend on which build of the C
//! library a CPU is dispatched to).
//!
//! The method is glibc's (Szabolcs Nagy's, from Arm's optimized-routines): a reduction to a
//! small table and a short polynomial, evaluated in f64, rounded once to f32. The constants are
//! that method's published table and coefficients. Every `mul_add` is one glibc's FMA build
//! fuses; `f64::mul_add` is exact (an FMA instruction in the wide copies of [`crate::simd!`],
//! the C library's `fma` in the baseline one), so the result does not depend on the copy taken.
//! The unit tests compare with the C library over a sweep of every 512th bit pattern and the
//! ends of every exponent; an exhaustive run over all 2^32 inputs is an ignored test.

// The coefficients are written as the exact f64 values glibc holds (in hexadecimal below).
#![allow(clippy::excessive_precision, clippy::unreadable_literal)]

/// 2^(i/32) as f64 bits, each less `i << 47` (the exponent bits the reduction adds back).
pub(super) const EXP_TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// 32 / ln 2 (0x1.71547652b82fep+5).
pub(super) const EXP_INV_LN2_N: u64 = 0x40471547652b82fe;
/// The polynomial for 2^(r/32) − 1 on |r| ≤ 1/2, highest degree first.
pub(super) const EXP_POLY: [u64; 3] = [0x3ebc6af84b912394, 0x3f2ebfce50fac4f3, 0x3f962e42ff0c52d6];
/// 1.5 · 2^52: adding it rounds an f64 of magnitude < 2^51 to an integer, in its low bits.
pub(super) const EXP_SHIFT: u64 = 0x4338000000000000;
/// Above this, e^x overflows f32 (0x1.62e42ep6 ≈ 88.72).
pub(super) const EXP_OVER: u32 = 0x42b17217;
/// Below this, e^x rounds to 0 (−0x1.9fe368p6 ≈ −103.97).
pub(super) const EXP_UNDER: u32 = 0xc2cff1b4;

/// e^x, as glibc's `expf` (FMA build) computes it.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let f = f64::from_bits;
    // z = x · 32/ln 2 = k + r, k an integer (from the low bits of the shifted sum), |r| ≤ 1/2.
    // glibc's build fuses the product z into both of its uses.
    let (inv, xd) = (f(EXP_INV_LN2_N), x as f64);
    let shifted = inv.mul_add(xd, f(EXP_SHIFT));
    let ki = shifted.to_bits();
    let r = inv.mul_add(xd, -(shifted - f(EXP_SHIFT)));
    // 2^(k/32): the table's 2^((k mod 32)/32) with k div 32 added to its exponent.
    let s = f(EXP_TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let [c0, c1, c2] = EXP_POLY.map(f);
    let p = c0.mul_add(r, c1);
    let y = p.mul_add(r * r, c2.mul_add(r, 1.0));
    let general = (y * s) as f32;
    // glibc's special cases (|x| ≥ 88 goes there), chosen after the fact: NaN propagates, a
    // large x overflows to ∞, a very negative one (−∞ too) gives 0; between, the general path.
    if x.is_nan() {
        x + x
    } else if x > f32::from_bits(EXP_OVER) {
        f32::INFINITY
    } else if x < f32::from_bits(EXP_UNDER) {
        0.0
    } else {
        general
    }
}

/// (1/c, ln c) for the 16 subintervals of [0x1.66p-1, 0x1.66p0) that `logf` reduces to.
pub(super) const LOG_TABLE: [[u64; 2]; 16] = [
    [0x3ff661ec79f8f3be, 0xbfd57bf7808caade],
    [0x3ff571ed4aaf883d, 0xbfd2bef0a7c06ddb],
    [0x3ff49539f0f010b0, 0xbfd01eae7f513a67],
    [0x3ff3c995b0b80385, 0xbfcb31d8a68224e9],
    [0x3ff30d190c8864a5, 0xbfc6574f0ac07758],
    [0x3ff25e227b0b8ea0, 0xbfc1aa2bc79c8100],
    [0x3ff1bb4a4a1a343f, 0xbfba4e76ce8c0e5e],
    [0x3ff12358f08ae5ba, 0xbfb1973c5a611ccc],
    [0x3ff0953f419900a7, 0xbfa252f438e10c1e],
    [0x3ff0000000000000, 0x0000000000000000],
    [0x3fee608cfd9a47ac, 0x3faaa5aa5df25984],
    [0x3feca4b31f026aa0, 0x3fbc5e53aa362eb4],
    [0x3feb2036576afce6, 0x3fc526e57720db08],
    [0x3fe9c2d163a1aa2d, 0x3fcbc2860d224770],
    [0x3fe886e6037841ed, 0x3fd1058bc8a07ee1],
    [0x3fe767dcf5534862, 0x3fd4043057b6ee09],
];
/// ln 2 (0x1.62e42fefa39efp-1).
pub(super) const LOG_LN2: u64 = 0x3fe62e42fefa39ef;
/// The polynomial for ln(1 + r) − r on the reduced range, highest degree first.
pub(super) const LOG_POLY: [u64; 3] = [0xbfd00ea348b88334, 0x3fd5575b0be00b6a, 0xbfdffffef20a4123];
/// The bits of 0x1.66p-1: the reduced argument lies in [OFF, 2·OFF).
pub(super) const LOG_OFF: u32 = 0x3f330000;

/// ln x, as glibc's `logf` (FMA build) computes it.
#[inline(always)]
pub fn logf(x: f32) -> f32 {
    let f = f64::from_bits;
    // A subnormal x is scaled into the normal range first (the scale comes off k below).
    let sub = x > 0.0 && x < f32::MIN_POSITIVE;
    let ix = if sub {
        (x * 8_388_608.0).to_bits().wrapping_sub(23 << 23)
    } else {
        x.to_bits()
    };
    // x = 2^k · z, z in [OFF, 2·OFF): subinterval i of the table, c near its centre.
    let tmp = ix.wrapping_sub(LOG_OFF);
    let i = ((tmp >> 19) % 16) as usize;
    let k = (tmp as i32) >> 23;
    let iz = ix.wrapping_sub(tmp & (0x1ff << 23));
    let [invc, logc] = LOG_TABLE[i].map(f);
    let z = f32::from_bits(iz) as f64;
    // ln x = ln(1 + (z/c − 1)) + ln c + k ln 2.
    let r = z.mul_add(invc, -1.0);
    let y0 = (k as f64).mul_add(f(LOG_LN2), logc);
    let [a0, a1, a2] = LOG_POLY.map(f);
    let r2 = r * r;
    let y = a1.mul_add(r, a2);
    let y = a0.mul_add(r2, y);
    let general = y.mul_add(r2, y0 + r) as f32;
    // glibc's special cases, chosen after the fact.
    let bits = x.to_bits();
    if bits == 0x3f80_0000 {
        0.0
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else if bits == 0x7f80_0000 {
        x
    } else if x < 0.0 || x.is_nan() {
        invalid(x)
    } else {
        general
    }
}

/// glibc's result for an argument outside the domain: (x − x) / (x − x), the default NaN
/// (the quiet x itself when x is one).
#[inline(always)]
#[allow(clippy::eq_op)]
fn invalid(x: f32) -> f32 {
    (x - x) / (x - x)
}

#[cfg(test)]
mod tests {
    //! The exhaustive comparison (every f32 bit pattern) with the C library takes about three
    //! minutes: `cargo test --release -p weightweave-core -- --ignored libm`. It found the one
    //! fusion a sweep of every 4096th pattern had missed (glibc fuses x · 32/ln 2 into both of
    //! its uses).
    use super::*;

    /// Whether this process's C library is glibc running its FMA builds of expf/logf, whose
    /// bits these functions reproduce (elsewhere they are compared within an ulp).
    fn glibc_fma() -> bool {
        cfg!(all(target_env = "gnu", target_arch = "x86_64")) && {
            #[cfg(target_arch = "x86_64")]
            {
                std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        }
    }

    /// Every 2^`step`-th bit pattern, and the first and last few of every exponent.
    fn sweep(step: u32) -> impl Iterator<Item = u32> {
        let edges = (0..512u32).flat_map(|e| {
            let base = e << 23;
            (0..64)
                .chain((1 << 23) - 64..1 << 23)
                .map(move |m| base | m)
        });
        (0..=u32::MAX).step_by(1 << step).chain(edges)
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Within one ulp of the correctly rounded value (from f64, close enough away from
    /// ties), where the C library is another.
    fn near(a: f32, want: f64) -> bool {
        let w = want as f32;
        same(a, w) || (a.to_bits() as i64 - w.to_bits() as i64).abs() <= 1
    }

    fn check(ours: fn(f32) -> f32, libc: fn(f32) -> f32, wide: fn(f64) -> f64, step: u32) {
        let exact = glibc_fma();
        let mut worst = 0;
        for bits in sweep(step) {
            let x = f32::from_bits(bits);
            let (a, b) = (ours(x), libc(x));
            if exact {
                assert!(
                    same(a, b),
                    "{x:e} ({bits:#x}): {a:e} vs the C library's {b:e}"
                );
            } else if !near(a, wide(x as f64)) {
                worst += 1;
                assert!(worst < 4, "{x:e}: {a:e} vs {:e}", wide(x as f64));
            }
        }
    }

    #[test]
    fn expf_is_the_c_librarys() {
        check(expf, f32::exp, f64::exp, 9);
    }

    #[test]
    fn logf_is_the_c_librarys() {
        check(logf, f32::ln, f64::ln, 9);
    }

    #[test]
    fn special_values() {
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(f32::INFINITY), f32::INFINITY);
        assert_eq!(expf(89.0), f32::INFINITY);
        assert_eq!(expf(-104.0), 0.0);
        assert!(expf(f32::NAN).is_nan());
        // Subnormal results: e^−100 ≈ 3.7e−44.
        assert!(expf(-100.0) > 0.0 && expf(-100.0) < f32::MIN_POSITIVE);
        assert_eq!(logf(1.0).to_bits(), 0);
        assert_eq!(logf(0.0), f32::NEG_INFINITY);
        assert_eq!(logf(-0.0), f32::NEG_INFINITY);
        assert_eq!(logf(f32::INFINITY), f32::INFINITY);
        assert!(logf(-1.0).is_nan() && logf(f32::NAN).is_nan());
        assert_eq!(logf(2.0), std::f32::consts::LN_2);
        assert_eq!(expf(1.0), std::f32::consts::E);
        assert!((logf(f32::from_bits(1)) - (-103.278_93)).abs() < 1e-4);
    }

    #[test]
    #[ignore = "every f32: about three minutes in release"]
    fn libm_exhaustive() {
        if glibc_fma() {
            check(expf, f32::exp, f64::exp, 0);
            check(logf, f32::ln, f64::ln, 0);
        }
    }
}
