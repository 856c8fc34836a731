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
    let (below, scale) = dare_terms(density, rescale);
    let z = stream.counter(first);
    match scale {
        Scale::One => dare_loop(x, z, below, |v| v),
        Scale::Mul(r) => dare_loop(x, z, below, |v| v * r),
        Scale::Div(d) => dare_loop(x, z, below, |v| v / d),
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
    let (below, scale) = dare_terms(density, rescale);
    let z = stream.counter(first);
    match scale {
        Scale::One => dare_loop_into(src, out, z, below, |v| v),
        Scale::Mul(r) => dare_loop_into(src, out, z, below, |v| v * r),
        Scale::Div(d) => dare_loop_into(src, out, z, below, |v| v / d),
    }
}

/// How the kept values are rescaled.
#[derive(Clone, Copy)]
enum Scale {
    One,
    /// By 1/density where that is a power of two: x·(1/d) and x/d round the same real number,
    /// so the bits are the division's, for a multiply (the default density 0.5 is one).
    Mul(f32),
    Div(f32),
}

/// The integer keep threshold ([`crate::rng::keep_below`]) and the rescale of one call.
fn dare_terms(density: f64, rescale: bool) -> (u64, Scale) {
    let d = density as f32;
    let scale = if !rescale {
        Scale::One
    } else if d.is_normal() && d > 0.0 && d.to_bits() & 0x007F_FFFF == 0 {
        // d = 2^e, a normal f32: 1/d = 2^-e is an f32 too (exactly).
        Scale::Mul(1.0 / d)
    } else {
        Scale::Div(d)
    };
    (crate::rng::keep_below(d), scale)
}

/// One element of the draws' loops: the counter is carried (one add per element,
/// [`Stream::draw_at`]) and the keep test is an integer compare, so an element costs two 64-bit
/// multiplies (three, two conversions to f32 and a float multiply before).
#[inline(always)]
fn dare_one(x: f32, z: &mut u64, below: u64, scale: &impl Fn(f32) -> f32) -> f32 {
    let (draw, next) = Stream::draw_at(*z);
    *z = next;
    // A dropped element is 0·x: −0 for a negative delta and NaN for an infinite one, as the
    // mask's product in the reference.
    scale(if draw >> 40 < below { x } else { 0.0 * x })
}

#[inline(always)]
fn dare_loop(x: &mut [f32], mut z: u64, below: u64, scale: impl Fn(f32) -> f32) {
    for o in x.iter_mut() {
        *o = dare_one(*o, &mut z, below, &scale);
    }
}

#[inline(always)]
fn dare_loop_into(
    src: &[f32],
    out: &mut [f32],
    mut z: u64,
    below: u64,
    scale: impl Fn(f32) -> f32,
) {
    for (o, &x) in out.iter_mut().zip(src) {
        *o = dare_one(x, &mut z, below, &scale);
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
    fn dare_is_its_definition() {
        // Element by element as SPEC and `Stream::keep` define it: kept x / density, dropped
        // 0·x; densities a power of two (the multiply) or not (the division), subnormal and
        // rescaled or not, over values whose quotients round (and overflow, and are NaN).
        let mut src: Vec<f32> = (0..3001u32)
            .map(|i| {
                f32::from_bits(0x3F80_0000u32.wrapping_add(i.wrapping_mul(2_654_435)) ^ (i << 31))
            })
            .collect();
        src[..6].copy_from_slice(&[f32::NAN, f32::INFINITY, -0.0, f32::MAX, -1e-40, 3e38]);
        let s = Stream::new(11, 2, "layer.w");
        let tiny = f32::from_bits(1);
        // A density equal to one element's unit draw: that element is dropped (unit < d fails).
        let at = |first: u64| (s.draw(first + 5) >> 40) as f64 / 16_777_216.0;
        for first in [0u64, 77, 1 << 33] {
            for density in [
                0.5,
                0.25,
                1.0,
                0.3,
                0.53,
                0.1,
                2f64.powi(-20),
                tiny as f64,
                at(first),
            ] {
                for rescale in [true, false] {
                    let d = density as f32;
                    let want: Vec<u32> = (0..src.len())
                        .map(|i| {
                            let x = src[i];
                            let kept = if s.keep(first + i as u64, d) {
                                x
                            } else {
                                0.0 * x
                            };
                            (if rescale { kept / d } else { kept }).to_bits()
                        })
                        .collect();
                    let mut into = vec![0.0; src.len()];
                    crate::simd!(dare_into(&src, &mut into, &s, first, density, rescale));
                    let mut inplace = src.clone();
                    dare(&mut inplace, &s, first, density, rescale);
                    for (got, name) in [(into, "into"), (inplace, "in place")] {
                        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{name} {density:e} {rescale} {first}");
                    }
                }
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
