//! A job resolved into what the pipeline computes: the distinct parameter sets of the search
//! space (M is computed once per set and chunk), the points that scale each, and the pool.
//! Everything a caller can get wrong is checked here, before any input is opened.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::methods::{Method, Param, Params};
use crate::pool::Pool;
use crate::scaling::Lines;

pub mod tensors;
pub use tensors::{PerTensor, TensorGroup};

/// Search points accepted in one run (each costs a term per element of the pool).
pub const MAX_POINTS: usize = 1 << 20;

/// Distinct parameter sets that need global statistics (TIES thresholds and signs, PCB
/// clamps, mergekit's cuts) in one run: each holds select windows and tallies per worker
/// (about 1 MiB), so this bounds statistics memory whatever the search asks for.
pub const MAX_STAT_SETS: usize = 64;

/// A user-defined pool: called with one block of A* (`rows` × `cols` f32, row-major, rows in A*
/// order) and the tensor's name; writes the `cols` pooled values.
pub type PoolFn = dyn Fn(&[f32], usize, usize, &str, &mut [f32]) -> Result<()> + Send + Sync;

/// A [`PoolFn`] that can live in a [`Job`].
#[derive(Clone)]
pub struct CustomPool(pub Arc<PoolFn>);

impl std::fmt::Debug for CustomPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CustomPool(..)")
    }
}

impl PartialEq for CustomPool {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A search space as the caller gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum Space {
    /// Named value lists; the points are their Cartesian product, the first name outermost.
    Grid(Vec<(String, Vec<Param>)>),
    /// Explicit points, each setting `lam` and any numeric parameter (or `weights`).
    Points(Vec<Params>),
}

/// Plain merge or Weight Weaving, as the caller asked (defaults not yet applied).
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Merge {
        lam: Option<f64>,
    },
    Weave {
        /// Λ, the shorthand for a grid over `lam` alone.
        lambdas: Option<Vec<f64>>,
        pool: String,
        include_deltas: bool,
    },
}

/// Everything a merge needs besides the inputs and the output.
#[derive(Clone, Debug)]
pub struct Job {
    pub method: String,
    pub params: Params,
    pub mode: Mode,
    pub seed: u64,
    pub threads: Option<usize>,
    pub chunk_size: Option<usize>,
    pub out_dtype: Option<String>,
    /// Per-model weights (SPEC: τ_t → w_t·τ_t), one per fine-tune.
    pub weights: Option<Vec<f64>>,
    /// A search space beyond Λ (weave only).
    pub space: Option<Space>,
    /// A pool given as a function (weave only; `pool` is then ignored).
    pub pool_fn: Option<CustomPool>,
    /// "mergekit" for mergekit's semantics; None or "paper" for SPEC.md's.
    pub compat: Option<String>,
    /// The weights are MetaGPT's, λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖², found in a pass over the inputs.
    pub metagpt: bool,
    /// LiNeS: each point's λ becomes α + λ·(ℓ − 1)/(L − 1) in block ℓ (α outside the blocks).
    pub lines: Option<Lines>,
    /// Parameters that vary by tensor (mergekit's gradients and filters).
    pub per_tensor: Option<PerTensor>,
    /// The output's layers from layer ranges of the inputs (mergekit's `slices`).
    pub slices: Option<crate::source::slices::Slices>,
    /// Tensors laid over an input's (input 0 the base, i the i-th model): the vocabulary
    /// tensors realigned to a tokenizer built for the output. Runs on files only.
    pub overlays: Vec<Overlay>,
    /// A tokenizer built for the output (mergekit's `tokenizer_source`, `chat_template`).
    pub tokenizer: Option<TokenizerOut>,
    /// mergekit's `dtype`: every input is rounded to it as it is read, as mergekit loads the
    /// tensors in it before any arithmetic (`None`: the values as stored).
    pub load_dtype: Option<String>,
    /// A regular expression: tensors it matches are copied from the base, and a model's own
    /// left out ([`crate::keep`]); for tensors the base and the models do not share.
    pub keep_base: Option<String>,
}

/// Safetensors file `path` laid over input `input`'s tensors; `label` names them in errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub input: usize,
    pub path: std::path::PathBuf,
    pub label: String,
}

/// A tokenizer written for the output: the files of `dir` replace the base's tokenizer files,
/// and `config.json` gets `vocab_size` when set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizerOut {
    pub dir: std::path::PathBuf,
    pub vocab_size: Option<usize>,
}

impl Job {
    /// A job with SPEC's defaults for everything but the method and mode.
    pub fn new(method: &str, mode: Mode) -> Job {
        Job {
            method: method.to_owned(),
            params: Params::new(),
            mode,
            seed: 0,
            threads: None,
            chunk_size: None,
            out_dtype: None,
            weights: None,
            space: None,
            pool_fn: None,
            compat: None,
            metagpt: false,
            lines: None,
            per_tensor: None,
            slices: None,
            overlays: Vec::new(),
            tokenizer: None,
            load_dtype: None,
            keep_base: None,
        }
    }

    /// Aligns the models' names to the base's and applies [`Job::keep_base`] ([`crate::keep`]).
    pub fn share_names<'a>(
        &self,
        base: &crate::reader::ModelView<'a>,
        models: &mut [crate::reader::ModelView<'a>],
    ) -> Result<crate::keep::Kept> {
        crate::keep::share(self.keep_base.as_deref(), base, models)
    }

    /// Fine-tuned models the method merges: the slices' model lanes, or the models given.
    pub fn tasks(&self, models: usize) -> usize {
        self.slices.as_ref().map_or(models, |s| s.lanes() - 1)
    }
}

/// One distinct parameter set: M(params) over the deltas weighted by `weights`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSet {
    pub method: Method,
    pub weights: Option<Vec<f32>>,
}

/// One point of the search space: `λ_p · M(sets[set])`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub lam: f32,
    pub set: usize,
    /// The point's own LiNeS α (`lines_alpha`), if it sets one.
    pub alpha: Option<f32>,
}

/// What is done with the M of each set.
#[derive(Clone, Debug, PartialEq)]
pub enum Combine {
    /// θ_pre + λ·M of the only set.
    Merge { lam: f32 },
    /// θ_pre + pool(A*), A* = the deltas (when included) + λ_p·M(set_p) in point order.
    Weave {
        points: Vec<Point>,
        pool: Pool,
        include_deltas: bool,
    },
}

impl Combine {
    /// |A*| (1 for a plain merge).
    pub fn members(&self, tasks: usize) -> usize {
        match self {
            Combine::Merge { .. } => 1,
            Combine::Weave {
                points,
                include_deltas,
                ..
            } => points.len() + if *include_deltas { tasks } else { 0 },
        }
    }

    pub fn is_random(&self) -> bool {
        matches!(
            self,
            Combine::Weave {
                pool: Pool::Random,
                ..
            }
        )
    }
}

/// What to compute.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// The distinct parameter sets, in order of first use; a plain merge has one.
    pub sets: Vec<ParamSet>,
    pub combine: Combine,
    pub seed: u64,
    /// Per-model weights of A*'s deltas (and of every set that does not set its own).
    pub weights: Option<Vec<f32>>,
    /// The weights are still to be found as MetaGPT's (`weights` is then `None`).
    pub metagpt: bool,
    pub lines: Option<Lines>,
    /// With per-tensor parameters, the groups of tensors and their own recipes (every mergeable
    /// tensor in one); empty otherwise. Filled once the plan is known ([`Job::tensor_groups`]).
    pub groups: Vec<TensorGroup>,
    /// The inputs are rounded to this dtype as they are read (`Job::load_dtype`).
    pub load_dtype: Option<crate::DType>,
}

impl Recipe {
    /// The method (every set has the same one, with different numbers).
    pub fn method(&self) -> &Method {
        &self.sets[0].method
    }

    /// Whether every statistic the merge needs is a tensor's own, in this recipe and in each
    /// of its groups: no whole-model scope (TIES's and PCB's global one), no MetaGPT weights,
    /// no LiNeS α rule. Tensors may then be merged in any grouping with the same result (a
    /// cluster's units, `pipeline/batches.rs`).
    pub fn tensor_local(&self) -> bool {
        let local = |r: &Recipe| {
            !r.metagpt
                && !crate::scaling::auto_alpha_sets(r).iter().any(|&a| a)
                && r.sets
                    .iter()
                    .all(|s| s.method.scope() == crate::methods::Scope::Tensor)
        };
        local(self) && self.groups.iter().all(|g| local(&g.recipe))
    }
}

/// Whether `v` is finite and an f32 holds it (all arithmetic is f32).
pub(crate) fn fits_f32(v: f64) -> bool {
    v.is_finite() && v.abs() <= f32::MAX as f64
}

fn f32_list(name: &str, v: &[f64]) -> Result<Vec<f32>> {
    if let Some(x) = v.iter().find(|x| !fits_f32(**x)) {
        return Err(Error::param(
            name,
            format!("{x} is not a finite value within the f32 range of the arithmetic"),
        ));
    }
    Ok(v.iter().map(|&x| x as f32).collect())
}

fn lam_value(name: &str, v: &Param) -> Result<f32> {
    match v {
        Param::Num(x) => Ok(f32_list(name, &[*x])?[0]),
        other => Err(Error::param(
            name,
            format!("expected a number, got {other:?}"),
        )),
    }
}

impl Job {
    fn parse_method(&self, params: &Params) -> Result<Method> {
        match self.compat.as_deref() {
            None | Some("paper") => Method::parse(&self.method, params),
            Some("mergekit") => Method::parse_mergekit(&self.method, params),
            Some(other) => Err(Error::param(
                "compat",
                format!("'{other}' is not one of paper, mergekit"),
            )),
        }
    }

    fn default_lam(&self) -> f64 {
        match self.compat.as_deref() {
            Some("mergekit") => 1.0,
            _ => Method::default_lam(&self.method),
        }
    }

    /// The resolved parameter set of one point's overrides (`None`: the job's own).
    fn param_set(&self, overrides: &Params) -> Result<ParamSet> {
        let mut params = self.params.clone();
        let mut weights = self.weights.clone();
        for (k, v) in overrides {
            match (k.as_str(), v) {
                ("lam" | "lines_alpha", _) => {}
                ("weights", Param::List(_)) if self.metagpt => {
                    return Err(Error::param(
                        "weights",
                        "a point's own weights and MetaGPT's weights: give one of them",
                    ))
                }
                ("weights", Param::List(w)) => weights = Some(w.clone()),
                ("weights", other) => {
                    return Err(Error::param(
                        "weights",
                        format!("expected a list of numbers, got {other:?}"),
                    ))
                }
                _ => {
                    params.insert(k.clone(), v.clone());
                }
            }
        }
        let method = self.parse_method(&params)?;
        if (weights.is_some() || self.metagpt) && !method.takes_weights() {
            return Err(Error::param(
                "weights",
                format!(
                    "{} takes no per-model weights (mergekit's {} has no `weight` parameter){}",
                    method.name(),
                    method.name(),
                    if self.metagpt {
                        ": MetaGPT's λ_t cannot apply"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let weights = weights.map(|w| f32_list("weights", &w)).transpose()?;
        if let Some(w) = &weights {
            method.check_weights(w)?;
        }
        Ok(ParamSet { method, weights })
    }

    /// The points of the search space, each as its parameter overrides (with `lam`).
    fn points(&self) -> Result<Vec<Params>> {
        let Mode::Weave { lambdas, .. } = &self.mode else {
            return Ok(Vec::new());
        };
        // The interpolation methods search over t, with λ = 1 (A* members merge(t) − θ_base).
        let var = crate::methods::registry::search_variable(&self.method);
        let lam_points = |l: &[f64]| -> Vec<Params> {
            l.iter()
                .map(|&x| match var {
                    Some(v) => Params::from([
                        ("lam".to_owned(), Param::Num(1.0)),
                        (v.to_owned(), Param::Num(x)),
                    ]),
                    None => Params::from([("lam".to_owned(), Param::Num(x))]),
                })
                .collect()
        };
        let default = || {
            crate::methods::registry::default_t(&self.method)
                .or_else(|| Method::default_lambdas(&self.method))
                .or_else(|| Method::default_lambdas("task_arithmetic"))
                .expect("a default Λ")
        };
        match (&self.space, lambdas) {
            (Some(_), Some(_)) => Err(Error::param(
                "lambdas",
                "give lambdas or a search space, not both (lambdas is a grid over lam alone)",
            )),
            (None, l) => {
                let l = l.clone().unwrap_or_else(default);
                if l.is_empty() || l.len() > MAX_POINTS {
                    return Err(Error::param(
                        "lambdas",
                        "must hold between 1 and 2^20 values",
                    ));
                }
                f32_list("lambdas", &l)?;
                if let Some(w) = l.windows(2).find(|w| w[0] >= w[1]) {
                    return Err(Error::param(
                        "lambdas",
                        format!(
                            "must be strictly increasing ({} is followed by {})",
                            w[0], w[1]
                        ),
                    ));
                }
                Ok(lam_points(&l))
            }
            (Some(Space::Points(p)), None) => {
                if p.is_empty() || p.len() > MAX_POINTS {
                    return Err(Error::param(
                        "search",
                        "must hold between 1 and 2^20 points",
                    ));
                }
                if var.is_some() {
                    // λ is 1 unless a point sets it.
                    let one = |p: &Params| {
                        let mut p = p.clone();
                        p.entry("lam".to_owned()).or_insert(Param::Num(1.0));
                        p
                    };
                    return Ok(p.iter().map(one).collect());
                }
                if let Some(i) = p.iter().position(|p| !p.contains_key("lam")) {
                    return Err(Error::param(
                        "search",
                        format!("point {i} sets no lam (every point sets λ)"),
                    ));
                }
                Ok(p.clone())
            }
            (Some(Space::Grid(axes)), None) => {
                let mut axes = axes.clone();
                if var.is_some() && !axes.iter().any(|(k, _)| k == "lam") {
                    axes.insert(0, ("lam".to_owned(), vec![Param::Num(1.0)]));
                }
                if !axes.iter().any(|(k, _)| k == "lam") {
                    let l = default();
                    axes.insert(
                        0,
                        ("lam".to_owned(), l.into_iter().map(Param::Num).collect()),
                    );
                }
                if let Some((k, _)) = axes.iter().find(|(_, v)| v.is_empty()) {
                    return Err(Error::param("search", format!("'{k}' has no values")));
                }
                let total = axes
                    .iter()
                    .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()))
                    .filter(|&n| n <= MAX_POINTS)
                    .ok_or_else(|| {
                        Error::param("search", "the grid holds more than 2^20 points")
                    })?;
                let mut out = Vec::with_capacity(total);
                for i in 0..total {
                    // Row-major: the last axis varies fastest.
                    let mut rest = i;
                    let mut p = Params::new();
                    for (k, v) in axes.iter().rev() {
                        p.insert(k.clone(), v[rest % v.len()].clone());
                        rest /= v.len();
                    }
                    out.push(p);
                }
                Ok(out)
            }
        }
    }

    /// Validates the job and resolves its defaults.
    pub fn recipe(&self) -> Result<Recipe> {
        self.recipe_cancellable(&AtomicBool::new(false))
    }

    /// [`Job::recipe`], checking `cancel` as it goes through the search points (a million-point
    /// grid takes seconds to resolve).
    pub fn recipe_cancellable(&self, cancel: &AtomicBool) -> Result<Recipe> {
        if let Some(pt) = &self.per_tensor {
            // Each group's recipe comes once the tensors are known; this one checks the rest.
            pt.check(self)?;
            let r = pt.stand_in(self).recipe_cancellable(cancel)?;
            if r.method().external() {
                return Err(Error::param(
                    "per-tensor parameters",
                    format!(
                        "{} runs on the torch backend, which takes one value per parameter for the whole model",
                        r.method().name()
                    ),
                ));
            }
            return Ok(r);
        }
        if self.chunk_size == Some(0) {
            return Err(Error::param("chunk_size", "must be positive"));
        }
        // Kernels count within a chunk in u32.
        if self.chunk_size.is_some_and(|c| c > crate::MAX_CHUNK) {
            return Err(Error::param(
                "chunk_size",
                format!("at most {} elements", crate::MAX_CHUNK),
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::param("threads", "must be positive"));
        }
        if let Some(t) = self.threads.filter(|&t| t > crate::MAX_THREADS) {
            return Err(Error::param(
                "threads",
                format!(
                    "{t} is more than the {} allowed (requests above {} per core are clamped)",
                    crate::MAX_THREADS,
                    crate::THREADS_PER_CORE
                ),
            ));
        }
        self.check_scaling()?;
        let weights = self
            .weights
            .as_ref()
            .map(|w| f32_list("weights", w))
            .transpose()?;
        // A weave over an interpolation's t takes t from its points, not from the job.
        let searched = matches!(self.mode, Mode::Weave { .. })
            && crate::methods::registry::search_variable(&self.method).is_some();
        let own = if searched {
            None
        } else {
            Some(self.param_set(&Params::new())?)
        };
        if matches!(self.mode, Mode::Merge { .. })
            && (self.space.is_some() || self.pool_fn.is_some())
        {
            return Err(Error::param(
                "search",
                "a search space and a pool belong to weave, not to a plain merge",
            ));
        }
        let combine = match &self.mode {
            Mode::Merge { lam } => {
                let lam = lam.unwrap_or_else(|| self.default_lam());
                Combine::Merge {
                    lam: lam_value("lam", &Param::Num(lam))?,
                }
            }
            Mode::Weave {
                pool,
                include_deltas,
                ..
            } => {
                let pool = match &self.pool_fn {
                    Some(f) => Pool::Custom(f.clone()),
                    None => Pool::parse(pool).ok_or_else(|| {
                        Error::param(
                            "pool",
                            format!("'{pool}' is not one of mean, random, magmax or a function"),
                        )
                    })?,
                };
                let mut sets: Vec<ParamSet> = Vec::new();
                // Distinct sets by their exact description: O(1) per point, not a scan of the
                // sets (a 512 × 512 grid took minutes before any work).
                let mut index: std::collections::HashMap<String, usize> = Default::default();
                let mut points = Vec::new();
                for (i, p) in self.points()?.iter().enumerate() {
                    if i % 4096 == 4095 && cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    let at = |e: Error| match e {
                        Error::InvalidParam { name, reason } => Error::param(
                            "search",
                            format!("point {i} ({}): {name}: {reason}", describe(p)),
                        ),
                        other => other,
                    };
                    let lam = lam_value("lam", &p["lam"]).map_err(at)?;
                    let alpha = self.point_alpha(p).map_err(at)?;
                    let set = self.param_set(p).map_err(at)?;
                    let idx = *index.entry(format!("{set:?}")).or_insert_with(|| {
                        sets.push(set);
                        sets.len() - 1
                    });
                    points.push(Point {
                        lam,
                        set: idx,
                        alpha,
                    });
                }
                // Kernel methods share statistics between sets with the same key (slerp's
                // norms serve every t); the others gather their own per set.
                let stats = sets
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.method.needs_statistics())
                    .map(|(_, s)| s.method.stats_key())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                if stats > MAX_STAT_SETS {
                    return Err(Error::param(
                        "search",
                        format!(
                            "{stats} distinct parameter sets of {}, each with statistics of its own over the whole model; at most {MAX_STAT_SETS} are gathered in one run (fewer distinct densities/ratios, or several runs)",
                            sets[0].method.name()
                        ),
                    ));
                }
                if sets.len() > 1 && sets[0].method.external() {
                    return Err(Error::param(
                        "search",
                        format!(
                            "{} searches over λ alone: a point with its own weights would need SVDs of its own",
                            sets[0].method.name()
                        ),
                    ));
                }
                return Ok(Recipe {
                    sets,
                    combine: Combine::Weave {
                        points,
                        pool,
                        include_deltas: *include_deltas,
                    },
                    seed: self.seed,
                    weights,
                    metagpt: self.metagpt,
                    lines: self.lines,
                    groups: Vec::new(),
                    load_dtype: self.load_dtype()?,
                });
            }
        };
        Ok(Recipe {
            sets: vec![own.expect("a plain merge's own set")],
            combine,
            seed: self.seed,
            weights,
            metagpt: self.metagpt,
            lines: self.lines,
            groups: Vec::new(),
            load_dtype: self.load_dtype()?,
        })
    }

    /// The dtype the inputs are rounded to as they are read, if any.
    fn load_dtype(&self) -> Result<Option<crate::DType>> {
        self.load_dtype
            .as_deref()
            .map(|s| {
                crate::DType::parse(s)
                    .filter(|d| {
                        matches!(
                            d,
                            crate::DType::F16
                                | crate::DType::BF16
                                | crate::DType::F32
                                | crate::DType::F64
                        )
                    })
                    .ok_or_else(|| {
                        Error::param("load_dtype", format!("'{s}' is not a floating dtype"))
                    })
            })
            .transpose()
    }

    /// Checks the data-free λ options (MetaGPT, LiNeS) against the rest of the job.
    fn check_scaling(&self) -> Result<()> {
        if self.metagpt && self.weights.is_some() {
            return Err(Error::param(
                "weights",
                "MetaGPT sets the weights (λ_t = ‖τ_t‖² / Σ‖τ_k‖²): give weights or metagpt, not both",
            ));
        }
        if let Some(l) = &self.lines {
            if let Some(a) = l.alpha {
                lam_value("lines_alpha", &Param::Num(a as f64))?;
            }
            if l.blocks == Some(0) {
                return Err(Error::param("lines_blocks", "must be at least 2"));
            }
        }
        Ok(())
    }

    /// A point's own LiNeS α (`lines_alpha`), only with LiNeS.
    fn point_alpha(&self, p: &Params) -> Result<Option<f32>> {
        match (p.get("lines_alpha"), &self.lines) {
            (None, _) => Ok(None),
            (Some(_), None) => Err(Error::param(
                "lines_alpha",
                "is LiNeS's α: turn LiNeS on (lines) to search over it",
            )),
            (Some(v), Some(_)) => lam_value("lines_alpha", v).map(Some),
        }
    }

    pub fn out_dtype(&self) -> Result<Option<crate::DType>> {
        self.out_dtype
            .as_deref()
            .map(|s| {
                crate::DType::parse(s)
                    .ok_or_else(|| Error::param("out_dtype", format!("unknown dtype '{s}'")))
            })
            .transpose()
    }

    pub fn options(&self) -> crate::Options {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        crate::Options {
            threads: self
                .threads
                .unwrap_or(cores)
                .min(cores * crate::THREADS_PER_CORE)
                .max(1),
            chunk_size: self
                .chunk_size
                .unwrap_or(crate::DEFAULT_CHUNK)
                .min(crate::PIECE),
        }
    }

    /// Checks that every per-model list has one value per fine-tune.
    pub(crate) fn check_tasks(&self, recipe: &Recipe, tasks: usize) -> Result<()> {
        if tasks == 0 {
            return Err(Error::param(
                "models",
                "at least one fine-tuned model is needed",
            ));
        }
        let check = |w: &Option<Vec<f32>>| match w {
            Some(w) if w.len() != tasks => Err(Error::param(
                "weights",
                format!("{} weights for {tasks} fine-tuned models", w.len()),
            )),
            _ => Ok(()),
        };
        check(&recipe.weights)?;
        for (k, s) in recipe.sets.iter().enumerate() {
            let at = |e: Error| match (e, recipe.sets.len()) {
                (e, 1) => e,
                (Error::InvalidParam { name, reason }, _) => {
                    Error::param("search", format!("parameter set {k}: {name}: {reason}"))
                }
                (e, _) => e,
            };
            check(&s.weights).map_err(at)?;
            s.method.check_tasks(tasks).map_err(at)?;
        }
        Ok(())
    }

    /// The recipe recorded in the output's `__metadata__`.
    pub fn metadata(&self, recipe: &Recipe) -> BTreeMap<String, String> {
        let mut r = serde_json::json!({
            "method": recipe.method().name(),
            "params": recipe.method().params_json(),
            "seed": recipe.seed,
        });
        if let Some(w) = &self.weights {
            r["weights"] = serde_json::json!(w);
        }
        if let Some(c) = &self.compat {
            r["compat"] = serde_json::json!(c);
        }
        if self.metagpt {
            r["weights"] = serde_json::json!("metagpt");
        }
        if let Some(pt) = &self.per_tensor {
            r["per_tensor"] = pt.json();
        }
        if let Some(s) = &self.slices {
            r["slices"] = s
                .0
                .iter()
                .map(|s| {
                    serde_json::json!({"len": s.len, "lanes": s.lanes.iter().map(|l| [l.input, l.start]).collect::<Vec<_>>()})
                })
                .collect();
        }
        if let Some(l) = &self.lines {
            r["lines"] = serde_json::json!({"alpha": l.alpha.map_or(serde_json::json!("auto"), |a| serde_json::json!(a)), "blocks": l.blocks});
        }
        // Numbers as the caller gave them (f64), not the f32 the arithmetic uses: 0.3, not
        // 0.30000001192092896.
        match (&recipe.combine, &self.mode) {
            (Combine::Merge { .. }, Mode::Merge { lam }) => {
                r["lam"] = serde_json::json!(lam.unwrap_or_else(|| self.default_lam()));
            }
            (
                Combine::Weave {
                    pool,
                    include_deltas,
                    ..
                },
                Mode::Weave { lambdas, .. },
            ) => {
                match &self.space {
                    Some(Space::Grid(axes)) => {
                        let g: serde_json::Map<String, serde_json::Value> = axes
                            .iter()
                            .map(|(k, v)| (k.clone(), bounded(v.iter().map(param_json).collect())))
                            .collect();
                        r["grid"] = serde_json::Value::Object(g);
                    }
                    Some(Space::Points(p)) => {
                        r["points"] = bounded(p.iter().map(params_json).collect());
                    }
                    None => {
                        let l = lambdas
                            .clone()
                            .or_else(|| crate::methods::registry::default_t(&self.method))
                            .or_else(|| Method::default_lambdas(&self.method))
                            .unwrap_or_default();
                        let key = crate::methods::registry::search_variable(&self.method)
                            .map_or("lambdas".to_owned(), |v| format!("{v} values"));
                        r[key.as_str()] = bounded(l.iter().map(|x| serde_json::json!(x)).collect());
                    }
                }
                r["pool"] = serde_json::json!(pool.name());
                r["include_deltas"] = serde_json::json!(include_deltas);
            }
            _ => unreachable!("the recipe is made from this job's mode"),
        }
        BTreeMap::from([
            ("format".to_owned(), "pt".to_owned()),
            ("weightweave.version".to_owned(), crate::VERSION.to_owned()),
            ("weightweave.recipe".to_owned(), r.to_string()),
        ])
    }
}

/// Lists longer than this are recorded by count and digest, not in full.
pub const RECORDED_VALUES: usize = 1024;

/// `values` as a JSON list, or, past [`RECORDED_VALUES`], `{"count", "fnv1a64"}` of its JSON
/// text: a search of 800 000 points would otherwise put a 100 MB list into the header, more
/// than safetensors readers open. The digest still tells two recipes apart.
fn bounded(values: Vec<serde_json::Value>) -> serde_json::Value {
    if values.len() <= RECORDED_VALUES {
        return serde_json::Value::Array(values);
    }
    let text = serde_json::Value::Array(values.clone()).to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    serde_json::json!({"count": values.len(), "fnv1a64": format!("{h:016x}")})
}

fn param_json(p: &Param) -> serde_json::Value {
    match p {
        Param::Num(x) => serde_json::json!(x),
        Param::Bool(b) => serde_json::json!(b),
        Param::Str(s) => serde_json::json!(s),
        Param::List(v) => serde_json::json!(v),
    }
}

fn params_json(p: &Params) -> serde_json::Value {
    serde_json::Value::Object(p.iter().map(|(k, v)| (k.clone(), param_json(v))).collect())
}

fn describe(p: &Params) -> String {
    params_json(p).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weave(space: Space) -> Job {
        let mut j = Job::new(
            "ties",
            Mode::Weave {
                lambdas: None,
                pool: "mean".into(),
                include_deltas: true,
            },
        );
        j.space = Some(space);
        j
    }

    #[test]
    fn planning_a_large_grid_is_cancellable_and_hashes_its_sets() {
        let axis = |k: &str, n: usize, step: f64| {
            (
                k.to_owned(),
                (0..n).map(|i| Param::Num(0.1 + i as f64 * step)).collect(),
            )
        };
        let mut j = weave(Space::Grid(vec![
            axis("density", 256, 1e-3),
            axis("gamma", 256, 1e-5),
        ]));
        j.method = "breadcrumbs".into();
        let cancel = AtomicBool::new(true);
        assert!(matches!(
            j.recipe_cancellable(&cancel),
            Err(Error::Cancelled)
        ));
        // 65 536 distinct sets, each point its own; no point shares another's set.
        let r = j.recipe().unwrap();
        assert_eq!(r.sets.len(), 256 * 256);
        // TIES over more than 64 densities: refused before any work, naming the limit.
        let t = weave(Space::Grid(vec![axis("density", 65, 1e-3)]));
        let e = t.recipe().unwrap_err().to_string();
        assert!(
            e.contains("65 distinct parameter sets") && e.contains("at most 64"),
            "{e}"
        );
    }

    #[test]
    fn grid_is_row_major_and_shares_sets() {
        let j = weave(Space::Grid(vec![
            ("density".into(), vec![Param::Num(0.1), Param::Num(0.2)]),
            (
                "lam".into(),
                vec![Param::Num(0.5), Param::Num(1.0), Param::Num(1.5)],
            ),
        ]));
        let r = j.recipe().unwrap();
        assert_eq!(r.sets.len(), 2);
        let Combine::Weave { points, .. } = &r.combine else {
            panic!()
        };
        let got: Vec<(f32, usize)> = points.iter().map(|p| (p.lam, p.set)).collect();
        assert_eq!(
            got,
            [(0.5, 0), (1.0, 0), (1.5, 0), (0.5, 1), (1.0, 1), (1.5, 1)]
        );
    }

    #[test]
    fn bad_points_name_the_point() {
        let j = weave(Space::Points(vec![
            Params::from([("lam".into(), Param::Num(1.0))]),
            Params::from([
                ("lam".into(), Param::Num(1.0)),
                ("density".into(), Param::Num(2.0)),
            ]),
        ]));
        let e = j.recipe().unwrap_err().to_string();
        assert!(e.contains("point 1") && e.contains("density"), "{e}");
        let j = weave(Space::Points(vec![Params::from([(
            "density".into(),
            Param::Num(0.5),
        )])]));
        assert!(j.recipe().unwrap_err().to_string().contains("sets no lam"));
    }
}
