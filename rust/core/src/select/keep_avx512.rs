//! The windowed count's loop over a chunk ([`super::Windowed::count`]) in AVX-512, with the
//! keys inside the window packed by `vpcompressd`.
//!
//! Why: a window holding a whole level of bf16 deltas (mergekit's per-tensor TIES: 3-4 % of a
//! row's values, a key inside in about half the blocks of 16) sent those blocks through a
//! scalar loop that writes every key and advances on the ones inside (the count with that loop
//! was 15 % of the run's `perf` samples). Here a block's keys are tested and packed in
//! registers: the compress writes its kept keys contiguously into a small buffer (a register
//! destination and a plain store: `vpcompressd` to memory is slow on AMD Zen 4), flushed into
//! `inside` as it fills. mergekit's TIES on 0.5 B bf16 took 2.46-2.64 s with the portable loop,
//! 2.34-2.40 s with this one (a 2-core Xeon VM with AVX-512 and AMX). The counts are the same
//! integers and the kept keys the same ones in the same order as the portable loop's; the
//! tests compare the two.

/// Keys packed before they are flushed into the caller's vector.
const BUFFER: usize = 512;

/// (#keys < lo, #keys = lo) of `values` (their magnitudes where `ABS`), every key in
/// (lo, lo + width] appended to `inside` in order, as `super::count_blocks` with a compacting
/// `inside` does.
///
/// # Safety
/// The CPU must have avx512f, avx512dq and avx512vl ([`crate::simd::Tier::Avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,avx512f,avx512dq,avx512vl")]
pub(super) unsafe fn count_keep<const ABS: bool>(
    values: &[f32],
    lo: u32,
    width: u32,
    inside: &mut Vec<u32>,
) -> (u32, u32) {
    use std::arch::x86_64::*;
    let sign = _mm512_set1_epi32(i32::MIN);
    let lo_v = _mm512_set1_epi32(lo as i32);
    let above_lo = _mm512_set1_epi32(lo.wrapping_add(1) as i32);
    let width_v = _mm512_set1_epi32(width as i32);
    let one = _mm512_set1_epi32(1);
    // Per-lane counts, in registers across the blocks.
    let (mut below_l, mut equal_l) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut buf = [0u32; BUFFER + 16];
    let mut at = 0usize;
    let mut blocks = values.chunks_exact(16);
    for block in &mut blocks {
        // SAFETY: `block` holds 16 f32, read unaligned.
        let b = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
        // key(v) = bits ^ (sign-fill(bits) | 0x8000_0000): !bits for a negative value, bits
        // with the sign bit set for the others; a magnitude has its sign bit cleared first.
        let k = match ABS {
            true => _mm512_or_si512(_mm512_andnot_si512(sign, b), sign),
            false => _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32::<31>(b), sign)),
        };
        below_l = _mm512_mask_add_epi32(below_l, _mm512_cmplt_epu32_mask(k, lo_v), below_l, one);
        equal_l = _mm512_mask_add_epi32(equal_l, _mm512_cmpeq_epi32_mask(k, lo_v), equal_l, one);
        // lo < k <= lo + width as one unsigned compare: k - (lo + 1) < width.
        let kept = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(k, above_lo), width_v);
        if kept != 0 {
            let packed = _mm512_maskz_compress_epi32(kept, k);
            // SAFETY: `at <= BUFFER`, so the 16 lanes stored fit `buf`.
            unsafe { _mm512_storeu_si512(buf.as_mut_ptr().add(at).cast(), packed) };
            at += kept.count_ones() as usize;
            if at > BUFFER {
                inside.extend_from_slice(&buf[..at]);
                at = 0;
            }
        }
    }
    inside.extend_from_slice(&buf[..at]);
    let mut below = _mm512_reduce_add_epi32(below_l) as u32;
    let mut equal = _mm512_reduce_add_epi32(equal_l) as u32;
    let inside_window = |k: u32| k.wrapping_sub(lo).wrapping_sub(1) < width;
    for &v in blocks.remainder() {
        let k = super::key(if ABS { v.abs() } else { v });
        below += u32::from(k < lo);
        equal += u32::from(k == lo);
        if inside_window(k) {
            inside.push(k);
        }
    }
    (below, equal)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::{count_keep_portable, key};
    use proptest::prelude::*;

    /// Values from a few levels (so that keys fall at, inside and around the window), both
    /// signs and both zeros.
    fn values() -> impl Strategy<Value = Vec<f32>> {
        let level = prop::sample::select(vec![0.0f32, -0.0, 1.0, -1.0, 1.5, -1.5, 2.0, 3.0, -3.0]);
        prop::collection::vec(prop_oneof![level, -4.0f32..4.0], 0..200)
    }

    fn both<const ABS: bool>(values: &[f32], lo: u32, width: u32) {
        let (mut want, mut got) = (vec![7u32], vec![7u32]);
        let w = count_keep_portable::<ABS>(values, lo, width, &mut want);
        // SAFETY: only where the CPU has AVX-512.
        let g = unsafe { super::count_keep::<ABS>(values, lo, width, &mut got) };
        assert_eq!((g, &got), (w, &want), "lo {lo:#x} width {width}");
    }

    proptest! {
        #[test]
        fn same_counts_and_keys_as_the_portable_loop(
            values in values(),
            at in prop::sample::select(vec![-3.0f32, -1.0, -0.0, 0.0, 1.0, 1.5, 2.0]),
            width in prop_oneof![Just(0u32), 1u32..16, Just(1 << 22), Just(u32::MAX >> 1)],
        ) {
            if !std::is_x86_feature_detected!("avx512f")
                || !std::is_x86_feature_detected!("avx512dq")
                || !std::is_x86_feature_detected!("avx512vl")
            {
                return Ok(());
            }
            let lo = key(at);
            both::<false>(&values, lo, width);
            both::<true>(&values, lo, width);
            // More kept than the buffer holds at once.
            let many: Vec<f32> = values.iter().cycle().take(values.len() * 9).copied().collect();
            both::<false>(&many, lo, width);
            both::<true>(&many, lo, width);
        }
    }
}
