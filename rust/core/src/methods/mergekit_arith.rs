//! mergekit's `merge_group` for the generalized task arithmetic family (`task_arithmetic`,
//! `ties`, `dare_*`, `breadcrumbs*`) under a bf16/f16 `dtype`: every torch operation rounded to
//! that dtype, as mergekit computes. Published configs are mostly bf16 checkpoints under
//! `dtype: bfloat16`, so this is the path most mergekit recipes take.
//!
//! Written as whole-chunk loops, task by task, with the per-element choices as selects, so that
//! the wide copies (`simd!`) vectorize them; each element still sees the same operations in the
//! same order as an element-at-a-time loop over the models (`tests::same_bits_as_per_element`
//! checks it against one).

use super::kernel::ChunkIn;
use super::mergekit::{Gta, Sparsify};
use crate::dtype::{bf16_bits, DType};

/// M of one chunk (the merged values, into `m`) from the sparsified deltas in `per_task` (their
/// contents unread without sparsification), whose kept elements are recomputed here from the
/// values, rounded as loading in `d` rounds them (from the deltas where the values are left
/// out, stored in `d`: `Kernel::values_from_deltas`):
/// the weights in `d`, each product rounded, sums over the models accumulated in f32 in model
/// order and rounded once (torch's reduction), the divisor likewise, then ÷, λ and
/// `base + mixed_delta` each rounded. `sums` and `div` are chunk-sized scratch.
pub(super) fn mix_in(
    g: &Gta,
    d: DType,
    x: &ChunkIn,
    (per_task, factors): (&mut [Vec<f32>], &[Option<f32>]),
    m: &mut [f32],
    (sums, div): (&mut [f32], &mut [f32]),
) {
    match d {
        DType::BF16 => crate::simd!(mix_with(g, round_bf16, x, per_task, factors, m, sums, div)),
        _ => mix_with(
            g,
            |v| crate::dtype::round_to(d, v),
            x,
            per_task,
            factors,
            m,
            sums,
            div,
        ),
    }
}

/// `v` rounded to bf16 (nearest even) and back.
#[inline(always)]
fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(v)) << 16)
}

/// Elements a block of [`mix_with`] takes through every step: its buffers (the models'
/// values and deltas, the base, the sums) then stay in cache from one step to the next, where
/// whole chunks (1 MiB per buffer) went through memory at every step: 41 % of mergekit's TIES
/// on bf16 was these loops, waiting on loads.
const BLOCK: usize = 2048;

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mix_with(
    g: &Gta,
    r: impl Fn(f32) -> f32 + Copy,
    x: &ChunkIn,
    per_task: &mut [Vec<f32>],
    factors: &[Option<f32>],
    m: &mut [f32],
    sums: &mut [f32],
    div: &mut [f32],
) {
    let weights: Vec<f32> = x.weights.iter().map(|&w| r(w)).collect();
    // Without values (`Kernel::values_from_deltas`) each difference r(θ_t) − r(θ_base) is the
    // delta itself; a loop of each kind, so neither carries a test per element.
    if x.values.is_empty() {
        let from = |d: f32, _b: f32| d;
        for lo in (0..x.n).step_by(BLOCK) {
            let at = lo..(lo + BLOCK).min(x.n);
            let src = (x.deltas, from);
            mix_block(g, r, x, src, per_task, factors, &weights, m, sums, div, at);
        }
    } else {
        let from = |v: f32, b: f32| r(v) - r(b);
        for lo in (0..x.n).step_by(BLOCK) {
            let at = lo..(lo + BLOCK).min(x.n);
            let src = (x.values, from);
            mix_block(g, r, x, src, per_task, factors, &weights, m, sums, div, at);
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mix_block(
    g: &Gta,
    r: impl Fn(f32) -> f32 + Copy,
    x: &ChunkIn,
    (src, from): (&[&[f32]], impl Fn(f32, f32) -> f32 + Copy),
    per_task: &mut [Vec<f32>],
    factors: &[Option<f32>],
    weights: &[f32],
    m: &mut [f32],
    sums: &mut [f32],
    div: &mut [f32],
    at: std::ops::Range<usize>,
) {
    let (m, sums, div) = (
        &mut m[at.clone()],
        &mut sums[at.clone()],
        &mut div[at.clone()],
    );
    let base = &x.base[at.clone()];
    // Each model's weighted delta y: a kept element's delta recomputed from the rounded values
    // (and rescaled, rounded), then times its weight, rounded; added to the models' sum in
    // model order, and kept in `per_task` when the sign consensus needs it again. Without
    // sparsification every element is kept: its f32 delta is zero only where the values are
    // equal, and the delta recomputed from them is then the same zero.
    // The sums start at 0 in the first model's loop (`0 + y`, as adding into zeros), not in a
    // memset of their own: the fills were 5 % of mergekit's TIES on bf16.
    if per_task.is_empty() {
        sums.fill(0.0);
    }
    let all_kept = g.sparsify == Sparsify::None;
    for (k, o) in per_task.iter_mut().enumerate() {
        let (o, vals, w) = (&mut o[at.clone()], &src[k][at.clone()], weights[k]);
        let lanes = o.iter_mut().zip(vals).zip(base).zip(sums.iter_mut());
        let add = |s: &mut f32, y: f32| *s = if k == 0 { 0.0 } else { *s } + y;
        match (all_kept, g.consensus, factors[k]) {
            (true, false, None) => {
                for (((_, &v), &b), s) in lanes {
                    add(s, r(r(from(v, b)) * w));
                }
            }
            (true, true, None) => {
                for (((o, &v), &b), s) in lanes {
                    let y = r(r(from(v, b)) * w);
                    *o = y;
                    add(s, y);
                }
            }
            (_, _, Some(f)) => {
                for (((o, &v), &b), s) in lanes {
                    let kept = r(r(from(v, b)) * f);
                    let y = r(if *o != 0.0 { kept } else { *o } * w);
                    *o = y;
                    add(s, y);
                }
            }
            (false, _, None) => {
                for (((o, &v), &b), s) in lanes {
                    let kept = r(from(v, b));
                    let y = r(if *o != 0.0 { kept } else { *o } * w);
                    *o = y;
                    add(s, y);
                }
            }
        }
    }
    let per_task = &*per_task;
    if !g.consensus {
        let total = r(weights.iter().fold(0.0f32, |s, &w| s + w));
        let total = if total.abs() < 1e-8 { 1.0 } else { total };
        finish(g, r, (m, sums, base), |_, s| (r(s), total));
    } else {
        // The models whose delta has the majority's sign (+ where the sum is ≥ 0; a zero has
        // no sign and is never counted): their deltas' sum in `m`, their weights' in `div`.
        if per_task.is_empty() {
            m.fill(0.0);
            div.fill(0.0);
        }
        for (k, (o, &w)) in per_task.iter().zip(weights).enumerate() {
            let lanes = m.iter_mut().zip(div.iter_mut()).zip(sums.iter());
            for (((s, q), &sum), &y) in lanes.zip(&o[at.clone()]) {
                let keep = if sum >= 0.0 { y > 0.0 } else { y < 0.0 };
                // From 0 in the first model's loop, as the sums.
                let (from_s, from_q) = if k == 0 { (0.0, 0.0) } else { (*s, *q) };
                *s = if keep { from_s + y } else { from_s };
                *q = if keep { from_q + w } else { from_q };
            }
        }
        finish(g, r, (m, div, base), |s, q| {
            let q = r(q);
            (r(s), if q == 0.0 { 1.0 } else { q })
        });
    }
}

/// θ_base + λ·M as mergekit rounds it, into `m`: M from each element's value in `m` and in
/// `other` (`mixed` gives its rounded sum over the models and the divisor), ÷ where
/// normalizing, × λ, + the base, each rounded. One loop for all of it (the mix and the base's
/// addition were two, each reading and writing M), and one per case of `normalize` and λ = 1,
/// so that neither is a test per element.
#[inline(always)]
fn finish(
    g: &Gta,
    r: impl Fn(f32) -> f32 + Copy,
    (m, other, base): (&mut [f32], &[f32], &[f32]),
    mixed: impl Fn(f32, f32) -> (f32, f32) + Copy,
) {
    let lambda = g.lambda;
    match (g.normalize, lambda != 1.0) {
        (true, true) => each_into(m, other, base, |v, o, b| {
            let (x, d) = mixed(v, o);
            r(r(b) + r(r(x / d) * lambda))
        }),
        (true, false) => each_into(m, other, base, |v, o, b| {
            let (x, d) = mixed(v, o);
            r(r(b) + r(x / d))
        }),
        (false, true) => each_into(
            m,
            other,
            base,
            |v, o, b| r(r(b) + r(mixed(v, o).0 * lambda)),
        ),
        (false, false) => each_into(m, other, base, |v, o, b| r(r(b) + mixed(v, o).0)),
    }
}

/// `m[i] = f(m[i], other[i], base[i])` for every element.
#[inline(always)]
fn each_into(m: &mut [f32], other: &[f32], base: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for ((v, &o), &b) in m.iter_mut().zip(other).zip(base) {
        *v = f(*v, o, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::round_to;

    /// The element-at-a-time loop this file replaced, kept as the reference: per element, the
    /// models in order.
    fn per_element(
        g: &Gta,
        d: DType,
        (values, base, weights): (&[Vec<f32>], &[f32], &[f32]),
        (per_task, factors): (&mut [Vec<f32>], &[Option<f32>]),
        m: &mut [f32],
    ) {
        let n = base.len();
        let r = |v: f32| round_to(d, v);
        let weights: Vec<f32> = weights.iter().map(|&w| r(w)).collect();
        for (k, o) in per_task.iter_mut().enumerate() {
            for ((o, &v), &b) in o[..n].iter_mut().zip(&values[k][..n]).zip(base) {
                if *o != 0.0 {
                    let kept = r(r(v) - r(b));
                    *o = factors[k].map_or(kept, |f| r(kept * f));
                }
                *o = r(*o * weights[k]);
            }
        }
        let total = r(weights.iter().fold(0.0f32, |s, &w| s + w));
        for (i, v) in m.iter_mut().enumerate() {
            let sum = per_task.iter().fold(0.0f32, |s, o| s + o[i]);
            if !g.consensus {
                let mixed = r(sum);
                let div = if total.abs() < 1e-8 { 1.0 } else { total };
                *v = if g.normalize { r(mixed / div) } else { mixed };
                continue;
            }
            let maj = if sum >= 0.0 { 1.0 } else { -1.0 };
            let (mut s, mut q) = (0.0f32, 0.0f32);
            for (o, &w) in per_task.iter().zip(&weights) {
                let y = o[i];
                let sign = if y > 0.0 {
                    1.0
                } else if y < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                if sign == maj {
                    s += y;
                    q += w;
                }
            }
            let (mixed, div) = (r(s), r(q));
            let div = if div == 0.0 { 1.0 } else { div };
            *v = if g.normalize { r(mixed / div) } else { mixed };
        }
        for (v, &b) in m.iter_mut().zip(base) {
            let mixed = if g.lambda != 1.0 {
                r(*v * g.lambda)
            } else {
                *v
            };
            *v = r(r(b) + mixed);
        }
    }

    /// A xorshift64 stream from `seed`.
    fn xorshift(mut rng: u64) -> impl FnMut() -> u64 {
        move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        }
    }

    /// The reference's M and `mix_in`'s for the same inputs: `sparse` the sparsified deltas,
    /// `chunk_deltas` what the chunk carries as its deltas, and the values given to the kernel
    /// only `with_values` (else it takes their differences from `chunk_deltas`).
    #[allow(clippy::too_many_arguments)]
    fn reference_and_kernel(
        g: &Gta,
        d: DType,
        (values, base, weights): (&[Vec<f32>], &[f32], &[f32]),
        sparse: &[Vec<f32>],
        factors: &[Option<f32>],
        chunk_deltas: &[Vec<f32>],
        with_values: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = base.len();
        let mut want = vec![0.0; n];
        let mut pt = sparse.to_vec();
        per_element(g, d, (values, base, weights), (&mut pt, factors), &mut want);
        let deltas: Vec<&[f32]> = chunk_deltas.iter().map(|v| &v[..]).collect();
        let vals: Vec<&[f32]> = values.iter().map(|v| &v[..]).collect();
        let plan = crate::plan::TensorPlan::vector("t", n);
        let x = ChunkIn {
            tensor: &plan,
            start: 0,
            n,
            base,
            deltas: &deltas,
            values: if with_values { &vals } else { &[] },
            weights,
            given: None,
            seed: 0,
        };
        // Scratch holding garbage: nothing may depend on what it held.
        let (mut got, mut a, mut b) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let mut pt = sparse.to_vec();
        mix_in(g, d, &x, (&mut pt, factors), &mut got, (&mut a, &mut b));
        (want, got)
    }

    #[test]
    fn same_bits_as_per_element() {
        // Over two blocks and a part: every block boundary meets the same operations.
        let n = 2 * BLOCK + 613;
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15u64);
        for name in ["task_arithmetic", "ties", "dare_linear", "breadcrumbs_ties"] {
            for d in [DType::BF16, DType::F16] {
                for (lambda, weights) in [(1.0, [1.0, 0.6, 0.3]), (0.7, [0.5, -0.5, 0.0])] {
                    let mut g = Gta::named(name).unwrap();
                    g.lambda = lambda;
                    // Values on a coarse grid, so that equal values, zero deltas, sums that
                    // cancel and ties in sign all occur; a NaN and infinities too.
                    let mut val = |_| ((next() % 41) as f32 - 20.0) * 0.013;
                    let base: Vec<f32> = (0..n).map(&mut val).collect();
                    let mut values: Vec<Vec<f32>> =
                        (0..3).map(|_| (0..n).map(&mut val).collect()).collect();
                    values[1][5] = f32::NAN;
                    values[2][9] = f32::INFINITY;
                    values[0][11] = f32::NEG_INFINITY;
                    // Sparsified deltas: the delta, or zero where dropped (and rescaled).
                    let drops = g.sparsify != Sparsify::None;
                    let sparse: Vec<Vec<f32>> = values
                        .iter()
                        .map(|v| {
                            v.iter()
                                .zip(&base)
                                .map(|(&v, &b)| {
                                    if drops && next().is_multiple_of(3) {
                                        0.0
                                    } else {
                                        v - b
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let factors = if drops {
                        [Some(1.7f32), None, Some(0.4)]
                    } else {
                        [None; 3]
                    };
                    let (want, got) = reference_and_kernel(
                        &g,
                        d,
                        (&values, &base, &weights),
                        &sparse,
                        &factors,
                        &sparse,
                        true,
                    );
                    for i in 0..n {
                        assert!(
                            got[i].to_bits() == want[i].to_bits()
                                || (got[i].is_nan() && want[i].is_nan()),
                            "{name} {d:?} λ {lambda} element {i}: {} vs {}",
                            got[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }

    /// Values stored in the arithmetic's dtype left out (`Kernel::values_from_deltas`): the
    /// kernel reads the f32 deltas θ_t − θ_base the load formed, and gives the bits the
    /// element-at-a-time reference gives from the values, over sparsified methods, both dtypes
    /// and values whose differences need rounding (wide and narrow magnitudes together).
    #[test]
    fn deltas_stand_in_for_values_stored_in_the_dtype() {
        let n = BLOCK + 777;
        let mut next = xorshift(0x2545_F491_4F6C_DD1Du64);
        for name in ["ties", "dare_ties", "breadcrumbs_ties", "dare_linear"] {
            for d in [DType::BF16, DType::F16] {
                let mut g = Gta::named(name).unwrap();
                g.lambda = 0.9;
                let r = |v: f32| round_to(d, v);
                let mut val = |_| {
                    let u = (next() % 2001) as f32 / 1000.0 - 1.0;
                    r(if next().is_multiple_of(4) {
                        u * 37.0
                    } else {
                        u * 0.02
                    })
                };
                let base: Vec<f32> = (0..n).map(&mut val).collect();
                let values: Vec<Vec<f32>> =
                    (0..3).map(|_| (0..n).map(&mut val).collect()).collect();
                let deltas: Vec<Vec<f32>> = values
                    .iter()
                    .map(|v| v.iter().zip(&base).map(|(&v, &b)| v - b).collect())
                    .collect();
                let sparse: Vec<Vec<f32>> = deltas
                    .iter()
                    .map(|v| {
                        v.iter()
                            .map(|&x| if next().is_multiple_of(3) { 0.0 } else { x })
                            .collect()
                    })
                    .collect();
                let factors = [Some(1.7f32), None, Some(0.4)];
                let weights = [0.8, 0.45, 1.1];
                let (want, got) = reference_and_kernel(
                    &g,
                    d,
                    (&values, &base, &weights),
                    &sparse,
                    &factors,
                    &deltas,
                    false,
                );
                let differ = (0..n).filter(|&i| got[i].to_bits() != want[i].to_bits());
                assert_eq!(differ.count(), 0, "{name} {d:?}");
                // Some deltas need their rounding: the case is not the identity's.
                assert!(deltas.iter().flatten().any(|&x| r(x) != x), "{name} {d:?}");
            }
        }
    }
}
