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

    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        // In the wide copies (`simd!`) `mul_add` is one vector FMA; compiled for baseline x86-64 it
        // is a libm call per element. Both round once, so the bits are the same.
        crate::simd!(weighted_sum(x.values, x.weights, self.normalize, m));
    }
}

/// Σ_t w_t v_t accumulated from zero with one rounding per term (torch's `addcmul_`), then
/// ÷ Σ_t w_t with `normalize`.
#[inline(always)]
fn weighted_sum<V: AsRef<[f32]>>(values: &[V], weights: &[f32], normalize: bool, m: &mut [f32]) {
    m.fill(0.0);
    for (v, &wt) in values.iter().zip(weights) {
        for (acc, &y) in m.iter_mut().zip(v.as_ref()) {
            *acc = y.mul_add(wt, *acc);
        }
    }
    if normalize {
        let total = weights.iter().fold(0.0f32, |s, &w| s + w);
        for v in m.iter_mut() {
            *v /= total;
        }
    }
}
