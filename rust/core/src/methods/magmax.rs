//! MagMax (Marczak et al. 2024): per element the τ'_t of largest |τ'_t| (ties → the later task).

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct MagMax;

impl MagMax {
    pub fn parse(_r: &mut Reader) -> Result<MagMax> {
        Ok(MagMax)
    }
}

impl Kernel for MagMax {
    fn name(&self) -> &'static str {
        "magmax"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn needs_statistics(&self) -> bool {
        false
    }

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            elementwise::magmax(x.deltas, x.n, m);
        })
    }
}
