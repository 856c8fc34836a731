//! mergekit's `linear`: Σ_t w_t θ_t (÷ Σ_t w_t with `normalize`), from the models' values, not
//! their deltas. mergekit accumulates from zero with `addcmul_`, a fused multiply-add in torch's
//! vectorized CPU kernel, in model order; so does this.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct MergekitLinear {
    pub normalize: bool,
}

impl MergekitLinear {
    pub fn parse(r: &mut Reader) -> Result<MergekitLinear> {
        Ok(MergekitLinear {
            normalize: r.flag("normalize", true)?,
        })
    }
}

impl Kernel for MergekitLinear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"normalize": self.normalize})
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

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        m.fill(0.0);
        for (v, &wt) in x.values.iter().zip(x.weights) {
            for (acc, &y) in m.iter_mut().zip(v.iter()) {
                *acc = y.mul_add(wt, *acc);
            }
        }
        if self.normalize {
            let total = x.weights.iter().fold(0.0f32, |s, &w| s + w);
            for v in m.iter_mut() {
                *v /= total;
            }
        }
    }
}
