//! mergekit's `arcee_fusion`: keep the model's change to an element only where its importance
//! — |θ − θ_base| times the KL divergence between the softmaxes of the two rows (last dimension)
//! — reaches the tensor's dynamic threshold median + 1.5·IQR. The softmax needs each row's
//! largest value and exponential sum, the KL one more row sum, and the threshold three order
//! statistics of the importance over the tensor (mergekit samples a million elements of larger
//! tensors at random; here the quantiles are exact). Four statistics stages.
//!
//! With `arith` (mergekit's `dtype`, bf16 or f16) every torch operation of mergekit's code is
//! rounded to that dtype as it is there: the softmaxes (computed wider, rounded once), `+ eps`,
//! the ratio, its log, each product, the KL sum, the importance and the threshold's steps; the
//! kept change `θ − θ_base` is rounded, and added to the base in f32 (mergekit's mask is f32).

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::mergekit::{parse_arith, round_opt};
use super::Reader;
use crate::dtype::DType;
use crate::error::Result;
use crate::plan::TensorPlan;

const EPS: f32 = 1e-8;
const QUANTILES: [f32; 3] = [0.25, 0.5, 0.75];

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

    #[inline(always)]
    fn r(&self, v: f32) -> f32 {
        round_opt(self.arith, v)
    }

    /// The softmax probabilities (+ eps) of the model's and the base's row `u`, as functions of
    /// an element's values; the row's statistics are looked up once.
    #[inline(always)]
    fn probs(&self, st: &TensorStats, u: usize) -> impl Fn(f32, f32) -> (f32, f32) + '_ {
        let (mx, sums) = (st.sums(0, u), st.sums(1, u));
        let (m0, m1) = (mx[0] as f32, mx[1] as f32);
        let (s0, s1) = (1.0 / sums[0] as f32, 1.0 / sums[1] as f32);
        move |v, b| {
            let r = |v: f32| self.r(v);
            (
                r(r((v - m0).exp() * s0) + EPS),
                r(r((b - m1).exp() * s1) + EPS),
            )
        }
    }

    /// The change θ − θ_base as mergekit holds it.
    #[inline(always)]
    fn change(&self, v: f32, b: f32) -> f32 {
        self.r(v - b)
    }

    /// The importance of each element of the chunk into `out`.
    #[inline(always)]
    fn importances(&self, x: &ChunkIn, st: &TensorStats, out: &mut [f32]) {
        for (u, span) in x.row_spans() {
            let kl = self.r(st.sums(2, u)[0] as f32);
            for i in span {
                out[i] = self.r(self.change(x.values[0][i], x.base[i]).abs() * kl);
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
        4
    }

    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, done: &TensorStats) -> Option<Stage> {
        let unit = Unit::Row;
        match done.stages.len() {
            0 => Some(Stage::Maxes { unit, slots: 2 }),
            1 => Some(Stage::Sums { unit, slots: 2 }),
            2 => Some(Stage::Sums { unit, slots: 1 }),
            3 => Some(Stage::Select { rows: 1 }),
            _ => None,
        }
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, acc: &mut [f64]) {
        crate::simd!({
            let first = x.row_of(0);
            let (v, b) = (x.values[0], x.base);
            for (u, span) in x.row_spans() {
                // Each row's sums add its elements in order, as before the loops ran by row.
                match st.stages.len() {
                    0 => {
                        let a = &mut acc[(u - first) * 2..];
                        for i in span {
                            a[0] = a[0].max(v[i] as f64);
                            a[1] = a[1].max(b[i] as f64);
                        }
                    }
                    1 => {
                        let a = &mut acc[(u - first) * 2..];
                        let mx = st.sums(0, u);
                        let (m0, m1) = (mx[0] as f32, mx[1] as f32);
                        let (mut s0, mut s1) = (a[0], a[1]);
                        for i in span {
                            s0 += (v[i] - m0).exp() as f64;
                            s1 += (b[i] - m1).exp() as f64;
                        }
                        (a[0], a[1]) = (s0, s1);
                    }
                    _ => {
                        let a = &mut acc[u - first];
                        let probs = self.probs(st, u);
                        let mut kl = *a;
                        for i in span {
                            let (p, q) = probs(v[i], b[i]);
                            kl += self.r(p * self.r(self.r(p / q).ln())) as f64;
                        }
                        *a = kl;
                    }
                }
            }
        })
    }

    fn score(
        &self,
        x: &ChunkIn,
        st: &TensorStats,
        _s: Scratch,
        _floor: Option<&[f32]>,
        out: &mut [Vec<f32>],
    ) {
        crate::simd!({
            self.importances(x, st, &mut out[0][..x.n]);
        })
    }

    fn ranks(&self, t: &TensorPlan, _tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        let last = (t.numel - 1) as f32;
        QUANTILES.iter().map(|&q| (0, (q * last) as u64)).collect()
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let q = st.selected(3);
            let r = |v: f32| self.r(v);
            let threshold = r(q[1] + r(1.5 * r(q[2] - q[0])));
            self.importances(x, st, m);
            for (i, o) in m.iter_mut().enumerate() {
                let keep = f32::from(u8::from(*o >= threshold));
                let (v, b) = (x.values[0][i], x.base[i]);
                *o = b + self.change(v, b) * keep;
            }
        })
    }
}
