//! The methods computed by the torch backend on 2-D tensors (`given`): TSV (Gargiulo et al.
//! 2025), Iso-C and Iso-CTS (Marczak et al. 2025), WUDI (Cheng et al. 2025, an Adam descent);
//! every other tensor takes the mean of τ'_t (Iso-CTS: the running mean its reference computes,
//! m += (τ'_t − m)/(t + 1)).

use super::elementwise;
use super::kernel::{ChunkIn, Kernel, Scratch, TensorStats};
use super::Reader;
use crate::error::Result;

#[derive(Clone, Debug, PartialEq)]
pub struct Svd {
    pub name: &'static str,
    /// Iso-CTS: the fraction of the rank given to the common subspace.
    pub common_space_fraction: Option<f64>,
    /// WUDI: Adam's steps and learning rate.
    pub wudi: Option<(u64, f64)>,
}

impl Svd {
    pub fn parse(r: &mut Reader, name: &'static str) -> Result<Svd> {
        let common_space_fraction = if name == "iso_cts" {
            Some(r.num("common_space_fraction", 0.8, 0.0, 1.0, true)?)
        } else {
            None
        };
        let wudi = if name == "wudi" {
            let steps = r.num("steps", 400.0, 0.0, 1e6, false)?;
            if steps.fract() != 0.0 {
                return Err(crate::error::Error::param(
                    "steps",
                    format!("{steps} is not a whole number of steps"),
                ));
            }
            Some((steps as u64, r.num("lr", 1e-5, 0.0, 1.0, true)?))
        } else {
            None
        };
        Ok(Svd {
            name,
            common_space_fraction,
            wudi,
        })
    }
}

impl Kernel for Svd {
    fn name(&self) -> &'static str {
        self.name
    }

    fn params_json(&self) -> serde_json::Value {
        match (self.common_space_fraction, self.wudi) {
            (Some(f), _) => serde_json::json!({ "common_space_fraction": f }),
            (_, Some((steps, lr))) => serde_json::json!({ "steps": steps, "lr": lr }),
            _ => serde_json::json!({}),
        }
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
            None if self.common_space_fraction.is_some() => {
                // Iso-CTS's reference: m = τ'_1, then m += (τ'_t − m)/t, in f32 as torch does.
                m.copy_from_slice(x.deltas[0]);
                for (t, d) in x.deltas.iter().enumerate().skip(1) {
                    let k = (t + 1) as f32;
                    for (o, &v) in m.iter_mut().zip(d.iter()) {
                        *o += (v - *o) / k;
                    }
                }
            }
            None => elementwise::mean(x.deltas, x.n, m),
        }
    }
}
