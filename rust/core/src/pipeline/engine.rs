//! Building an [`Engine`] for one run: what every engine of a run shares, and the engine of a
//! recipe. A run may build two (MetaGPT's norms come before the weights every later pass uses),
//! and callers that need MetaGPT's weights before a merge build one of their own.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Mutex;

use super::{scaling, source, Engine, Given, Options, Part, Progress};
use crate::error::{Error, Result};
use crate::methods::Rows;
use crate::plan::TensorPlan;
use crate::reader::ModelView;
use crate::recipe::{Combine, Recipe};

/// MetaGPT's weights λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² of `recipe`'s inputs, from one pass over every
/// mergeable tensor (for callers that need them before a merge: the torch backend), and the
/// bytes read.
#[allow(clippy::too_many_arguments)]
pub fn metagpt_weights(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
    recipe: &Recipe,
    opts: Options,
    progress: Progress,
    cancel: &AtomicBool,
) -> Result<(Vec<f32>, u64)> {
    let chunk = opts.chunk_size.max(1);
    let (merge, _) = crate::plan::chunks(plan, chunk, Rows::None);
    let tasks = models.len() as u64;
    let total = merge
        .iter()
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
        .sum();
    let mut r = recipe.clone();
    r.weights = None;
    for s in &mut r.sets {
        s.weights = None;
    }
    let run = Run {
        base,
        models,
        plan,
        progress,
        cancel,
        given: &[],
        total,
        part: Part::default(),
    };
    let engine = run.engine(&r, 0, 0);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::param("threads", e.to_string()))?;
    let norms = pool.install(|| engine.task_sq_norms(&merge))?;
    Ok((crate::scaling::metagpt_weights(&norms)?, total))
}

/// What every engine of one run shares.
pub(super) struct Run<'a> {
    pub(super) base: &'a ModelView<'a>,
    pub(super) models: &'a [ModelView<'a>],
    pub(super) plan: &'a [TensorPlan],
    pub(super) progress: Progress<'a>,
    pub(super) cancel: &'a AtomicBool,
    pub(super) given: Given<'a>,
    pub(super) total: u64,
    pub(super) part: Part<'a>,
}

impl<'a> Run<'a> {
    /// An engine for `recipe`, its progress starting at `done` bytes and `stats_passes`.
    pub(super) fn engine(&self, recipe: &'a Recipe, done: u64, stats_passes: u32) -> Engine<'a> {
        let (models, plan) = (self.models, self.plan);
        let method = recipe.method();
        let ones = vec![1.0f32; models.len()];
        let weights: Vec<Vec<f32>> = recipe
            .sets
            .iter()
            .map(|s| s.weights.clone().unwrap_or_else(|| ones.clone()))
            .collect();
        let own_weights: Vec<bool> = recipe
            .sets
            .iter()
            .map(|s| s.weights != recipe.weights)
            .collect();
        let mergekit = method.unweighted();
        use crate::methods::kernel::{Inputs, Output};
        let value_out = method.output() == Output::Value;
        let plain_merge = !recipe.metagpt
            && recipe.lines.is_none()
            && matches!(recipe.combine, Combine::Merge { lam } if lam == 1.0);
        // One mergekit method merged at any λ: it weights the unweighted deltas itself, and
        // nothing else reads A*'s weighted deltas (MetaGPT's norms, LiNeS's sums and a weave's
        // pool do; a merge's θ_pre + λ·M does not). Weighting them all the same and copying the
        // unweighted ones aside for the kernel was a tenth of an f32 mergekit DARE-TIES's time.
        let direct = !recipe.metagpt
            && recipe.lines.is_none()
            && matches!(recipe.combine, Combine::Merge { .. })
            && mergekit
            && recipe.sets.len() == 1;
        let weigh_raw = recipe.weights.is_some() && !direct;
        // Each mapped file once (slices' lanes list every input's).
        let mut maps: Vec<&[u8]> = (self.base.maps.iter())
            .chain(models.iter().flat_map(|m| &m.maps))
            .copied()
            .collect();
        maps.sort_by_key(|m| m.as_ptr());
        maps.dedup_by_key(|m| m.as_ptr());
        // Without LiNeS every tensor is of one class; LiNeS's come once its α are known.
        let classes = vec![scaling::Class::of(
            recipe.combine.clone(),
            recipe.sets.len(),
        )];
        let mut engine = Engine {
            models,
            plan,
            recipe,
            maps,
            in_memory: AtomicBool::new(false),
            // A computed scale tensor has no input of its own: its weight's stands in (never read).
            base_refs: plan
                .iter()
                .map(|t| self.base.tensors[source(plan, t)])
                .collect(),
            model_refs: models
                .iter()
                .map(|m| plan.iter().map(|t| m.tensors[source(plan, t)]).collect())
                .collect(),
            done: AtomicU64::new(done),
            total: AtomicU64::new(self.total),
            progress: self.progress,
            cancel: self.cancel,
            given: self.given,
            spare: Mutex::new(Vec::new()),
            classes,
            class_of: vec![0; plan.len()],
            need_plain: weigh_raw && (mergekit || own_weights.iter().any(|&o| o)),
            weigh_raw,
            weights,
            own_weights,
            values: method.inputs() == Inputs::Values,
            values_from_deltas: Vec::new(),
            value_out,
            values_only: value_out && !method.reads_deltas() && plain_merge,
            rows: method.rows(),
            stats_passes: AtomicU32::new(stats_passes),
            in_output: AtomicBool::new(false),
            spare_sample: Default::default(),
            part: self.part,
        };
        engine.values_from_deltas = (0..plan.len())
            .map(|t| engine.takes_values_from_deltas(t))
            .collect();
        engine
    }
}
