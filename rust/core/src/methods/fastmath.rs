//! exp and tanh for f32 without branches or libm calls, so PCB's per-element loops vectorize.
//! Cephes-style range reduction and polynomials: about 1–2 ulp, the same class as torch's
//! vectorized kernels (which are not correctly rounded either).

// The coefficients are kept as published (Cephes), even where f32 cannot hold every digit.
#![allow(clippy::excessive_precision)]

/// e^x for x in about [-87, 88] (PCB only evaluates it on [0, T]).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // floor() is a libm call on baseline x86-64 (no SSE4.1): truncate and correct instead.
    let t = x * std::f32::consts::LOG2_E + 0.5;
    // SAFETY: x is clamped to [-87, 88], so t is finite and far inside i32's range; the
    // unchecked conversion (unlike the saturating `as`) vectorizes.
    let i: i32 = unsafe { t.to_int_unchecked() };
    // floor(t) as an integer: the exponent below is built from it directly, because converting
    // the float n back (`n as i32`, saturating) would not vectorize: each lane became a scalar
    // conversion with NaN and range checks, a quarter of PCB's time.
    let k = i - i32::from(t < i as f32);
    let n = k as f32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// tanh(x): an odd polynomial near 0, 1 − 2/(e^{2|x|} + 1) elsewhere; both computed, one chosen.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328_2e-1)
            * z
            * x
            + x;
    let e = exp(2.0 * a.min(40.0));
    let large = (1.0 - 2.0 / (e + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0;
        for i in 0..=200_000 {
            let x = -20.0 + 40.0 * i as f32 / 200_000.0;
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "{worst}");
    }

    #[test]
    fn tanh_is_within_a_few_ulp() {
        let mut worst = 0;
        for i in 0..=200_000 {
            let x = -3.0 + 6.0 * i as f32 / 200_000.0;
            if x.abs() < 1e-30 {
                continue;
            }
            worst = worst.max(ulps(tanh(x), (x as f64).tanh() as f32));
        }
        assert!(worst <= 4, "{worst}");
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(tanh(20.0), 1.0);
    }
}
