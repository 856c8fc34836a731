//! DARE (Yu et al. 2024): M = Σ_t dare(τ'_t), each delta dropped at random with probability
//! 1 − density and (with `rescale`) divided by density. The drop is the engine's pre-step
//! ([`Kernel::dare`]), so DARE-TIES and Weight Weaving share the same masks.

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::{DareParams, Reader};
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct Dare(pub DareParams);

impl Dare {
    pub fn parse(r: &mut Reader) -> Result<Dare> {
        Ok(Dare(super::dare(r)?))
    }
}

impl Kernel for Dare {
    fn name(&self) -> &'static str {
        "dare"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"density": self.0.density.json(), "rescale": self.0.rescale})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn dare(&self) -> Option<&DareParams> {
        Some(&self.0)
    }

    fn needs_statistics(&self) -> bool {
        false
    }

    fn check_tasks(&self, tasks: usize) -> Result<()> {
        self.0.density.check_len("density", tasks)
    }

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            elementwise::sum(x.deltas, x.n, m);
        })
    }
}
