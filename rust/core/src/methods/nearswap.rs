//! mergekit's `nearswap`: per element, move the base toward the model by t/|θ − θ_base|
//! (clamped to [0, 1]): elements that barely differ take the model's value, distant ones keep
//! the base's. Element-wise, no statistics.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct NearSwap {
    pub t: f64,
}

impl NearSwap {
    pub fn parse(r: &mut Reader) -> Result<NearSwap> {
        Ok(NearSwap {
            t: super::registry::required(r, "nearswap", "t", f64::MIN, f64::MAX)?,
        })
    }
}

impl Kernel for NearSwap {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "nearswap"
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

    fn needs_statistics(&self) -> bool {
        false
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_exactly("nearswap", tasks, 1)
    }

    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        let t = self.t as f32;
        for ((o, &a), &b) in m.iter_mut().zip(x.base).zip(x.values[0]) {
            // torch's `t / x` is `x.reciprocal() * t`.
            let w = ((1.0 / (a - b).abs().max(1e-6)) * t).clamp(0.0, 1.0);
            *o = w * b + (1.0 - w) * a;
        }
    }
}
