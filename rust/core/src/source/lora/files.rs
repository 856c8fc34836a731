//! Diffusion LoRA files, given as one `.safetensors` file: diffusers'
//! `pytorch_lora_weights.safetensors` (`unet.….to_k.lora_A.weight`, the older
//! `….processor.to_k_lora.down.weight` and `….lora_linear_layer.down.weight` names, a component
//! prefix per pipeline part, or none for a single model's `save_lora_adapter`) and kohya-ss's
//! (`lora_unet_…_to_k.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_`, `lora_te1_`,
//! `lora_te2_` for the text encoders; SDXL's names of the sgm UNet's blocks).
//!
//! Scaling, as diffusers' `load_lora_weights` + `fuse_lora` apply it:
//! - diffusers files: the component's PEFT configuration when the file's `lora_adapter_metadata`
//!   gives one (α/r, α/√r, rank and alpha patterns), otherwise 1 (diffusers mirrors each
//!   module's rank into its alpha: `W + B·A`);
//! - kohya-ss files: α/r with each module's `.alpha`, 1 without. A file that gives some modules an
//!   α and not others is refused: kohya-ss then scales those by 1, diffusers by the most common α.
//!
//! Modules are found by name in the base, never guessed: a kohya-ss name is the module's path
//! with '.' turned into '_', so it is looked up among the base's own names turned the same way
//! (one that two base names make is refused, not picked).

use std::collections::BTreeMap;

use super::{AdapterConfig, Format, Halves, Pair, Parsed};
use crate::dtype::decode;
use crate::error::{Error, Result};
use crate::reader::{ModelView, TensorRef};

/// The file diffusers' `save_lora_weights` writes in the directory it is given (safetensors, or
/// a pickle with `safe_serialization=False`).
pub const WEIGHTS: [&str; 2] = [
    "pytorch_lora_weights.safetensors",
    "pytorch_lora_weights.bin",
];

/// Where diffusers writes each component's LoRA configuration in the file's `__metadata__`.
const METADATA_KEY: &str = "lora_adapter_metadata";

/// diffusers' prefixes: the pipeline components a LoRA file adapts.
const COMPONENTS: [&str; 7] = [
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
];

/// kohya-ss's prefixes and the diffusers components they stand for.
const KOHYA: [(&str, &str); 4] = [
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
];

/// Factor suffixes of diffusers' names, old and new: (suffix, which factor).
const DIFFUSERS_SUFFIXES: [(&str, u8); 8] = [
    (".lora_A.weight", 0),
    (".lora_B.weight", 1),
    (".lora_linear_layer.down.weight", 0),
    (".lora_linear_layer.up.weight", 1),
    (".lora.down.weight", 0),
    (".lora.up.weight", 1),
    ("_lora.down.weight", 0),
    ("_lora.up.weight", 1),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Diffusers,
    Kohya,
}

/// A diffusion LoRA file and how its modules are scaled.
#[derive(Clone, Debug)]
pub struct LoraFile {
    kind: Kind,
    /// Per component ("" for an unprefixed file): the PEFT configuration diffusers saved.
    configs: BTreeMap<String, AdapterConfig>,
}

/// Whether `names` (a file's tensors) are a diffusion LoRA file's. A PEFT adapter's weights file
/// given alone is not: it needs its directory's `adapter_config.json` (said when it is used).
pub fn detect<'n>(mut names: impl Iterator<Item = &'n str>) -> bool {
    names.any(|n| {
        KOHYA
            .iter()
            .any(|(p, _)| n.starts_with(p) && n.ends_with(".lora_down.weight"))
            || (!n.starts_with("base_model.model.")
                && DIFFUSERS_SUFFIXES.iter().any(|(s, _)| n.ends_with(s)))
    })
}

impl LoraFile {
    /// Reads the file's kind and, for diffusers files, the configuration in its metadata.
    pub fn new(
        label: &str,
        names: &[&str],
        metadata: &BTreeMap<String, String>,
    ) -> Result<LoraFile> {
        let kind = if names
            .iter()
            .any(|n| KOHYA.iter().any(|(p, _)| n.starts_with(p)))
        {
            Kind::Kohya
        } else {
            Kind::Diffusers
        };
        let mut configs = BTreeMap::new();
        if let Some(raw) = metadata.get(METADATA_KEY) {
            let bad = |e: String| {
                Error::header(
                    label,
                    format!("its {METADATA_KEY} is not diffusers' LoRA configuration: {e}"),
                )
            };
            let value: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
            let map = value
                .as_object()
                .ok_or_else(|| bad("not a JSON object".into()))?;
            // Keys are `<component>.<field>` (none for a single model's adapter).
            let mut by: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
                BTreeMap::new();
            for (k, v) in map {
                let (c, field) = match k.split_once('.') {
                    Some((c, f)) if COMPONENTS.contains(&c) => (c, f),
                    _ => ("", k.as_str()),
                };
                by.entry(c.to_owned())
                    .or_default()
                    .insert(field.to_owned(), v.clone());
            }
            for (c, fields) in by {
                let what = if c.is_empty() {
                    format!("{label} ({METADATA_KEY})")
                } else {
                    format!("{label} ({METADATA_KEY} of {c})")
                };
                let cfg = AdapterConfig::from_value(what, serde_json::Value::Object(fields))?;
                configs.insert(c, cfg);
            }
        }
        Ok(LoraFile { kind, configs })
    }
}

/// The base's tensors, by component ("" when the base is one model, not a pipeline).
fn split(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((c, rest)) => (c, rest),
        None => ("", name),
    }
}

/// A text encoder's module path without transformers 4's `text_model.` (transformers 5's
/// CLIPTextModel is flattened; LoRA files of either era name modules either way).
fn plain_te(module: &str) -> &str {
    module.strip_prefix("text_model.").unwrap_or(module)
}

/// The base's modules with a `.weight`, by component and a spelling of their path: diffusers'
/// (`'.'`) or kohya-ss's (`'_'`); a text encoder's without `text_model.`. `None` where two base
/// names meet.
struct Index(BTreeMap<(String, String), Option<String>>);

impl Index {
    fn new(base: &ModelView, sep: char) -> Index {
        let mut index: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
        for name in base.tensors.keys() {
            let (c, rest) = split(name);
            let Some(m) = rest.strip_suffix(".weight") else {
                continue;
            };
            let key = plain_te(m).replace('.', &sep.to_string());
            index
                .entry((c.to_owned(), key))
                .and_modify(|v| *v = None)
                .or_insert_with(|| Some(name.clone()));
        }
        Index(index)
    }

    /// The base tensor of `module` in `component`: in the pipeline's component directory, or,
    /// when the base is one model, that model's own. `Some(None)`: two base names meet.
    fn find(&self, component: &str, modules: &[String]) -> Option<Option<String>> {
        for dir in [component, ""] {
            for m in modules {
                if let Some(hit) = self.0.get(&(dir.to_owned(), plain_te(m).to_owned())) {
                    return Some(hit.clone());
                }
            }
        }
        None
    }
}

/// A diffusers name's module, in the spellings diffusers' loaders accept: `….processor.to_k`
/// (attention processors) is `….to_k`, `to_out` is `to_out.0`; in a text encoder, the old
/// `to_q`/`to_k`/`to_v`/`to_out` are CLIP's `q_proj`/`k_proj`/`v_proj`/`out_proj`.
fn diffusers_spellings(component: &str, module: &str) -> Vec<String> {
    let m = module.replace(".processor.", ".");
    let m = m.strip_suffix(".processor").unwrap_or(&m).to_owned();
    let mut out = vec![m.clone()];
    if let Some(stem) = m.strip_suffix(".to_out") {
        out.push(format!("{stem}.to_out.0"));
    }
    if component.starts_with("text_encoder") {
        for (old, new) in [
            ("to_q", "q_proj"),
            ("to_k", "k_proj"),
            ("to_v", "v_proj"),
            ("to_out", "out_proj"),
        ] {
            if let Some(stem) = m.strip_suffix(old) {
                out.push(format!("{stem}{new}"));
            }
        }
    }
    out
}

/// How many resnets each of the UNet's down blocks holds (`layers_per_block`), from its names:
/// SDXL's kohya-ss names number the sgm UNet's blocks, which this maps to diffusers' blocks.
fn layers_per_block(base: &ModelView, component: &str) -> Option<usize> {
    let mut most = None;
    for name in base.tensors.keys() {
        let (c, rest) = split(name);
        if c != component && !c.is_empty() {
            continue;
        }
        if let Some(r) = rest.strip_prefix("down_blocks.0.resnets.") {
            let i: usize = r.split('.').next()?.parse().ok()?;
            most = Some(most.map_or(i + 1, |m: usize| m.max(i + 1)));
        }
    }
    most
}

/// A kohya-ss UNet name of the sgm UNet (SDXL: `input_blocks_4_1_…`) as diffusers' module path
/// with '_' (`down_blocks_1_attentions_0_…`), as diffusers' `_maybe_map_sgm_blocks_to_diffusers`
/// and `_convert_unet_lora_key` map it. `None` when it is not an sgm name.
fn sgm_to_diffusers(name: &str, lpb: usize) -> Option<String> {
    let resnet_tail = |t: &str| {
        let mut t = t.to_owned();
        for (old, new) in [
            ("in_layers_2", "conv1"),
            ("out_layers_3", "conv2"),
            ("emb_layers_1", "time_emb_proj"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if let Some(rest) = t.strip_prefix(old) {
                t = format!("{new}{rest}");
            }
        }
        t
    };
    let num = |s: &str| -> Option<(usize, String)> {
        let (n, rest) = s.split_once('_').unwrap_or((s, ""));
        Some((n.parse().ok()?, rest.to_owned()))
    };
    for (old, new) in [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
    ] {
        if name == old {
            return Some(new.to_owned());
        }
    }
    let inner = ["resnets", "attentions", "upsamplers"];
    if let Some(rest) = name.strip_prefix("input_blocks_") {
        let (i, rest) = num(rest)?;
        let (j, tail) = num(&rest)?;
        if i == 0 {
            return None;
        }
        let (block, layer) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
        if let Some(t) = tail.strip_prefix("op") {
            return Some(format!("down_blocks_{block}_downsamplers_0_conv{t}"));
        }
        let kind = inner.get(j).filter(|k| **k != "upsamplers")?;
        let tail = if j == 0 { resnet_tail(&tail) } else { tail };
        return Some(format!("down_blocks_{block}_{kind}_{layer}_{tail}"));
    }
    if let Some(rest) = name.strip_prefix("middle_block_") {
        let (i, tail) = num(rest)?;
        let part = ["resnets_0", "attentions_0", "resnets_1"].get(i)?;
        let tail = if i == 1 { tail } else { resnet_tail(&tail) };
        return Some(format!("mid_block_{part}_{tail}"));
    }
    if let Some(rest) = name.strip_prefix("output_blocks_") {
        let (i, rest) = num(rest)?;
        let (j, tail) = num(&rest)?;
        let (block, layer) = (i / (lpb + 1), i % (lpb + 1));
        let kind = inner.get(j)?;
        let layer = if j < 2 { layer } else { 0 };
        let tail = if j == 0 { resnet_tail(&tail) } else { tail };
        return Some(format!("up_blocks_{block}_{kind}_{layer}_{tail}"));
    }
    None
}

/// kohya-ss's `.alpha` of each module, by (component, module).
type Alphas = BTreeMap<(String, String), f64>;

/// The scalar `.alpha` of a kohya-ss module.
fn alpha_value(t: &TensorRef, key: &str) -> Result<f64> {
    if t.numel() != 1 || !t.dtype.is_mergeable() {
        return Err(Error::tensor(
            t.file,
            key,
            format!(
                "a LoRA alpha must be one floating-point number, not {:?} {:?}",
                t.dtype, t.shape
            ),
        ));
    }
    let mut v = [0f32];
    decode(t.dtype, t.data, &mut v);
    if !v[0].is_finite() || v[0] <= 0.0 {
        return Err(Error::tensor(
            t.file,
            key,
            format!("LoRA alpha {} is not a positive number", v[0]),
        ));
    }
    Ok(v[0] as f64)
}

impl LoraFile {
    fn parse_diffusers<'a>(
        &self,
        adapter: &ModelView<'a>,
        base: &ModelView<'a>,
    ) -> Result<Halves<'a>> {
        let index = Index::new(base, '.');
        let mut halves = Halves::default();
        for (key, t) in &adapter.tensors {
            let (component, name) = match key.split_once('.') {
                Some((c, rest)) if COMPONENTS.contains(&c) => (c, rest),
                _ => ("", key.as_str()),
            };
            let Some((module, which)) = DIFFUSERS_SUFFIXES
                .iter()
                .find_map(|(s, w)| name.strip_suffix(s).map(|m| (m, *w)))
            else {
                let why = if key.ends_with(".alpha") {
                    "is an alpha in diffusers' naming, which diffusers' loader does not read (only kohya-ss files carry alphas); remove it, or save the file in kohya-ss's naming"
                } else if key.contains("dora") || key.contains("magnitude") {
                    "is a DoRA magnitude: DoRA adapters are not supported yet"
                } else {
                    "is not a LoRA factor this diffusion LoRA file format knows (.lora_A/.lora_B, .lora.down/.lora.up)"
                };
                return Err(Error::tensor(t.file, key, why));
            };
            let target = match index.find(component, &diffusers_spellings(component, module)) {
                Some(Some(target)) => target,
                Some(None) => return Err(twice(t.file, key)),
                None => return Err(unmatched(t.file, key, component, base)),
            };
            let (_, rest) = split(&target);
            let module = rest.strip_suffix(".weight").unwrap_or(rest);
            halves.put(component, module, target.clone(), which, false, t);
        }
        Ok(halves)
    }

    fn parse_kohya<'a>(
        &self,
        adapter: &ModelView<'a>,
        base: &ModelView<'a>,
    ) -> Result<(Halves<'a>, Alphas)> {
        let index = Index::new(base, '_');
        let mut halves = Halves::default();
        let mut alphas = BTreeMap::new();
        for (key, t) in &adapter.tensors {
            let Some((prefix, component)) = KOHYA.iter().find(|(p, _)| key.starts_with(p)) else {
                return Err(Error::tensor(
                    t.file,
                    key,
                    "does not start with a kohya-ss prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_) like the file's other tensors",
                ));
            };
            let (stem, what) = key.split_once('.').unwrap_or((key, ""));
            let which = match what {
                "lora_down.weight" => 0,
                "lora_up.weight" => 1,
                "alpha" => 2,
                _ => {
                    let why = match what {
                        "dora_scale" => "is a DoRA magnitude: DoRA adapters are not supported yet",
                        "lora_mid.weight" => "is a LoCon Tucker core (lora_mid): not supported yet",
                        w if w.starts_with("hada_") || w.starts_with("lokr_") => {
                            "belongs to a LyCORIS LoHa/LoKr adapter: only LoRA is supported"
                        }
                        _ => "is not .lora_down.weight, .lora_up.weight or .alpha",
                    };
                    return Err(Error::tensor(t.file, key, why));
                }
            };
            let raw = &stem[prefix.len()..];
            let raw = raw.strip_prefix("text_model_").unwrap_or(raw);
            let mut names = vec![raw.to_owned()];
            if *component == "unet" {
                let lpb = layers_per_block(base, component).or_else(|| layers_per_block(base, ""));
                names.extend(lpb.and_then(|lpb| sgm_to_diffusers(raw, lpb)));
            }
            let found = index.find(component, &names);
            let target = match found {
                Some(Some(target)) => target,
                Some(None) => return Err(twice(t.file, key)),
                None => return Err(unmatched(t.file, key, component, base)),
            };
            let (_, rest) = split(&target);
            let module = rest.strip_suffix(".weight").unwrap_or(rest).to_owned();
            if which == 2 {
                alphas.insert((component.to_string(), module), alpha_value(t, key)?);
            } else {
                halves.put(component, &module, target.clone(), which, false, t);
            }
        }
        Ok((halves, alphas))
    }
}

/// The error for a LoRA tensor whose name two of the base's modules share once spelled as its
/// format spells them.
fn twice(file: &str, key: &str) -> Error {
    Error::tensor(
        file,
        key,
        "names two of the base's modules once spelled as this format spells names ('.' read as '_', text_model. dropped); it cannot be told which it adapts",
    )
}

/// The error for a LoRA tensor that adapts no module of the base.
fn unmatched(file: &str, key: &str, component: &str, base: &ModelView) -> Error {
    let pipeline = base.tensors.keys().any(|n| n.contains('/'));
    let hint = if pipeline {
        format!("the base pipeline has no such module in {component}/")
    } else if component.is_empty() {
        "the base has no such module".to_owned()
    } else {
        format!("the base has no such module: it adapts the {component}; give the base as the whole diffusers pipeline (the directory with model_index.json), or the {component} directory")
    };
    Error::tensor(file, key, format!("adapts no module of the base: {hint}"))
}

impl Format for LoraFile {
    fn parse<'a>(&self, adapter: &ModelView<'a>, base: &ModelView<'a>) -> Result<Parsed<'a>> {
        let pairs = match self.kind {
            Kind::Diffusers => self.parse_diffusers(adapter, base)?.pairs(&adapter.label)?,
            Kind::Kohya => {
                let (halves, alphas) = self.parse_kohya(adapter, base)?;
                let mut pairs = halves.pairs(&adapter.label)?;
                for p in &mut pairs {
                    p.alpha = alphas
                        .get(&(p.component.clone(), p.module.clone()))
                        .copied();
                }
                let with = pairs.iter().filter(|p| p.alpha.is_some()).count();
                if let Some(p) = pairs
                    .iter()
                    .find(|p| p.alpha.is_none())
                    .filter(|_| with > 0)
                {
                    return Err(Error::tensor(
                        p.a.file,
                        &p.target,
                        format!(
                            "is adapted without an .alpha while {with} of the file's {} modules have one: kohya-ss scales such a module by 1, diffusers by the most common alpha; give every module its alpha",
                            pairs.len()
                        ),
                    ));
                }
                pairs
            }
        };
        Ok(Parsed {
            pairs,
            full: BTreeMap::new(),
        })
    }

    fn scaling(&self, pair: &Pair, rank: usize) -> Result<f32> {
        if let Some(alpha) = pair.alpha {
            return Ok((alpha / rank as f64) as f32);
        }
        match self.configs.get(&pair.component) {
            Some(cfg) => cfg.scaling(&pair.module, rank, pair.a.file),
            None => Ok(1.0),
        }
    }
}
