//! PCB (parameter competition balancing) as SPEC.md writes it. Each task row needs four exact
//! order statistics — the clamp bounds of |X| and of the balancing score B — gathered by the
//! pipeline's radix-select passes; everything else is per element.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats};
use super::{fastmath, int_frac, Reader, Scope};
use crate::error::Result;
use crate::pipeline::grow;
use crate::plan::TensorPlan;

/// PCB over the whole model: a select of |τ_t|'s clamps, then one of the balancing scores'.
#[derive(Debug)]
pub struct Pcb {
    pub ratio: f64,
}

impl Pcb {
    pub fn parse(r: &mut Reader) -> Result<Pcb> {
        Ok(Pcb {
            ratio: r.num("ratio", 0.05, 0.0, 1.0, true)?,
        })
    }
}

/// The clamps of a select's values: two per task, in task order.
fn clamps(v: &[f32]) -> Vec<Clamp> {
    v.chunks(2).map(|p| Clamp { a: p[0], b: p[1] }).collect()
}

impl Kernel for Pcb {
    fn name(&self) -> &'static str {
        "pcb"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"ratio": self.ratio})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn scope(&self) -> Scope {
        Scope::Global
    }

    fn passes(&self) -> u64 {
        2
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        (done.stages.len() < 2 && tasks > 0).then_some(Stage::Select { rows: tasks })
    }

    /// Both selects' rows depend on the deltas alone (the ratio only picks ranks of the
    /// second), so every ratio of a search shares them.
    fn select_key(&self, done: &TensorStats) -> String {
        format!("pcb {}", done.stages.len())
    }

    fn ranks(&self, t: &TensorPlan, tasks: usize, done: &TensorStats) -> Vec<(usize, u64)> {
        let d = t.numel;
        let (a, b) = match done.stages.len() {
            0 => clamp_ranks(d, ABS_CLAMP.0, ABS_CLAMP.1),
            _ => (
                int_frac(d, 1.0 - self.ratio).min(d - 1) as u64,
                d as u64 - 1,
            ),
        };
        (0..tasks).flat_map(|k| [(k, a), (k, b)]).collect()
    }

    fn score(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, out: &mut [Vec<f32>]) {
        if st.stages.is_empty() {
            for (o, d) in out.iter_mut().zip(x.deltas) {
                for (o, &v) in o[..x.n].iter_mut().zip(d.iter()) {
                    *o = v.abs();
                }
            }
        } else {
            let abs = clamps(st.selected(0));
            crate::simd!(scores(x.deltas, x.n, &abs, out, s.a));
        }
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        let (abs, score) = (clamps(st.selected(0)), clamps(st.selected(1)));
        s.per_task.resize_with(x.tasks(), Vec::new);
        for b in s.per_task.iter_mut() {
            grow(b, x.n);
        }
        // The kernel is reached through the trait, out of line: its loops need their own AVX2
        // copy (`simd!`).
        crate::simd!(merge(x.deltas, x.n, &abs, &score, s.per_task, s.a, m));
    }
}

/// clamp(x, lo, hi) followed by norm(): SPEC's a = sorted[int(d·lo)], b = sorted[int(d·(1−hi)−1)].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    pub a: f32,
    pub b: f32,
}

impl Clamp {
    #[inline]
    pub fn clip(&self, x: f32) -> f32 {
        x.max(self.a).min(self.b)
    }

    /// (clipped − min)/(max − min) over the clipped row, whose min is min(a, b) and max is b;
    /// 0 where the row is flat.
    #[inline]
    pub fn norm(&self, clipped: f32) -> f32 {
        let lo = self.a.min(self.b);
        let den = self.b - lo;
        if den > 0.0 {
            (clipped - lo) / den
        } else {
            0.0
        }
    }
}

/// The clamp ranks (0-based, ascending) of a row of length d.
pub fn clamp_ranks(d: usize, lo: f64, hi: f64) -> (u64, u64) {
    let a = int_frac(d, lo).min(d - 1);
    let b = (d as f64 * (1.0 - hi) - 1.0).max(0.0) as usize;
    (a as u64, b.min(d - 1) as u64)
}

/// |X| is clamped at the 1st and 99th percentiles.
pub const ABS_CLAMP: (f64, f64) = (0.01, 0.01);

/// torch.sign, branch-free: data signs are random, so a branch would mispredict half the time.
#[inline]
fn sign(x: f32) -> f32 {
    f32::from(u8::from(x > 0.0)) - f32::from(u8::from(x < 0.0))
}

/// B_t = exp(T·norm(A_t)²) · Σ_j tanh(N_t N_j) for every element of the chunk, into `b`.
/// Each symmetric pair tanh(N_t N_j) is evaluated once and added to both sums, which still
/// accumulate in ascending j like the reference.
#[inline(always)]
pub fn scores<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    abs: &[Clamp],
    b: &mut [Vec<f32>],
    signed: &mut Vec<f32>,
) {
    let t_count = deltas.len();
    let tf = t_count as f32;
    // Blocks keep N (t-major) and the block's scores in L1 across the T(T+1)/2 pair loops.
    signed.resize(t_count * BLOCK, 0.0);
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let len = r.len();
        // N_t = sign(x)·norm(A_t).
        for (t, d) in deltas.iter().enumerate() {
            let c = abs[t];
            let d = &d.as_ref()[r.clone()];
            for (s, &x) in signed[t * len..(t + 1) * len].iter_mut().zip(d) {
                *s = sign(x) * c.norm(c.clip(x.abs()));
            }
        }
        for bt in b.iter_mut() {
            bt[r.clone()].fill(0.0);
        }
        for t in 0..t_count {
            for j in t..t_count {
                let (nt, nj) = (
                    &signed[t * len..(t + 1) * len],
                    &signed[j * len..(j + 1) * len],
                );
                if j == t {
                    fastmath::add_tanh(nt, nt, &mut b[t][r.clone()], None);
                } else {
                    let (lo, hi) = b.split_at_mut(j);
                    let (bt, bj) = (&mut lo[t][r.clone()], &mut hi[0][r.clone()]);
                    fastmath::add_tanh(nt, nj, bt, Some(bj));
                }
            }
        }
        for t in 0..t_count {
            let nt = &signed[t * len..(t + 1) * len];
            for (out, &x) in b[t][r.clone()].iter_mut().zip(nt) {
                let na = x.abs();
                *out *= fastmath::exp(tf * (na * na));
            }
        }
    }
}

/// Elements per block: T rows of N plus T rows of scores stay in L1.
const BLOCK: usize = 1024;

/// M = Σ_t S_t ⊙ Xc_t / max(Σ_t S_t, 1e-12), with S_t = norm(clamp(B_t)).
#[inline(always)]
pub fn merge<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    abs: &[Clamp],
    score: &[Clamp],
    b: &mut [Vec<f32>],
    signed: &mut Vec<f32>,
    m: &mut [f32],
) {
    scores(deltas, n, abs, b, signed);
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let mut den = [0.0f32; BLOCK];
        let (m, den) = (&mut m[r.clone()], &mut den[..r.len()]);
        m.fill(0.0);
        for (t, d) in deltas.iter().enumerate() {
            let (ca, cb) = (abs[t], score[t]);
            for (((mi, di), &x), &bt) in m
                .iter_mut()
                .zip(den.iter_mut())
                .zip(&d.as_ref()[r.clone()])
                .zip(&b[t][r.clone()])
            {
                let xc = sign(x) * ca.clip(x.abs());
                let s = cb.norm(cb.clip(bt));
                *mi += s * xc;
                *di += s;
            }
        }
        for (v, &d) in m.iter_mut().zip(den.iter()) {
            *v /= d.max(1e-12);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_ranks_follow_python_int() {
        assert_eq!(clamp_ranks(1000, 0.01, 0.01), (10, 989));
        assert_eq!(clamp_ranks(1, 0.01, 0.01), (0, 0));
        assert_eq!(clamp_ranks(100, 0.95, 0.0), (95, 99));
    }

    #[test]
    fn flat_row_normalizes_to_zero() {
        let c = Clamp { a: 2.0, b: 2.0 };
        assert_eq!(c.norm(c.clip(5.0)), 0.0);
    }
}
