//! The streaming engine. Every pass walks the same list of chunks on a rayon pool; a chunk reads
//! one element range of the base and of every fine-tune, converts it to f32 and forms the deltas.
//! Statistics passes reduce integer histograms and counts (order-free, so thread count and chunk
//! size cannot change a result); the final pass computes M, pools, encodes and writes each chunk
//! at its final offset. Anonymous memory is a few chunk-sized buffers per worker.

mod advice;
mod batches;
mod engine;
pub mod exchange;
mod groups;
mod kernel;
mod long_rows;
mod output;
pub mod patch;
mod room;
pub(crate) mod sample;
mod scaling;
pub(crate) mod select_many;
mod select_stage;
mod speculate;
pub(crate) mod top_nonzero;

pub use engine::metagpt_weights;
use engine::Run;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::dtype::{decode, decode_delta, decode_finite, first_non_finite, round_to, DType};
use crate::error::{Error, Result};
use crate::methods::{elementwise, Rows};
use crate::plan::{Chunk, TensorPlan};
use crate::reader::{ModelView, TensorRef};
use crate::recipe::{Combine, Recipe};
use crate::rng::Stream;
use crate::source::{lora, scaled};

/// Where finished chunks go: a file writer or caller-owned memory.
pub trait Sink: Sync {
    /// Writes `data` at byte `offset` of output tensor `tensor`.
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()>;

    /// Writes `edits` over bytes written before (the one-read pass's fix-ups, `patch.rs`),
    /// later edits over earlier ones. One [`Sink::write`] each unless the sink can do better.
    fn patch(&self, edits: &patch::Edits) -> Result<()> {
        edits
            .iter()
            .try_for_each(|(tensor, offset, data)| self.write(tensor, offset, data))
    }
}

/// How to run it.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub threads: usize,
    pub chunk_size: usize,
}

/// M supplied from outside, per planned tensor (the SVD methods' 2-D tensors); `None` for a
/// tensor means "compute it here".
pub type Given<'a> = &'a [Option<&'a [f32]>];

/// Whole-model statistics: what a cluster merge's driver gathers once and hands to every unit
/// (`crate::cluster`).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct ModelStats {
    /// Each representative's, by (tensor group, statistics key).
    pub tensors: BTreeMap<(usize, String), crate::methods::kernel::TensorStats>,
    /// MetaGPT's weights, by tensor group (each group's from its own tensors, as in one process).
    pub metagpt: BTreeMap<usize, Vec<f32>>,
}

impl ModelStats {
    pub fn new() -> ModelStats {
        ModelStats::default()
    }
}

/// A run's share of a merge split across processes (`crate::cluster`).
#[derive(Clone, Copy, Default)]
pub struct Part<'a> {
    /// The tensors this run merges and writes (a unit); `None`: every tensor.
    pub tensors: Option<&'a [bool]>,
    pub model: ModelPart<'a>,
    /// The tensor group being run (per-tensor parameters): keys [`ModelStats`].
    pub(crate) group: usize,
}

/// Where a run's whole-model statistics (TIES's and PCB's global scope) come from.
#[derive(Clone, Copy, Default)]
pub enum ModelPart<'a> {
    /// Computed here, from the chunks at hand (a whole run).
    #[default]
    Compute,
    /// Computed here over every tensor, and nothing else: no per-tensor statistics, no output
    /// (a cluster driver's pass); with an [`exchange::Exchange`], each pass split across the
    /// cluster's units.
    Gather(&'a Mutex<ModelStats>, Option<&'a exchange::Exchange>),
    /// Given: a unit holds only some of the model.
    Given(&'a ModelStats),
}

/// Called with (bytes processed, bytes to process, stage) after every chunk; must be cheap.
/// The stage is 0 for the output pass and k ≥ 1 for the k-th statistics pass.
pub type Progress<'a> = &'a (dyn Fn(u64, u64, u32) + Sync);

/// Per-worker buffers, reused from chunk to chunk.
#[derive(Default)]
pub(crate) struct Work {
    pub(crate) base: Vec<f32>,
    /// A*'s deltas τ'_t = w_t·τ_t (the models' values for a method that reads them).
    pub(crate) raw: Vec<Vec<f32>>,
    /// Unweighted τ_t, kept when some parameter set weights differently from the recipe.
    pub(crate) plain: Vec<Vec<f32>>,
    /// The models' values θ_t, for a kernel method that reads them.
    pub(crate) vals: Vec<Vec<f32>>,
    /// The deltas of the parameter set being computed, when they differ from `raw` (their own
    /// weights, DARE, sparsification).
    pub(crate) eff: Vec<Vec<f32>>,
    pub(crate) m: Vec<f32>,
    pub(crate) scratch: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) keys: Vec<u64>,
    /// f64 scratch for the kernel methods.
    pub(crate) wide: Vec<f64>,
    pub(crate) scores: Vec<Vec<f32>>,
    /// Rows of scores a kernel's select emits.
    pub(crate) sel: Vec<Vec<f32>>,
    /// Decoded LoRA factors (A, B) of the tensor being read.
    pub(crate) lora: (Vec<f32>, Vec<f32>),
    /// Pooling state over several parameter sets.
    pub(crate) acc: Vec<f32>,
    pub(crate) pos: Vec<u32>,
    pub(crate) picks: Vec<u64>,
    pub(crate) astar: Vec<f32>,
    /// Elements of a chunk the one-read pass holds for rewriting (`speculate.rs`).
    pub(crate) marks: Vec<u8>,
    /// The chunks this worker has read and not yet released, as one run ([`Engine::release`]).
    pub(crate) unreleased: Option<Chunk>,
}

/// Which buffer holds a parameter set's deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    Raw,
    Plain,
    Eff,
}

/// A set's deltas and the scratch buffers, borrowed apart.
pub(crate) struct Parts<'w> {
    pub(crate) deltas: &'w [Vec<f32>],
    pub(crate) m: &'w mut Vec<f32>,
    pub(crate) scratch: &'w mut Vec<f32>,
}

impl Work {
    pub(crate) fn src(&self, s: Src) -> &[Vec<f32>] {
        match s {
            Src::Raw => &self.raw,
            Src::Plain => &self.plain,
            Src::Eff => &self.eff,
        }
    }

    pub(crate) fn parts(&mut self, s: Src) -> Parts<'_> {
        let Work {
            raw,
            plain,
            eff,
            m,
            scratch,
            ..
        } = self;
        let deltas = match s {
            Src::Raw => &*raw,
            Src::Plain => &*plain,
            Src::Eff => &*eff,
        };
        Parts { deltas, m, scratch }
    }
}

/// The statistics of one parameter set.
#[derive(Default)]
pub(crate) struct Stats {
    /// The method's statistics, by tensor.
    pub(crate) kernel: BTreeMap<usize, crate::methods::kernel::TensorStats>,
}

pub(crate) struct Engine<'a> {
    pub(crate) models: &'a [ModelView<'a>],
    pub(crate) plan: &'a [TensorPlan],
    pub(crate) recipe: &'a Recipe,
    pub(crate) base_refs: Vec<TensorRef<'a>>,
    /// The inputs' mapped files, for read-ahead advice (`advice`).
    pub(crate) maps: Vec<&'a [u8]>,
    /// Whether a pass has found every page of `maps` in memory ([`Engine::on_disk`]).
    pub(crate) in_memory: AtomicBool,
    pub(crate) model_refs: Vec<Vec<TensorRef<'a>>>,
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) progress: Progress<'a>,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) given: Given<'a>,
    /// Worker buffers handed from pass to pass (a pass per tensor is common with scope=tensor).
    pub(crate) spare: Mutex<Vec<Work>>,
    /// What each depth class pools with (one class without LiNeS), and each tensor's class.
    pub(crate) classes: Vec<scaling::Class>,
    pub(crate) class_of: Vec<u32>,
    /// Each set's weights for M (ones without weights), and whether they differ from A*'s.
    pub(crate) weights: Vec<Vec<f32>>,
    pub(crate) own_weights: Vec<bool>,
    /// Some set needs the unweighted deltas while A*'s are weighted.
    pub(crate) need_plain: bool,
    /// The loads weight `raw` by the recipe's weights (A*'s τ'_t): false when there are none,
    /// or when nothing reads A* (one mergekit method at λ = 1, whose merged values are
    /// written as they are: its kernel then reads `raw` unweighted, no copy kept).
    pub(crate) weigh_raw: bool,
    /// A kernel method reads the models' values (`Work::vals`).
    pub(crate) values: bool,
    /// Per tensor: its values are left out, the kernel taking their differences from the
    /// deltas ([`crate::methods::kernel::Kernel::values_from_deltas`]).
    pub(crate) values_from_deltas: Vec<bool>,
    /// A kernel method's M is the merged value, not a delta.
    pub(crate) value_out: bool,
    /// Nothing reads the deltas of stored values (a plain merge at λ = 1 by a method that
    /// reads only values): they are not formed, and `raw` holds stale numbers.
    pub(crate) values_only: bool,
    pub(crate) rows: Rows,
    /// Statistics passes started so far, and whether the output pass has begun (the stage
    /// progress reports).
    pub(crate) stats_passes: AtomicU32,
    pub(crate) in_output: AtomicBool,
    /// A sample the one-read path took and then declined to use, for the statistics passes
    /// to take rather than read it again (`speculate.rs`).
    pub(crate) spare_sample: Mutex<Option<crate::stats::SpareSample>>,
    pub(crate) part: Part<'a>,
}

/// Runs a merge: validation already done (`plan` from [`crate::plan::validate`]).
#[allow(clippy::too_many_arguments)]
pub fn run(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
    recipe: &Recipe,
    opts: Options,
    sink: &dyn Sink,
    progress: Progress,
    cancel: &AtomicBool,
    given: Given,
    part: Part,
) -> Result<u64> {
    let mut chunk = opts.chunk_size.max(1);
    if let Combine::Weave {
        pool: crate::pool::Pool::Custom(_),
        ..
    } = &recipe.combine
    {
        // A function pool sees a block of A*, N rows by a chunk: keep it near 16 MiB.
        let members = recipe.combine.members(models.len()).max(1);
        chunk = chunk.min(((1 << 22) / members).max(64));
    }
    let k = recipe.method();
    let rows = k.rows();
    {
        let check =
            |r: &Recipe, t: &TensorPlan| r.sets.iter().try_for_each(|s| s.method.check_tensor(t));
        if recipe.groups.is_empty() {
            for t in plan.iter().filter(|t| t.mergeable) {
                check(recipe, t)?;
            }
        }
        for g in &recipe.groups {
            for &t in &g.tensors {
                check(&g.recipe, &plan[t])?;
            }
        }
        if rows == Rows::Slab {
            // Chunks of whole rows (slabs): the chunk grows to hold the longest.
            let longest = plan.iter().filter(|t| t.mergeable).map(|t| t.unit(rows));
            chunk = chunk.max(longest.max().unwrap_or(1));
            if chunk > crate::MAX_CHUNK {
                return Err(Error::param(
                    "method",
                    format!(
                        "{} ranks within rows, and a row of {chunk} elements is past the {} a chunk holds",
                        k.name(),
                        crate::MAX_CHUNK
                    ),
                ));
            }
        }
    }
    let opts = Options {
        chunk_size: chunk,
        ..opts
    };
    let (mut merge, mut copy) = crate::plan::chunks(plan, chunk, rows);
    if let Some(mine) = part.tensors {
        // A unit: its own tensors' chunks only (per-tensor statistics stay exact: a tensor's
        // chunks all go to one unit).
        merge.retain(|c| mine[c.tensor]);
        copy.retain(|c| mine[c.tensor]);
    }
    // Per-tensor parameters run each group of tensors in turn; otherwise one run takes them all
    // (in batches of tensors where that reads less from disk: `batches.rs`).
    let go: RunFn = if recipe.groups.is_empty() {
        batches::run
    } else {
        groups::run
    };
    go(
        base,
        models,
        plan,
        recipe,
        opts,
        (&merge, &copy),
        sink,
        progress,
        cancel,
        given,
        part,
    )
}

/// [`run_chunks`], or its per-group form.
type RunFn = fn(
    &ModelView,
    &[ModelView],
    &[TensorPlan],
    &Recipe,
    Options,
    (&[Chunk], &[Chunk]),
    &dyn Sink,
    Progress,
    &AtomicBool,
    Given,
    Part,
) -> Result<u64>;

/// Runs the given merge and copy chunks (all of a model, or one tensor's).
#[allow(clippy::too_many_arguments)]
pub fn run_chunks(
    base: &ModelView,
    models: &[ModelView],
    plan: &[TensorPlan],
    recipe: &Recipe,
    opts: Options,
    (merge, copy): (&[Chunk], &[Chunk]),
    sink: &dyn Sink,
    progress: Progress,
    cancel: &AtomicBool,
    given: Given,
    part: Part,
) -> Result<u64> {
    // Decided once, so that the progress total and the passes run agree.
    let one_read = speculate::eligible(recipe, plan, merge, &part, advice::from_disk(base, models));
    let total = total_bytes(
        plan,
        recipe,
        models.len(),
        opts.chunk_size,
        (merge, copy),
        one_read,
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::param("threads", e.to_string()))?;
    let parts = Run {
        base,
        models,
        plan,
        progress,
        cancel,
        given,
        total,
        part,
    };
    let resolved;
    let mut recipe = recipe;
    let (mut done, mut stats_passes) = (0, 0);
    if recipe.metagpt {
        // The norms of the unweighted deltas set the weights of everything after: found here
        // (a cluster's driver: pass by pass over its units), or given to a cluster's unit.
        let w =
            if let ModelPart::Given(model) = part.model {
                model.metagpt.get(&part.group).cloned().ok_or_else(|| {
                    Error::param("cluster", "a unit was not given MetaGPT's weights")
                })?
            } else {
                let pre = parts.engine(recipe, 0, 0);
                let norms = pool.install(|| pre.task_sq_norms(merge))?;
                let w = crate::scaling::metagpt_weights(&norms)?;
                (done, stats_passes) = (pre.done.into_inner(), pre.stats_passes.into_inner());
                if let ModelPart::Gather(into, _) = part.model {
                    into.lock()
                        .expect("not poisoned")
                        .metagpt
                        .insert(part.group, w.clone());
                }
                w
            };
        let mut r = recipe.clone();
        r.metagpt = false;
        r.weights = Some(w.clone());
        for s in &mut r.sets {
            s.weights.get_or_insert_with(|| w.clone());
        }
        resolved = r;
        recipe = &resolved;
    }
    let mut engine = parts.engine(recipe, done, stats_passes);
    let tasks = parts.models.len();
    pool.install(|| {
        let debug = std::env::var_os("WEIGHTWEAVE_DEBUG").is_some();
        let t0 = std::time::Instant::now();
        if one_read && recipe.lines.is_some() {
            // A fixed α: the classes need no statistics, and the output pass comes first.
            let alphas = engine.lines_alphas(merge, &[])?;
            (engine.classes, engine.class_of) = scaling::classes(recipe, plan, &alphas)?;
        }
        let spec = if one_read {
            engine.speculate(merge, sink)?
        } else {
            speculate::Spec::No
        };
        let stats = match spec {
            speculate::Spec::Written => {
                if debug {
                    eprintln!("one read: {:.2}s", t0.elapsed().as_secs_f64());
                }
                return engine.copy(copy, sink);
            }
            speculate::Spec::Stats(stats) => {
                // The guess did not hold: the output pass comes on top of the one counted.
                let extra = total_bytes(plan, recipe, tasks, 1, (merge, &[]), true);
                engine.total.fetch_add(extra, Ordering::Relaxed);
                stats
            }
            speculate::Spec::No => {
                if one_read {
                    // Declined after all: the statistics passes come on top of the one counted.
                    let size = opts.chunk_size;
                    let passes = total_bytes(plan, recipe, tasks, size, (merge, &[]), false);
                    let one = total_bytes(plan, recipe, tasks, size, (merge, &[]), true);
                    engine.total.fetch_add(passes - one, Ordering::Relaxed);
                }
                engine.statistics(merge, opts.chunk_size)?
            }
        };
        if let ModelPart::Gather(..) = part.model {
            return Ok(());
        }
        if recipe.lines.is_some() && !one_read {
            let alphas = engine.lines_alphas(merge, &stats)?;
            (engine.classes, engine.class_of) = scaling::classes(recipe, plan, &alphas)?;
        }
        let scales = engine.requant_scales(merge, &stats)?;
        if debug {
            eprintln!("statistics: {:.2}s", t0.elapsed().as_secs_f64());
        }
        let t1 = std::time::Instant::now();
        engine.output(merge, copy, &stats, &scales, sink)?;
        engine.write_scales(&scales, sink)?;
        if debug {
            eprintln!("output: {:.2}s", t1.elapsed().as_secs_f64());
        }
        Ok::<(), Error>(())
    })?;
    Ok(engine.done.load(Ordering::Relaxed))
}

/// The bytes a run of `recipe` over these chunks reads, when the sampled windows hold (a radix
/// fallback adds a pass per select): what its progress counts up to.
pub(crate) fn total_bytes(
    plan: &[TensorPlan],
    recipe: &Recipe,
    tasks: usize,
    chunk_size: usize,
    (merge, copy): (&[Chunk], &[Chunk]),
    one_read: bool,
) -> u64 {
    let tasks = tasks as u64;
    let merge_bytes: u64 = merge
        .iter()
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
        .sum();
    let copy_bytes: u64 = copy
        .iter()
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64)
        .sum();
    // Statistics passes when the sampled windows hold (a radix fallback adds one per select).
    let method = recipe.method();
    let passes = if one_read { 1 } else { 1 + method.passes() };
    let rows = method.rows();
    // Long rows take a windowed select and a counting pass more.
    let long_rows: u64 = merge
        .iter()
        .filter(|c| plan[c.tensor].has_long(rows, chunk_size))
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
        .sum();
    // Re-quantized FP8 weights take a pass more: their blocks' largest values set the scales.
    let requant_bytes: u64 = merge
        .iter()
        .filter(|c| plan[c.tensor].requant.is_some())
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
        .sum();
    // MetaGPT's norms and LiNeS's α take a pass each.
    let auto_alpha = crate::scaling::auto_alpha_sets(recipe)
        .iter()
        .zip(&recipe.sets)
        .any(|(&a, s)| a && !(s.method.sum_of_deltas() && s.weights == recipe.weights));
    let scaling_bytes = merge_bytes * (recipe.metagpt as u64 + auto_alpha as u64);
    merge_bytes * passes + copy_bytes + 2 * long_rows + requant_bytes + scaling_bytes
}

impl<'a> Engine<'a> {
    /// What tensor `t` is pooled with (its LiNeS depth class).
    #[inline]
    pub(crate) fn class(&self, t: usize) -> &scaling::Class {
        &self.classes[self.class_of[t] as usize]
    }

    pub(crate) fn tasks(&self) -> usize {
        self.models.len()
    }

    /// Runs `f` on every chunk in parallel, folding per-worker accumulators with `merge`.
    pub(crate) fn pass<A, I, F, R>(&self, chunks: &[Chunk], init: I, f: F, merge: R) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        self.pass_impl(chunks, init, f, merge, true)
    }

    pub(crate) fn pass_impl<A, I, F, R>(
        &self,
        chunks: &[Chunk],
        init: I,
        f: F,
        merge: R,
        report: bool,
    ) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        let stage = match (report, self.in_output.load(Ordering::Relaxed)) {
            (true, false) => self.stats_passes.fetch_add(1, Ordering::Relaxed) + 1,
            _ => 0,
        };
        let ahead = self.read_ahead(chunks);
        let release = self.releases(ahead, chunks);
        // The chunks no worker asks for below (those within `ahead` of the start). Why: a
        // sample's runs are fewer than `ahead` (a tensor's own sample in a per-tensor select:
        // 128 runs), so without this every run was a synchronous read, one or two at a time.
        chunks.iter().take(ahead).for_each(|c| self.prefetch(c));
        chunks
            .par_iter()
            .enumerate()
            .try_fold(
                || (self.spare_work(), init()),
                |(mut w, mut acc), (i, c)| {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    // A worker mostly walks its share of the list in order (rayon splits it
                    // into ranges), so this is what it reads a few chunks from now.
                    if let (true, Some(next)) = (ahead > 0, chunks.get(i + ahead)) {
                        self.prefetch(next);
                    }
                    crate::simd!({
                        let loaded = self.load(&mut w, c);
                        loaded.and_then(|()| f(&mut w, c, &mut acc))
                    })?;
                    if release {
                        self.release_after(&mut w, c);
                    }
                    if report {
                        let size = self.plan[c.tensor].base_dtype.size() as u64;
                        let bytes = c.len as u64 * size * (self.tasks() as u64 + 1);
                        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                        let total = self.total.load(Ordering::Relaxed);
                        (self.progress)(done.min(total), total, stage);
                    }
                    Ok((w, acc))
                },
            )
            .map(|r| {
                r.map(|(mut w, acc)| {
                    if let Some(run) = w.unreleased.take() {
                        self.release(&run);
                    }
                    self.spare.lock().expect("not poisoned").push(w);
                    acc
                })
            })
            .try_reduce(&init, |a, b| Ok(merge(a, b)))
    }

    fn spare_work(&self) -> Work {
        self.spare
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_default()
    }

    /// Decodes the chunk of the base and of every model and forms the (weighted) deltas.
    #[inline(always)]
    fn load(&self, w: &mut Work, c: &Chunk) -> Result<()> {
        let n = c.len;
        let tasks = self.tasks();
        // Buffers only grow (and keep stale data past n): zeroing megabytes whenever a short
        // chunk or a sample run came before a full one cost more than the work itself.
        grow(&mut w.base, n);
        w.raw.resize_with(tasks, Vec::new);
        if self.values {
            w.vals.resize_with(tasks, Vec::new);
        }
        match self.rounding(c.tensor) {
            Some(d) => self.load_rounded(w, c, d)?,
            None => self.load_stored(w, c)?,
        }
        if self.need_plain {
            w.plain.resize_with(tasks, Vec::new);
            for (p, d) in w.plain.iter_mut().zip(&w.raw) {
                grow(p, n);
                p[..n].copy_from_slice(&d[..n]);
            }
        }
        if let (true, Some(ws)) = (self.weigh_raw, &self.recipe.weights) {
            for (d, &wt) in w.raw.iter_mut().zip(ws) {
                for x in &mut d[..n] {
                    *x *= wt;
                }
            }
        }
        grow(&mut w.m, n);
        grow(&mut w.scratch, n);
        grow(&mut w.out, n);
        Ok(())
    }

    /// Whether tensor `t`'s values are left out of the loads: every set's kernel takes their
    /// differences from the deltas in the dtype they are loaded in
    /// ([`crate::methods::kernel::Kernel::values_from_deltas`]), and the load forms each delta
    /// as the f32 difference of those very values. Loaded in the recipe's load dtype
    /// ([`Engine::rounding`]), every input is rounded to it (a LoRA's and a scaled FP8's values
    /// too) before the deltas are formed; loaded as stored, only a base and models stored plain
    /// in one dtype are (a LoRA's value is θ_base + τ, whose rounding its delta does not carry).
    pub(crate) fn takes_values_from_deltas(&self, t: usize) -> bool {
        if !self.values {
            return false;
        }
        let accept = |d: DType| (self.recipe.sets.iter()).all(|s| s.method.values_from_deltas(d));
        let plain =
            |r: &TensorRef, d: DType| r.dtype == d && r.delta.is_none() && r.scale.is_none();
        match self.rounding(t) {
            Some(d) => accept(d),
            None => {
                let d = self.base_refs[t].dtype;
                plain(&self.base_refs[t], d)
                    && self.model_refs.iter().all(|m| plain(&m[t], d))
                    && accept(d)
            }
        }
    }

    /// Whether tensor `t`'s chunks load the models' values ([`Engine::values`], less the
    /// tensors whose kernel takes them from the deltas).
    #[inline(always)]
    pub(crate) fn reads_values(&self, t: usize) -> bool {
        self.values && !self.values_from_deltas[t]
    }

    /// The inputs of a chunk as stored: the base, and each model's delta from it (and its
    /// values for a kernel that reads them).
    #[inline(always)]
    fn load_stored(&self, w: &mut Work, c: &Chunk) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let b = &self.base_refs[c.tensor];
        read_values(b, t, c, &mut w.base[..n], &mut w.lora)?;
        for (k, refs) in self.model_refs.iter().enumerate() {
            grow(&mut w.raw[k], n);
            let d = &mut w.raw[k][..n];
            let r = &refs[c.tensor];
            if self.reads_values(c.tensor) && r.delta.is_none() && r.scale.is_none() {
                // The values as stored, and the deltas from them (the same f32 subtraction
                // `decode_delta` does).
                grow(&mut w.vals[k], n);
                let v = &mut w.vals[k][..n];
                read_values(r, t, c, v, &mut w.lora)?;
                if !self.values_only {
                    for ((x, &y), b) in d.iter_mut().zip(v.iter()).zip(&w.base[..n]) {
                        *x = y - b;
                    }
                }
                continue;
            }
            if let Some(delta) = &r.delta {
                lora::fill(delta, &t.name, t.row_len(), c.start, d, &mut w.lora)?;
                continue;
            }
            if r.scale.is_some() {
                read_values(r, t, c, d, &mut w.lora)?;
                for (x, b) in d.iter_mut().zip(&w.base[..n]) {
                    *x -= b;
                }
                continue;
            }
            let size = r.dtype.size();
            let bytes = &r.data[c.start * size..(c.start + c.len) * size];
            if !decode_delta(r.dtype, bytes, &w.base[..n], d) {
                // Rare path: find and report the offending element.
                decode_checked(r, &t.name, c, d)?;
            }
        }
        if self.reads_values(c.tensor) {
            // LoRA and scaled FP8 inputs have no stored value: θ_base + τ stands in.
            for (k, refs) in self.model_refs.iter().enumerate() {
                let r = &refs[c.tensor];
                if r.delta.is_some() || r.scale.is_some() {
                    grow(&mut w.vals[k], n);
                    for ((v, &x), &b) in w.vals[k][..n]
                        .iter_mut()
                        .zip(&w.raw[k][..n])
                        .zip(&w.base[..n])
                    {
                        *v = b + x;
                    }
                }
            }
        }
        Ok(())
    }

    /// The load dtype tensor `t`'s inputs are rounded to, when rounding can change one: some
    /// input is stored in another dtype, or is a LoRA or scaled FP8 input.
    #[inline(always)]
    fn rounding(&self, t: usize) -> Option<DType> {
        // Decoding already rounds wider inputs to the f32 of the arithmetic.
        let d = self
            .recipe
            .load_dtype
            .filter(|d| matches!(d, DType::BF16 | DType::F16))?;
        let differs = |r: &TensorRef| r.dtype != d || r.delta.is_some() || r.scale.is_some();
        (differs(&self.base_refs[t]) || self.model_refs.iter().any(|refs| differs(&refs[t])))
            .then_some(d)
    }

    /// The inputs of a chunk loaded in `d` (mergekit's `dtype`): each value, the base's too,
    /// rounded to `d` before the deltas are formed, as mergekit converts the tensors it loads.
    #[inline(always)]
    fn load_rounded(&self, w: &mut Work, c: &Chunk, d: DType) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let Work {
            base,
            raw,
            vals,
            out: stored,
            lora,
            ..
        } = w;
        grow(stored, n);
        let (base, stored) = (&mut base[..n], &mut stored[..n]);
        let b = &self.base_refs[c.tensor];
        read_values(b, t, c, base, lora)?;
        // The base as stored: a LoRA's values are θ_base + BA before they are loaded in d.
        stored.copy_from_slice(base);
        // Values stored in d itself are d's already (a bf16 checkpoint under `dtype: bfloat16`).
        let plain = |r: &TensorRef| r.dtype == d && r.delta.is_none() && r.scale.is_none();
        if !plain(b) {
            round_loaded(d, b.file, t, c.start, base)?;
        }
        let values = self.reads_values(c.tensor);
        for (k, refs) in self.model_refs.iter().enumerate() {
            let r = &refs[c.tensor];
            grow(&mut raw[k], n);
            if values {
                grow(&mut vals[k], n);
            }
            let v = if values {
                &mut vals[k][..n]
            } else {
                &mut raw[k][..n]
            };
            match &r.delta {
                Some(delta) => {
                    // A LoRA's values as mergekit loads them: PEFT's merge_and_unload adds the
                    // f32 ΔW and stores θ_base + ΔW in the base's stored dtype.
                    lora::fill(delta, &t.name, t.row_len(), c.start, v, lora)?;
                    for (x, &s) in v.iter_mut().zip(stored.iter()) {
                        *x = round_to(b.dtype, s + *x);
                    }
                }
                None => read_values(r, t, c, v, lora)?,
            }
            if !plain(r) {
                round_loaded(d, r.file, t, c.start, v)?;
            }
            if !values {
                for (x, &b) in raw[k][..n].iter_mut().zip(base.iter()) {
                    *x -= b;
                }
            } else if !self.values_only {
                let pairs = raw[k][..n].iter_mut().zip(vals[k][..n].iter());
                for ((x, &y), &b) in pairs.zip(base.iter()) {
                    *x = y - b;
                }
            }
        }
        Ok(())
    }

    /// Fills `w.eff` with set `j`'s deltas when they are not A*'s (`raw`): its own weights,
    /// DARE. mergekit's methods take the unweighted deltas and weight them themselves.
    pub(crate) fn set_deltas(&self, w: &mut Work, j: usize, c: &Chunk) -> Src {
        let n = c.len;
        let tasks = self.tasks();
        let unweighted = if self.need_plain {
            Src::Plain
        } else {
            Src::Raw
        };
        let method = &self.recipe.sets[j].method;
        if method.unweighted() {
            return unweighted;
        }
        let mut src = Src::Raw;
        if self.own_weights[j] {
            let Work {
                raw, plain, eff, ..
            } = w;
            let from = if unweighted == Src::Plain {
                &*plain
            } else {
                &*raw
            };
            eff.resize_with(tasks, Vec::new);
            for ((e, d), &wt) in eff.iter_mut().zip(from).zip(&self.weights[j]) {
                grow(e, n);
                for (o, &x) in e[..n].iter_mut().zip(&d[..n]) {
                    *o = x * wt;
                }
            }
            src = Src::Eff;
        }
        if let Some(p) = method.dare() {
            let name = &self.plan[c.tensor].name;
            w.eff.resize_with(tasks, Vec::new);
            for k in 0..tasks {
                grow(&mut w.eff[k], n);
                let stream = Stream::new(self.recipe.seed, k as u64, name);
                let (first, density) = (c.start as u64, p.density.get(k));
                // In the widest copy (`simd!`): the draws' 64-bit products vectorise there.
                if src == Src::Raw {
                    let (raw, eff) = (&w.raw[k][..n], &mut w.eff[k][..n]);
                    crate::simd!(elementwise::dare_into(
                        raw, eff, &stream, first, density, p.rescale
                    ));
                } else {
                    let x = &mut w.eff[k][..n];
                    crate::simd!(elementwise::dare(x, &stream, first, density, p.rescale));
                }
            }
            src = Src::Eff;
        }
        src
    }
}

/// The input tensor a planned output reads (a computed scale tensor: its weight's).
fn source<'p>(plan: &'p [TensorPlan], t: &'p TensorPlan) -> &'p str {
    match t.derived {
        Some(w) => &plan[w].name,
        None => &t.name,
    }
}

/// Makes `v` at least `n` long without touching what it holds.
#[inline]
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// The stored values of `r`'s chunk (scaled FP8 codes times their scales) into `out`.
#[inline(always)]
fn read_values(
    r: &TensorRef,
    t: &TensorPlan,
    c: &Chunk,
    out: &mut [f32],
    lora: &mut (Vec<f32>, Vec<f32>),
) -> Result<()> {
    let size = r.dtype.size();
    let bytes = &r.data[c.start * size..(c.start + c.len) * size];
    if !decode_finite(r.dtype, bytes, out) {
        decode_checked(r, &t.name, c, out)?;
    }
    if let Some(s) = &r.scale {
        scaled::apply(s, &t.name, t.row_len(), c.start, out, &mut lora.0)?;
    }
    Ok(())
}

/// Rounds loaded values to `d` (nearest even); a value beyond `d`'s range is an error naming
/// the file, the tensor and the element, never an infinity merged.
#[inline(always)]
fn round_loaded(d: DType, file: &str, t: &TensorPlan, start: usize, v: &mut [f32]) -> Result<()> {
    let limit = d.overflow_at();
    // The check and the rounding are loops of their own, without an early exit or a dtype
    // branch per element, so both vectorise (one loop of both was a third of a bf16 merge).
    if v.iter().fold(false, |over, x| over | (x.abs() >= limit)) {
        let i = v.iter().position(|x| x.abs() >= limit).expect("one is");
        return Err(Error::LoadOverflow {
            file: file.to_owned(),
            tensor: t.name.clone(),
            index: start + i,
            value: v[i],
            dtype: d.name(),
        });
    }
    match d {
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = f32::from_bits(u32::from(crate::dtype::bf16_bits(*x)) << 16)),
        _ => v.iter_mut().for_each(|x| *x = round_to(d, *x)),
    }
    Ok(())
}

/// Decodes a chunk that failed the fast finite check, and reports its first bad element: a
/// NaN or infinity, or a finite f64 that f32 cannot hold.
pub(crate) fn decode_checked(r: &TensorRef, name: &str, c: &Chunk, out: &mut [f32]) -> Result<()> {
    let size = r.dtype.size();
    let bytes = &r.data[c.start * size..(c.start + c.len) * size];
    decode(r.dtype, bytes, out);
    if let Some((i, value)) = first_non_finite(out) {
        if r.dtype == crate::dtype::DType::F64 {
            let v = f64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if v.is_finite() {
                return Err(Error::OutOfRange {
                    file: r.file.to_owned(),
                    tensor: name.to_owned(),
                    index: c.start + i,
                    value: v,
                });
            }
        }
        return Err(Error::NonFinite {
            file: r.file.to_owned(),
            tensor: name.to_owned(),
            index: c.start + i,
            value,
        });
    }
    Ok(())
}
