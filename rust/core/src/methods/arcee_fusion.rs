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

    /// The softmax probabilities of the model and of the base at element `i` (+ eps).
    #[inline(always)]
    fn probs(&self, x: &ChunkIn, st: &TensorStats, i: usize) -> (f32, f32) {
        let u = x.row_of(i);
        let (mx, sums) = (st.sums(0, u), st.sums(1, u));
        let r = |v: f32| self.r(v);
        let p = r(r((x.values[0][i] - mx[0] as f32).exp() * (1.0 / sums[0] as f32)) + EPS);
        let q = r(r((x.base[i] - mx[1] as f32).exp() * (1.0 / sums[1] as f32)) + EPS);
        (p, q)
    }

    /// The change θ − θ_base as mergekit holds it.
    #[inline(always)]
    fn change(&self, x: &ChunkIn, i: usize) -> f32 {
        self.r(x.values[0][i] - x.base[i])
    }

    #[inline(always)]
    fn importance(&self, x: &ChunkIn, st: &TensorStats, i: usize) -> f32 {
        let kl = self.r(st.sums(2, x.row_of(i))[0] as f32);
        self.r(self.change(x, i).abs() * kl)
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
        let first = x.row_of(0);
        for i in 0..x.n {
            let u = x.row_of(i) - first;
            match st.stages.len() {
                0 => {
                    acc[2 * u] = acc[2 * u].max(x.values[0][i] as f64);
                    acc[2 * u + 1] = acc[2 * u + 1].max(x.base[i] as f64);
                }
                1 => {
                    let mx = st.sums(0, u + first);
                    acc[2 * u] += (x.values[0][i] - mx[0] as f32).exp() as f64;
                    acc[2 * u + 1] += (x.base[i] - mx[1] as f32).exp() as f64;
                }
                _ => {
                    let (p, q) = self.probs(x, st, i);
                    acc[u] += self.r(p * self.r(self.r(p / q).ln())) as f64;
                }
            }
        }
    }

    fn score(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, out: &mut [Vec<f32>]) {
        for (i, o) in out[0][..x.n].iter_mut().enumerate() {
            *o = self.importance(x, st, i);
        }
    }

    fn ranks(&self, t: &TensorPlan, _tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        let last = (t.numel - 1) as f32;
        QUANTILES.iter().map(|&q| (0, (q * last) as u64)).collect()
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        let q = st.selected(3);
        let r = |v: f32| self.r(v);
        let threshold = r(q[1] + r(1.5 * r(q[2] - q[0])));
        for (i, o) in m.iter_mut().enumerate() {
            let keep = f32::from(u8::from(self.importance(x, st, i) >= threshold));
            *o = x.base[i] + self.change(x, i) * keep;
        }
    }
}
