//! The weighted average of the fine-tunes, a model soup: M = Σ_t w_t τ_t / Σ_t w_t
//! (`normalize`, the default), or the plain weighted sum.

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::Reader;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub normalize: bool,
}

impl Linear {
    pub fn parse(r: &mut Reader) -> Result<Linear> {
        Ok(Linear {
            normalize: r.flag("normalize", true)?,
        })
    }
}

impl Kernel for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"normalize": self.normalize})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn needs_statistics(&self) -> bool {
        false
    }

    fn check_weights(&self, w: &[f32]) -> Result<()> {
        if self.normalize && w.iter().map(|&x| x as f64).sum::<f64>() == 0.0 {
            return Err(Error::param(
                "weights",
                "sum to 0, and linear with normalize divides by their sum",
            ));
        }
        Ok(())
    }

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            elementwise::sum(x.deltas, x.n, m);
            if self.normalize {
                let total = crate::pool::lam_sum(x.weights.iter().copied());
                for v in m.iter_mut() {
                    *v /= total;
                }
            }
        })
    }
}
