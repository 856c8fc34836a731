//! Breadcrumbs' row cuts (`row_cut.rs`): which magnitudes of a block of 64 lie in each of two
//! key ranges, as bits, compared into mask registers.
//!
//! Why: built lane by lane in portable code, each bit became a vector lane that was moved out
//! of a mask, shifted into place and ORed (`objdump`); that loop was a sixth of a warm
//! Breadcrumbs' CPU time on 0.5 B bf16 (`perf`). Here 16 magnitudes are tested with one
//! unsigned compare per range, and its mask register is the 16 bits. The bits are the same as
//! the portable loop's; `row_cut`'s tests compare the two.

/// The bits of the elements of `xs` whose magnitudes (the bits of |x|) lie in [l, h), for
/// each of the two ranges of `w` (an empty range, l ≥ h, holds none).
///
/// # Safety
/// The CPU must have avx512f, avx512dq and avx512vl ([`crate::simd::Tier::Avx512`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,avx512f,avx512dq,avx512vl")]
pub(super) unsafe fn within_bits(xs: &[f32; 64], w: [(u32, u32); 2]) -> (u64, u64) {
    use std::arch::x86_64::*;
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    // l <= b < h as one unsigned compare: b - l < h - l (no value where h <= l).
    let (l0, n0) = (w[0].0, w[0].1.saturating_sub(w[0].0));
    let (l1, n1) = (w[1].0, w[1].1.saturating_sub(w[1].0));
    let (l0, n0) = (_mm512_set1_epi32(l0 as i32), _mm512_set1_epi32(n0 as i32));
    let (l1, n1) = (_mm512_set1_epi32(l1 as i32), _mm512_set1_epi32(n1 as i32));
    let (mut m0, mut m1) = (0u64, 0u64);
    for (g, block) in xs.chunks_exact(16).enumerate() {
        // SAFETY: `block` holds 16 f32, read unaligned.
        let b = unsafe { _mm512_loadu_si512(block.as_ptr().cast()) };
        let b = _mm512_and_si512(b, abs);
        let k0 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(b, l0), n0);
        let k1 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(b, l1), n1);
        m0 |= u64::from(k0) << (16 * g);
        m1 |= u64::from(k1) << (16 * g);
    }
    (m0, m1)
}
