//! The merge methods f_merge(τ_1..τ_T) → M of SPEC.md: their parameters, defaults and the
//! per-chunk kernels. Global statistics (TIES thresholds, PCB percentiles) are gathered by the
//! pipeline's extra passes and handed to the kernels as plain numbers.

/// Runs `$body` with `$r` the rounding of `$arith`, a closure of its own per dtype (the
/// identity without one), so each arithmetic is compiled without a branch per operation.
macro_rules! with_round {
    ($arith:expr, |$r:ident| $body:expr) => {
        match $arith {
            None => {
                let $r = |v: f32| v;
                $body
            }
            Some(crate::dtype::DType::F16) => {
                let $r = |v: f32| half::f16::from_f32(v).to_f32();
                $body
            }
            Some(_) => {
                let $r = |v: f32| crate::dtype::round_to(crate::dtype::DType::BF16, v);
                $body
            }
        }
    };
}

pub mod arcee_fusion;
pub mod breadcrumbs;
pub mod dare;
pub mod della;
pub mod elementwise;
pub mod fastmath;
mod gather_avx512;
pub mod karcher;
mod karcher_dtype;
pub mod kernel;
pub mod libm;
pub mod libm_avx512;
pub mod linear;
pub mod magmax;
pub mod mergekit;
mod mergekit_arith;
pub mod mergekit_linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod pcb;
mod pcb_block;
pub mod ram;
pub mod reduce;
pub mod registry;
mod row_cut;
pub mod sce;
pub mod sign_tally;
pub mod slerp;
pub mod svd;
pub mod task_arithmetic;
pub mod ties;

use std::collections::BTreeMap;

use crate::error::{Error, Result};

pub use mergekit::{Gta, Sparsify};

/// A parameter value as it arrives from Python or the CLI.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    Num(f64),
    Bool(bool),
    Str(String),
    /// One number per fine-tuned model (SPEC: per-model density or gamma).
    List(Vec<f64>),
}

/// A parameter given for all tasks at once or one value per task.
#[derive(Clone, Debug, PartialEq)]
pub enum PerTask {
    All(f64),
    Each(Vec<f64>),
}

impl PerTask {
    #[inline]
    pub fn get(&self, task: usize) -> f64 {
        match self {
            PerTask::All(v) => *v,
            PerTask::Each(v) => v[task],
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        match self {
            PerTask::All(v) => serde_json::json!(v),
            PerTask::Each(v) => serde_json::json!(v),
        }
    }

    pub(crate) fn check_len(&self, name: &str, tasks: usize) -> Result<()> {
        match self {
            PerTask::Each(v) if v.len() != tasks => Err(Error::param(
                name,
                format!("{} values for {tasks} fine-tuned models", v.len()),
            )),
            _ => Ok(()),
        }
    }
}

pub type Params = BTreeMap<String, Param>;

/// The unit within which a method ranks magnitudes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    None,
    /// Rows along the last dimension (a 0-d tensor is left as it is).
    Last,
    /// The whole tensor is one row.
    Tensor,
    /// Whole slices along dimension 0 of a tensor of 3 or more dimensions (the vectors along
    /// dimension 1 lie within one), rows along the last dimension otherwise; never split.
    Slab,
    /// Rows along the last dimension, whole in every chunk where a row fits one (a longer row
    /// comes in plain chunks, as with `None`); nothing ranks within them. For row statistics
    /// a chunk can finish alone (see [`kernel::Kernel::next_stage_for`]).
    Whole,
}

/// Where TIES computes its threshold and majority sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Over the whole model, like the reference implementation.
    Global,
    /// Per tensor, like mergekit.
    Tensor,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DareParams {
    /// Keep probability (1 − drop rate), per task.
    pub density: PerTask,
    pub rescale: bool,
}

/// A merge method with validated parameters: a [`kernel::Kernel`] (every method is one file
/// under `methods/` behind the trait; `methods/registry.rs` builds them by name).
#[derive(Clone, Debug, PartialEq)]
pub struct Method(pub KernelRef);

/// A shared [`kernel::Kernel`]; two are equal when their names and parameters are.
#[derive(Clone, Debug)]
pub struct KernelRef(pub std::sync::Arc<dyn kernel::Kernel>);

impl PartialEq for KernelRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name() && self.0.params_json() == other.0.params_json()
    }
}

impl std::ops::Deref for Method {
    type Target = dyn kernel::Kernel;
    fn deref(&self) -> &Self::Target {
        self.0 .0.as_ref()
    }
}

pub const METHOD_NAMES: &str =
    "task_arithmetic, linear, magmax, dare, dare_ties, ties, breadcrumbs, pcb, tsv, iso_c, iso_cts, wudi, della, della_linear, slerp, nuslerp, multislerp, nearswap, passthrough, model_stock, sce, ram, ramplus_tl, karcher, arcee_fusion";

/// Reads and range-checks parameters, rejecting any the method does not take.
pub struct Reader<'a> {
    params: &'a Params,
    used: Vec<&'static str>,
}

impl<'a> Reader<'a> {
    pub fn new(params: &'a Params) -> Reader<'a> {
        Reader {
            params,
            used: Vec::new(),
        }
    }

    pub fn num(
        &mut self,
        name: &'static str,
        default: f64,
        lo: f64,
        hi: f64,
        lo_open: bool,
    ) -> Result<f64> {
        self.used.push(name);
        let v = match self.params.get(name) {
            None => return Ok(default),
            Some(Param::Num(v)) => *v,
            Some(other) => {
                return Err(Error::param(
                    name,
                    format!("expected a number, got {other:?}"),
                ))
            }
        };
        let below = if lo_open { v <= lo } else { v < lo };
        if !v.is_finite() || below || v > hi {
            let open = if lo_open { "(" } else { "[" };
            return Err(Error::param(
                name,
                format!("{v} is outside {open}{lo}, {hi}]"),
            ));
        }
        Ok(v)
    }

    /// A number for all tasks or a list of one per task, each in the range.
    pub fn frac(
        &mut self,
        name: &'static str,
        default: f64,
        lo: f64,
        hi: f64,
        lo_open: bool,
    ) -> Result<PerTask> {
        if let Some(Param::List(values)) = self.params.get(name) {
            self.used.push(name);
            if values.is_empty() {
                return Err(Error::param(name, "an empty list"));
            }
            for (t, &v) in values.iter().enumerate() {
                let one = Params::from([(name.to_owned(), Param::Num(v))]);
                let mut r = Reader {
                    params: &one,
                    used: Vec::new(),
                };
                r.num(name, default, lo, hi, lo_open)
                    .map_err(|e| Error::param(name, format!("model {t}: {}", e.detail())))?;
            }
            return Ok(PerTask::Each(values.clone()));
        }
        Ok(PerTask::All(self.num(name, default, lo, hi, lo_open)?))
    }

    pub fn flag(&mut self, name: &'static str, default: bool) -> Result<bool> {
        self.used.push(name);
        match self.params.get(name) {
            None => Ok(default),
            Some(Param::Bool(b)) => Ok(*b),
            Some(Param::Str(s)) if s == "true" || s == "false" => Ok(s == "true"),
            Some(other) => Err(Error::param(
                name,
                format!("expected true or false, got {other:?}"),
            )),
        }
    }

    pub(crate) fn scope(&mut self) -> Result<Scope> {
        self.used.push("scope");
        match self.params.get("scope") {
            None => Ok(Scope::Global),
            Some(Param::Str(s)) if s == "global" => Ok(Scope::Global),
            Some(Param::Str(s)) if s == "tensor" => Ok(Scope::Tensor),
            Some(other) => Err(Error::param(
                "scope",
                format!("expected \"global\" or \"tensor\", got {other:?}"),
            )),
        }
    }

    pub fn finish(self, method: &str) -> Result<()> {
        if let Some(k) = self
            .params
            .keys()
            .find(|k| !self.used.contains(&k.as_str()))
        {
            let accepted = if self.used.is_empty() {
                "none".to_owned()
            } else {
                self.used.join(", ")
            };
            return Err(Error::param(
                k,
                format!("not a parameter of {method} (accepted: {accepted})"),
            ));
        }
        Ok(())
    }
}

impl Method {
    /// Builds a method from its name and parameters, applying SPEC.md's defaults.
    pub fn parse(name: &str, params: &Params) -> Result<Method> {
        let mut r = Reader::new(params);
        if let Some(k) = registry::paper(name, &mut r)? {
            r.finish(name)?;
            return Ok(Method(KernelRef(k)));
        }
        if registry::mergekit_only(name) {
            // mergekit's other methods have mergekit's semantics only.
            return Method::parse_mergekit(name, params);
        }
        Err(Error::UnknownMethod {
            name: name.to_owned(),
            known: METHOD_NAMES,
        })
    }

    /// Builds one of mergekit's methods with mergekit's semantics and defaults.
    pub fn parse_mergekit(name: &str, params: &Params) -> Result<Method> {
        let mut r = Reader::new(params);
        match registry::mergekit(name, &mut r)? {
            Some(k) => {
                r.finish(name)?;
                Ok(Method(KernelRef(k)))
            }
            None => Err(Error::UnknownMethod {
                name: name.to_owned(),
                known: registry::MERGEKIT_NAMES,
            }),
        }
    }

    /// Whether the method takes the deltas unweighted, with the weights beside (mergekit's).
    pub fn unweighted(&self) -> bool {
        !self.weighted()
    }

    /// λ of a plain merge when the caller gives none (SPEC.md's table; 1.0 where it gives none).
    pub fn default_lam(name: &str) -> f64 {
        match name {
            "task_arithmetic" => 0.3,
            "magmax" => 0.5,
            _ => 1.0,
        }
    }

    /// The paper's default search space Λ for Weight Weaving (step 0.1, both ends included).
    pub fn default_lambdas(name: &str) -> Option<Vec<f64>> {
        let (a, b) = match name {
            "task_arithmetic" | "linear" | "dare" | "magmax" | "breadcrumbs" => (1, 10),
            "ties" | "dare_ties" => (1, 15),
            "pcb" => (1, 25),
            "tsv" => (5, 20),
            "iso_c" | "iso_cts" => (1, 20),
            "wudi" => (1, 20),
            // mergekit's other methods: λ, or t for the interpolations (`registry::default_t`).
            _ if registry::mergekit_only(name) => (1, 10),
            _ => return None,
        };
        Some((a..=b).map(|k| k as f64 / 10.0).collect())
    }
}

pub(crate) fn dare(r: &mut Reader) -> Result<DareParams> {
    Ok(DareParams {
        density: r.frac("density", 0.5, 0.0, 1.0, true)?,
        rescale: r.flag("rescale", true)?,
    })
}

/// `int(d · f)` as Python computes it (f64 product, truncation), used for every rank in SPEC.md.
pub fn int_frac(d: usize, f: f64) -> usize {
    let v = d as f64 * f;
    if v <= 0.0 {
        0
    } else {
        v as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, Param)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn defaults_and_validation() {
        assert_eq!(
            Method::parse("ties", &Params::new()).unwrap().params_json(),
            serde_json::json!({"density": 0.2, "scope": "global"})
        );
        let bad = [
            ("ties", p(&[("density", Param::Num(0.0))])),
            ("ties", p(&[("density", Param::Num(1.5))])),
            ("ties", p(&[("scope", Param::Str("row".into()))])),
            ("dare", p(&[("gamma", Param::Num(0.1))])),
            (
                "breadcrumbs",
                p(&[("density", Param::Num(0.9)), ("gamma", Param::Num(0.2))]),
            ),
            ("pcb", p(&[("ratio", Param::Num(f64::NAN))])),
            ("task_arithmetic", p(&[("density", Param::Num(0.5))])),
        ];
        for (m, params) in bad {
            assert!(
                matches!(Method::parse(m, &params), Err(Error::InvalidParam { .. })),
                "{m} {params:?}"
            );
        }
        assert!(matches!(
            Method::parse("nope", &Params::new()),
            Err(Error::UnknownMethod { .. })
        ));
    }

    #[test]
    fn default_search_spaces() {
        let l = Method::default_lambdas("pcb").unwrap();
        assert_eq!((l.len(), l[0], l[24]), (25, 0.1, 2.5));
        assert_eq!(Method::default_lambdas("tsv").unwrap()[0], 0.5);
    }

    #[test]
    fn python_int_semantics() {
        assert_eq!(int_frac(10, 0.2), 2);
        assert_eq!(int_frac(3, 0.99), 2);
        assert_eq!(int_frac(0, 0.5), 0);
    }
}
