//! mergekit's `arcee_fusion`: keep the model's change to an element only where its importance
//! — |θ − θ_base| times the KL divergence between the softmaxes of the two rows (last dimension)
//! — reaches the tensor's dynamic threshold median + 1.5·IQR. The softmax needs each row's
//! largest value and exponential sum, the KL one more row sum, and the threshold three order
//! statistics of the importance over the tensor (mergekit samples a million elements of larger
//! tensors at random; here the quantiles are exact).
//!
//! Chunks hold whole rows where a row fits one ([`Rows::Whole`]): then each chunk finishes its
//! rows' largest values, exponential sums and KL sums alone, from the data it holds, and one
//! statistics pass gives all three (each row's values in the order the three passes added them,
//! so the same bits). A tensor whose rows come in pieces takes three passes, one per row
//! statistic. Then the quantiles (an exact select), then the output pass. The exponentials and
//! logarithms are [`super::libm`]'s: the C library's bits, in loops that vectorize.
//!
//! With `arith` (mergekit's `dtype`, bf16 or f16) every torch operation of mergekit's code is
//! rounded to that dtype as it is there: the softmaxes (computed wider, rounded once), `+ eps`,
//! the ratio, its log, each product, the KL sum, the importance and the threshold's steps; the
//! kept change `θ − θ_base` is rounded, and added to the base in f32 (mergekit's mask is f32).

use super::kernel::{ChunkIn, Found, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::libm::{expf, logf};
use super::libm_avx512::{expf_shifted, logf_in_place};
use super::mergekit::parse_arith;
use super::{Reader, Rows};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

const EPS: f32 = 1e-8;
const QUANTILES: [f32; 3] = [0.25, 0.5, 0.75];
/// Slots of the one-stage row statistics.
const ROW_SLOTS: usize = 5;
/// Whole rows whose statistics are computed side by side (their sums' chains overlap).
const BLOCK: usize = 8;

#[derive(Clone, Debug, PartialEq)]
pub struct ArceeFusion {
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

impl ArceeFusion {
    pub fn parse(r: &mut Reader) -> Result<ArceeFusion> {
        Ok(ArceeFusion {
            arith: parse_arith(r)?,
        })
    }

    /// Whether the row statistics came in one stage (chunks of whole rows): its five slots are
    /// both rows' largest values, both exponential sums, and the KL sum.
    fn one_stage(st: &TensorStats) -> bool {
        matches!(
            &st.stages[0],
            Found::Sums {
                slots: ROW_SLOTS,
                ..
            }
        )
    }

    /// Row `u`'s (largest values, exponential sums) of the model and the base.
    fn softmax_stats(st: &TensorStats, u: usize) -> ([f64; 2], [f64; 2]) {
        if Self::one_stage(st) {
            let a = st.sums(0, u);
            ([a[0], a[1]], [a[2], a[3]])
        } else {
            let (mx, sums) = (st.sums(0, u), st.sums(1, u));
            ([mx[0], mx[1]], [sums[0], sums[1]])
        }
    }

    /// Row `u`'s KL sum.
    fn kl_sum(st: &TensorStats, u: usize) -> f64 {
        if Self::one_stage(st) {
            st.sums(0, u)[4]
        } else {
            st.sums(2, u)[0]
        }
    }

    /// The stage of the quantiles.
    fn select_stage(st: &TensorStats) -> usize {
        if Self::one_stage(st) {
            1
        } else {
            3
        }
    }

    /// The largest values of the model's row `v` and the base's `b` (from −∞, NaN skipped).
    #[inline(always)]
    fn maxes(acc: [f64; 2], v: &[f32], b: &[f32]) -> [f64; 2] {
        let [mut a0, mut a1] = acc;
        for (&v, &b) in v.iter().zip(b) {
            a0 = a0.max(v as f64);
            a1 = a1.max(b as f64);
        }
        [a0, a1]
    }

    /// The exponential sums of a row's elements, added in order to `acc`.
    #[inline(always)]
    fn exp_sums(acc: [f64; 2], mx: [f64; 2], v: &[f32], b: &[f32]) -> [f64; 2] {
        let (m0, m1) = (mx[0] as f32, mx[1] as f32);
        let [mut s0, mut s1] = acc;
        for (&v, &b) in v.iter().zip(b) {
            s0 += expf(v - m0) as f64;
            s1 += expf(b - m1) as f64;
        }
        [s0, s1]
    }

    /// The KL terms of a row's elements, added in order to `acc`: p · ln(p / q) of the softmax
    /// probabilities (+ eps) of the model's row `v` and the base's `b`, given the row's largest
    /// values and exponential sums.
    #[inline(always)]
    fn kl<R: Fn(f32) -> f32 + Copy>(
        r: R,
        acc: f64,
        mx: [f64; 2],
        sums: [f64; 2],
        v: &[f32],
        b: &[f32],
    ) -> f64 {
        let (m0, m1) = (mx[0] as f32, mx[1] as f32);
        let inv = Self::inverses(sums);
        let mut kl = acc;
        for (&v, &b) in v.iter().zip(b) {
            kl += Self::kl_term(r, inv, expf(v - m0), expf(b - m1)) as f64;
        }
        kl
    }

    /// 1 / each exponential sum, in f32 (once per row, not per element).
    #[inline(always)]
    fn inverses(sums: [f64; 2]) -> [f32; 2] {
        [1.0 / sums[0] as f32, 1.0 / sums[1] as f32]
    }

    /// One element's KL term from its exponentials exp(v − max) and exp(b − max), given the
    /// row's [`Self::inverses`], with the dtype's rounding `r`.
    #[inline(always)]
    fn kl_term<R: Fn(f32) -> f32>(r: R, [s0, s1]: [f32; 2], ev: f32, eb: f32) -> f32 {
        let p = r(r(ev * s0) + EPS);
        let q = r(r(eb * s1) + EPS);
        r(p * r(logf(r(p / q))))
    }

    /// The three statistics of `K` whole rows of `n` elements each (`v`, `b` hold them one
    /// after the other): per row [both largest values, both exponential sums, the KL sum], each
    /// sum added in the row's order as the three passes add them. The exponentials and then the
    /// KL terms are computed into `ev`, `eb` first, loops that vectorize; the sums, chains of
    /// dependent f64 adds that cannot be reordered without changing bits, run `K` rows side by
    /// side so that the rows' chains overlap (one row alone waited on each add's latency).
    #[inline(always)]
    fn rows_stats<R: Fn(f32) -> f32 + Copy, const K: usize>(
        r: R,
        n: usize,
        v: &[f32],
        b: &[f32],
        ev: &mut [f32],
        eb: &mut [f32],
    ) -> [[f64; ROW_SLOTS]; K] {
        let (v, b, ev, eb) = (&v[..K * n], &b[..K * n], &mut ev[..K * n], &mut eb[..K * n]);
        let mut out = [[0.0f64; ROW_SLOTS]; K];
        for (k, o) in out.iter_mut().enumerate() {
            let row = k * n..(k + 1) * n;
            let (m0, m1) = (largest(&v[row.clone()]), largest(&b[row.clone()]));
            [o[0], o[1]] = [m0 as f64, m1 as f64];
            expf_shifted(&v[row.clone()], m0, &mut ev[row.clone()]);
            expf_shifted(&b[row.clone()], m1, &mut eb[row]);
        }
        let (mut s0, mut s1) = ([0.0f64; K], [0.0f64; K]);
        for j in 0..n {
            for k in 0..K {
                s0[k] += ev[k * n + j] as f64;
                s1[k] += eb[k * n + j] as f64;
            }
        }
        for k in 0..K {
            let inv = Self::inverses([s0[k], s1[k]]);
            let row = k * n..(k + 1) * n;
            // Each term (an f32 value) in place of the model's exponential: [`Self::kl_term`]
            // in three loops, the logarithms in one of their own (wide, where the CPU has it).
            let [i0, i1] = inv;
            for (ev, eb) in ev[row.clone()].iter_mut().zip(eb[row.clone()].iter_mut()) {
                let p = r(r(*ev * i0) + EPS);
                let q = r(r(*eb * i1) + EPS);
                (*ev, *eb) = (p, r(p / q));
            }
            logf_in_place(&mut eb[row.clone()]);
            for (ev, &ln) in ev[row.clone()].iter_mut().zip(&eb[row]) {
                *ev = r(*ev * r(ln));
            }
            [out[k][2], out[k][3]] = [s0[k], s1[k]];
        }
        let mut kl = [0.0f64; K];
        for j in 0..n {
            for k in 0..K {
                kl[k] += ev[k * n + j] as f64;
            }
        }
        for k in 0..K {
            out[k][4] = kl[k];
        }
        out
    }

    /// The importance of each element of the chunk into `out`: |θ − θ_base| (the change as
    /// mergekit holds it) times its row's KL sum, with the dtype's rounding `r`.
    #[inline(always)]
    fn importances<R: Fn(f32) -> f32 + Copy>(r: R, x: &ChunkIn, st: &TensorStats, out: &mut [f32]) {
        let (v, b) = (&x.values[0][..x.n], &x.base[..x.n]);
        for (u, span) in x.row_spans() {
            let kl = r(Self::kl_sum(st, u) as f32);
            let (v, b) = (&v[span.clone()], &b[span.clone()]);
            for ((o, &v), &b) in out[span].iter_mut().zip(v).zip(b) {
                *o = r(r(v - b).abs() * kl);
            }
        }
    }
}

impl Kernel for ArceeFusion {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit"});
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    fn inputs(&self) -> Inputs {
        Inputs::Values
    }

    fn reads_deltas(&self) -> bool {
        false
    }

    fn output(&self) -> Output {
        Output::Value
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_exactly("arcee_fusion", tasks, 1)
    }

    fn passes(&self) -> u64 {
        2
    }

    fn rows(&self) -> Rows {
        Rows::Whole
    }

    fn next_stage(&self, t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        self.next_stage_for(t, tasks, done, false)
    }

    fn next_stage_for(
        &self,
        _t: &TensorPlan,
        _tasks: usize,
        done: &TensorStats,
        whole_rows: bool,
    ) -> Option<Stage> {
        let unit = Unit::Row;
        match (done.stages.len(), whole_rows) {
            (0, true) => Some(Stage::Sums {
                unit,
                slots: ROW_SLOTS,
            }),
            (1, true) => Some(Stage::Select { rows: 1 }),
            (0, false) => Some(Stage::Maxes { unit, slots: 2 }),
            (1, false) => Some(Stage::Sums { unit, slots: 2 }),
            (2, false) => Some(Stage::Sums { unit, slots: 1 }),
            (3, false) => Some(Stage::Select { rows: 1 }),
            _ => None,
        }
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        // The rounding picked once, outside the loops (a per-element match kept them scalar).
        with_round!(self.arith, |r| crate::simd!(Self::accumulate_in(
            r, x, st, s, acc
        )))
    }

    fn score(
        &self,
        x: &ChunkIn,
        st: &TensorStats,
        _s: Scratch,
        _floor: Option<&[f32]>,
        out: &mut [Vec<f32>],
    ) -> usize {
        with_round!(self.arith, |r| crate::simd!(Self::importances(
            r,
            x,
            st,
            &mut out[0][..x.n]
        )));
        x.n
    }

    fn ranks(&self, t: &TensorPlan, _tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        let last = (t.numel - 1) as f32;
        QUANTILES.iter().map(|&q| (0, (q * last) as u64)).collect()
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        with_round!(self.arith, |r| crate::simd!(Self::merge_in(r, x, st, m)))
    }
}

impl ArceeFusion {
    /// [`Kernel::accumulate`] with the dtype's rounding `r`.
    #[inline(always)]
    fn accumulate_in<R: Fn(f32) -> f32 + Copy>(
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        let first = x.row_of(0);
        let units = x.row_of(x.n - 1) - first + 1;
        // The stage asked for (`next_stage_for`) shows in its slots per row.
        let whole = acc.len() == units * ROW_SLOTS;
        let (v, b) = (x.values[0], x.base);
        if whole && st.stages.is_empty() {
            return Self::whole_rows(r, x, s, &mut acc[..units * ROW_SLOTS]);
        }
        for (u, span) in x.row_spans() {
            let (v, b) = (&v[span.clone()], &b[span]);
            let at = u - first;
            match st.stages.len() {
                // Rows in pieces: each statistic in its own pass, carried between chunks.
                0 => {
                    let a = &mut acc[at * 2..at * 2 + 2];
                    [a[0], a[1]] = Self::maxes([a[0], a[1]], v, b);
                }
                1 => {
                    let a = &mut acc[at * 2..at * 2 + 2];
                    let mx = st.sums(0, u);
                    [a[0], a[1]] = Self::exp_sums([a[0], a[1]], [mx[0], mx[1]], v, b);
                }
                _ => {
                    let (mx, sums) = Self::softmax_stats(st, u);
                    acc[at] = Self::kl(r, acc[at], mx, sums, v, b);
                }
            }
        }
    }

    /// The one-stage statistics of a chunk of whole rows into `acc` (its rows' slots, from the
    /// first): [`Self::rows_stats`] of [`BLOCK`] rows at a time, the rest one by one. Each
    /// row's only chunk, so each sum starts at 0 (a largest value of −0 is held as +0, which
    /// leaves every v − max unchanged).
    #[inline(always)]
    fn whole_rows<R: Fn(f32) -> f32 + Copy>(r: R, x: &ChunkIn, s: Scratch, acc: &mut [f64]) {
        let (v, b) = (&x.values[0][..x.n], &x.base[..x.n]);
        let n = x.tensor.row_len().max(1);
        debug_assert!(
            x.start.is_multiple_of(n) && x.n.is_multiple_of(n),
            "chunks of whole rows"
        );
        let rows = x.n / n;
        crate::pipeline::grow(s.a, BLOCK * n);
        crate::pipeline::grow(s.b, BLOCK * n);
        let mut put = |row: usize, stats: &[f64; ROW_SLOTS]| {
            for (a, s) in acc[row * ROW_SLOTS..][..ROW_SLOTS].iter_mut().zip(stats) {
                *a += s;
            }
        };
        let mut row = 0;
        while row < rows {
            let (v, b) = (&v[row * n..], &b[row * n..]);
            if rows - row >= BLOCK {
                let stats = Self::rows_stats::<R, BLOCK>(r, n, v, b, s.a, s.b);
                for (k, st) in stats.iter().enumerate() {
                    put(row + k, st);
                }
                row += BLOCK;
            } else {
                put(row, &Self::rows_stats::<R, 1>(r, n, v, b, s.a, s.b)[0]);
                row += 1;
            }
        }
    }

    /// [`Kernel::merge`] with the dtype's rounding `r`.
    #[inline(always)]
    fn merge_in<R: Fn(f32) -> f32 + Copy>(r: R, x: &ChunkIn, st: &TensorStats, m: &mut [f32]) {
        let q = st.selected(Self::select_stage(st));
        let threshold = r(q[1] + r(1.5 * r(q[2] - q[0])));
        let m = &mut m[..x.n];
        Self::importances(r, x, st, m);
        let (v, b) = (&x.values[0][..x.n], &x.base[..x.n]);
        for ((o, &v), &b) in m.iter_mut().zip(v).zip(b) {
            let keep = f32::from(u8::from(*o >= threshold));
            *o = b + r(v - b) * keep;
        }
    }
}

/// The largest of `x` (−∞ if empty or all NaN; NaN skipped) as f64::max finds it from −∞, but
/// in 16 lanes that vectorize: the same value, but for the sign of a largest zero, which the
/// statistics' sums (started at +0) and v − max do not see.
#[inline(always)]
fn largest(x: &[f32]) -> f32 {
    let pick = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut blocks = x.chunks_exact(16);
    for block in &mut blocks {
        for (l, &v) in lanes.iter_mut().zip(block) {
            *l = pick(*l, v);
        }
    }
    let m = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| pick(m, v));
    blocks.remainder().iter().fold(m, |m, &v| pick(m, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same f64, NaN for NaN (its payload may differ), and a zero's sign ignored where the
    /// statistics hold it (their sums start at +0).
    fn same(a: f64, b: f64) -> bool {
        (0.0 + a).to_bits() == (0.0 + b).to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Rows of a simple generator's values, with the cases a row can hold: ties, zeros of both
    /// signs, a NaN, ±∞, a row of one value, a large value (exponentials that underflow). The
    /// spread of the later seeds makes the sums' terms span more than f64 holds exactly, so
    /// that their order shows in the bits.
    fn rows(n: usize, k: usize, seed: u64) -> Vec<f32> {
        let spread = [8.0f32, 60.0, 150.0][seed as usize % 3];
        let mut s = seed;
        let mut x: Vec<f32> = (0..n * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
            })
            .collect();
        let mut set = |i: usize, v: f32| {
            if let Some(e) = x.get_mut(i) {
                *e = v;
            }
        };
        set(3, 0.75);
        set(5, 0.75);
        set(n, -0.0);
        set(n + 1, 0.0);
        set(2 * n + 4, f32::NAN);
        set(3 * n + 1, f32::INFINITY);
        set(3 * n + 2, f32::NEG_INFINITY);
        set(5 * n + 7, 300.0);
        if k > 4 {
            x[4 * n..5 * n].fill(-0.0);
        }
        x
    }

    /// The one-stage statistics of rows side by side are the three passes' (each row's
    /// statistics one after the other, as a tensor whose rows come in pieces takes them), bit
    /// for bit, in f32 and in bf16 arithmetic.
    fn check<R: Fn(f32) -> f32 + Copy>(r: R) {
        for &(n, k) in &[(301usize, BLOCK), (16, BLOCK), (1, BLOCK), (257, 1), (5, 1)] {
            for seed in 0..3u64 {
                let (v, b) = (rows(n, k.max(6), seed), rows(n, k.max(6), seed + 10));
                let (mut ev, mut eb) = (vec![0.0; k * n], vec![0.0; k * n]);
                let got: Vec<[f64; ROW_SLOTS]> = match k {
                    BLOCK => {
                        ArceeFusion::rows_stats::<R, BLOCK>(r, n, &v, &b, &mut ev, &mut eb).to_vec()
                    }
                    _ => ArceeFusion::rows_stats::<R, 1>(r, n, &v, &b, &mut ev, &mut eb).to_vec(),
                };
                for (row, g) in got.iter().enumerate() {
                    let (v, b) = (&v[row * n..][..n], &b[row * n..][..n]);
                    let mx = ArceeFusion::maxes([f64::NEG_INFINITY; 2], v, b);
                    let sums = ArceeFusion::exp_sums([0.0; 2], mx, v, b);
                    let kl = ArceeFusion::kl(r, 0.0, mx, sums, v, b);
                    let want = [mx[0], mx[1], sums[0], sums[1], kl];
                    for (slot, (&g, &w)) in g.iter().zip(&want).enumerate() {
                        assert!(
                            same(g, w),
                            "n {n} row {row} seed {seed} slot {slot}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_side_by_side_give_the_three_passes_bits() {
        check(|v: f32| v);
        check(|v: f32| crate::dtype::round_to(crate::dtype::DType::BF16, v));
    }

    #[test]
    fn largest_is_f64_max_from_minus_infinity() {
        let mut x = rows(40, 6, 3);
        for len in [0usize, 1, 15, 16, 17, 33, 240] {
            let want = x[..len]
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            assert!(same(largest(&x[..len]) as f64, want), "len {len}");
        }
        x.fill(f32::NAN);
        assert_eq!(largest(&x), f32::NEG_INFINITY);
    }
}
