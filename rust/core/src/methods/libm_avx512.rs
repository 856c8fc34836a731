//! [`super::libm::expf`] of x − m and [`super::libm::logf`] over slices, eight lanes at a time
//! in AVX-512, with their tables read by two-register permutes instead of gathers.
//!
//! Why: the wide copies of [`crate::simd!`] vectorize `expf`'s loop, but its 2^(i/32) table
//! lookup becomes a `vgatherdpd`, and on the machines measured (AMD Zen 4) the gathers were
//! a quarter of arcee_fusion's statistics pass. 32 f64 entries fit in four registers; two
//! `vpermt2pd` and a blend on the index's fifth bit read them (the logarithm's 16 pairs: one
//! `vpermt2pd` per column). Every other operation is the
//! scalar function's, in its order (the same FMAs, the same single rounding to f32, the same
//! special cases), so the bits are too; the tests compare the two over a sweep of bit
//! patterns.

use super::libm::{expf, logf};
#[cfg(target_arch = "x86_64")]
use super::libm::{EXP_INV_LN2_N, EXP_OVER, EXP_POLY, EXP_SHIFT, EXP_TABLE, EXP_UNDER};
#[cfg(target_arch = "x86_64")]
use super::libm::{LOG_LN2, LOG_OFF, LOG_POLY, LOG_TABLE};

/// `out[i] = e^(x[i] − m)`, with `x[i] − m` rounded to f32 first (as the scalar loop computes it).
#[inline(always)]
pub fn expf_shifted(x: &[f32], m: f32, out: &mut [f32]) {
    let out = &mut out[..x.len()];
    #[cfg(target_arch = "x86_64")]
    if crate::simd::tier() == crate::simd::Tier::Avx512 {
        // SAFETY: the tier is AVX-512 only where the CPU has avx512f, avx512dq and avx512vl.
        unsafe { expf_shifted_avx512(x, m, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = expf(v - m);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,avx512f,avx512dq,avx512vl")]
fn expf_shifted_avx512(x: &[f32], m: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let f = f64::from_bits;
    let t = |i: usize| {
        let e = &EXP_TABLE[i * 8..i * 8 + 8];
        // SAFETY: eight u64 of the table, read unaligned.
        _mm512_castsi512_pd(unsafe { _mm512_loadu_si512(e.as_ptr() as *const _) })
    };
    let (t0, t1, t2, t3) = (t(0), t(1), t(2), t(3));
    let inv = _mm512_set1_pd(f(EXP_INV_LN2_N));
    let shift = _mm512_set1_pd(f(EXP_SHIFT));
    let [c0, c1, c2] = EXP_POLY.map(|c| _mm512_set1_pd(f(c)));
    let one = _mm512_set1_pd(1.0);
    let (over, under) = (
        _mm256_set1_ps(f32::from_bits(EXP_OVER)),
        _mm256_set1_ps(f32::from_bits(EXP_UNDER)),
    );
    let (inf, zero) = (_mm256_set1_ps(f32::INFINITY), _mm256_setzero_ps());
    let (low5, bit4) = (_mm512_set1_epi64(31), _mm512_set1_epi64(16));
    let mv = _mm256_set1_ps(m);
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 <= x.len() = out.len(): eight f32 of each, unaligned.
        let xs = _mm256_sub_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }, mv);
        let xd = _mm512_cvtps_pd(xs);
        // z = x · 32/ln 2 = k + r: the shifted sum's low bits are k; r = fma(inv, x, −(shifted − SHIFT)).
        let shifted = _mm512_fmadd_pd(inv, xd, shift);
        let ki = _mm512_castpd_si512(shifted);
        let r = _mm512_fmsub_pd(inv, xd, _mm512_sub_pd(shifted, shift));
        // The table's entry k mod 32: entries 0..15 and 16..31 by permutes, picked by bit 4.
        let idx = _mm512_and_si512(ki, low5);
        let lo = _mm512_permutex2var_pd(t0, idx, t1);
        let hi = _mm512_permutex2var_pd(t2, idx, t3);
        let entry = _mm512_mask_blend_pd(_mm512_test_epi64_mask(ki, bit4), lo, hi);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(
            _mm512_castpd_si512(entry),
            _mm512_slli_epi64::<47>(ki),
        ));
        let p = _mm512_fmadd_pd(c0, r, c1);
        let y = _mm512_fmadd_pd(p, _mm512_mul_pd(r, r), _mm512_fmadd_pd(c2, r, one));
        let mut v = _mm512_cvtpd_ps(_mm512_mul_pd(y, s));
        // The special cases, in the scalar function's order of precedence.
        v = _mm256_mask_blend_ps(_mm256_cmp_ps_mask::<_CMP_LT_OQ>(xs, under), v, zero);
        v = _mm256_mask_blend_ps(_mm256_cmp_ps_mask::<_CMP_GT_OQ>(xs, over), v, inf);
        let nan = _mm256_cmp_ps_mask::<_CMP_UNORD_Q>(xs, xs);
        v = _mm256_mask_blend_ps(nan, v, _mm256_add_ps(xs, xs));
        // SAFETY: as the load.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), v) };
    }
    for (o, &v) in out[n8..].iter_mut().zip(&x[n8..]) {
        *o = expf(v - m);
    }
}

/// `x[i] = ln x[i]`, in place.
#[inline(always)]
pub fn logf_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::tier() == crate::simd::Tier::Avx512 {
        // SAFETY: the tier is AVX-512 only where the CPU has avx512f, avx512dq and avx512vl.
        unsafe { logf_avx512(x) };
        return;
    }
    for v in x.iter_mut() {
        *v = logf(*v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,avx512f,avx512dq,avx512vl")]
fn logf_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let f = f64::from_bits;
    let column = |c: usize, half: usize| {
        let mut e = [0.0f64; 8];
        for (j, e) in e.iter_mut().enumerate() {
            *e = f(LOG_TABLE[half * 8 + j][c]);
        }
        // SAFETY: eight f64 of a local array, read unaligned.
        unsafe { _mm512_loadu_pd(e.as_ptr()) }
    };
    let (inv0, inv1, log0, log1) = (column(0, 0), column(0, 1), column(1, 0), column(1, 1));
    let ln2 = _mm512_set1_pd(f(LOG_LN2));
    let [a0, a1, a2] = LOG_POLY.map(|c| _mm512_set1_pd(f(c)));
    let one = _mm512_set1_pd(1.0);
    let off = _mm256_set1_epi32(LOG_OFF as i32);
    let (min_pos, scale) = (
        _mm256_set1_ps(f32::MIN_POSITIVE),
        _mm256_set1_ps(8_388_608.0),
    );
    let (zero, neg_inf) = (_mm256_setzero_ps(), _mm256_set1_ps(f32::NEG_INFINITY));
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 <= x.len(): eight f32, unaligned.
        let xs = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
        let xi = _mm256_castps_si256(xs);
        // A subnormal x is scaled into the normal range first (the scale comes off k below).
        let sub = _mm256_cmp_ps_mask::<_CMP_GT_OQ>(xs, zero)
            & _mm256_cmp_ps_mask::<_CMP_LT_OQ>(xs, min_pos);
        let scaled = _mm256_sub_epi32(
            _mm256_castps_si256(_mm256_mul_ps(xs, scale)),
            _mm256_set1_epi32(23 << 23),
        );
        let ix = _mm256_mask_blend_epi32(sub, xi, scaled);
        let tmp = _mm256_sub_epi32(ix, off);
        let idx = _mm256_and_si256(_mm256_srli_epi32::<19>(tmp), _mm256_set1_epi32(15));
        let k = _mm256_srai_epi32::<23>(tmp);
        let iz = _mm256_sub_epi32(ix, _mm256_and_si256(tmp, _mm256_set1_epi32(0x1ff << 23)));
        let idx = _mm512_cvtepu32_epi64(idx);
        let invc = _mm512_permutex2var_pd(inv0, idx, inv1);
        let logc = _mm512_permutex2var_pd(log0, idx, log1);
        let z = _mm512_cvtps_pd(_mm256_castsi256_ps(iz));
        let r = _mm512_fmsub_pd(z, invc, one);
        let y0 = _mm512_fmadd_pd(_mm512_cvtepi32_pd(k), ln2, logc);
        let r2 = _mm512_mul_pd(r, r);
        let y = _mm512_fmadd_pd(a1, r, a2);
        let y = _mm512_fmadd_pd(a0, r2, y);
        let mut v = _mm512_cvtpd_ps(_mm512_fmadd_pd(y, r2, _mm512_add_pd(y0, r)));
        // The special cases, in the scalar function's order of precedence (last blend wins).
        let xx = _mm256_sub_ps(xs, xs);
        let invalid =
            _mm256_cmp_ps_mask::<_CMP_LT_OQ>(xs, zero) | _mm256_cmp_ps_mask::<_CMP_UNORD_Q>(xs, xs);
        v = _mm256_mask_blend_ps(invalid, v, _mm256_div_ps(xx, xx));
        let inf = _mm256_cmpeq_epi32_mask(xi, _mm256_set1_epi32(0x7f80_0000));
        v = _mm256_mask_blend_ps(inf, v, xs);
        v = _mm256_mask_blend_ps(_mm256_cmp_ps_mask::<_CMP_EQ_OQ>(xs, zero), v, neg_inf);
        let one_f = _mm256_cmpeq_epi32_mask(xi, _mm256_set1_epi32(0x3f80_0000));
        v = _mm256_mask_blend_ps(one_f, v, zero);
        // SAFETY: as the load.
        unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(i), v) };
    }
    for v in x[n8..].iter_mut() {
        *v = logf(*v);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Every 2^`step`-th f32 bit pattern through both: the same bits (NaN for NaN).
    fn compare(step: u32, m: f32) {
        let xs: Vec<f32> = (0..=u32::MAX >> step)
            .map(|i| f32::from_bits(i << step | (i & 0x7f)))
            .chain([
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                88.72,
                -103.97,
            ])
            .collect();
        let mut got = vec![0.0f32; xs.len()];
        // SAFETY: called only where the CPU has the features (checked by the caller).
        unsafe { expf_shifted_avx512(&xs, m, &mut got) };
        for (&x, &g) in xs.iter().zip(&got) {
            let want = expf(x - m);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "x {x:e} m {m}: {g:e} vs {want:e}"
            );
        }
    }

    /// Whether this CPU runs the AVX-512 copies (else the tests have nothing to compare).
    fn has_avx512() -> bool {
        let ok = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma");
        if !ok {
            eprintln!("skipped: this CPU lacks AVX-512 (the scalar loops are the ones taken)");
        }
        ok
    }

    #[test]
    fn same_bits_as_the_scalar_expf() {
        if !has_avx512() {
            return;
        }
        for m in [0.0, 1.5, -3.25, 80.0] {
            compare(12, m);
        }
    }

    #[test]
    fn same_bits_as_the_scalar_logf() {
        if !has_avx512() {
            return;
        }
        // Every 2^12-th bit pattern (all exponents, subnormals, both signs) and the special
        // values.
        let xs: Vec<f32> = (0..=u32::MAX >> 12)
            .map(|i| f32::from_bits(i << 12 | (i & 0x7f)))
            .chain([
                1.0,
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                -1.0,
            ])
            .chain([f32::MIN_POSITIVE, f32::from_bits(1), 1.0 + f32::EPSILON])
            .collect();
        let mut got = xs.clone();
        // SAFETY: the CPU has the features.
        unsafe { logf_avx512(&mut got) };
        for (&x, &g) in xs.iter().zip(&got) {
            let want = logf(x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "x {x:e}: {g:e} vs {want:e}"
            );
        }
    }
}
