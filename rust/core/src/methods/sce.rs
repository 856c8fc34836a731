//! mergekit's `sce` (Select, Calculate, Erase; Wan et al. 2024), per tensor: keep the elements
//! whose variance across the fine-tunes is in the top `select_topk` fraction of the nonzero
//! variances (ties at the cut by position), weight each task by its mean squared (selected)
//! delta over the sum of those, erase deltas against TIES's majority sign, and take the
//! weighted mean of the rest. Stages: the nonzero count and the cut (an exact select ranked
//! from the top of the nonzero variances, counted in the same pass: `top_of_nonzero`), the
//! ties at the cut before each chunk with the weights' sums of squares if every tie is kept
//! (the usual case: the cut's value is one element's), and only when more elements tie at the
//! cut than the selection has room for, the weights in a pass of their own.
//!
//! With `arith` (mergekit's `dtype`, bf16 or f16) every torch operation of mergekit's code is
//! rounded to that dtype as it is there: each delta, the variance, each square and its mean,
//! the weights' sum and each weight, each product; the sums over tasks (the sign vote, the
//! weighted sum, the divisor) accumulate in f32 in task order and are rounded once.

use super::kernel::{ChunkIn, Kernel, Scratch, Stage, TensorStats, Unit};
use super::mergekit::{parse_arith, round_opt};
use super::{reduce, Reader};
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct Sce {
    pub select_topk: f64,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

/// Stage indices when the selection is on.
const NONZERO: usize = 0;
const CUT: usize = 1;
const TIES: usize = 2;
const WEIGHTS: usize = 3;

impl Sce {
    pub fn parse(r: &mut Reader) -> Result<Sce> {
        r.flag("int8_mask", false)?;
        Ok(Sce {
            select_topk: r.num("select_topk", 1.0, f64::MIN, f64::MAX, false)?,
            arith: parse_arith(r)?,
        })
    }

    #[inline(always)]
    fn r(&self, v: f32) -> f32 {
        round_opt(self.arith, v)
    }

    fn selects(&self) -> bool {
        self.select_topk < 1.0
    }

    /// The variance across tasks of every element of the chunk, into `out`, as torch's CPU
    /// `var(unbiased=False)` has it: Welford's update in f64, rounded to f32 (equal deltas give
    /// exactly 0). Task by task over the chunk, so that it vectorizes.
    #[inline(always)]
    fn var_into<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        wide: &mut Vec<f64>,
        out: &mut [f32],
    ) {
        let n = x.n;
        if wide.len() < 2 * n {
            wide.resize(2 * n, 0.0);
        }
        let (mean, m2) = wide[..2 * n].split_at_mut(n);
        // The first update from zero, written out: μ = 0 + v (so −0 becomes +0, as there),
        // M2 = +0 (v·(v − μ) is ±0, and 0 + ±0 is +0). It replaces zeroing the buffers and a
        // division per element.
        let Some((first, rest)) = x.deltas.split_first() else {
            mean.fill(0.0);
            m2.fill(0.0);
            return self.finish(r, x, m2, out);
        };
        for ((mu, q), &v) in mean.iter_mut().zip(m2.iter_mut()).zip(first.iter()) {
            *mu = 0.0 + r(v) as f64;
            *q = 0.0;
        }
        for (t, d) in rest.iter().enumerate() {
            let k = (t + 2) as f64;
            for ((mu, q), &v) in mean.iter_mut().zip(m2.iter_mut()).zip(d.iter()) {
                let v = r(v) as f64;
                let delta = v - *mu;
                *mu += delta / k;
                *q += delta * (v - *mu);
            }
        }
        self.finish(r, x, m2, out);
    }

    /// The variance from M2: M2 / T, rounded to f32 and to the arithmetic's dtype.
    #[inline(always)]
    fn finish<R: Fn(f32) -> f32>(&self, r: R, x: &ChunkIn, m2: &[f64], out: &mut [f32]) {
        let tasks = x.tasks() as f64;
        for (o, &q) in out.iter_mut().zip(m2.iter()) {
            *o = r((q / tasks) as f32);
        }
    }

    /// Whether the selection keeps nothing at all (M is then 0).
    fn keeps_nothing(&self, st: &TensorStats) -> bool {
        self.selects() && (self.select_topk <= 0.0 || self.k(st) == 0)
    }

    /// k = int(nonzero · select_topk) in f32, as mergekit computes it.
    fn k(&self, st: &TensorStats) -> u64 {
        let nonzero = st.sums(NONZERO, 0)[0] as f32;
        (nonzero * self.select_topk as f32) as u64
    }

    /// The selection mask of one chunk into `mask` (1 or 0), given the cut and the ties before.
    #[inline(always)]
    fn mask<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        wide: &mut Vec<f64>,
        mask: &mut [f32],
    ) {
        if !self.selects() {
            mask.fill(1.0);
            return;
        }
        let k = self.k(st);
        if self.select_topk <= 0.0 || k == 0 {
            mask.fill(0.0);
            return;
        }
        let cut = st.selected(CUT)[0];
        let total = st.sums(TIES, 0);
        // Of the elements equal to the cut, the first k − (# above) by position are kept.
        let room = k as f64 - total[0];
        let mut equal_before = st.before(TIES, x.start)[1];
        self.var_into(r, x, wide, mask);
        let equal = mask.iter().filter(|&&v| v == cut).count() as f64;
        if equal == 0.0 || equal_before >= room {
            // No tie at the cut here, or no room left for one (nearly every chunk; in a bf16
            // dtype, whose variances tie often, the chunks after the room is used up): no
            // count to carry, so the loop vectorizes.
            mask.iter_mut()
                .for_each(|o| *o = if *o > cut { 1.0 } else { 0.0 });
            return;
        }
        if equal_before + equal <= room {
            // Room for every tie here (the chunks before the room is used up).
            mask.iter_mut()
                .for_each(|o| *o = if *o >= cut { 1.0 } else { 0.0 });
            return;
        }
        for o in mask.iter_mut() {
            let v = *o;
            *o = if v > cut {
                1.0
            } else if v == cut && equal_before < room {
                equal_before += 1.0;
                1.0
            } else {
                if v == cut {
                    equal_before += 1.0;
                }
                0.0
            };
        }
    }

    /// Each task's weight from its summed squares: mean / Σ means (1/T when Σ < 1e-6), the
    /// means, their sum and each quotient rounded as the arithmetic rounds them.
    fn weights(&self, squares: &[f64], numel: f32) -> Vec<f32> {
        let tasks = squares.len();
        let means: Vec<f32> = match self.arith {
            // torch's mean in bf16/f16: the sum reduced wider, ÷ n, rounded once.
            Some(_) => squares
                .iter()
                .map(|&q| self.r((q / numel as f64) as f32))
                .collect(),
            None => squares.iter().map(|&q| q as f32 / numel).collect(),
        };
        let total = self.r(means.iter().fold(0.0f32, |a, &b| a + b));
        if (total as f64).abs() < 1e-6 {
            vec![self.r(1.0 / tasks as f32); tasks]
        } else {
            means.iter().map(|&w| self.r(w / total)).collect()
        }
    }

    /// Each task's Σ (mask·τ_t)²: from the ties stage when every tie is kept, else from the
    /// weights' own stage (or the only stage, without a selection).
    fn squares<'a>(&self, st: &'a TensorStats) -> &'a [f64] {
        match (self.selects(), st.stages.len()) {
            (false, _) => st.sums(0, 0),
            (true, 3) => &st.sums(TIES, 0)[2..],
            _ => st.sums(WEIGHTS, 0),
        }
    }

    /// Whether every element tied at the cut is kept (k − #above ≥ #equal).
    fn keeps_every_tie(&self, st: &TensorStats) -> bool {
        let total = st.sums(TIES, 0);
        total[1] <= self.k(st) as f64 - total[0]
    }

    /// Σ (mask·τ_t)² of the chunk into `acc[t]`, as mergekit squares the masked deltas. The
    /// rounded squares go through `sq` first: rounded inside the f64 sum, the loop stayed
    /// scalar (the bf16 statistics passes took 2–7× the f32 ones).
    #[inline(always)]
    fn add_squares<R: Fn(f32) -> f32 + Copy>(
        r: R,
        x: &ChunkIn,
        mask: &[f32],
        sq: &mut Vec<f32>,
        acc: &mut [f64],
    ) {
        let n = x.n;
        crate::pipeline::grow(sq, n);
        let (sq, mask) = (&mut sq[..n], &mask[..n]);
        for (t, d) in x.deltas.iter().enumerate() {
            for ((o, &v), &k) in sq.iter_mut().zip(&d[..n]).zip(mask) {
                let y = r(v) * k;
                *o = r(y * y);
            }
            let sq: &[f32] = sq;
            acc[t] += reduce::sum(n, |i| sq[i] as f64);
        }
    }
}

impl Kernel for Sce {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "sce"
    }

    fn params_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"compat": "mergekit", "select_topk": self.select_topk});
        if let Some(d) = self.arith {
            v["arith"] = serde_json::json!(d.name());
        }
        v
    }

    /// Statistics passes: the weights' sums; with a selection, the nonzero count with the cut,
    /// then the ties at the cut with the sums (none when nothing can be kept).
    fn passes(&self) -> u64 {
        match (self.selects(), self.select_topk <= 0.0) {
            (false, _) => 1,
            (true, true) => 0,
            (true, false) => 2,
        }
    }

    fn next_stage(&self, _t: &TensorPlan, tasks: usize, done: &TensorStats) -> Option<Stage> {
        let sums = |slots| {
            Some(Stage::Sums {
                unit: Unit::Tensor,
                slots,
            })
        };
        match (self.selects(), done.stages.len()) {
            (false, 0) => sums(tasks),
            // Nothing can be kept: no statistic is needed.
            (true, 0) if self.select_topk <= 0.0 => None,
            // The nonzero count and the cut, in one pass (`top_of_nonzero`): two stages.
            (true, 0) => Some(Stage::Select { rows: 1 }),
            (true, 2) if self.keeps_nothing(done) => None,
            (true, 2) => sums(2 + tasks),
            (true, 3) if self.keeps_every_tie(done) => None,
            (true, 3) => sums(tasks),
            _ => None,
        }
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, acc: &mut [f64]) {
        // The rounding picked once, outside the loops (a per-element match kept them scalar).
        with_round!(self.arith, |r| crate::simd!(
            self.accumulate_in(r, x, st, s, acc)
        ))
    }

    fn score(
        &self,
        x: &ChunkIn,
        _st: &TensorStats,
        s: Scratch,
        _floor: Option<&[f32]>,
        out: &mut [Vec<f32>],
    ) -> usize {
        with_round!(self.arith, |r| crate::simd!({
            let out = &mut out[0][..x.n];
            self.var_into(r, x, s.wide, out);
            out.iter_mut().for_each(|v| *v = v.abs());
        }));
        x.n
    }

    fn top_of_nonzero(&self, st: &TensorStats) -> Option<f32> {
        (self.selects() && st.stages.is_empty()).then_some(self.select_topk as f32)
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, s: Scratch, m: &mut [f32]) {
        with_round!(self.arith, |r| crate::simd!(self.merge_in(r, x, st, s, m)))
    }
}

impl Sce {
    /// M of one chunk (see [`Kernel::merge`]), with the dtype's rounding `r`.
    #[inline(always)]
    fn merge_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        m: &mut [f32],
    ) {
        if self.keeps_nothing(st) {
            m.fill(0.0);
            return;
        }
        let numel = x.tensor.numel as f32;
        let squares = self.squares(st);
        let weights = self.weights(squares, numel);
        crate::pipeline::grow(s.a, x.n);
        let mask = &mut s.a[..x.n];
        self.mask(r, x, st, s.wide, mask);
        let floor = r(1e-6);
        let n = x.n;
        // Task by task over the chunk (each element's sums still add the tasks in order,
        // from 0, as the per-element folds did), so that every loop vectorizes.
        let mask: &[f32] = mask;
        // The majority sign of the masked deltas' sum, into `m`.
        m.fill(0.0);
        for d in x.deltas {
            for ((o, &k), &y) in m.iter_mut().zip(mask).zip(&d[..n]) {
                *o += r(y) * k;
            }
        }
        m.iter_mut()
            .for_each(|o| *o = if r(*o) >= 0.0 { 1.0 } else { -1.0 });
        crate::pipeline::grow(s.b, n);
        if s.per_task.is_empty() {
            s.per_task.push(Vec::new());
        }
        crate::pipeline::grow(&mut s.per_task[0], n);
        let (div, merged) = (&mut s.b[..n], &mut s.per_task[0][..n]);
        div.fill(0.0);
        merged.fill(0.0);
        for (d, &w) in x.deltas.iter().zip(&weights) {
            for ((((me, dv), &majority), &k), &y) in merged
                .iter_mut()
                .zip(div.iter_mut())
                .zip(m.iter())
                .zip(mask)
                .zip(&d[..n])
            {
                let v = r(y) * k;
                let sign = f32::from(u8::from(v > 0.0)) - f32::from(u8::from(v < 0.0));
                let ew = w * f32::from(u8::from(sign == majority));
                *me += r(v * ew);
                *dv += ew;
            }
        }
        for ((o, &me), &dv) in m.iter_mut().zip(merged.iter()).zip(div.iter()) {
            *o = r(r(me) / r(dv).max(floor));
        }
    }

    /// The statistics of a chunk (see [`Kernel::accumulate`]).
    #[inline(always)]
    fn accumulate_in<R: Fn(f32) -> f32 + Copy>(
        &self,
        r: R,
        x: &ChunkIn,
        st: &TensorStats,
        s: Scratch,
        acc: &mut [f64],
    ) {
        let stage = st.stages.len();
        crate::pipeline::grow(s.a, x.n);
        let buf = &mut s.a[..x.n];
        if self.selects() && stage == NONZERO {
            self.var_into(r, x, s.wide, buf);
            acc[0] += buf.iter().filter(|&&v| v != 0.0).count() as f64;
            return;
        }
        if stage == TIES && self.selects() {
            let cut = st.selected(CUT)[0];
            self.var_into(r, x, s.wide, buf);
            acc[0] += buf.iter().filter(|&&v| v > cut).count() as f64;
            acc[1] += buf.iter().filter(|&&v| v == cut).count() as f64;
            // The weights' sums as if every tie were kept: the mask `mask` gives then (used
            // only when the counts show it is so).
            buf.iter_mut()
                .for_each(|v| *v = if *v >= cut { 1.0 } else { 0.0 });
            return Self::add_squares(r, x, buf, s.b, &mut acc[2..]);
        }
        // The weights: Σ (mask·τ_t)² per task.
        self.mask(r, x, st, s.wide, buf);
        Self::add_squares(r, x, buf, s.b, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variance equals Welford's update written literally from zero (every task, the
    /// first too), bit for bit: signed zeros, equal deltas, spread and extreme values, one to
    /// five tasks, f32 and bf16 arithmetic, and a scratch buffer left dirty by a longer chunk.
    #[test]
    fn var_is_welford_from_zero() {
        let mut seed = 5u64;
        let mut next = || {
            seed = crate::rng::mix(seed.wrapping_add(0x9E37_79B9_7F4A_7C15));
            seed
        };
        let n = 67;
        for tasks in 1..=5 {
            for arith in [None, Some(DType::BF16)] {
                let sce = Sce {
                    select_topk: 0.5,
                    arith,
                };
                let deltas: Vec<Vec<f32>> = (0..tasks)
                    .map(|t| {
                        (0..n)
                            .map(|i| match i % 7 {
                                0 => -0.0,
                                1 => 0.0,
                                2 => 0.25, // equal in every task
                                3 if t % 2 == 0 => -0.0,
                                4 => f32::MAX / 4.0 * if t == 0 { 1.0 } else { -1.0 },
                                _ => ((next() >> 40) as f32 / 16_777_216.0 - 0.5) * 1e-2,
                            })
                            .collect()
                    })
                    .collect();
                let d: Vec<&[f32]> = deltas.iter().map(|v| &v[..]).collect();
                let base = vec![0.0f32; n];
                let plan = TensorPlan::vector("t", n);
                let weights = vec![1.0f32; tasks];
                let x = ChunkIn {
                    tensor: &plan,
                    start: 0,
                    n,
                    base: &base,
                    deltas: &d,
                    values: &d,
                    weights: &weights,
                    given: None,
                    seed: 0,
                };
                let mut wide = vec![f64::NAN; 3 * n];
                let mut got = vec![0.0f32; n];
                with_round!(sce.arith, |r| sce.var_into(r, &x, &mut wide, &mut got));
                for i in 0..n {
                    let (mut mu, mut q) = (0.0f64, 0.0f64);
                    for (t, dt) in d.iter().enumerate() {
                        let v = sce.r(dt[i]) as f64;
                        let delta = v - mu;
                        mu += delta / (t + 1) as f64;
                        q += delta * (v - mu);
                    }
                    let want = sce.r((q / tasks as f64) as f32);
                    assert_eq!(
                        got[i].to_bits(),
                        want.to_bits(),
                        "T {tasks} {arith:?} element {i}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }
}
