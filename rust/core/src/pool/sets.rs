//! Pooling over a search space with several parameter sets, or with a user's function. A* is
//! `[deltas] + [λ_p·M(set_p) for p in S]`: the pipeline computes each set's M in turn, and each
//! built-in pool folds it in at once (a running sum, a running (magnitude, position) maximum, or
//! the values of the members the random draws picked), so memory stays O(chunk) whatever |S|.
//! Only a function pool fills a block of A*, a chunk wide.

use super::{best_scaled, Pool};
use crate::error::Result;
use crate::recipe::Point;
use crate::rng::Stream;

/// The points of one parameter set, in A* order.
#[derive(Clone, Debug, Default)]
pub struct SetPoints {
    /// Index of each point in the search space.
    pub index: Vec<u32>,
    pub lams: Vec<f32>,
    pub lam_sum: f32,
    /// λ strictly increase, so MagMax's closed form applies.
    pub increasing: bool,
}

impl SetPoints {
    /// Groups the points by set.
    pub fn of(points: &[Point], sets: usize) -> Vec<SetPoints> {
        let mut out = vec![SetPoints::default(); sets];
        for (i, p) in points.iter().enumerate() {
            out[p.set].index.push(i as u32);
            out[p.set].lams.push(p.lam);
        }
        for s in &mut out {
            s.lam_sum = super::lam_sum(s.lams.iter().copied());
            s.increasing = super::increasing(&s.lams);
        }
        out
    }
}

/// Chunk-sized buffers of a weaving in progress.
pub struct Buffers<'w> {
    pub acc: &'w mut [f32],
    pub pos: &'w mut [u32],
    pub picks: &'w mut [u64],
    /// Rows × n, for a function pool.
    pub astar: &'w mut Vec<f32>,
}

/// One chunk's pooling over several sets.
pub struct Weaving<'w> {
    pool: &'w Pool,
    points: &'w [Point],
    /// Deltas in A* (T, or 0 without include_deltas).
    lead: usize,
    n: usize,
    b: Buffers<'w>,
}

impl<'w> Weaving<'w> {
    /// Starts with A*'s deltas. `rng` and `first` key the random pool's draws.
    pub fn start(
        pool: &'w Pool,
        points: &'w [Point],
        deltas: &[&[f32]],
        n: usize,
        b: Buffers<'w>,
        (rng, first): (&Stream, u64),
    ) -> Weaving<'w> {
        let lead = deltas.len();
        let members = (lead + points.len()) as u64;
        let w = Weaving {
            pool,
            points,
            lead,
            n,
            b,
        };
        let (acc, pos) = (&mut w.b.acc[..n], &mut w.b.pos[..n]);
        match pool {
            Pool::Mean => acc.fill(0.0),
            Pool::MagMax => {
                acc.fill(f32::NAN);
                pos.fill(0);
                for (t, d) in deltas.iter().enumerate() {
                    for ((a, p), &x) in acc.iter_mut().zip(pos.iter_mut()).zip(&d[..n]) {
                        if a.is_nan() || x.abs() >= a.abs() {
                            *a = x;
                            *p = t as u32;
                        }
                    }
                }
            }
            Pool::Random => {
                for (i, (k, a)) in w.b.picks[..n].iter_mut().zip(acc.iter_mut()).enumerate() {
                    let pick = rng.pick(first + i as u64, members);
                    *k = pick as u64;
                    if let Some(d) = deltas.get(pick) {
                        *a = d[i];
                    }
                }
            }
            Pool::Custom(_) => {
                let rows = lead + points.len();
                if w.b.astar.len() < rows * n {
                    w.b.astar.resize(rows * n, 0.0);
                }
                for (t, d) in deltas.iter().enumerate() {
                    w.b.astar[t * n..(t + 1) * n].copy_from_slice(&d[..n]);
                }
            }
        }
        w
    }

    /// Folds in the members λ_p·M of one set.
    pub fn add(&mut self, set: usize, s: &SetPoints, m: &[f32]) {
        let n = self.n;
        let (m, acc, pos) = (&m[..n], &mut self.b.acc[..n], &mut self.b.pos[..n]);
        match self.pool {
            Pool::Mean => {
                for (a, &x) in acc.iter_mut().zip(m) {
                    *a += s.lam_sum * x;
                }
            }
            Pool::MagMax => {
                let lead = self.lead as u32;
                for ((a, p), &x) in acc.iter_mut().zip(pos.iter_mut()).zip(m) {
                    let (v, k) = if s.increasing {
                        let (v, k) = best_scaled(&s.lams, x);
                        (v, s.index[k])
                    } else {
                        let mut best = (f32::NAN, 0);
                        for (&l, &k) in s.lams.iter().zip(&s.index) {
                            let v = l * x;
                            if best.0.is_nan() || v.abs() >= best.0.abs() {
                                best = (v, k);
                            }
                        }
                        best
                    };
                    let k = lead + k;
                    let wins = a.is_nan() || v.abs() > a.abs() || (v.abs() == a.abs() && k > *p);
                    if wins {
                        *a = v;
                        *p = k;
                    }
                }
            }
            Pool::Random => {
                for ((a, &k), &x) in acc.iter_mut().zip(&self.b.picks[..n]).zip(m) {
                    if let Some(p) = (k as usize).checked_sub(self.lead) {
                        let point = &self.points[p];
                        if point.set == set {
                            *a = point.lam * x;
                        }
                    }
                }
            }
            Pool::Custom(_) => {
                for (&k, &l) in s.index.iter().zip(&s.lams) {
                    let row = self.lead + k as usize;
                    for (o, &x) in self.b.astar[row * n..(row + 1) * n].iter_mut().zip(m) {
                        *o = l * x;
                    }
                }
            }
        }
    }

    /// out = base + P. `deltas` are A*'s deltas again (the mean adds them last).
    pub fn finish(
        self,
        deltas: &[&[f32]],
        base: &[f32],
        out: &mut [f32],
        tensor: &str,
    ) -> Result<()> {
        let n = self.n;
        let (acc, out, base) = (&self.b.acc[..n], &mut out[..n], &base[..n]);
        match self.pool {
            Pool::Mean => {
                let members = (self.lead + self.points.len()) as f32;
                out.fill(0.0);
                for d in deltas {
                    for (o, &x) in out.iter_mut().zip(&d[..n]) {
                        *o += x;
                    }
                }
                for ((o, &a), &b) in out.iter_mut().zip(acc).zip(base) {
                    *o = b + (*o + a) / members;
                }
            }
            Pool::MagMax | Pool::Random => {
                for ((o, &a), &b) in out.iter_mut().zip(acc).zip(base) {
                    *o = b + a;
                }
            }
            Pool::Custom(f) => {
                let rows = self.lead + self.points.len();
                (f.0)(&self.b.astar[..rows * n], rows, n, tensor, out)?;
                for (o, &b) in out.iter_mut().zip(base) {
                    *o += b;
                }
            }
        }
        Ok(())
    }
}
