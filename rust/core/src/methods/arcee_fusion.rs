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
use super::mergekit::parse_arith;
use super::{Reader, Rows};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

const EPS: f32 = 1e-8;
const QUANTILES: [f32; 3] = [0.25, 0.5, 0.75];
/// Slots of the one-stage row statistics.
const ROW_SLOTS: usize = 5;

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

    /// A whole row's three statistics: [both largest values, both exponential sums, the KL
    /// sum], each added in the row's order as the three passes add them. The exponentials and
    /// then the KL terms are computed into `ev`, `eb` first, a loop that vectorizes (each sum
    /// then adds them in order, which does not); half the calls to exp.
    #[inline(always)]
    fn row_stats<R: Fn(f32) -> f32 + Copy>(
        r: R,
        v: &[f32],
        b: &[f32],
        ev: &mut [f32],
        eb: &mut [f32],
    ) -> [f64; 5] {
        let n = v.len();
        let (b, ev, eb) = (&b[..n], &mut ev[..n], &mut eb[..n]);
        let mx = Self::maxes([f64::NEG_INFINITY; 2], v, b);
        let (m0, m1) = (mx[0] as f32, mx[1] as f32);
        for (((&v, &b), ev), eb) in v.iter().zip(b).zip(ev.iter_mut()).zip(eb.iter_mut()) {
            *ev = expf(v - m0);
            *eb = expf(b - m1);
        }
        let (mut s0, mut s1) = (0.0f64, 0.0f64);
        for (&ev, &eb) in ev.iter().zip(eb.iter()) {
            s0 += ev as f64;
            s1 += eb as f64;
        }
        let inv = Self::inverses([s0, s1]);
        // Each term (an f32 value) in place of the model's exponential.
        for (ev, &eb) in ev.iter_mut().zip(eb.iter()) {
            *ev = Self::kl_term(r, inv, *ev, eb);
        }
        let mut kl = 0.0f64;
        for &term in ev.iter() {
            kl += term as f64;
        }
        [mx[0], mx[1], s0, s1, kl]
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
    ) {
        with_round!(self.arith, |r| crate::simd!(Self::importances(
            r,
            x,
            st,
            &mut out[0][..x.n]
        )))
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
        for (u, span) in x.row_spans() {
            let (v, b) = (&v[span.clone()], &b[span]);
            let at = u - first;
            match st.stages.len() {
                // Whole rows: the three statistics of each, one after the other.
                0 if whole => {
                    crate::pipeline::grow(s.a, v.len());
                    crate::pipeline::grow(s.b, v.len());
                    let (ev, eb) = (&mut s.a[..v.len()], &mut s.b[..v.len()]);
                    let stats = Self::row_stats(r, v, b, ev, eb);
                    let a = &mut acc[at * ROW_SLOTS..(at + 1) * ROW_SLOTS];
                    // The row's only chunk: each sum starts at 0 (so a largest value of
                    // −0 is held as +0, which leaves every v − max unchanged).
                    for (a, s) in a.iter_mut().zip(stats) {
                        *a += s;
                    }
                }
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
