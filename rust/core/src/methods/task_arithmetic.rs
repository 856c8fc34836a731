//! Task arithmetic (Ilharco et al. 2023): M = Σ_t τ'_t, summed in task order.

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct TaskArithmetic;

impl TaskArithmetic {
    pub fn parse(_r: &mut Reader) -> Result<TaskArithmetic> {
        Ok(TaskArithmetic)
    }
}

impl Kernel for TaskArithmetic {
    fn name(&self) -> &'static str {
        "task_arithmetic"
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

    fn sum_of_deltas(&self) -> bool {
        true
    }

    #[inline(always)]
    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            elementwise::sum(x.deltas, x.n, m);
        })
    }
}
