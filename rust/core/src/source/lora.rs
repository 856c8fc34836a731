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

/// What `adapter_config.json` says that matters here, as it is written.
#[derive(Clone, Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: i64,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    /// Kept in the file's order (serde_json preserves it): PEFT takes the first key that matches.
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
}

/// A `rank_pattern` / `alpha_pattern` key: a regular expression that PEFT matches against the
/// module's name as `re.match(rf"(.*\.)?({key})$", name)`, first key in the config's order.
#[derive(Clone, Debug)]
struct Pattern<T> {
    key: String,
    re: regex::Regex,
    value: T,
}

/// An adapter's configuration, resolved as PEFT resolves it.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: u64,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    rank_pattern: Vec<Pattern<u64>>,
    alpha_pattern: Vec<Pattern<f64>>,
    label: String,
}

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS: [&str; 2] = ["adapter_model.safetensors", "adapter_model.bin"];
const PREFIX: &str = "base_model.model.";
/// An adapter config is a few kilobytes.
const MAX_CONFIG: u64 = 16 << 20;

/// Architectures whose projections are transformers' `Conv1D` (weight stored [in, out]): PEFT
/// transposes their ΔW whatever `fan_in_fan_out` says, and ignores the flag on `nn.Linear`.
const CONV1D_MODELS: [&str; 4] = ["gpt2", "openai-gpt", "imagegpt", "decision_transformer"];

fn patterns<T>(
    label: &str,
    what: &str,
    map: &serde_json::Map<String, serde_json::Value>,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<Pattern<T>>> {
    map.iter()
        .map(|(key, v)| {
            let bad = |why: String| Error::header(label, format!("{what} key '{key}': {why}"));
            let value = value(v).ok_or_else(|| bad(format!("{v} is not a valid value")))?;
            // Linear-time matching and a bounded compiled size: a hostile key costs nothing.
            let re = regex::RegexBuilder::new(&format!("^(?:.*\\.)?(?:{key})$"))
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    bad(format!(
                        "not a regular expression weightweave can match as PEFT does ({})",
                        e.to_string().lines().last().unwrap_or("")
                    ))
                })?;
            Ok(Pattern {
                key: key.clone(),
                re,
                value,
            })
        })
        .collect()
}

impl AdapterConfig {
    pub fn read(path: &Path) -> Result<AdapterConfig> {
        use std::io::Read;
        let label = path.display().to_string();
        let mut text = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG + 1).read_to_end(&mut text))
            .map_err(|e| Error::io(path, e))?;
        if text.len() as u64 > MAX_CONFIG {
            return Err(Error::header(
                &label,
                "larger than 16 MiB: not an adapter config",
            ));
        }
        let cfg: RawConfig = serde_json::from_slice(&text)
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
        if cfg.r <= 0 {
            return Err(Error::header(
                &label,
                format!(
                    "r = {}: a LoRA rank must be positive (PEFT refuses it too)",
                    cfg.r
                ),
            ));
        }
        let positive = |v: &serde_json::Value| v.as_u64().filter(|&r| r > 0);
        Ok(AdapterConfig {
            r: cfg.r as u64,
            lora_alpha: cfg.lora_alpha,
            use_rslora: cfg.use_rslora,
            fan_in_fan_out: cfg.fan_in_fan_out,
            rank_pattern: patterns(&label, "rank_pattern", &cfg.rank_pattern, positive)?,
            alpha_pattern: patterns(&label, "alpha_pattern", &cfg.alpha_pattern, |v| v.as_f64())?,
            label,
        })
    }

    /// PEFT's `get_pattern_key`: the first pattern, in the config's order, whose regex matches.
    fn pattern<'p, T>(patterns: &'p [Pattern<T>], module: &str) -> Option<&'p Pattern<T>> {
        patterns.iter().find(|p| p.re.is_match(module))
    }

    /// α/r (α/√r with rank-stabilised LoRA) for `module`, whose factors have rank `rank`. The
    /// rank the config gives it must be the factors' (PEFT refuses to load them otherwise).
    fn scaling(&self, module: &str, rank: usize, file: &str) -> Result<f32> {
        let rp = Self::pattern(&self.rank_pattern, module);
        let r = rp.map_or(self.r, |p| p.value);
        if r != rank as u64 {
            let from = rp.map_or("r".to_owned(), |p| format!("rank_pattern '{}'", p.key));
            return Err(Error::tensor(
                file,
                &format!("{module}.lora_A"),
                format!(
                    "has rank {rank} but {} gives {from} = {r}: the factors do not belong to this config (PEFT refuses them too)",
                    self.label
                ),
            ));
        }
        let alpha = Self::pattern(&self.alpha_pattern, module).map_or(self.lora_alpha, |p| p.value);
        let r = r as f64;
        let s = if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        if !(s as f32).is_finite() {
            return Err(Error::header(
                &self.label,
                format!("the LoRA scaling of '{module}' (α = {alpha:e}, r = {r}) is {s:e}, beyond the f32 range of the arithmetic"),
            ));
        }
        Ok(s as f32)
    }
}

/// The adapter as a fine-tune of `base`: every base tensor, as a low-rank delta, a full tensor
/// (PEFT's `modules_to_save`) or τ = 0.
pub fn aligned_view<'a>(
    cfg: &AdapterConfig,
    adapter: &ModelView<'a>,
    base: &ModelView<'a>,
    model_type: Option<&str>,
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
            None if name.contains(".base_layer.") => {
                // PEFT saves the base's own embedding weights next to an embedding adapter
                // (`save_embedding_layers`); they are the base's tensor, or the adapter was
                // trained on another base (a resized vocabulary).
                let target = name.replace(".base_layer.", ".");
                let w = base.tensors.get(&target).ok_or_else(|| {
                    Error::tensor(t.file, key, "wraps a tensor the base does not have")
                })?;
                same_values(t, w, key, &target)?;
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
        // A convolution's (PEFT's Conv1d/2d/3d LoRA, LoCon): A [r, in, k…], B [out, r, 1…];
        // ΔW[o, i, k…] = Σ_r B[o, r]·A[r, i, k…], the 2-D product over A's flattened columns.
        let conv = !emb
            && w.shape.len() >= 3
            && a.shape.len() == w.shape.len()
            && b.shape.len() == w.shape.len()
            && b.shape[2..].iter().all(|&d| d == 1)
            && a.shape[2..] == w.shape[2..]
            && a.shape[0] == b.shape[1]
            && (b.shape[0], a.shape[1]) == (w.shape[0], w.shape[1]);
        // A: [r, in], B: [out, r]; ΔW = B·A is [out, in], transposed for embeddings (whose
        // factors PEFT stores the other way round) and for Conv1D weights ([in, out]).
        let ok = a.shape.len() == 2
            && b.shape.len() == 2
            && w.shape.len() == 2
            && a.shape[0] == b.shape[1];
        let plain = ok && (b.shape[0], a.shape[1]) == (w.shape[0], w.shape[1]);
        let flipped = ok && (a.shape[1], b.shape[0]) == (w.shape[0], w.shape[1]);
        let transposed = if conv {
            false
        } else if emb {
            flipped
        } else if plain && flipped {
            // A square weight: its layer type decides, as in PEFT, never the flag alone.
            match model_type {
                Some(m) => CONV1D_MODELS.contains(&m),
                None if cfg.fan_in_fan_out => {
                    return Err(Error::tensor(
                        a.file,
                        &target,
                        "is square and the adapter sets fan_in_fan_out: whether it is a Conv1D (transposed) or an nn.Linear (where PEFT ignores the flag) cannot be told without the base's config.json; give the base as a model directory",
                    ))
                }
                None => false,
            }
        } else {
            flipped
        };
        if !conv && !flipped && (emb || !plain) {
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
        let scaling = cfg.scaling(&module, a.shape[0], a.file)?;
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

/// Checks that `saved` (an adapter's copy of a base tensor) holds exactly the base's values,
/// compared as f32 in pieces.
fn same_values(saved: &TensorRef, w: &TensorRef, key: &str, target: &str) -> Result<()> {
    let differs = |why: &str| {
        Error::tensor(
            saved.file,
            key,
            format!("{why} the base's '{target}': the adapter was trained on another base (a resized vocabulary?); merge it into that base instead"),
        )
    };
    if saved.shape != w.shape || !saved.dtype.is_mergeable() || w.data.is_empty() {
        return Err(differs("is not"));
    }
    const PIECE: usize = 1 << 16;
    let (sa, sb) = (saved.dtype.size(), w.dtype.size());
    let (mut x, mut y) = (vec![0f32; PIECE], vec![0f32; PIECE]);
    let n = saved.numel();
    let mut at = 0;
    while at < n {
        let k = PIECE.min(n - at);
        decode(
            saved.dtype,
            &saved.data[at * sa..(at + k) * sa],
            &mut x[..k],
        );
        decode(w.dtype, &w.data[at * sb..(at + k) * sb], &mut y[..k]);
        if x[..k]
            .iter()
            .zip(&y[..k])
            .any(|(p, q)| p.to_bits() != q.to_bits())
        {
            return Err(differs("differs from"));
        }
        at += k;
    }
    Ok(())
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

/// τ for elements `start..start + out.len()` of a tensor whose rows are `cols` long (a
/// non-transposed ΔW's rows are A's flattened columns, whatever the tensor's last dimension).
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
    // A's columns: `in`, or `in × kernel` for a convolution (whose rows are that long too).
    let a_cols: usize = a.shape[1..].iter().product();
    let cols = if *transposed { cols } else { a_cols };
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
