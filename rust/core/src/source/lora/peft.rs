//! PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`): factor
//! names under `base_model.model.`, scaling α/r (α/√r with rank-stabilised LoRA) with per-module
//! ranks and alphas as PEFT's `rank_pattern` / `alpha_pattern` give them, and whole tensors for
//! `modules_to_save`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{same_values, Format, Pair, Parsed};
use crate::error::{Error, Result};
use crate::reader::ModelView;

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
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::header(&label, format!("not a PEFT LoRA adapter config: {e}")))?;
        Self::from_value(label, value)
    }

    /// A configuration given as JSON (an `adapter_config.json`, or the part of a diffusers LoRA
    /// file's `lora_adapter_metadata` for one component); `label` names where it came from.
    pub fn from_value(label: String, value: serde_json::Value) -> Result<AdapterConfig> {
        let cfg: RawConfig = serde_json::from_value(value)
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
    pub(crate) fn scaling(&self, module: &str, rank: usize, file: &str) -> Result<f32> {
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

impl Format for AdapterConfig {
    fn parse<'a>(&self, adapter: &ModelView<'a>, base: &ModelView<'a>) -> Result<Parsed<'a>> {
        let mut halves = super::Halves::default();
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
                    halves.put("", module, format!("{module}.weight"), which, emb, t)
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
        Ok(Parsed {
            pairs: halves.pairs(&adapter.label)?,
            full,
        })
    }

    fn scaling(&self, pair: &Pair, rank: usize) -> Result<f32> {
        self.scaling(&pair.module, rank, pair.a.file)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }
}
