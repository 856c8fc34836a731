//! mergekit's `slerp` (0.1.5): spherical interpolation between the base and one model, per
//! tensor. The norms and the dot product run over the whole tensor (0.1.5's leading "batch"
//! axis stacks tensors; it does not make rows), so they are two statistics stages; the
//! interpolation itself is element-wise. Nearly parallel tensors (|cos| > 0.9995) are lerped.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, Stage, TensorStats, Unit};
use super::{reduce, Reader};
use crate::error::Result;
use crate::plan::TensorPlan;

const DOT_THRESHOLD: f32 = 0.9995;
const EPS: f32 = 1e-8;

#[derive(Clone, Debug, PartialEq)]
pub struct Slerp {
    pub t: f64,
}

impl Slerp {
    pub fn parse(r: &mut Reader) -> Result<Slerp> {
        Ok(Slerp {
            t: super::registry::required(r, "slerp", "t", f64::MIN, f64::MAX)?,
        })
    }

    /// The norms of the base and the model (1 where below eps), as f32 as mergekit has them.
    fn norms(st: &TensorStats) -> (f32, f32) {
        let s = st.sums(0, 0);
        let n = |x: f64| {
            let v = x.sqrt() as f32;
            if v > EPS {
                v
            } else {
                1.0
            }
        };
        (n(s[0]), n(s[1]))
    }

    /// The two interpolation coefficients of a tensor.
    fn coefficients(&self, st: &TensorStats) -> (f32, f32) {
        let dot = (st.sums(1, 0)[0] as f32).clamp(-1.0, 1.0);
        let t = self.t as f32;
        if dot.abs() > DOT_THRESHOLD {
            return (1.0 - t, t);
        }
        let theta = dot.acos();
        let sin_theta = theta.sin();
        (
            ((1.0 - t) * theta).sin() / sin_theta,
            (t * theta).sin() / sin_theta,
        )
    }
}

impl Kernel for Slerp {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "slerp"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"compat": "mergekit", "t": self.t})
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
        super::registry::tasks_exactly("slerp", tasks, 1)
    }

    fn stats_key(&self) -> String {
        "slerp".into()
    }

    fn passes(&self) -> u64 {
        2
    }

    fn next_stage(&self, _t: &TensorPlan, _tasks: usize, done: &TensorStats) -> Option<Stage> {
        (done.stages.len() < 2).then_some(Stage::Sums {
            unit: Unit::Tensor,
            slots: if done.stages.is_empty() { 2 } else { 1 },
        })
    }

    fn accumulate(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, acc: &mut [f64]) {
        crate::simd!({
            let (a, b) = (x.base, x.values[0]);
            if st.stages.is_empty() {
                acc[0] += reduce::sum_sq(a);
                acc[1] += reduce::sum_sq(b);
            } else {
                let (na, nb) = Slerp::norms(st);
                let (a, b) = (&a[..x.n], &b[..x.n]);
                acc[0] += reduce::sum(
                    x.n,
                    #[inline(always)]
                    |i| ((a[i] / na) * (b[i] / nb)) as f64,
                );
            }
        })
    }

    fn merge(&self, x: &ChunkIn, st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let (ca, cb) = self.coefficients(st);
            for ((o, &a), &b) in m.iter_mut().zip(x.base).zip(x.values[0]) {
                *o = ca * a + cb * b;
            }
        })
    }
}
