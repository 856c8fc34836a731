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

/// out = base + P for one chunk. `raw` are the unmodified deltas (A*'s first members), `m` the
/// merged task vector; `first` is the element index of the chunk's start within its tensor.
/// `m_is_sum`: M equals Σ_t raw τ_t (task arithmetic), which the mean pool then reuses.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn apply(
    combine: &Combine,
    raw: &[&[f32]],
    m: &[f32],
    m_is_sum: bool,
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
                Pool::Mean => mean(deltas, lambdas, m, m_is_sum, base, out),
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
                Pool::MagMax => {
                    // Members in A* order; each later one wins ties. Task-outer selects vectorize.
                    let first_member = |i: usize| match deltas.first() {
                        Some(d) => d[i],
                        None => lambdas[0] * m[i],
                    };
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = first_member(i);
                    }
                    let skip = usize::from(deltas.is_empty());
                    for d in deltas.iter().skip(1) {
                        for (o, &x) in out.iter_mut().zip(&d[..n]) {
                            *o = if x.abs() >= o.abs() { x } else { *o };
                        }
                    }
                    for &l in &lambdas[skip..] {
                        for (o, &mi) in out.iter_mut().zip(m) {
                            let x = l * mi;
                            *o = if x.abs() >= o.abs() { x } else { *o };
                        }
                    }
                    for (o, &b) in out.iter_mut().zip(base) {
                        *o += b;
                    }
                }
            }
        }
    }
}

/// P = (Σ_t τ_t + (Σ_i λ_i)·M) / N.
#[inline(always)]
fn mean(
    deltas: &[&[f32]],
    lambdas: &[f32],
    m: &[f32],
    m_is_sum: bool,
    base: &[f32],
    out: &mut [f32],
) {
    let n = base.len();
    let lam_sum = lambdas.iter().map(|&l| l as f64).sum::<f64>() as f32;
    let members = (deltas.len() + lambdas.len()) as f32;
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
            &[10.0],
            &mut out,
            &Stream::new(0, 0, "x"),
            0,
        );
        assert_eq!(out, [12.0]);
    }
}
