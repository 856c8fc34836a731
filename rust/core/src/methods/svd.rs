//! The SVD methods, TSV (Gargiulo et al. 2025) and Iso-C (Marczak et al. 2025): M of 2-D
//! tensors comes from the torch backend (`given`); every other tensor takes the mean of τ'_t.

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct Svd {
    pub name: &'static str,
}

impl Svd {
    pub fn parse(_r: &mut Reader, name: &'static str) -> Result<Svd> {
        Ok(Svd { name })
    }
}

impl Kernel for Svd {
    fn name(&self) -> &'static str {
        self.name
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn weighted(&self) -> bool {
        true
    }

    fn external(&self) -> bool {
        true
    }

    fn needs_statistics(&self) -> bool {
        false
    }

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        match x.given {
            Some(g) => m.copy_from_slice(g),
            None => elementwise::mean(x.deltas, x.n, m),
        }
    }
}
