//! The methods behind the [`Kernel`] trait, by name: one line per method. Each file under
//! `methods/` parses its own parameters (mergekit 0.1.5's names and defaults) and does the rest.

use std::sync::Arc;

use super::kernel::Kernel;
use super::{Param, Reader};
use crate::error::{Error, Result};

/// Every mergekit 0.1.5 method this crate runs (with `compat = "mergekit"`).
pub const MERGEKIT_NAMES: &str = "linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, nuslerp, multislerp, karcher, nearswap, passthrough, model_stock, sce, ram, ramplus_tl, arcee_fusion";

/// Builds a kernel method from its parameters.
type Make = fn(&mut Reader) -> Result<Arc<dyn Kernel>>;

/// The methods behind the trait: one line each.
static REGISTRY: [(&str, Make); 14] = [
    ("linear", |r| {
        Ok(Arc::new(super::mergekit_linear::MergekitLinear::parse(r)?))
    }),
    ("slerp", |r| Ok(Arc::new(super::slerp::Slerp::parse(r)?))),
    ("nuslerp", |r| {
        Ok(Arc::new(super::nuslerp::NuSlerp::parse(r)?))
    }),
    ("multislerp", |r| {
        Ok(Arc::new(super::multislerp::MultiSlerp::parse(r)?))
    }),
    ("karcher", |r| {
        Ok(Arc::new(super::karcher::Karcher::parse(r)?))
    }),
    ("nearswap", |r| {
        Ok(Arc::new(super::nearswap::NearSwap::parse(r)?))
    }),
    ("passthrough", |r| {
        Ok(Arc::new(super::passthrough::Passthrough::parse(r)?))
    }),
    ("model_stock", |r| {
        Ok(Arc::new(super::model_stock::ModelStock::parse(r)?))
    }),
    ("della", |r| {
        Ok(Arc::new(super::della::Della::parse(r, true)?))
    }),
    ("della_linear", |r| {
        Ok(Arc::new(super::della::Della::parse(r, false)?))
    }),
    ("sce", |r| Ok(Arc::new(super::sce::Sce::parse(r)?))),
    ("ram", |r| Ok(Arc::new(super::ram::Ram::parse(r, false)?))),
    ("ramplus_tl", |r| {
        Ok(Arc::new(super::ram::Ram::parse(r, true)?))
    }),
    ("arcee_fusion", |r| {
        Ok(Arc::new(super::arcee_fusion::ArceeFusion::parse(r)?))
    }),
];

/// mergekit's generalized task arithmetic family (`compat = "mergekit"`): one kernel with
/// switches, as mergekit has it.
static GTA: [(&str, Make); 6] = [
    ("task_arithmetic", |r| gta("task_arithmetic", r)),
    ("ties", |r| gta("ties", r)),
    ("dare_ties", |r| gta("dare_ties", r)),
    ("dare_linear", |r| gta("dare_linear", r)),
    ("breadcrumbs", |r| gta("breadcrumbs", r)),
    ("breadcrumbs_ties", |r| gta("breadcrumbs_ties", r)),
];

fn gta(name: &str, r: &mut Reader) -> Result<Arc<dyn Kernel>> {
    Ok(Arc::new(super::mergekit::Gta::parse(name, r)?))
}

/// The papers' methods behind the trait (SPEC.md's semantics).
static PAPER: [(&str, Make); 12] = [
    ("task_arithmetic", |r| {
        Ok(Arc::new(super::task_arithmetic::TaskArithmetic::parse(r)?))
    }),
    ("linear", |r| Ok(Arc::new(super::linear::Linear::parse(r)?))),
    ("magmax", |r| Ok(Arc::new(super::magmax::MagMax::parse(r)?))),
    ("dare", |r| Ok(Arc::new(super::dare::Dare::parse(r)?))),
    ("dare_ties", |r| {
        Ok(Arc::new(super::ties::Ties::parse_dare(r)?))
    }),
    ("ties", |r| Ok(Arc::new(super::ties::Ties::parse(r)?))),
    ("breadcrumbs", |r| {
        Ok(Arc::new(super::breadcrumbs::Breadcrumbs::parse(r)?))
    }),
    ("pcb", |r| Ok(Arc::new(super::pcb::Pcb::parse(r)?))),
    ("tsv", |r| Ok(Arc::new(super::svd::Svd::parse(r, "tsv")?))),
    ("iso_c", |r| {
        Ok(Arc::new(super::svd::Svd::parse(r, "iso_c")?))
    }),
    ("iso_cts", |r| {
        Ok(Arc::new(super::svd::Svd::parse(r, "iso_cts")?))
    }),
    ("wudi", |r| Ok(Arc::new(super::svd::Svd::parse(r, "wudi")?))),
];

/// Builds the papers' method `name` on the trait, or None when it is not one of them.
pub fn paper(name: &str, r: &mut Reader) -> Result<Option<Arc<dyn Kernel>>> {
    match PAPER.iter().find(|(n, _)| *n == name) {
        Some((_, make)) => make(r).map(Some),
        None => Ok(None),
    }
}

/// Builds mergekit's method `name` (mergekit's semantics), or None when it is not one.
pub fn mergekit(name: &str, r: &mut Reader) -> Result<Option<Arc<dyn Kernel>>> {
    match REGISTRY.iter().chain(&GTA).find(|(n, _)| *n == name) {
        Some((_, make)) => make(r).map(Some),
        None => Ok(None),
    }
}

/// Whether `name` is one of mergekit's methods the papers have no version of (they have
/// mergekit's semantics only).
pub fn mergekit_only(name: &str) -> bool {
    REGISTRY.iter().any(|(n, _)| *n == name)
}

/// mergekit's methods the papers have no version of, in registry order.
pub fn kernels() -> impl Iterator<Item = &'static str> {
    REGISTRY.iter().map(|(n, _)| *n)
}

/// The kernel methods' default search variables and spaces for Weight Weaving: `t` over
/// 0.1–1.0 for the interpolations (A* members M(t) = merge(t) − θ_base), λ otherwise.
pub fn default_t(name: &str) -> Option<Vec<f64>> {
    matches!(name, "slerp" | "nearswap").then(|| (1..=10).map(|k| k as f64 / 10.0).collect())
}

/// The parameter a method's Weight Weaving grids over in place of λ (`lambdas` give its values).
pub fn search_variable(name: &str) -> Option<&'static str> {
    matches!(name, "slerp" | "nearswap").then_some("t")
}

/// A number the method cannot do without (mergekit has no default for it).
pub(crate) fn required(
    r: &mut Reader,
    method: &str,
    name: &'static str,
    lo: f64,
    hi: f64,
) -> Result<f64> {
    if !r.params.contains_key(name) {
        return Err(Error::param(name, format!("is required by {method}")));
    }
    r.num(name, 0.0, lo, hi, false)
}

/// A per-model list (or one number for all), as mergekit's per-model parameters arrive.
pub(crate) fn per_model(
    r: &mut Reader,
    name: &'static str,
    default: f64,
    lo: f64,
    hi: f64,
) -> Result<super::PerTask> {
    if let Some(Param::List(v)) = r.params.get(name) {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::param(name, "values must be finite"));
        }
    }
    r.frac(name, default, lo, hi, false)
}

pub(crate) fn tasks_exactly(method: &str, tasks: usize, want: usize) -> Result<()> {
    if tasks != want {
        return Err(Error::param(
            "models",
            format!("{method} takes {want} model(s) besides the base, got {tasks}"),
        ));
    }
    Ok(())
}

pub(crate) fn tasks_at_least(method: &str, tasks: usize, want: usize) -> Result<()> {
    if tasks < want {
        return Err(Error::param(
            "models",
            format!("{method} takes at least {want} models besides the base, got {tasks}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_listed_in_the_error_messages() {
        for name in kernels() {
            assert!(MERGEKIT_NAMES.split(", ").any(|n| n == name), "{name}");
            assert!(
                super::super::METHOD_NAMES.split(", ").any(|n| n == name),
                "{name}"
            );
        }
    }
}
