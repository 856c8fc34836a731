//! mergekit's `nuslerp`: spherical interpolation of two models at t = w_2 / (w_1 + w_2)
//! (0.5 when the weights sum to about 0), of their deltas from the base when there is one.
//! Vectors are the whole tensor (`nuslerp_flatten`, the default), its rows, or its columns
//! (`nuslerp_row_wise`); norms and the dot per vector are two statistics stages.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::{reduce, Reader};
use crate::error::Result;
use crate::plan::TensorPlan;

#[derive(Clone, Debug, PartialEq)]
pub struct NuSlerp {
    pub row_wise: bool,
    pub flatten: bool,
    /// Of the deltas from the base (mergekit with a base_model), else of the models' values.
    pub relative: bool,
}

impl NuSlerp {
    pub fn parse(r: &mut Reader) -> Result<NuSlerp> {
        Ok(NuSlerp {
            row_wise: r.flag("nuslerp_row_wise", false)?,
            flatten: r.flag("nuslerp_flatten", true)?,
            relative: r.flag("relative", true)?,
        })
    }

    fn unit(&self) -> Unit {
        match (self.flatten, self.row_wise) {
            (true, _) => Unit::Tensor,
            (false, false) => Unit::Row,
            (false, true) => Unit::Column,
        }
    }

    /// t as mergekit computes it (in f64, from the per-model weights).
    fn t(&self, x: &ChunkIn) -> f64 {
        let (a, b) = (x.weights[0] as f64, x.weights[1] as f64);
        let total = a + b;
        if total.abs() < 1e-6 {
            0.5
        } else {
            b / total
        }
    }

    fn pair<'a>(&self, x: &'a ChunkIn) -> (&'a [f32], &'a [f32]) {
        if self.relative {
            (x.deltas[0], x.deltas[1])
        } else {
            (x.values[0], x.values[1])
        }
    }

    fn norms(st: &TensorStats, u: usize) -> (f32, f32) {
        let s = st.sums(0, u);
        let n = |v: f64| (v.sqrt() as f32).max(1e-7);
        (n(s[0]), n(s[1]))
    }
}

impl Kernel for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"compat": "mergekit", "nuslerp_row_wise": self.row_wise,
            "nuslerp_flatten": self.flatten, "relative": self.relative})
    }

    fn inputs(&self) -> Inputs {
        Inputs::relative(self.relative)
    }

    fn output(&self) -> Output {
        Output::relative(self.relative)
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_exactly("nuslerp", tasks, 2)
    }

    fn stats_key(&self) -> String {
        format!(
            "nuslerp {:?} {} {}",
            self.unit(),
            self.relative,
            self.row_wise
        )
    }

    fn passes(&self) -> u64 {
        2
    }

    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, done: &TensorStats) -> Option<Stage> {
        (done.stages.len() < 2).then_some(Stage::Sums {
            unit: self.unit(),
            slots: if done.stages.is_empty() { 2 } else { 1 },
        })
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, acc: &mut [f64]) {
        let (a, b) = self.pair(x);
        let unit = self.unit();
        let slots = if st.stages.is_empty() { 2 } else { 1 };
        if unit == Unit::Column {
            // Units interleave: element by element.
            for i in 0..x.n {
                let u = unit.of(x.tensor, x.start + i);
                if st.stages.is_empty() {
                    acc[2 * u] += (a[i] as f64) * (a[i] as f64);
                    acc[2 * u + 1] += (b[i] as f64) * (b[i] as f64);
                } else {
                    let (p, q) = NuSlerp::norms(st, u);
                    acc[u] += ((a[i] / p) * (b[i] / q)) as f64;
                }
            }
            return;
        }
        // The whole chunk, or its pieces of rows.
        let first = x.row_of(0);
        let mut at = 0;
        while at < x.n {
            let (u, end) = match unit {
                Unit::Tensor => (0, x.n),
                _ => {
                    let row = x.tensor.row_len();
                    let r = (x.start + at) / row;
                    (r, ((r + 1) * row - x.start).min(x.n))
                }
            };
            let (sa, sb) = (&a[at..end], &b[at..end]);
            let o = (u - if unit == Unit::Tensor { 0 } else { first }) * slots;
            if st.stages.is_empty() {
                acc[o] += reduce::sum_sq(sa);
                acc[o + 1] += reduce::sum_sq(sb);
            } else {
                let (p, q) = NuSlerp::norms(st, u);
                acc[o] += reduce::sum(sa.len(), |i| ((sa[i] / p) * (sb[i] / q)) as f64);
            }
            at = end;
        }
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        let t = self.t(x);
        let (t32, rest32) = (t as f32, (1.0 - t) as f32);
        let (a, b) = self.pair(x);
        let unit = self.unit();
        // Per unit: (unit, coefficient of a, coefficient of b, divisor or None when colinear).
        let mut coef = (usize::MAX, 0.0f32, 0.0f32, None::<f32>);
        for (i, o) in m.iter_mut().enumerate() {
            let u = unit.of(x.tensor, x.start + i);
            if coef.0 != u {
                let cos = (st.sums(1, u)[0] as f32).clamp(-1.0, 1.0);
                let colinear = 1.0 - cos * cos <= 1e-16f32;
                coef = if colinear {
                    (u, rest32, t32, None)
                } else {
                    let theta = cos.acos();
                    (
                        u,
                        (rest32 * theta).sin(),
                        (t32 * theta).sin(),
                        Some(theta.sin()),
                    )
                };
            }
            *o = match coef.3 {
                None => coef.1 * a[i] + coef.2 * b[i],
                Some(s) => (coef.1 * a[i] + coef.2 * b[i]) / s,
            };
        }
    }
}
