//! Weight Weaving's pooling over A* = [τ_1..τ_T] + [λ_1·M..λ_L·M], computed per element from the
//! deltas and M alone: A* is never built. A plain merge is the degenerate case θ_pre + λ·M.

use crate::rng::Stream;

/// How the members of A* are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Mean,
    Random,
    MagMax,
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

    pub fn name(self) -> &'static str {
        match self {
            Pool::Mean => "mean",
            Pool::Random => "random",
            Pool::MagMax => "magmax",
        }
    }
}

/// What is done with M.
#[derive(Clone, Debug, PartialEq)]
pub enum Combine {
    /// θ_pre + λ·M.
    Merge { lam: f32 },
    /// θ_pre + pool(A*).
    Weave {
        lambdas: Vec<f32>,
        pool: Pool,
        include_deltas: bool,
    },
}

impl Combine {
    /// |A*| (1 for a plain merge).
    pub fn members(&self, tasks: usize) -> usize {
        match self {
            Combine::Merge { .. } => 1,
            Combine::Weave {
                lambdas,
                include_deltas,
                ..
            } => lambdas.len() + if *include_deltas { tasks } else { 0 },
        }
    }

    pub fn is_random(&self) -> bool {
        matches!(
            self,
            Combine::Weave {
                pool: Pool::Random,
                ..
            }
        )
    }
}

impl Combine {
    /// Σ_i λ_i (summed in f64 once per run, not per chunk: Λ may hold a million values).
    pub fn lam_sum(&self) -> f32 {
        match self {
            Combine::Merge { lam } => *lam,
            Combine::Weave { lambdas, .. } => lambdas.iter().map(|&l| l as f64).sum::<f64>() as f32,
        }
    }
}

/// out = base + P for one chunk. `raw` are the unmodified deltas (A*'s first members), `m` the
/// merged task vector; `first` is the element index of the chunk's start within its tensor.
/// `m_is_sum`: M equals Σ_t raw τ_t (task arithmetic), which the mean pool then reuses.
/// `lam_sum` is [`Combine::lam_sum`]. Every pool is O(1) per element in |Λ|.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn apply(
    combine: &Combine,
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
    match combine {
        Combine::Merge { lam } => {
            for i in 0..n {
                out[i] = base[i] + lam * m[i];
            }
        }
        Combine::Weave {
            lambdas,
            pool,
            include_deltas,
        } => {
            let deltas: &[&[f32]] = if *include_deltas { raw } else { &[] };
            match pool {
                Pool::Mean => mean(deltas, lambdas.len(), lam_sum, m, m_is_sum, base, out),
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
                Pool::MagMax => magmax(deltas, lambdas, m, base, out),
            }
        }
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

/// The product λ_k·m of the last k with |λ_k·m| = `top` (= |λ_1·m|, the maximum): the
/// magnitudes fall and then rise along Λ, and stay below `top` on the rising side, so the
/// indices reaching `top` are a prefix, found by bisection.
#[cold]
fn last_tie(lambdas: &[f32], m: f32, top: f32) -> f32 {
    let (mut lo, mut hi) = (0, lambdas.len());
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if (lambdas[mid] * m).abs() == top {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lambdas[lo] * m
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

    #[test]
    fn spec_hand_case_mean() {
        let raw = [[1.0, -2.0, 3.0, 0.0], [2.0, 2.0, -1.0, 0.0]];
        let m = [3.0, 0.0, 2.0, 0.0];
        let mut out = [0.0; 4];
        let c = Combine::Weave {
            lambdas: vec![0.5, 1.0],
            pool: Pool::Mean,
            include_deltas: true,
        };
        let raw: Vec<&[f32]> = raw.iter().map(|v| &v[..]).collect();
        apply(
            &c,
            &raw,
            &m,
            false,
            c.lam_sum(),
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
        let c = Combine::Weave {
            lambdas: vec![1.0],
            pool: Pool::MagMax,
            include_deltas: true,
        };
        let mut out = [0.0];
        apply(
            &c,
            &[&[-2.0][..]],
            &[2.0],
            false,
            c.lam_sum(),
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
                    let c = Combine::Weave {
                        lambdas: lambdas.to_vec(),
                        pool: Pool::MagMax,
                        include_deltas: true,
                    };
                    let raw: Vec<[f32; 1]> = deltas.iter().map(|&d| [d]).collect();
                    let raw: Vec<&[f32]> = raw.iter().map(|d| &d[..]).collect();
                    let mut out = [0.0];
                    let s = Stream::new(0, 0, "x");
                    apply(&c, &raw, &[m], false, c.lam_sum(), &[0.0], &mut out, &s, 0);
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
