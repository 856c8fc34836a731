//! Kernels that look at one element position across tasks at a time: task arithmetic (a sum),
//! MagMax, and DARE's random drop-and-rescale. Loops run task-outer so each inner loop is a
//! straight pass over a chunk that the compiler vectorizes.

use crate::rng::Stream;

/// M = Σ_t τ_t, summed in task order.
#[inline(always)]
pub fn sum<D: AsRef<[f32]>>(deltas: &[D], n: usize, m: &mut [f32]) {
    m[..n].fill(0.0);
    for d in deltas {
        for (acc, &x) in m[..n].iter_mut().zip(&d.as_ref()[..n]) {
            *acc += x;
        }
    }
}

/// M = mean_t τ_t (the SVD methods' rule for tensors that are not 2-D).
#[inline(always)]
pub fn mean<D: AsRef<[f32]>>(deltas: &[D], n: usize, m: &mut [f32]) {
    sum(deltas, n, m);
    let t = deltas.len() as f32;
    for v in &mut m[..n] {
        *v /= t;
    }
}

/// M = the τ_t of largest |τ_t| per element; ties go to the later task.
#[inline(always)]
pub fn magmax<D: AsRef<[f32]>>(deltas: &[D], n: usize, m: &mut [f32]) {
    m[..n].fill(0.0);
    for d in deltas {
        for (best, &x) in m[..n].iter_mut().zip(&d.as_ref()[..n]) {
            // A select, not a conditional store, so the loop vectorizes.
            *best = if x.abs() >= best.abs() { x } else { *best };
        }
    }
}

/// dare(τ) = τ ⊙ mask / density (or τ ⊙ mask without rescale), in place; `first` is the element
/// index of `x[0]` within its tensor, so the mask does not depend on chunking.
#[inline(always)]
pub fn dare(x: &mut [f32], stream: &Stream, first: u64, density: f64, rescale: bool) {
    let density = density as f32;
    for (i, o) in x.iter_mut().enumerate() {
        *o = dare_one(*o, stream, first + i as u64, density, rescale);
    }
}

/// [`dare`] from `src` into `out`.
#[inline(always)]
pub fn dare_into(
    src: &[f32],
    out: &mut [f32],
    stream: &Stream,
    first: u64,
    density: f64,
    rescale: bool,
) {
    let density = density as f32;
    for (i, (o, &x)) in out.iter_mut().zip(src).enumerate() {
        *o = dare_one(x, stream, first + i as u64, density, rescale);
    }
}

#[inline(always)]
fn dare_one(x: f32, stream: &Stream, index: u64, density: f32, rescale: bool) -> f32 {
    let kept = if stream.keep(index, density) {
        x
    } else {
        0.0 * x
    };
    if rescale {
        kept / density
    } else {
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_hand_case() {
        let d = vec![vec![1.0, -2.0, 3.0, 0.0], vec![2.0, 2.0, -1.0, 0.0]];
        let mut m = [0.0; 4];
        sum(&d, 4, &mut m);
        assert_eq!(m, [3.0, 0.0, 2.0, 0.0]);
        magmax(&d, 4, &mut m);
        assert_eq!(m, [2.0, 2.0, 3.0, 0.0]);
    }

    #[test]
    fn every_copy_draws_the_same_bits() {
        // The AVX-512 copy (`simd!`, where this CPU has it) and the AVX2 copy of the
        // draws' loop against the baseline copy, over odd lengths, specials and densities.
        let mut src: Vec<f32> = (0..4099)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
            .collect();
        src[..4].copy_from_slice(&[f32::NAN, f32::INFINITY, -0.0, f32::NEG_INFINITY]);
        let s = Stream::new(5, 1, "w");
        for (density, rescale) in [(0.3, true), (0.7, false), (1e-9, true), (1.0, true)] {
            for first in [0, 123, 1 << 40] {
                let mut want = vec![0.0; src.len()];
                dare_into(&src, &mut want, &s, first, density, rescale);
                let mut wide = vec![0.0; src.len()];
                crate::simd!(dare_into(&src, &mut wide, &s, first, density, rescale));
                let mut avx2 = want.clone();
                #[cfg(target_arch = "x86_64")]
                if crate::simd::wide() {
                    // SAFETY: `wide()` checked that the CPU has AVX2 and the rest.
                    unsafe {
                        crate::simd::with_avx2(|| {
                            dare_into(&src, &mut avx2, &s, first, density, rescale)
                        })
                    };
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&wide), bits(&want), "{density} {first}");
                assert_eq!(bits(&avx2), bits(&want), "{density} {first}");
            }
        }
    }

    #[test]
    fn dare_keeps_or_rescales() {
        let mut out = vec![1.0f32; 1000];
        let s = Stream::new(3, 0, "t");
        dare(&mut out, &s, 0, 0.25, true);
        assert!(out.iter().all(|&v| v == 0.0 || v == 4.0));
        let kept = out.iter().filter(|&&v| v != 0.0).count();
        assert!((150..350).contains(&kept), "{kept}");
    }
}
