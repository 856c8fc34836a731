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
    pub value: Value,
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
    evaluate_in(setting, name, t, 0)
}

/// [`evaluate`] for a tensor of output slice `slice`.
pub fn evaluate_in(setting: &[Cond], name: &str, t: f64, slice: usize) -> Option<Param> {
    let c = setting.iter().find(|c| {
        c.slice.map_or(true, |s| s == slice)
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

/// The layer of each tensor (its first integer name component, `layers.7.`) and the layer count:
/// the largest layer + 1.
fn layers(plan: &[TensorPlan]) -> (Vec<Option<usize>>, usize) {
    let layer: Vec<Option<usize>> = plan
        .iter()
        .map(|t| crate::scaling::block_index(&t.name))
        .collect();
    let n = plan
        .iter()
        .zip(&layer)
        .filter(|(t, _)| t.mergeable)
        .filter_map(|(_, l)| *l)
        .max()
        .map_or(0, |l| l + 1);
    (layer, n)
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
    fn resolve(&self, job: &Job, name: &str, (t, slice): (f64, usize)) -> Result<(Job, String)> {
        let mut j = job.clone();
        j.per_tensor = None;
        j.slices = None;
        let mut key = String::new();
        for (k, s) in &self.shared {
            let v = evaluate_in(s, name, t, slice);
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
            let vals: Vec<Option<Param>> =
                per.iter().map(|s| evaluate_in(s, name, t, slice)).collect();
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
        let (layer, n) = layers(plan);
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
                    (p.t, p.slice)
                }
                None => (gradient_t(layer[i], n), 0),
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
                value: one(0.2),
            },
            Cond {
                filter: Some("mlp".into()),
                slice: None,
                value: one(0.7),
            },
            Cond {
                filter: None,
                slice: None,
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
}
