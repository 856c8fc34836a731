//! mergekit's `nearswap`: per element, move the base toward the model by t/|θ − θ_base|
//! (clamped to [0, 1]): elements that barely differ take the model's value, distant ones keep
//! the base's. Element-wise, no statistics. With `arith` (mergekit's bf16/f16 `dtype`) every
//! torch operation is rounded to it as mergekit's run rounds it.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, TensorStats};
use super::mergekit::parse_arith;
use super::Reader;
use crate::dtype::DType;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct NearSwap {
    pub t: f64,
    /// mergekit's dtype when its arithmetic is emulated.
    pub arith: Option<DType>,
}

impl NearSwap {
    pub fn parse(r: &mut Reader) -> Result<NearSwap> {
        Ok(NearSwap {
            t: super::registry::required(r, "nearswap", "t", f64::MIN, f64::MAX)?,
            arith: parse_arith(r)?,
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
        let mut v = serde_json::json!({"compat": "mergekit", "t": self.t});
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

    fn needs_statistics(&self) -> bool {
        false
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        super::registry::tasks_exactly("nearswap", tasks, 1)
    }

    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            let t = self.t as f32;
            with_round!(self.arith, |r| {
                for ((o, &a), &b) in m.iter_mut().zip(x.base).zip(x.values[0]) {
                    // torch's `t / x` is `x.reciprocal() * t`; `clamp(min=1e-6)` rounds its result.
                    let w = r(r(1.0 / r(r(a - b).abs().max(1e-6))) * t).clamp(0.0, 1.0);
                    *o = r(r(w * b) + r(r(1.0 - w) * a));
                }
            })
        })
    }
}
