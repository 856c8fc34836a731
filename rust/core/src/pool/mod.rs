//! Weight Weaving's pooling over A* = [τ_1..τ_T] + [λ_1·M..λ_L·M], computed per element from the
//! deltas and M alone: A* is never built. A plain merge is the degenerate case θ_pre + λ·M.

use crate::rng::Stream;

pub mod sets;

use crate::recipe::{Combine, CustomPool};

/// How the members of A* are pooled.
#[derive(Clone, Debug, PartialEq)]
pub enum Pool {
    Mean,
    Random,
    MagMax,
    /// A function of one block of A* (the only pool that materializes A*, a block at a time).
    Custom(CustomPool),
}

impl Pool {
    pub fn parse(s: &str) -> Option<Pool> {
        match s {
            "mean" => Some(Pool::Mean),
            "random" => Some(Pool::Random),
            "magmax" => Some(Pool::MagMax),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Pool::Mean => "mean",
            Pool::Random => "random",
            Pool::MagMax => "magmax",
            Pool::Custom(_) => "function",
        }
    }
}

/// Σ λ of the given points, summed in f64 once per run, not per chunk (Λ may hold a million).
pub fn lam_sum(lams: impl Iterator<Item = f32>) -> f32 {
    lams.map(|l| l as f64).sum::<f64>() as f32
}

/// out = base + P for one chunk of a recipe with one parameter set and a built-in pool. `raw`
/// are the deltas (A*'s first members), `m` the merged task vector, `lambdas` the points' λ in
/// order; `first` is the element index of the chunk's start within its tensor. `m_is_sum`: M
/// equals Σ_t τ_t (task arithmetic), which the mean pool then reuses. `lam_sum` is Σ λ. Every
/// pool is O(1) per element in |Λ| when Λ is increasing.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn apply(
    combine: &Combine,
    lambdas: &[f32],
    raw: &[&[f32]],
    m: &[f32],
    m_is_sum: bool,
    lam_sum: f32,
    base: &[f32],
    out: &mut [f32],
    rng: &Stream,
    first: u64,
) {
    let n = base.len();
    let (m, out) = (&m[..n], &mut out[..n]);
    debug_assert!(!matches!(combine, Combine::Weave { .. }) || !lambdas.is_empty());
    match combine {
        Combine::Merge { lam } => {
            for i in 0..n {
                out[i] = base[i] + lam * m[i];
            }
        }
        Combine::Weave {
            pool,
            include_deltas,
            ..
        } => {
            let deltas: &[&[f32]] = if *include_deltas { raw } else { &[] };
            match pool {
                Pool::Mean => mean(deltas, lambdas.len(), lam_sum, m, m_is_sum, base, out),
                Pool::Custom(_) => unreachable!("a function pool goes through sets::Weaver"),
                Pool::Random => {
                    let members = (deltas.len() + lambdas.len()) as u64;
                    for i in 0..n {
                        let k = rng.pick(first + i as u64, members);
                        let p = match deltas.get(k) {
                            Some(d) => d[i],
                            None => lambdas[k - deltas.len()] * m[i],
                        };
                        out[i] = base[i] + p;
                    }
                }
                Pool::MagMax if increasing(lambdas) => magmax(deltas, lambdas, m, base, out),
                Pool::MagMax => {
                    for i in 0..n {
                        let mut best = f32::NAN;
                        for d in deltas {
                            best = later_if_not_smaller(best, d[i]);
                        }
                        for &l in lambdas {
                            best = later_if_not_smaller(best, l * m[i]);
                        }
                        out[i] = base[i] + best;
                    }
                }
            }
        }
    }
}

/// Whether the λ strictly increase (the closed-form magmax needs it).
pub fn increasing(lambdas: &[f32]) -> bool {
    lambdas.windows(2).all(|w| w[0] < w[1])
}

/// MagMax's step over members in A* order: the later member wins ties (NaN: none yet).
#[inline(always)]
pub(crate) fn later_if_not_smaller(best: f32, x: f32) -> f32 {
    if best.is_nan() || x.abs() >= best.abs() {
        x
    } else {
        best
    }
}

/// The member of A* of largest magnitude, the later one on ties (A* order: deltas, then
/// λ_1·M < … < λ_L·M). Over the scaled merges, |fl(λ·m)| is monotone in |λ| (rounding is
/// monotone), so the winner is λ_L·m or, when |λ_1·m| is strictly larger, the last λ whose
/// product rounds to the same magnitude as λ_1's: λ_1 itself unless neighbouring λ tie.
#[inline(always)]
fn magmax(deltas: &[&[f32]], lambdas: &[f32], m: &[f32], base: &[f32], out: &mut [f32]) {
    let n = base.len();
    let (lo, hi) = (lambdas[0], lambdas[lambdas.len() - 1]);
    let second = lambdas.get(1).copied().unwrap_or(hi);
    // Deltas first, task-outer so the selects vectorize.
    if let Some(d0) = deltas.first() {
        out.copy_from_slice(&d0[..n]);
        for d in &deltas[1..] {
            for (o, &x) in out.iter_mut().zip(&d[..n]) {
                *o = if x.abs() >= o.abs() { x } else { *o };
            }
        }
    }
    let has_deltas = !deltas.is_empty();
    for i in 0..n {
        let (a, b) = (hi * m[i], lo * m[i]);
        let mut x = if a.abs() >= b.abs() { a } else { b };
        if a.abs() < b.abs() && (second * m[i]).abs() == b.abs() {
            x = last_tie(lambdas, m[i], b.abs());
        }
        let o = if has_deltas && out[i].abs() > x.abs() {
            out[i]
        } else {
            x
        };
        out[i] = base[i] + o;
    }
}

/// The winner of λ_k·m over an increasing Λ and its index k (the later one on ties).
#[inline(always)]
pub(crate) fn best_scaled(lambdas: &[f32], m: f32) -> (f32, usize) {
    let last = lambdas.len() - 1;
    let (a, b) = (lambdas[last] * m, lambdas[0] * m);
    if a.abs() >= b.abs() {
        return (a, last);
    }
    let second = lambdas.get(1).copied().unwrap_or(lambdas[last]);
    if (second * m).abs() == b.abs() {
        let k = last_tie_index(lambdas, m, b.abs());
        return (lambdas[k] * m, k);
    }
    (b, 0)
}

/// The product λ_k·m of the last k with |λ_k·m| = `top` (= |λ_1·m|, the maximum): the
/// magnitudes fall and then rise along Λ, and stay below `top` on the rising side, so the
/// indices reaching `top` are a prefix, found by bisection.
#[cold]
fn last_tie(lambdas: &[f32], m: f32, top: f32) -> f32 {
    lambdas[last_tie_index(lambdas, m, top)] * m
}

#[cold]
fn last_tie_index(lambdas: &[f32], m: f32, top: f32) -> usize {
    let (mut lo, mut hi) = (0, lambdas.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if (lambdas[mid] * m).abs() == top {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// P = (Σ_t τ_t + (Σ_i λ_i)·M) / N.
#[inline(always)]
fn mean(
    deltas: &[&[f32]],
    lambdas: usize,
    lam_sum: f32,
    m: &[f32],
    m_is_sum: bool,
    base: &[f32],
    out: &mut [f32],
) {
    let n = base.len();
    let members = (deltas.len() + lambdas) as f32;
    if deltas.is_empty() {
        for i in 0..n {
            out[i] = base[i] + (lam_sum * m[i]) / members;
        }
        return;
    }
    if m_is_sum {
        for i in 0..n {
            out[i] = base[i] + (m[i] + lam_sum * m[i]) / members;
        }
        return;
    }
    out.fill(0.0);
    for d in deltas {
        for i in 0..n {
            out[i] += d[i];
        }
    }
    for i in 0..n {
        out[i] = base[i] + (out[i] + lam_sum * m[i]) / members;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weave(pool: Pool) -> Combine {
        Combine::Weave {
            points: Vec::new(),
            pool,
            include_deltas: true,
        }
    }

    #[test]
    fn spec_hand_case_mean() {
        let raw = [[1.0, -2.0, 3.0, 0.0], [2.0, 2.0, -1.0, 0.0]];
        let m = [3.0, 0.0, 2.0, 0.0];
        let mut out = [0.0; 4];
        let c = weave(Pool::Mean);
        let raw: Vec<&[f32]> = raw.iter().map(|v| &v[..]).collect();
        apply(
            &c,
            &[0.5, 1.0],
            &raw,
            &m,
            false,
            1.5,
            &[0.0; 4],
            &mut out,
            &Stream::new(0, 0, "x"),
            0,
        );
        assert_eq!(out, [1.875, 0.0, 1.25, 0.0]);
    }

    #[test]
    fn magmax_pool_prefers_later_on_ties() {
        // Members: τ = [−2], 1.0·M = [2]: equal magnitude → the later (2).
        let c = weave(Pool::MagMax);
        let mut out = [0.0];
        apply(
            &c,
            &[1.0],
            &[&[-2.0][..]],
            &[2.0],
            false,
            1.0,
            &[10.0],
            &mut out,
            &Stream::new(0, 0, "x"),
            0,
        );
        assert_eq!(out, [12.0]);
    }

    /// The member-by-member definition, for comparison with the O(1) pool.
    fn magmax_by_definition(deltas: &[f32], lambdas: &[f32], m: f32) -> f32 {
        let members = deltas.iter().copied().chain(lambdas.iter().map(|&l| l * m));
        members.fold(f32::NAN, |o, x| {
            if o.is_nan() || x.abs() >= o.abs() {
                x
            } else {
                o
            }
        })
    }

    #[test]
    fn magmax_pool_matches_the_definition() {
        let lambda_sets: [&[f32]; 6] = [
            &[0.1, 0.5, 1.0],
            &[-2.0, -1.0, 0.5, 1.0],
            &[-1.0, 1.0],
            &[-1.0, -0.99999994, -0.9999999, 0.5],
            &[-3.0],
            &[-1.5, -1.0, -0.5],
        ];
        let ms = [0.0f32, -0.0, 1.0, -2.5, 1e-45, -3e-45, 7e-39, 1e30];
        let delta_sets: [&[f32]; 4] = [&[], &[0.5], &[-3.0, 3.0], &[0.0, -0.0]];
        for lambdas in lambda_sets {
            for &m in &ms {
                for deltas in delta_sets {
                    let c = weave(Pool::MagMax);
                    let raw: Vec<[f32; 1]> = deltas.iter().map(|&d| [d]).collect();
                    let raw: Vec<&[f32]> = raw.iter().map(|d| &d[..]).collect();
                    let mut out = [0.0];
                    let s = Stream::new(0, 0, "x");
                    let sum = lam_sum(lambdas.iter().copied());
                    apply(&c, lambdas, &raw, &[m], false, sum, &[0.0], &mut out, &s, 0);
                    let (v, _) = best_scaled(lambdas, m);
                    let w = magmax_by_definition(&[], lambdas, m);
                    assert_eq!(v.to_bits(), w.to_bits(), "{lambdas:?} m={m}");
                    let want = magmax_by_definition(deltas, lambdas, m);
                    assert_eq!(
                        out[0].to_bits(),
                        (0.0 + want).to_bits(),
                        "{lambdas:?} m={m} deltas={deltas:?}"
                    );
                }
            }
        }
    }
}
