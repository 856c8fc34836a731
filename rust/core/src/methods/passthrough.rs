//! mergekit's `passthrough`: the one input as it is, or times `scale`. With `slices` it stacks
//! layers of several models (the recipes' layer mapping); on whole models it copies (or scales)
//! the model.

use super::kernel::{ChunkIn, Inputs, Kernel, Output, Scratch, TensorStats};
use super::{Param, Reader};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Passthrough {
    pub scale: Option<f64>,
}

impl Passthrough {
    pub fn parse(r: &mut Reader) -> Result<Passthrough> {
        let scale = match r.params.get("scale") {
            None => None,
            Some(Param::List(v)) if v.len() == 1 => Some(v[0]),
            Some(Param::List(v)) => {
                return Err(Error::param(
                    "scale",
                    format!("{} values for passthrough's one model", v.len()),
                ))
            }
            Some(_) => Some(r.num("scale", 1.0, f64::MIN, f64::MAX, false)?),
        };
        r.used.push("scale");
        if let Some(s) = scale {
            if !crate::recipe::fits_f32(s) {
                return Err(Error::param("scale", format!("{s} does not fit an f32")));
            }
        }
        Ok(Passthrough { scale })
    }
}

impl Kernel for Passthrough {
    fn takes_weights(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn params_json(&self) -> serde_json::Value {
        serde_json::json!({"compat": "mergekit", "scale": self.scale})
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
        super::registry::tasks_exactly("passthrough", tasks, 1)
    }

    fn merge(&self, x: &ChunkIn, _st: &TensorStats, _s: Scratch, m: &mut [f32]) {
        crate::simd!({
            match self.scale {
                None => m.copy_from_slice(x.values[0]),
                Some(s) => {
                    let s = s as f32;
                    for (o, &v) in m.iter_mut().zip(x.values[0]) {
                        *o = v * s;
                    }
                }
            }
        })
    }
}
