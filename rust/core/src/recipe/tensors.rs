//! Per-tensor parameters, resolved as mergekit 0.1.5 resolves them (`evaluate_setting`,
//! `resolve_parameters`): a parameter's setting is a list of conditions, and the first whose
//! filter is a substring of the tensor's name (or that has none, or `*`) gives the value. A value
//! is one number (bool, string) or a gradient over the layers, read at t = layer / (layers − 1)
//! (t = 1 with one layer; t = 0 for tensors outside the layers, as mergekit's pre/post weights).
//!
//! Tensors whose values agree form a group, and each group is merged with a recipe of its own:
//! a method's statistics (TIES's threshold, PCB's bounds, …) are gathered over the group's tensors
//! only, so they mean what they would in a merge of just those tensors. With mergekit's semantics
//! every statistic is per tensor anyway, so the result is mergekit's whatever the grouping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Job, Mode, Recipe};
use crate::error::{Error, Result};
use crate::methods::Param;
use crate::plan::TensorPlan;

/// One condition of a setting.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    /// A substring of the tensor name; `None` or `*` match every tensor.
    pub filter: Option<String>,
    /// With slices: the condition holds in this output slice only (a slice's own scope).
    pub slice: Option<usize>,
    /// With modules: the condition holds in this module only (index into [`PerTensor::modules`]).
    pub module: Option<usize>,
    pub value: Value,
}

/// A part of a model with layers of its own (mergekit's modules: a vision-language model's text
/// decoder, vision tower and projector; T5's encoder and decoder). A gradient runs over the
/// module's own layers, as mergekit plans each module apart, and a condition can be scoped to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    pub name: String,
    /// Its tensors: names starting with one of these (the longest prefix of any module wins, so
    /// `visual.merger.` can be one module inside another's `visual.`).
    pub prefixes: Vec<String>,
    /// Whether it has layers; one without (a projector) reads its gradients at t = 0, as
    /// mergekit's pre- and post-layer weights.
    pub layered: bool,
    /// Tensors (by name prefix) that mergekit plans at a t of its own: an architecture file
    /// whose layer names lack the layer index plans them once per layer, and the last wins.
    pub pins: Vec<(String, f64)>,
}

/// Modules one run accepts, and prefixes per module: far beyond any architecture.
pub const MAX_MODULES: usize = 64;
pub const MAX_PREFIXES: usize = 256;

/// The module tensor `name` belongs to: the one with the longest prefix of it.
pub fn module_of(modules: &[Module], name: &str) -> Option<usize> {
    modules
        .iter()
        .enumerate()
        .flat_map(|(m, md)| md.prefixes.iter().map(move |p| (m, p)))
        .filter(|(_, p)| name.starts_with(p.as_str()))
        .max_by_key(|(m, p)| (p.len(), std::cmp::Reverse(*m)))
        .map(|(m, _)| m)
}

/// A condition's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    One(Param),
    /// A gradient: numbers are interpolated linearly at t; other values are stepped through.
    Steps(Vec<Param>),
}

/// A parameter's setting: conditions in precedence order (mergekit's scopes, narrowest first,
/// concatenated: the first scope that yields a value wins, as the first condition that matches).
pub type Setting = Vec<Cond>;

/// The per-tensor parameters of a job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerTensor {
    /// Parameters shared by the models (`lam` among them), by name.
    pub shared: BTreeMap<String, Setting>,
    /// Per-model parameters (`weights` among them): one setting per fine-tuned model.
    pub per_model: BTreeMap<String, Vec<Setting>>,
    /// The model's modules (none: one, the whole model).
    pub modules: Vec<Module>,
}

/// Tensors merged with one recipe: plan indices, ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorGroup {
    pub tensors: Vec<usize>,
    pub recipe: Recipe,
}

/// Groups accepted in one run (each runs its own passes over its own tensors).
pub const MAX_GROUPS: usize = 1 << 16;

/// The value of `setting` for tensor `name` at `t`, `None` when no condition matches.
pub fn evaluate(setting: &[Cond], name: &str, t: f64) -> Option<Param> {
    evaluate_in(setting, name, t, 0, None)
}

/// [`evaluate`] for a tensor of output slice `slice` and module `module`.
pub fn evaluate_in(
    setting: &[Cond],
    name: &str,
    t: f64,
    slice: usize,
    module: Option<usize>,
) -> Option<Param> {
    let c = setting.iter().find(|c| {
        c.slice.is_none_or(|s| s == slice)
            && c.module.is_none_or(|m| Some(m) == module)
            && match c.filter.as_deref() {
                None | Some("*") => true,
                Some(f) => name.contains(f),
            }
    })?;
    match &c.value {
        Value::One(p) => Some(p.clone()),
        Value::Steps(v) if v.is_empty() => None,
        Value::Steps(v) => {
            let last = (v.len() - 1) as f64;
            let nums: Option<Vec<f64>> = v
                .iter()
                .map(|p| match p {
                    Param::Num(x) => Some(*x),
                    _ => None,
                })
                .collect();
            let Some(nums) = nums else {
                return Some(v[(t * last) as usize].clone());
            };
            // As mergekit does it, in f64: i0 = int(t·(n−1)), frac the rest.
            let scaled = t * last;
            let i0 = scaled as usize;
            let i1 = (i0 + 1).min(v.len() - 1);
            let frac = scaled - i0 as f64;
            Some(Param::Num((1.0 - frac) * nums[i0] + frac * nums[i1]))
        }
    }
}

/// The first value a setting can give (a stand-in while the tensors are not known yet).
fn first(setting: &[Cond]) -> Option<Param> {
    setting.iter().find_map(|c| match &c.value {
        Value::One(p) => Some(p.clone()),
        Value::Steps(v) => v.first().cloned(),
    })
}

/// Each tensor's module and mergekit's t for it: its layer (its first integer name component,
/// `layers.7.`) over its module's layer count, the largest layer of the module's tensors + 1
/// (tensors in no module count as one more module; a module without layers reads t = 0).
fn positions(plan: &[TensorPlan], modules: &[Module]) -> Vec<(Option<usize>, f64)> {
    let module: Vec<Option<usize>> = plan.iter().map(|t| module_of(modules, &t.name)).collect();
    let layer: Vec<Option<usize>> = plan
        .iter()
        .map(|t| crate::scaling::block_index(&t.name))
        .collect();
    let slot = |m: Option<usize>| m.unwrap_or(modules.len());
    let mut n = vec![0usize; modules.len() + 1];
    for ((t, m), l) in plan.iter().zip(&module).zip(&layer) {
        if let (true, Some(l)) = (t.mergeable, l) {
            n[slot(*m)] = n[slot(*m)].max(l + 1);
        }
    }
    module
        .iter()
        .zip(&layer)
        .zip(plan)
        .map(|((&m, &l), t)| match m {
            Some(k) => {
                let pin = modules[k]
                    .pins
                    .iter()
                    .filter(|(p, _)| t.name.starts_with(p.as_str()))
                    .max_by_key(|(p, _)| p.len());
                match pin {
                    Some(&(_, at)) => (m, at),
                    None if !modules[k].layered => (m, 0.0),
                    None => (m, gradient_t(l, n[k])),
                }
            }
            None => (m, gradient_t(l, n[slot(m)])),
        })
        .collect()
}

/// mergekit's t: layer / (layers − 1), 1 with a single layer, 0 outside the layers.
pub fn gradient_t(layer: Option<usize>, layers: usize) -> f64 {
    match layer {
        None => 0.0,
        Some(_) if layers <= 1 => 1.0,
        Some(i) => i as f64 / (layers - 1) as f64,
    }
}

fn setting_json(s: &[Cond]) -> serde_json::Value {
    s.iter()
        .map(|c| {
            let value = match &c.value {
                Value::One(p) => super::param_json(p),
                Value::Steps(v) => super::bounded(v.iter().map(super::param_json).collect()),
            };
            let mut j = serde_json::json!({"filter": c.filter, "value": value});
            if let Some(k) = c.slice {
                j["slice"] = serde_json::json!(k);
            }
            if let Some(k) = c.module {
                j["module"] = serde_json::json!(k);
            }
            j
        })
        .collect()
}

impl PerTensor {
    /// The settings as recorded in the output's metadata.
    pub(crate) fn json(&self) -> serde_json::Value {
        let mut r = serde_json::Map::new();
        for (k, s) in &self.shared {
            r.insert(k.clone(), setting_json(s));
        }
        for (k, per) in &self.per_model {
            r.insert(k.clone(), per.iter().map(|s| setting_json(s)).collect());
        }
        if !self.modules.is_empty() {
            let m: Vec<serde_json::Value> = self
                .modules
                .iter()
                .map(|m| {
                    serde_json::json!({"name": m.name, "prefixes": m.prefixes, "layered": m.layered,
                                       "pins": m.pins})
                })
                .collect();
            r.insert("modules".into(), serde_json::Value::Array(m));
        }
        serde_json::Value::Object(r)
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.shared.keys().chain(self.per_model.keys())
    }

    /// Checks the settings against the rest of the job before anything is opened.
    pub(crate) fn check(&self, job: &Job) -> Result<()> {
        for k in self.keys() {
            let clash = job.params.contains_key(k)
                || (k == "weights" && job.weights.is_some())
                || (k == "lam" && matches!(job.mode, Mode::Merge { lam: Some(_) }));
            if clash {
                return Err(Error::param(
                    k,
                    "is given both per tensor and for the whole model: give one of them",
                ));
            }
            if matches!(job.mode, Mode::Weave { .. }) && k == "lam" {
                return Err(Error::param(
                    "lam",
                    "a weave searches over λ: it cannot also be set per tensor",
                ));
            }
        }
        if self.shared.contains_key("weights") || self.per_model.contains_key("lam") {
            return Err(Error::param(
                "weights",
                "weights are per model and lam is shared: a setting of the other kind",
            ));
        }
        if job.metagpt || job.lines.is_some() {
            return Err(Error::param(
                "per-tensor parameters",
                "MetaGPT and LiNeS scale the whole model by rules of their own: they cannot take per-tensor parameters",
            ));
        }
        let searched = |k: &str| match &job.space {
            Some(crate::recipe::Space::Grid(axes)) => axes.iter().any(|(a, _)| a == k),
            Some(crate::recipe::Space::Points(p)) => p.iter().any(|p| p.contains_key(k)),
            None => false,
        };
        if let Some(k) = self.keys().find(|k| searched(k)) {
            return Err(Error::param(
                k,
                "is searched over and set per tensor: give one of them",
            ));
        }
        for (k, s) in &self.per_model {
            if s.is_empty() {
                return Err(Error::param(k, "per-model settings for no model"));
            }
        }
        self.check_modules(job)
    }

    fn check_modules(&self, job: &Job) -> Result<()> {
        let bad = |m: String| Err(Error::param("modules", m));
        if self.modules.is_empty() {
            return Ok(());
        }
        if job.slices.is_some() {
            return bad("slices and modules together: give each module its own layers".into());
        }
        if self.modules.len() > MAX_MODULES {
            return bad(format!(
                "{} modules, more than the {MAX_MODULES} allowed",
                self.modules.len()
            ));
        }
        for (i, m) in self.modules.iter().enumerate() {
            if m.prefixes.is_empty() || m.prefixes.len() > MAX_PREFIXES {
                return bad(format!(
                    "module '{}' needs 1 to {MAX_PREFIXES} name prefixes",
                    m.name
                ));
            }
            if m.pins.len() > MAX_PREFIXES || m.pins.iter().any(|(_, t)| !(0.0..=1.0).contains(t)) {
                return bad(format!(
                    "module '{}': up to {MAX_PREFIXES} pins, each a t in [0, 1]",
                    m.name
                ));
            }
            if self.modules[..i].iter().any(|o| o.name == m.name) {
                return bad(format!("module '{}' is given twice", m.name));
            }
        }
        let settings = self.shared.iter().chain(
            self.per_model
                .iter()
                .flat_map(|(k, per)| per.iter().map(move |s| (k, s))),
        );
        for (k, s) in settings {
            if let Some(m) = s
                .iter()
                .filter_map(|c| c.module)
                .find(|&m| m >= self.modules.len())
            {
                return Err(Error::param(
                    k,
                    format!(
                        "a condition of module {m}, of {} modules",
                        self.modules.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The job with each setting's first value in place of the setting: its recipe checks
    /// everything the per-tensor values do not change (the method, the mode, the pool).
    pub(crate) fn stand_in(&self, job: &Job) -> Job {
        let mut j = job.clone();
        j.per_tensor = None;
        for (k, s) in &self.shared {
            match (k.as_str(), first(s)) {
                ("lam", Some(Param::Num(x))) => {
                    if let Mode::Merge { lam } = &mut j.mode {
                        *lam = Some(x);
                    }
                }
                (_, Some(p)) => {
                    j.params.insert(k.clone(), p);
                }
                _ => {}
            }
        }
        for (k, per) in &self.per_model {
            let v: Option<Vec<f64>> = per
                .iter()
                .map(|s| match first(s) {
                    Some(Param::Num(x)) => Some(x),
                    _ => None,
                })
                .collect();
            match (k.as_str(), v) {
                ("weights", Some(v)) => j.weights = Some(v),
                (_, Some(v)) => {
                    j.params.insert(k.clone(), Param::List(v));
                }
                _ => {}
            }
        }
        j
    }

    /// The job of one tensor: its settings' values at its name and t, and a key telling apart
    /// jobs that differ.
    fn resolve(
        &self,
        job: &Job,
        name: &str,
        (t, slice, module): (f64, usize, Option<usize>),
    ) -> Result<(Job, String)> {
        let mut j = job.clone();
        j.per_tensor = None;
        j.slices = None;
        let mut key = String::new();
        for (k, s) in &self.shared {
            let v = evaluate_in(s, name, t, slice, module);
            key.push_str(&format!("{k}={v:?};"));
            match (k.as_str(), v) {
                (_, None) => {}
                ("lam", Some(Param::Num(x))) => {
                    if let Mode::Merge { lam } = &mut j.mode {
                        *lam = Some(x);
                    }
                }
                ("lam", Some(other)) => {
                    return Err(Error::param(
                        "lam",
                        format!("expected a number, got {other:?}"),
                    ))
                }
                (_, Some(p)) => {
                    j.params.insert(k.clone(), p);
                }
            }
        }
        for (k, per) in &self.per_model {
            let vals: Vec<Option<Param>> = per
                .iter()
                .map(|s| evaluate_in(s, name, t, slice, module))
                .collect();
            key.push_str(&format!("{k}={vals:?};"));
            if vals.iter().all(Option::is_none) {
                continue;
            }
            let mut nums = Vec::with_capacity(vals.len());
            for (m, v) in vals.into_iter().enumerate() {
                match v {
                    Some(Param::Num(x)) => nums.push(x),
                    Some(other) => {
                        return Err(Error::param(
                            k,
                            format!("model {m}: expected a number, got {other:?}"),
                        ))
                    }
                    None => {
                        return Err(Error::param(
                            k,
                            format!("no value for model {m}: none of its conditions matches"),
                        ))
                    }
                }
            }
            match k.as_str() {
                "weights" => j.weights = Some(nums),
                _ => {
                    j.params.insert(k.clone(), Param::List(nums));
                }
            }
        }
        Ok((j, key))
    }
}

impl Job {
    /// The groups of tensors that per-tensor parameters split `plan` into, each with its recipe
    /// (none without per-tensor parameters). Every value is checked here, before any work.
    pub fn tensor_groups(
        &self,
        plan: &[TensorPlan],
        tasks: usize,
        cancel: &AtomicBool,
    ) -> Result<Vec<TensorGroup>> {
        let Some(pt) = &self.per_tensor else {
            return Ok(Vec::new());
        };
        let pos = positions(plan, &pt.modules);
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut groups: Vec<TensorGroup> = Vec::new();
        for (i, t) in plan.iter().enumerate() {
            if !t.mergeable {
                continue;
            }
            if i % 1024 == 1023 && cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let at = |e: Error| match e {
                Error::InvalidParam { name, reason } => Error::param(
                    &name,
                    format!("{reason} (tensor '{}', per-tensor parameters)", t.name),
                ),
                other => other,
            };
            let at_t = match &self.slices {
                Some(s) => {
                    let p = s.position(&t.name);
                    (p.t, p.slice, None)
                }
                None => (pos[i].1, 0, pos[i].0),
            };
            let (job, key) = pt.resolve(self, &t.name, at_t).map_err(at)?;
            if let Some(&g) = index.get(&key) {
                groups[g].tensors.push(i);
                continue;
            }
            if groups.len() == MAX_GROUPS {
                return Err(Error::param(
                    "per-tensor parameters",
                    format!("split the model into more than {MAX_GROUPS} groups of tensors"),
                ));
            }
            let recipe = job.recipe_cancellable(cancel).map_err(at)?;
            // Every group holds its own points: bound them all together, as one search's are.
            let points = recipe.combine.members(0).max(1);
            if (groups.len() + 1).saturating_mul(points) > super::MAX_POINTS {
                return Err(Error::param(
                    "per-tensor parameters",
                    format!(
                        "{} groups of tensors × {points} search points each is past the {} points of one run",
                        groups.len() + 1,
                        super::MAX_POINTS
                    ),
                ));
            }
            job.check_tasks(&recipe, tasks).map_err(at)?;
            index.insert(key, groups.len());
            groups.push(TensorGroup {
                tensors: vec![i],
                recipe,
            });
        }
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(x: f64) -> Value {
        Value::One(Param::Num(x))
    }

    fn steps(v: &[f64]) -> Value {
        Value::Steps(v.iter().map(|&x| Param::Num(x)).collect())
    }

    #[test]
    fn first_matching_condition_wins() {
        let s = vec![
            Cond {
                filter: Some("self_attn".into()),
                slice: None,
                module: None,
                value: one(0.2),
            },
            Cond {
                filter: Some("mlp".into()),
                slice: None,
                module: None,
                value: one(0.7),
            },
            Cond {
                filter: None,
                slice: None,
                module: None,
                value: one(0.5),
            },
        ];
        let v = |n: &str| evaluate(&s, n, 0.0);
        assert_eq!(
            v("model.layers.0.self_attn.q_proj.weight"),
            Some(Param::Num(0.2))
        );
        assert_eq!(
            v("model.layers.0.mlp.up_proj.weight"),
            Some(Param::Num(0.7))
        );
        assert_eq!(v("model.norm.weight"), Some(Param::Num(0.5)));
        assert_eq!(evaluate(&s[..2], "model.norm.weight", 0.0), None);
    }

    #[test]
    fn gradients_interpolate_as_mergekit() {
        // Hand-worked: [0, 0.5, 0.3, 0.7, 1] at t = 0.6 → scaled 2.4, between 0.3 and 0.7.
        let s = vec![Cond {
            filter: Some("*".into()),
            slice: None,
            module: None,
            value: steps(&[0.0, 0.5, 0.3, 0.7, 1.0]),
        }];
        let Some(Param::Num(x)) = evaluate(&s, "x", 0.6) else {
            panic!()
        };
        assert!((x - (0.6 * 0.3 + 0.4 * 0.7)).abs() < 1e-12);
        assert_eq!(evaluate(&s, "x", 1.0), Some(Param::Num(1.0)));
        assert_eq!(evaluate(&s, "x", 0.0), Some(Param::Num(0.0)));
        let flags = vec![Cond {
            filter: None,
            slice: None,
            module: None,
            value: Value::Steps(vec![Param::Bool(true), Param::Bool(false)]),
        }];
        assert_eq!(evaluate(&flags, "x", 0.99), Some(Param::Bool(true)));
        assert_eq!(evaluate(&flags, "x", 1.0), Some(Param::Bool(false)));
    }

    #[test]
    fn t_is_layer_over_layers_minus_one() {
        assert_eq!(gradient_t(None, 32), 0.0);
        assert_eq!(gradient_t(Some(0), 1), 1.0);
        assert_eq!(gradient_t(Some(3), 4), 1.0);
        assert_eq!(gradient_t(Some(1), 5), 0.25);
    }

    fn plan(names: &[&str]) -> Vec<TensorPlan> {
        names
            .iter()
            .map(|n| TensorPlan {
                name: (*n).into(),
                shape: vec![1],
                numel: 1,
                base_dtype: crate::dtype::DType::F32,
                out_dtype: crate::dtype::DType::F32,
                mergeable: true,
                requant: None,
                derived: None,
            })
            .collect()
    }

    fn module(name: &str, prefixes: &[&str], layered: bool) -> Module {
        Module {
            name: name.into(),
            prefixes: prefixes.iter().map(|p| (*p).into()).collect(),
            layered,
            pins: Vec::new(),
        }
    }

    #[test]
    fn each_module_runs_its_gradient_over_its_own_layers() {
        // A Qwen2-VL: 3 text layers, 5 vision blocks, a projector inside `visual.`.
        let mut projector = module("multi_modal_projector", &["visual.merger."], false);
        projector.pins = vec![("visual.merger.mlp.".into(), 1.0)];
        let mods = [
            module("text_decoder", &["model.", "lm_head."], true),
            projector,
            module("vision_tower", &["visual."], true),
        ];
        let p = plan(&[
            "model.embed_tokens.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "visual.blocks.4.attn.qkv.weight",
            "visual.blocks.1.attn.qkv.weight",
            "visual.merger.mlp.2.weight",
            "lm_head.weight",
            "other.3.weight",
            "visual.merger.ln_q.weight",
        ]);
        let got = positions(&p, &mods);
        let want = [
            (Some(0), 0.0),
            (Some(0), 1.0),
            (Some(0), 0.5),
            (Some(0), 0.0),
            (Some(2), 1.0),
            (Some(2), 0.25),
            (Some(1), 1.0),
            (Some(0), 0.0),
            (None, 1.0),
            (Some(1), 0.0),
        ];
        assert_eq!(got, want);
        // Without modules: one layer count (5) for every tensor, as before.
        assert_eq!(positions(&p, &[])[1], (None, 0.5));
        // Conditions scoped to a module hold in it only.
        let s = vec![
            Cond {
                filter: None,
                slice: None,
                module: Some(2),
                value: one(0.9),
            },
            Cond {
                filter: None,
                slice: None,
                module: None,
                value: one(0.1),
            },
        ];
        assert_eq!(
            evaluate_in(&s, "visual.blocks.1.x", 0.0, 0, Some(2)),
            Some(Param::Num(0.9))
        );
        assert_eq!(
            evaluate_in(&s, "visual.merger.x", 0.0, 0, Some(1)),
            Some(Param::Num(0.1))
        );
        assert_eq!(module_of(&mods, "visualize.x"), None);
    }
}
