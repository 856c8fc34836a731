//! PEFT LoRA adapters as fine-tunes. An adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`) stands for θ_pre + ΔW with ΔW = scaling · B·A on every module it
//! targets (scaling = α/r, or α/√r with rank-stabilised LoRA; per-module ranks and alphas as PEFT's
//! `rank_pattern` / `alpha_pattern` give them) and τ = 0 on every other tensor. ΔW is never
//! built whole: each chunk's rows are computed from the low-rank factors as the pipeline reaches
//! them ([`fill`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::dtype::{decode, first_non_finite};
use crate::error::{Error, Result};
use crate::reader::{ModelView, TensorRef};

/// One stored low-rank factor.
#[derive(Clone, Copy, Debug)]
pub struct Factor<'a> {
    pub dtype: crate::dtype::DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    pub file: &'a str,
}

impl<'a> From<TensorRef<'a>> for Factor<'a> {
    fn from(t: TensorRef<'a>) -> Self {
        Factor {
            dtype: t.dtype,
            shape: t.shape,
            data: t.data,
            file: t.file,
        }
    }
}

/// How a fine-tune's tensor differs from the base when it is not stored whole.
#[derive(Clone, Copy, Debug)]
pub enum Delta<'a> {
    /// τ = scaling · B·A (`transposed`: τ = scaling · (B·A)ᵀ, for embeddings and Conv1D).
    LowRank {
        a: Factor<'a>,
        b: Factor<'a>,
        scaling: f32,
        transposed: bool,
    },
    /// The adapter does not touch this tensor: τ = 0.
    Zero,
}

/// What `adapter_config.json` says that matters here.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    pub r: u64,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, u64>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS: [&str; 2] = ["adapter_model.safetensors", "adapter_model.bin"];
const PREFIX: &str = "base_model.model.";

impl AdapterConfig {
    pub fn read(path: &Path) -> Result<AdapterConfig> {
        let label = path.display().to_string();
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cfg: AdapterConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::header(&label, format!("not a PEFT LoRA adapter config: {e}")))?;
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(Error::header(
                &label,
                format!(
                    "a {} adapter; only LoRA adapters are supported",
                    cfg.peft_type.as_deref().unwrap_or("?")
                ),
            ));
        }
        if cfg.use_dora {
            return Err(Error::header(&label, "DoRA adapters are not supported yet"));
        }
        Ok(cfg)
    }

    /// PEFT's per-module pattern lookup: a key matches a module named like it or ending in
    /// `.key`.
    fn pattern<T: Copy>(patterns: &BTreeMap<String, T>, module: &str) -> Option<T> {
        patterns
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map(|(_, v)| *v)
    }

    fn scaling(&self, module: &str, rank: usize) -> f32 {
        let alpha = Self::pattern(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        let r = Self::pattern(&self.rank_pattern, module).unwrap_or(rank as u64) as f64;
        (if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }) as f32
    }
}

/// The adapter as a fine-tune of `base`: every base tensor, as a low-rank delta, a full tensor
/// (PEFT's `modules_to_save`) or τ = 0.
pub fn aligned_view<'a>(
    cfg: &AdapterConfig,
    adapter: &ModelView<'a>,
    base: &ModelView<'a>,
) -> Result<ModelView<'a>> {
    let label = adapter.label.clone();
    let mut pairs: BTreeMap<String, (Option<TensorRef<'a>>, Option<TensorRef<'a>>, bool)> =
        BTreeMap::new();
    let mut full = BTreeMap::new();
    for (key, t) in &adapter.tensors {
        let name = key.strip_prefix(PREFIX).unwrap_or(key);
        let lora = [
            (".lora_A.weight", 0, false),
            (".lora_B.weight", 1, false),
            (".lora_embedding_A", 0, true),
            (".lora_embedding_B", 1, true),
        ]
        .into_iter()
        .find_map(|(suffix, which, emb)| name.strip_suffix(suffix).map(|m| (m, which, emb)));
        match lora {
            Some((module, which, emb)) => {
                let e = pairs.entry(module.to_owned()).or_insert((None, None, emb));
                if which == 0 {
                    e.0 = Some(*t);
                } else {
                    e.1 = Some(*t);
                }
            }
            None => {
                let name = name.replace(".modules_to_save.default.", ".");
                if !base.tensors.contains_key(&name) {
                    return Err(Error::tensor(
                        t.file,
                        key,
                        "is neither a LoRA factor nor a tensor of the base",
                    ));
                }
                full.insert(name, *t);
            }
        }
    }
    let mut tensors: BTreeMap<String, TensorRef<'a>> = BTreeMap::new();
    for (module, (a, b, emb)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::header(
                &label,
                format!("module '{module}' has only one of its two LoRA factors"),
            ));
        };
        let target = format!("{module}.weight");
        let w = base.tensors.get(&target).ok_or_else(|| {
            Error::tensor(
                a.file,
                &target,
                "is targeted by the adapter but is not in the base",
            )
        })?;
        let transposed = emb || cfg.fan_in_fan_out;
        // A: [r, in], B: [out, r]; ΔW = B·A is [out, in] (its transpose when `transposed`).
        let ok = a.shape.len() == 2
            && b.shape.len() == 2
            && w.shape.len() == 2
            && a.shape[0] == b.shape[1]
            && if transposed {
                (a.shape[1], b.shape[0]) == (w.shape[0], w.shape[1])
            } else {
                (b.shape[0], a.shape[1]) == (w.shape[0], w.shape[1])
            };
        if !ok {
            return Err(Error::tensor(
                a.file,
                &target,
                format!(
                    "LoRA factors A {:?} and B {:?} do not make the base's {:?}",
                    a.shape, b.shape, w.shape
                ),
            ));
        }
        if !(a.dtype.is_mergeable() && b.dtype.is_mergeable()) {
            return Err(Error::tensor(
                a.file,
                &target,
                "LoRA factors must be floating point",
            ));
        }
        let scaling = cfg.scaling(&module, a.shape[0]);
        tensors.insert(
            target,
            TensorRef {
                delta: Some(Delta::LowRank {
                    a: a.into(),
                    b: b.into(),
                    scaling,
                    transposed,
                }),
                scale: None,
                data: &[],
                ..*w
            },
        );
    }
    for (name, w) in &base.tensors {
        if let Some(t) = full.get(name) {
            tensors.insert(name.clone(), *t);
        } else if !tensors.contains_key(name) {
            tensors.insert(
                name.clone(),
                TensorRef {
                    delta: Some(Delta::Zero),
                    scale: None,
                    data: &[],
                    file: adapter.tensors.values().next().map_or("", |t| t.file),
                    ..*w
                },
            );
        }
    }
    Ok(ModelView { label, tensors })
}

fn decoded(t: &Factor, name: &str, out: &mut Vec<f32>) -> Result<()> {
    out.resize(t.shape.iter().product(), 0.0);
    decode(t.dtype, t.data, out);
    if let Some((i, value)) = first_non_finite(out) {
        return Err(Error::NonFinite {
            file: t.file.to_owned(),
            tensor: name.to_owned(),
            index: i,
            value,
        });
    }
    Ok(())
}

/// τ for elements `start..start + out.len()` of a tensor whose rows are `cols` long.
/// `scratch` holds the decoded factors between calls.
pub fn fill(
    delta: &Delta,
    name: &str,
    cols: usize,
    start: usize,
    out: &mut [f32],
    scratch: &mut (Vec<f32>, Vec<f32>),
) -> Result<()> {
    let Delta::LowRank {
        a,
        b,
        scaling,
        transposed,
    } = delta
    else {
        out.fill(0.0);
        return Ok(());
    };
    let (fa, fb) = scratch;
    decoded(a, name, fa)?;
    decoded(b, name, fb)?;
    let r = a.shape[0];
    let a_cols = a.shape[1];
    for (k, o) in out.iter_mut().enumerate() {
        let idx = start + k;
        let (i, j) = (idx / cols, idx % cols);
        // Σ over the rank, in a fixed order: the same bits whatever the chunking.
        let mut acc = 0.0f32;
        for q in 0..r {
            acc += if *transposed {
                fb[j * r + q] * fa[q * a_cols + i]
            } else {
                fb[i * r + q] * fa[q * a_cols + j]
            };
        }
        *o = scaling * acc;
    }
    Ok(())
}
