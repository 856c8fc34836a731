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

/// An upper bound of e^x for x ≤ 87 (+∞ above, and for NaN), within 6.2 % of it: with
/// w = x·log2(e) = i + f (i an integer, 0 ≤ f < 1), e^x = 2^i·2^f ≤ 2^i·(1 + f), because 2^f is
/// convex and meets 1 + f at f = 0 and f = 1. A third of [`exp`]'s operations: PCB's bound on
/// its scores takes it for every element, [`exp`] only for the elements the bound leaves open.
/// Rounding: w is at most 1.3 units of 2^-24 low (relative: log2(e) in f32, and the product),
/// which costs a factor of at least 1 − 0.9·x·2^-24, and 1 + f another half unit: callers
/// allow (x + 1) units of 2^-24 below e^x.
#[inline(always)]
// Not `clamp`: it keeps a NaN, which `to_int_unchecked` must not see.
#[allow(clippy::manual_clamp)]
pub fn exp_upper(x: f32) -> f32 {
    // Negative x: e^x ≤ 1, the bound at 0. `max` takes a NaN to 0 (its bound is replaced
    // below); the `min` keeps 2^i a normal f32.
    let w = x.max(0.0).min(87.0) * std::f32::consts::LOG2_E;
    // SAFETY: w is finite, in [0, 125.6]; truncating it is flooring it.
    let i: i32 = unsafe { w.to_int_unchecked() };
    let f = w - i as f32;
    let y = (1.0 + f) * f32::from_bits(((i + 127) as u32) << 23);
    if x <= 87.0 {
        y
    } else {
        f32::INFINITY
    }
}

/// Below this |x|, [`tanh`] is its polynomial ([`tanh_small`]).
pub const TANH_SMALL: f32 = 0.625;

/// tanh(x): an odd polynomial near 0, 1 − 2/(e^{2|x|} + 1) elsewhere; both computed, one chosen.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let small = tanh_small(x);
    let e = exp(2.0 * a.min(40.0));
    let large = (1.0 - 2.0 / (e + 1.0)).copysign(x);
    if a < TANH_SMALL {
        small
    } else {
        large
    }
}

/// [`tanh`]'s odd polynomial: what it returns for |x| < [`TANH_SMALL`], at a fraction of the
/// cost (no exp, no division). Callers that know a whole block is that small use it alone.
#[inline(always)]
pub fn tanh_small(x: f32) -> f32 {
    let z = x * x;
    ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
        - 3.333_328_2e-1)
        * z
        * x
        + x
}

/// Lanes of a block that [`add_tanh`] decides together.
const LANES: usize = 16;

/// `acc[i] += tanh(x[i]·y[i])` and, with `also`, `also[i] += ` the same value. A block of 16
/// products all below [`TANH_SMALL`] in magnitude takes the polynomial alone, the value `tanh`
/// would choose there; any other block (a NaN too), and the tail, take the whole `tanh`. PCB's
/// normalised products are mostly small, so most blocks skip the exp and the division: on
/// AVX2, a third less time for PCB's pair sums (on AVX-512 the same time).
#[inline(always)]
pub fn add_tanh(x: &[f32], y: &[f32], acc: &mut [f32], mut also: Option<&mut [f32]>) {
    let n = acc.len();
    let (x, y) = (&x[..n], &y[..n]);
    let full = n / LANES * LANES;
    for b0 in (0..full).step_by(LANES) {
        let (xs, ys) = (&x[b0..b0 + LANES], &y[b0..b0 + LANES]);
        // Not `>=`: a NaN product is not small either.
        let large = xs.iter().zip(ys).fold(false, |l, (&a, &b)| {
            let small = (a * b).abs() < TANH_SMALL;
            l | !small
        });
        let mut v = [0.0f32; LANES];
        if large {
            for ((v, &a), &b) in v.iter_mut().zip(xs).zip(ys) {
                *v = tanh(a * b);
            }
        } else {
            for ((v, &a), &b) in v.iter_mut().zip(xs).zip(ys) {
                *v = tanh_small(a * b);
            }
        }
        for (a, &v) in acc[b0..b0 + LANES].iter_mut().zip(&v) {
            *a += v;
        }
        if let Some(also) = also.as_deref_mut() {
            for (a, &v) in also[b0..b0 + LANES].iter_mut().zip(&v) {
                *a += v;
            }
        }
    }
    for i in full..n {
        let v = tanh(x[i] * y[i]);
        acc[i] += v;
        if let Some(also) = also.as_deref_mut() {
            also[i] += v;
        }
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
    fn exp_upper_bounds_exp_within_its_documented_rounding() {
        // Every 97th f32 of [0, 88], and the edges: never below e^x by more than the
        // (x + 1) units of 2^-24 its callers allow, never below `exp` by more than that and
        // 2 ulp, and within 6.2 % above e^x.
        let unit = f64::from(f32::EPSILON) / 2.0;
        let top = 88.0f32.to_bits();
        for bits in (0..=top).step_by(97).chain([0, 87.0f32.to_bits(), top]) {
            let x = f32::from_bits(bits);
            let (got, want) = (f64::from(exp_upper(x)), f64::from(x).exp());
            if x > 87.0 {
                assert_eq!(got, f64::INFINITY, "{x}");
                continue;
            }
            let allowed = 1.0 - (f64::from(x) + 1.0) * unit;
            assert!(got >= want * allowed, "{x}: {got} < {want}");
            assert!(got >= f64::from(exp(x)) * (allowed - 4.0 * unit), "{x}");
            assert!(got <= want * 1.0625, "{x}: {got} vs {want}");
        }
        assert_eq!(exp_upper(-3.0), 1.0);
        assert_eq!(exp_upper(f32::NAN), f32::INFINITY);
        assert_eq!(exp_upper(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn add_tanh_adds_what_tanh_gives() {
        // Blocks of small products, blocks with one large, NaN and ±inf, and a short tail:
        // the same bits as adding `tanh` element by element.
        let n = 16 * 40 + 7;
        let mut x: Vec<f32> = (0..n)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                _ => ((i * 7919 % 2001) as f32 - 1000.0) / 1000.0,
            })
            .collect();
        let mut y: Vec<f32> = (0..n)
            .map(|i| {
                let v = ((i * 104_729 % 1999) as f32 - 999.0) / 999.0;
                // Mostly small products, with whole blocks of large ones now and then.
                if (i / 16) % 5 == 0 {
                    v
                } else {
                    v * 0.3
                }
            })
            .collect();
        // Two blocks of small products but for one each: in block 10 the first product past
        // the threshold whose polynomial value is not `tanh`'s (the whole `tanh` must decide
        // that block), in block 11 one just below it (the polynomial is `tanh`'s value there).
        let past = (0..20_000)
            .map(|i| TANH_SMALL + i as f32 * 1e-5)
            .find(|&p| tanh_small(p).to_bits() != tanh(p).to_bits())
            .unwrap();
        for (b, edge) in [(10, past), (11, 0.62)] {
            x[b * 16..b * 16 + 16].fill(0.1);
            y[b * 16..b * 16 + 16].fill(0.5);
            (x[b * 16 + 9], y[b * 16 + 9]) = (1.0, edge);
        }
        let start: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.25).collect();
        let (mut acc, mut also) = (start.clone(), start.clone());
        add_tanh(&x, &y, &mut acc, Some(&mut also));
        let mut alone = start.clone();
        add_tanh(&x, &y, &mut alone, None);
        let mut small_blocks = 0;
        for i in 0..n {
            let want = start[i] + tanh(x[i] * y[i]);
            assert_eq!(acc[i].to_bits(), want.to_bits(), "{i}");
            assert_eq!(also[i].to_bits(), want.to_bits(), "{i}");
            assert_eq!(alone[i].to_bits(), want.to_bits(), "{i}");
        }
        for b in x.chunks_exact(16).zip(y.chunks_exact(16)) {
            small_blocks += usize::from(b.0.iter().zip(b.1).all(|(a, b)| (a * b).abs() < 0.625));
        }
        // Both paths ran.
        assert!(small_blocks > 5 && small_blocks < 35, "{small_blocks}");
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

    #[test]
    fn tanh_is_odd_and_never_exceeds_its_argument() {
        // PCB's bound on its scores rests on 0.76·|y| <= |tanh(y)| <= |y| for its
        // products, |y| <= 1:
        // every 61st f32 of (0, 1], and 1 itself.
        let one = 1.0f32.to_bits();
        for bits in (1..=one).step_by(61).chain([one]) {
            let y = f32::from_bits(bits);
            let t = tanh(y);
            assert!(t >= 0.0 && t <= y, "tanh({y:e}) = {t:e}");
            // And tanh(y) >= 0.76·y there (tanh(1) = 0.7616; tanh(y)/y falls to it at 1):
            // below zero, its chord bound tanh(-y) <= -0.76·y.
            assert!(t >= 0.76 * y, "tanh({y:e}) = {t:e}");
            assert_eq!(tanh(-y).to_bits(), (-t).to_bits(), "{y:e}");
        }
    }
}
