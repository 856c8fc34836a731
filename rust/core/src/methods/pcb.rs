//! PCB (parameter competition balancing) as SPEC.md writes it. Each task row needs four exact
//! order statistics — the clamp bounds of |X| and of the balancing score B — gathered by the
//! pipeline's radix-select passes; everything else is per element.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats};
use super::pcb_block::{self, sign, Rows, BLOCK};
use super::{int_frac, Reader, Scope};
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
    ) -> usize {
        if st.stages.is_empty() {
            for (o, d) in out.iter_mut().zip(x.deltas) {
                for (o, &v) in o[..x.n].iter_mut().zip(d.iter()) {
                    *o = v.abs();
                }
            }
            x.n
        } else {
            let abs = clamps(st.selected(0));
            crate::simd!(scores(x.deltas, x.n, &abs, floor, out, (s.a, s.b), true))
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

/// B_t = exp(T·norm(A_t)²) · Σ_j tanh(N_t N_j) for every element of the chunk, into `b`;
/// returns how many elements each row of `b` holds.
///
/// With a `floor` (per task), an element whose every B_t is provably below its task's floor
/// gets −∞ for all of them, without its T(T+1)/2 tanh and T exp: the callers cannot tell such
/// scores apart (a windowed select counts them below its window; the output clamps them to
/// the cut, where S_t = 0). With `compact`, such elements are left out instead: the others'
/// scores are written to the front of the rows, in order (a select then counts the rest
/// without reading them). The bound is `pcb_block::settle`'s; elements past it are
/// gathered into short rows and computed exactly as without a floor, so every B_t that is
/// written has the same bits.
#[inline(always)]
pub fn scores<D: AsRef<[f32]>>(
    deltas: &[D],
    n: usize,
    abs: &[Clamp],
    floor: Option<&[f32]>,
    b: &mut [Vec<f32>],
    (signed, work): (&mut Vec<f32>, &mut Vec<f32>),
    compact: bool,
) -> usize {
    let t_count = deltas.len();
    let mut rows = Rows::new(t_count, signed, work);
    let mut kept = 0;
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let len = r.len();
        let m = pcb_block::settle(deltas, r.clone(), abs, floor, &mut rows);
        pcb_block::pack(deltas, r.clone(), m, false, &mut rows);
        pcb_block::pair_sums(t_count, len, m, &mut rows);
        for (t, bt) in b.iter_mut().enumerate() {
            let ot = &rows.out[t * len..t * len + m];
            if compact {
                // kept ≤ start: nothing unwritten is overwritten.
                bt[kept..kept + m].copy_from_slice(ot);
                continue;
            }
            let bt = &mut bt[r.clone()];
            if m == len {
                bt.copy_from_slice(ot);
            } else {
                bt.fill(f32::NEG_INFINITY);
                for (&i, &v) in rows.idx[..m].iter().zip(ot) {
                    bt[i as usize] = v;
                }
            }
        }
        kept += if compact { m } else { len };
    }
    kept
}

/// M = Σ_t S_t ⊙ Xc_t / max(Σ_t S_t, 1e-12), with S_t = norm(clamp(B_t)). The scores are
/// computed with the cuts as floors: an element whose B_t are all below their cuts (−∞) has
/// every S_t = 0, and M = 0 whatever the B_t.
///
/// Where the clamps of |X| are finite (so is every Xc_t), such an element's M is +0 (sums of
/// ±0 from +0, over 10^-12), so only the open elements are merged, from their packed rows;
/// otherwise every element is, from its scores. (That S_t is +0: an element is settled only
/// where every cut a_t is above −∞, and then clamp(−∞) = min(a_t, b_t), the low end of the
/// norm, which maps it to (a_t − a_t)/(b_t − a_t) = +0, or to 0 where b_t − a_t is not
/// positive.)
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
    if !abs.iter().all(|c| c.a.is_finite() && c.b.is_finite()) {
        scores(deltas, n, abs, Some(&cuts), b, (signed, work), false);
        for start in (0..n).step_by(BLOCK) {
            let r = start..(start + BLOCK).min(n);
            merge_rows(
                deltas.iter().map(|d| &d.as_ref()[r.clone()]),
                b.iter().map(|b| &b[r.clone()]),
                abs,
                score,
                &mut m[r.clone()],
            );
        }
        return;
    }
    let t_count = deltas.len();
    let mut rows = Rows::new(t_count, signed, work);
    for start in (0..n).step_by(BLOCK) {
        let r = start..(start + BLOCK).min(n);
        let len = r.len();
        let open = pcb_block::settle(deltas, r.clone(), abs, Some(&cuts), &mut rows);
        pcb_block::pack(deltas, r.clone(), open, true, &mut rows);
        pcb_block::pair_sums(t_count, len, open, &mut rows);
        let m = &mut m[r];
        if open == len {
            let xs = (0..t_count).map(|t| &rows.xs[t * len..(t + 1) * len]);
            let bs = (0..t_count).map(|t| &rows.out[t * len..(t + 1) * len]);
            merge_rows(xs, bs, abs, score, m);
            continue;
        }
        let mut packed = [0.0f32; BLOCK];
        let xs = (0..t_count).map(|t| &rows.xs[t * len..t * len + open]);
        let bs = (0..t_count).map(|t| &rows.out[t * len..t * len + open]);
        merge_rows(xs, bs, abs, score, &mut packed[..open]);
        m.fill(0.0);
        for (&i, &v) in rows.idx[..open].iter().zip(&packed) {
            m[i as usize] = v;
        }
    }
}

/// M of elements whose deltas and scores are the rows `xs` and `bs` (one per task), into `m`.
#[inline(always)]
fn merge_rows<'a>(
    xs: impl Iterator<Item = &'a [f32]>,
    bs: impl Iterator<Item = &'a [f32]>,
    abs: &[Clamp],
    score: &[Clamp],
    m: &mut [f32],
) {
    let mut den = [0.0f32; BLOCK];
    let den = &mut den[..m.len()];
    m.fill(0.0);
    for (((x, bt), &ca), &cb) in xs.zip(bs).zip(abs).zip(score) {
        for (((mi, di), &x), &bt) in m.iter_mut().zip(den.iter_mut()).zip(x).zip(bt) {
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
        scores(d, n, abs, floor, &mut b, (&mut signed, &mut work), false);
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
                // Left out instead (a select's rows): the same scores, in order, up front.
                let mut c = vec![vec![f32::NAN; n]; t];
                let (mut signed, mut work) = (Vec::new(), Vec::new());
                let pair = (&mut signed, &mut work);
                let kept = scores(&d, n, &abs, Some(&floor), &mut c, pair, true);
                assert_eq!(kept, n - hidden, "{name}");
                for (row, c) in got.iter().zip(&c) {
                    let open = (0..n).filter(|&i| {
                        got[0][i] != f32::NEG_INFINITY || exact[0][i] == f32::NEG_INFINITY
                    });
                    for (j, i) in open.enumerate() {
                        assert_eq!(c[j].to_bits(), row[i].to_bits(), "{name} kept {j}");
                    }
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

    /// The clamps of |X| and of B at PCB's ranks (ratio 0.05) of `d`'s own values.
    fn data_clamps(d: &[Vec<f32>]) -> (Vec<Clamp>, Vec<Clamp>) {
        let n = d[0].len();
        let abs = abs_clamps(d);
        let score = run_scores(d, &abs, None)
            .iter()
            .map(|row| Clamp {
                a: at_rank(row, int_frac(n, 0.95)),
                b: at_rank(row, n - 1),
            })
            .collect();
        (abs, score)
    }

    /// SPEC.md's M from the exact scores, element by element, against `merge`'s.
    fn check_merge(d: &[Vec<f32>], abs: &[Clamp], score: &[Clamp]) -> Vec<f32> {
        let (t, n) = (d.len(), d[0].len());
        let exact = run_scores(d, abs, None);
        let mut b = vec![Vec::new(); t];
        for v in &mut b {
            grow(v, n);
        }
        let (mut signed, mut work) = (Vec::new(), Vec::new());
        let mut m = vec![0.0; n];
        merge(d, n, abs, score, &mut b, (&mut signed, &mut work), &mut m);
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
        m
    }

    #[test]
    fn merge_with_its_cuts_as_floors_keeps_every_bit() {
        let n = 3 * BLOCK + 5;
        for (t, odd) in [(3, false), (3, true), (6, false)] {
            let d = deltas(t, n, 99 + t as u64, odd);
            let (abs, score) = data_clamps(&d);
            let m = check_merge(&d, &abs, &score);
            assert!(m.iter().filter(|v| v.to_bits() == 0).count() > n / 2);
        }
        // Clamps of |X| at +∞ for a task (given, as no data has them: its N are then all 0,
        // and its scores' cut is 0, which settles nothing): every nonzero Xc of it is ±∞ and
        // M is 0·∞ = NaN wherever its delta is nonzero, though all scores there are below
        // their cuts (the elements merged from their packed rows alone would be +0).
        let d = deltas(3, n, 5, false);
        let (mut abs, mut score) = data_clamps(&d);
        abs[1] = Clamp {
            a: f32::INFINITY,
            b: f32::INFINITY,
        };
        score[1] = Clamp { a: 1.0, b: 2.0 };
        let m = check_merge(&d, &abs, &score);
        assert!((0..n).filter(|&i| d[1][i] != 0.0).all(|i| m[i].is_nan()));
    }
}
