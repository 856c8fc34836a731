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

    fn score(
        &self,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        floor: Option<&[f32]>,
        out: &mut [Vec<f32>],
    ) {
        if st.stages.is_empty() {
            for (o, d) in out.iter_mut().zip(x.deltas) {
                for (o, &v) in o[..x.n].iter_mut().zip(d.iter()) {
                    *o = v.abs();
                }
            }
        } else {
            let abs = clamps(st.selected(0));
            crate::simd!(scores(x.deltas, x.n, &abs, floor, out, s.a, s.b));
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
        crate::simd!(merge(
            x.deltas,
            x.n,
            &abs,
            &score,
            s.per_task,
            (s.a, s.b),
            m
        ));
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
///
/// With a `floor` (per task), an element whose every B_t is provably below its task's floor
/// gets −∞ for all of them, without its T(T+1)/2 tanh and T exp: the callers cannot tell such
/// scores apart (a windowed select counts them below its window; the output clamps them to
/// the cut, where S_t = 0). The proof is cheap: every |N| ≤ 1, so each product y = N_t·N_j
/// is in [−1, 1], where tanh y ≤ y for y ≥ 0 and, tanh being convex below 0, tanh y ≤
/// tanh(1)·y ≤ 0.76·y for y ≤ 0. With P_t the sum of |N_j| over the tasks of N_t's sign and
/// Q_t over the others, Σ_j tanh(N_t N_j) ≤ |N_t|·(P_t − 0.76·Q_t) =: |N_t|·V_t, so
/// B_t ≤ |N_t|·V_t·e^(T·N_t²) =: U_t, with an upper bound of the exponential where V_t > 0
/// and e^0 = 1 where V_t ≤ 0. U_t is taken with margins over the roundings (see
/// `undecided`). Elements past the test are gathered into short rows and computed exactly as
/// without a floor, so every B_t that is written has the same bits.
#[inline(always)]
pub fn scores<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    abs: &[Clamp],
    floor: Option<&[f32]>,
    b: &mut [Vec<f32>],
    signed: &mut Vec<f32>,
    work: &mut Vec<f32>,
) {
    let t_count = deltas.len();
    let tf = t_count as f32;
    // Blocks keep N (t-major), the exp factors and the block's scores in L1 across the
    // T(T+1)/2 pair loops. The scratch is grown, never shrunk: the caller's chunk-sized
    // buffers (`work` is the output buffer) are used again after this.
    grow(signed, t_count * BLOCK);
    grow(work, 2 * t_count * BLOCK + 2 * BLOCK);
    let (e, rest) = work.split_at_mut(t_count * BLOCK);
    let (sum, rest) = rest.split_at_mut(2 * BLOCK);
    let out = &mut rest[..t_count * BLOCK];
    let mut idx = [0u16; BLOCK];
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let len = r.len();
        // N_t = sign(x)·norm(A_t), and exp(T·N_t²).
        for (t, d) in deltas.iter().enumerate() {
            let c = abs[t];
            let d = &d.as_ref()[r.clone()];
            let (nt, et) = (
                &mut signed[t * len..(t + 1) * len],
                &mut e[t * len..(t + 1) * len],
            );
            for ((s, e), &x) in nt.iter_mut().zip(et.iter_mut()).zip(d) {
                *s = sign(x) * c.norm(c.clip(x.abs()));
                let na = s.abs();
                // The exponent for now; e^ of it below, where the element is computed.
                *e = tf * (na * na);
            }
        }
        // The elements to compute: all, or those some task's bound does not settle.
        let m = match floor {
            None => len,
            Some(f) => undecided(signed, e, len, f, &mut sum[..2 * len], &mut idx),
        };
        if m < len {
            // Packed in place: row t's kept elements to its first m slots (idx[k] >= k).
            for t in 0..t_count {
                let (nt, et) = (
                    &mut signed[t * len..(t + 1) * len],
                    &mut e[t * len..(t + 1) * len],
                );
                for (k, &i) in idx[..m].iter().enumerate() {
                    nt[k] = nt[i as usize];
                    et[k] = et[i as usize];
                }
            }
        }
        for t in 0..t_count {
            for z in &mut e[t * len..t * len + m] {
                *z = fastmath::exp(*z);
            }
        }
        // Row t's m elements at t·len, in `signed`, `e` and `out` alike.
        let out = &mut out[..t_count * len];
        for t in 0..t_count {
            out[t * len..t * len + m].fill(0.0);
        }
        for t in 0..t_count {
            for j in t..t_count {
                let nt = &signed[t * len..t * len + m];
                let nj = &signed[j * len..j * len + m];
                let (lo, hi) = out.split_at_mut(j * len);
                if j == t {
                    fastmath::add_tanh(nt, nt, &mut hi[..m], None);
                } else {
                    let bt = &mut lo[t * len..t * len + m];
                    fastmath::add_tanh(nt, nj, bt, Some(&mut hi[..m]));
                }
            }
        }
        for (t, bt) in b.iter_mut().enumerate() {
            let (ot, et) = (&mut out[t * len..t * len + m], &e[t * len..t * len + m]);
            for (o, &x) in ot.iter_mut().zip(et) {
                *o *= x;
            }
            let bt = &mut bt[r.clone()];
            if m == len {
                bt.copy_from_slice(ot);
            } else {
                bt.fill(f32::NEG_INFINITY);
                for (&i, &v) in idx[..m].iter().zip(ot.iter()) {
                    bt[i as usize] = v;
                }
            }
        }
    }
}

/// The elements of a block that the bound U_t < floor_t does not settle for every task, as
/// indices into `idx`; returns their count. `z` holds the exponents T·N_t², `sum` is scratch.
#[inline(always)]
fn undecided(
    signed: &[f32],
    z: &[f32],
    len: usize,
    floor: &[f32],
    sum: &mut [f32],
    idx: &mut [u16; BLOCK],
) -> usize {
    let t_count = floor.len();
    // P = Σ_j max(N_j, 0) and Q = Σ_j max(−N_j, 0): sums of non-negative terms, each within
    // T roundings of its exact value.
    let (pos, neg) = sum.split_at_mut(len);
    pos.fill(0.0);
    neg.fill(0.0);
    for t in 0..t_count {
        let row = &signed[t * len..(t + 1) * len];
        for ((p, q), &x) in pos.iter_mut().zip(neg.iter_mut()).zip(row) {
            *p += x.max(0.0);
            *q += (-x).max(0.0);
        }
    }
    // V = P_t − 0.76·Q_t is a difference, so the rounding of it, of the products N_t·N_j, of
    // the T tanh and of B_t's sum is bounded against P + Q instead: 8(T + 2) units of 2^-24
    // of it. The remaining factors are rounded a few times each, and the exponential's bound
    // is (z + 1) units low at most (z ≤ T) and `exp` 2 ulp off: (2T + 5) units of 2^-24 in
    // all, doubled, and a fixed 10^-5, cover them.
    let slack = (4 * (t_count + 2)) as f32 * f32::EPSILON;
    let margin = 1.0 + 1e-5 + (2 * t_count + 5) as f32 * f32::EPSILON;
    // 1 where every task is settled (a NaN bound settles nothing: `<` is false for it).
    let mut settled = [1u8; BLOCK];
    let settled = &mut settled[..len];
    for (t, &f) in floor.iter().enumerate() {
        let (nt, zt) = (&signed[t * len..(t + 1) * len], &z[t * len..(t + 1) * len]);
        let cells = settled
            .iter_mut()
            .zip(nt)
            .zip(zt)
            .zip(pos.iter().zip(neg.iter()));
        for (((o, &x), &z), (&p, &q)) in cells {
            let (same, other) = if x > 0.0 { (p, q) } else { (q, p) };
            let v = same - 0.76 * other + slack * (same + other);
            // B_t ≤ |N_t|·V·e^z: an upper bound of e^z where V > 0, its lower bound 1 where
            // V ≤ 0.
            let factor = if v > 0.0 {
                fastmath::exp_upper(z) * margin
            } else {
                1.0 / margin
            };
            let u = x.abs() * v * factor;
            *o &= u8::from(u < f);
        }
    }
    // The open ones' indices: a mask per 64 elements (a loop that vectorizes), its set bits
    // visited. A store per element with a count carried from one to the next (branch-free
    // compaction) took 7 % of PCB's time; open elements are a sixth of them.
    let mut m = 0;
    for (g, os) in settled.chunks(64).enumerate() {
        let mut mask = os
            .iter()
            .enumerate()
            .fold(0u64, |a, (k, &o)| a | (u64::from(o == 0) << k));
        while mask != 0 {
            idx[m] = (g * 64) as u16 + mask.trailing_zeros() as u16;
            mask &= mask - 1;
            m += 1;
        }
    }
    m
}

/// Elements per block: T rows of N, of exp factors and of scores stay in L1.
const BLOCK: usize = 1024;

/// M = Σ_t S_t ⊙ Xc_t / max(Σ_t S_t, 1e-12), with S_t = norm(clamp(B_t)). The scores are
/// computed with the cuts as floors: an element whose B_t are all below their cuts has every
/// S_t = 0, and M = 0 whatever the B_t.
#[inline(always)]
pub fn merge<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    abs: &[Clamp],
    score: &[Clamp],
    b: &mut [Vec<f32>],
    (signed, work): (&mut Vec<f32>, &mut Vec<f32>),
    m: &mut [f32],
) {
    let cuts: Vec<f32> = score.iter().map(|c| c.a).collect();
    scores(deltas, n, abs, Some(&cuts), b, signed, work);
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

    /// Deltas of `t` tasks, length `n`: mostly small, some exact zeros, a heavy tail; NaN and
    /// ±inf when `odd`.
    fn deltas(t: usize, n: usize, seed: u64, odd: bool) -> Vec<Vec<f32>> {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..t)
            .map(|_| {
                (0..n)
                    .map(|i| {
                        let u = next() - 0.5;
                        match (i % 211, i % 997) {
                            (_, 500) if odd => f32::NAN,
                            (_, 501) if odd => f32::INFINITY,
                            (_, 502) if odd => f32::NEG_INFINITY,
                            (3..=9, _) => 0.0,
                            (10, _) => -0.0,
                            (11, _) => u * 40.0,
                            _ => u * 2e-3,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Value at rank r (0-based, ascending, NaN last) of v.
    fn at_rank(v: &[f32], r: usize) -> f32 {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s[r]
    }

    fn abs_clamps(d: &[Vec<f32>]) -> Vec<Clamp> {
        let n = d[0].len();
        let (a, b) = clamp_ranks(n, ABS_CLAMP.0, ABS_CLAMP.1);
        d.iter()
            .map(|row| {
                let abs: Vec<f32> = row.iter().map(|x| x.abs()).collect();
                Clamp {
                    a: at_rank(&abs, a as usize),
                    b: at_rank(&abs, b as usize),
                }
            })
            .collect()
    }

    fn run_scores(d: &[Vec<f32>], abs: &[Clamp], floor: Option<&[f32]>) -> Vec<Vec<f32>> {
        let n = d[0].len();
        let mut b = vec![vec![0.0; n]; d.len()];
        let (mut signed, mut work) = (Vec::new(), Vec::new());
        scores(d, n, abs, floor, &mut b, &mut signed, &mut work);
        b
    }

    #[test]
    fn a_floor_at_an_elements_own_score_never_hides_it() {
        // The bound at its tightest: every task's floor is one element's exact score (positive
        // or negative, large or small), which is not below it, so that element is computed,
        // with its bits. A bound that undercut a score by one rounding would hide some.
        let n = 2 * BLOCK + 33;
        for (t, seed) in [(2, 1), (3, 2), (5, 3)] {
            let d = deltas(t, n, seed, false);
            let abs = abs_clamps(&d);
            let exact = run_scores(&d, &abs, None);
            for i in (0..n).step_by(29) {
                let floor: Vec<f32> = exact.iter().map(|row| row[i]).collect();
                let got = run_scores(&d, &abs, Some(&floor));
                for k in 0..t {
                    assert_eq!(
                        got[k][i].to_bits(),
                        exact[k][i].to_bits(),
                        "t{t} {i} task {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_floor_only_hides_scores_below_it() {
        let n = 5 * BLOCK + 77;
        for (t, odd) in [(3, false), (3, true), (1, false), (5, false), (8, true)] {
            let d = deltas(t, n, 7 + t as u64, odd);
            let abs = abs_clamps(&d);
            let exact = run_scores(&d, &abs, None);
            // Floors at the 95th and 50th percentiles of each task's scores, one task's floor
            // at −∞ or NaN (nothing hidden for it, so nothing at all), and at +∞.
            let q = |k: usize| -> Vec<f32> {
                exact.iter().map(|row| at_rank(row, n * k / 100)).collect()
            };
            let mut minus = q(95);
            minus[0] = f32::NEG_INFINITY;
            let mut nan = q(95);
            nan[t - 1] = f32::NAN;
            for (name, floor) in [
                ("q95", q(95)),
                ("q50", q(50)),
                ("-inf", minus),
                ("nan", nan),
                ("+inf", vec![f32::INFINITY; t]),
            ] {
                let got = run_scores(&d, &abs, Some(&floor));
                let mut hidden = 0;
                for i in 0..n {
                    let h = got[0][i] == f32::NEG_INFINITY && exact[0][i] != f32::NEG_INFINITY;
                    for k in 0..t {
                        if h {
                            assert_eq!(got[k][i], f32::NEG_INFINITY, "{name} t{k} {i}");
                            assert!(exact[k][i] < floor[k], "{name} t{k} {i}: {}", exact[k][i]);
                        } else {
                            assert_eq!(got[k][i].to_bits(), exact[k][i].to_bits(), "{name} {i}");
                        }
                    }
                    hidden += usize::from(h);
                }
                match name {
                    "-inf" | "nan" => assert_eq!(hidden, 0, "{name}"),
                    // The bound settles most of the elements below the cuts, and not all.
                    "q95" if t <= 3 => assert!(hidden > n / 4 && hidden < n, "{name} {hidden}"),
                    "+inf" => assert!(hidden > n / 2, "{name} {hidden}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn merge_with_its_cuts_as_floors_keeps_every_bit() {
        let n = 3 * BLOCK + 5;
        for (t, odd) in [(3, false), (3, true), (6, false)] {
            let d = deltas(t, n, 99 + t as u64, odd);
            let abs = abs_clamps(&d);
            let exact = run_scores(&d, &abs, None);
            let score: Vec<Clamp> = exact
                .iter()
                .map(|row| Clamp {
                    a: at_rank(row, int_frac(n, 0.95)),
                    b: at_rank(row, n - 1),
                })
                .collect();
            let mut b = vec![Vec::new(); t];
            for v in &mut b {
                grow(v, n);
            }
            let (mut signed, mut work) = (Vec::new(), Vec::new());
            let mut m = vec![0.0; n];
            merge(
                &d,
                n,
                &abs,
                &score,
                &mut b,
                (&mut signed, &mut work),
                &mut m,
            );
            // SPEC.md's M from the exact scores, element by element.
            for i in 0..n {
                let (mut num, mut den) = (0.0f32, 0.0f32);
                for k in 0..t {
                    let x = d[k][i];
                    let xc = sign(x) * abs[k].clip(x.abs());
                    let s = score[k].norm(score[k].clip(exact[k][i]));
                    num += s * xc;
                    den += s;
                }
                let want = num / den.max(1e-12);
                assert_eq!(
                    m[i].to_bits(),
                    want.to_bits(),
                    "t{t} {i}: {} vs {want}",
                    m[i]
                );
            }
        }
    }
}
