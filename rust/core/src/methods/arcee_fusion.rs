//! mergekit's `arcee_fusion`: keep the model's change to an element only where its importance
//! — |θ − θ_base| times the KL divergence between the softmaxes of the two rows (last dimension)
//! — reaches the tensor's dynamic threshold median + 1.5·IQR. The softmax needs each row's
//! largest value and exponential sum, the KL one more row sum, and the threshold three order
//! statistics of the importance over the tensor (mergekit samples a million elements of larger
//! tensors at random; here the quantiles are exact). Four statistics stages.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::Reader;
use crate::error::Result;
use crate::plan::TensorPlan;

const EPS: f32 = 1e-8;
const QUANTILES: [f32; 3] = [0.25, 0.5, 0.75];

#[derive(Clone, Debug, PartialEq)]
pub struct ArceeFusion;

impl ArceeFusion {
    pub fn parse(_r: &mut Reader) -> Result<ArceeFusion> {
        Ok(ArceeFusion)
    }

    /// The softmax probabilities of the model and of the base at element `i` (+ eps).
    #[inline(always)]
    fn probs(x: &ChunkIn, st: &TensorStats, i: usize) -> (f32, f32) {
        let u = x.row_of(i);
        let (mx, sums) = (st.sums(0, u), st.sums(1, u));
        let p = (x.values[0][i] - mx[0] as f32).exp() * (1.0 / sums[0] as f32) + EPS;
        let q = (x.base[i] - mx[1] as f32).exp() * (1.0 / sums[1] as f32) + EPS;
        (p, q)
    }

    #[inline(always)]
    fn importance(x: &ChunkIn, st: &TensorStats, i: usize) -> f32 {
        let kl = st.sums(2, x.row_of(i))[0] as f32;
        (x.values[0][i] - x.base[i]).abs() * kl
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
        serde_json::json!({"compat": "mergekit"})
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
                    let (p, q) = ArceeFusion::probs(x, st, i);
                    acc[u] += (p * (p / q).ln()) as f64;
                }
            }
        }
    }

    fn score(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, out: &mut [Vec<f32>]) {
        for (i, o) in out[0][..x.n].iter_mut().enumerate() {
            *o = ArceeFusion::importance(x, st, i);
        }
    }

    fn ranks(&self, t: &TensorPlan, _tasks: usize, _st: &TensorStats) -> Vec<(usize, u64)> {
        let last = (t.numel - 1) as f32;
        QUANTILES.iter().map(|&q| (0, (q * last) as u64)).collect()
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        let q = st.selected(3);
        let threshold = q[1] + 1.5 * (q[2] - q[0]);
        for (i, o) in m.iter_mut().enumerate() {
            let keep = f32::from(u8::from(ArceeFusion::importance(x, st, i) >= threshold));
            *o = x.base[i] + (x.values[0][i] - x.base[i]) * keep;
        }
    }
}
