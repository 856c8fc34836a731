//! weightweave-core: out-of-core merging of fine-tuned safetensors checkpoints and Weight
//! Weaving, with no Python in sight. The data path is
//! [`reader`] (mmap + validation) → [`plan`] (cross-model checks, chunks) → [`pipeline`]
//! (passes over chunks: [`methods`], [`select`] statistics, [`pool`]) → [`writer`].

pub mod cluster;
pub mod dtype;
pub mod error;
pub mod keep;
pub mod key_hist;
pub mod source;
/// The safetensors header parser, under its historical name.
pub use source::safetensors as header;
pub mod methods;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod reader;
pub mod recipe;
pub mod rng;
pub mod scaling;
pub mod select;
pub mod session;
pub mod simd;
mod stats;
pub mod watch;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub use dtype::DType;
pub use error::{Error, Result};
pub use methods::{Method, Param, Params};
pub use pipeline::{Options, Sink};
pub use pool::Pool;
pub use reader::{Checkpoint, ModelView, TensorRef};
pub use recipe::{Combine, CustomPool, Job, Mode, Recipe, Space};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Elements per chunk when the caller gives none: small enough that a worker's (T+4) f32
/// buffers (512 KiB each) stay near its core's L2 cache, large enough to amortize per-chunk
/// overhead. It was 2^18 (1 MiB buffers) until measured (`benches/chunk_size.py`): on 2 Zen 4
/// cores (1 MiB L2), warm cache, 0.5 B bf16, 2^17 took 0.43–0.88× the time of 2^18 for every
/// paper method and mergekit's TIES; 2^16 and 2^15 were no faster again. On 2 Xeon cores
/// (2 MiB L2) every size from 2^14 to 2^17 took 0.90–1.04× the time of 2^17
/// (`benches/results/chunk_size_xeon.md`), so it stayed.
pub const DEFAULT_CHUNK: usize = 1 << 17;

/// The largest chunk accepted.
pub const MAX_CHUNK: usize = 1 << 30;

/// Chunks larger than this are processed in pieces of this size: a chunk is the unit between
/// cancellation checks, so this bounds how long Ctrl-C takes (tens of milliseconds for the
/// slowest method), and it only lowers memory. Outputs do not depend on chunking.
pub const PIECE: usize = 1 << 20;

/// More worker threads than this is an error (a typo, not a wish).
pub const MAX_THREADS: usize = 1024;

/// Threads beyond this many per core only add contention; larger requests are clamped.
pub const THREADS_PER_CORE: usize = 4;

/// What a finished merge did.
#[derive(Clone, Debug)]
pub struct Report {
    pub outputs: Vec<PathBuf>,
    /// Integer/bool tensors that differ between the base and a fine-tune (copied from the base).
    pub differing: Vec<String>,
    /// What `keep_base` copied from the base and left out of the models.
    pub kept: keep::Kept,
    /// Files of the base's model directory not copied to the output, with why.
    pub skipped: Vec<String>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

/// Merges in-memory models into a caller-provided sink (the array API). For the SVD methods,
/// `given` maps tensor names to their externally computed M (other tensors take the mean).
pub fn run_views(
    base: &ModelView,
    models: &[ModelView],
    job: &Job,
    given: &BTreeMap<String, &[f32]>,
    sink: &dyn Sink,
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<Vec<plan::TensorPlan>> {
    let mut recipe = job.recipe_cancellable(cancel)?;
    no_slices(job)?;
    job.check_tasks(&recipe, models.len())?;
    let mut models = models.to_vec();
    let (plan, _) = keep::plan(job, base, &mut models, job.out_dtype()?)?;
    recipe.groups = job.tensor_groups(&plan, models.len(), cancel)?;
    let given = plan::given_for(&plan, given, &recipe)?;
    let opts = job.options();
    pipeline::run(
        base,
        &models,
        &plan,
        &recipe,
        opts,
        sink,
        progress,
        cancel,
        &given,
        pipeline::Part::default(),
    )?;
    Ok(plan)
}

/// Slices read layer ranges of checkpoint files, and a built tokenizer realigns files; in-memory
/// models are merged whole.
fn no_slices(job: &Job) -> Result<()> {
    if job.slices.is_some() {
        return Err(Error::param(
            "slices",
            "take layer ranges of checkpoint files, not of arrays",
        ));
    }
    if job.tokenizer.is_some() || !job.overlays.is_empty() {
        return Err(Error::param(
            "tokenizer",
            "a tokenizer is built for checkpoint files, not for arrays",
        ));
    }
    Ok(())
}

/// Validates in-memory models and returns the output plan, without merging.
pub fn plan_views(
    base: &ModelView,
    models: &[ModelView],
    job: &Job,
    cancel: &AtomicBool,
) -> Result<Vec<plan::TensorPlan>> {
    let recipe = job.recipe_cancellable(cancel)?;
    no_slices(job)?;
    job.check_tasks(&recipe, models.len())?;
    let mut models = models.to_vec();
    let (plan, _) = keep::plan(job, base, &mut models, job.out_dtype()?)?;
    job.tensor_groups(&plan, models.len(), cancel)?;
    Ok(plan)
}

/// Where and how a file merge writes its output.
#[derive(Clone, Debug, Default)]
pub struct OutputOptions {
    /// Maximum bytes per shard (directory output).
    pub shard_size: Option<u64>,
    /// Replace an earlier weightweave output at the same path.
    pub overwrite: bool,
}

/// A computed merge, fully written to its staging area, not yet published.
pub struct Prepared {
    output: writer::FileOutput,
    inputs: Vec<(PathBuf, watch::Fingerprint)>,
    differing: Vec<String>,
    kept: keep::Kept,
    bytes_read: u64,
    bytes_written: u64,
    start: Instant,
    unmap: Option<std::thread::JoinHandle<()>>,
}

impl Prepared {
    /// Checks that no input changed and publishes the output in one step. Nothing is left at
    /// the target when this fails.
    pub fn publish(self) -> Result<Report> {
        let Prepared {
            output,
            inputs,
            differing,
            kept,
            bytes_read,
            bytes_written,
            start,
            unmap,
        } = self;
        let verify = || inputs.iter().try_for_each(|(p, fp)| watch::verify(p, fp));
        let skipped = output.skipped().to_vec();
        let outputs = output.publish(&verify);
        if let Some(h) = unmap {
            let _ = h.join();
        }
        Ok(Report {
            outputs: outputs?,
            differing,
            kept,
            skipped,
            bytes_read,
            bytes_written,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// The checkpoints of a file merge, opened and validated, with the output's staging area
/// created: every check that can fail before any work has passed when this returns.
pub(crate) struct Opened {
    pub base: Checkpoint,
    pub models: Vec<Checkpoint>,
    pub plan: Vec<plan::TensorPlan>,
    pub output: writer::FileOutput,
    pub bytes_written: u64,
    pub differing: Vec<String>,
    pub kept: keep::Kept,
    /// Some input weight is FP8 with scales (dequantized while read).
    pub scaled: bool,
}

/// What the pipeline reads of each fine-tune (a LoRA adapter as deltas of the base's tensors).
/// The views the pipeline reads: the base and each fine-tune (a LoRA adapter as deltas of the
/// base's tensors), with FP8 scales attached to the weights they scale. The name of one scaled
/// weight, if any.
pub(crate) type Views<'a> = (ModelView<'a>, Vec<ModelView<'a>>, Option<String>);

/// The views a job merges: the inputs', or with `slices` the lanes assembled from them.
pub(crate) fn job_views<'a>(
    job: &Job,
    base: &'a Checkpoint,
    models: &'a [Checkpoint],
) -> Result<Views<'a>> {
    let (b, v, scaled) = input_views(base, models)?;
    let Some(sl) = &job.slices else {
        return Ok((b, v, scaled));
    };
    if let Some(m) = models.iter().find(|m| m.lora.is_some()) {
        return Err(Error::param(
            "slices",
            format!(
                "{} is a LoRA adapter: slices take whole models (merge it into its model first)",
                m.path.display()
            ),
        ));
    }
    let inputs: Vec<&ModelView> = std::iter::once(&b).chain(&v).collect();
    let (b2, v2) = sl.apply(&inputs)?;
    Ok((b2, v2, scaled))
}

pub(crate) fn input_views<'a>(base: &'a Checkpoint, models: &'a [Checkpoint]) -> Result<Views<'a>> {
    if base.lora.is_some() {
        return Err(Error::param(
            "base",
            format!(
                "{} is a LoRA adapter; the base is the model it adapts (give the adapter as a fine-tune)",
                base.path.display()
            ),
        ));
    }
    let block = base.fp8_block();
    let model_type = base.model_type();
    let base_view = source::scaled::dequant_view(base.view(), block)?;
    let views = models
        .iter()
        .map(|m| {
            m.tuned_view(&base_view, model_type.as_deref())
                .and_then(|v| source::scaled::dequant_view(v, block))
        })
        .collect::<Result<Vec<_>>>()?;
    source::scaled::check_same_scaling(&base_view, &views)?;
    let scaled = std::iter::once(&base_view)
        .chain(&views)
        .flat_map(|v| v.tensors.iter())
        .find(|(_, t)| t.scale.is_some())
        .map(|(n, _)| n.clone());
    Ok((base_view, views, scaled))
}

/// The output's `__metadata__`: the base's entries, then ours (version, recipe with λ and the
/// inputs as the caller gave them).
fn output_metadata(
    base_ck: &Checkpoint,
    job: &Job,
    recipe: &Recipe,
    base: &Path,
    models: &[PathBuf],
    kept: &keep::Kept,
) -> BTreeMap<String, String> {
    let mut meta = base_ck.metadata().clone();
    let mut ours = job.metadata(recipe);
    if let Some(r) = ours.get_mut("weightweave.recipe") {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(r) {
            if let Some(p) = &job.keep_base {
                v["keep_base"] = serde_json::json!({"pattern": p, "copied": kept.copied, "left_out": kept.dropped});
            }
            if !kept.aligned.is_empty() {
                v["aligned_names"] = serde_json::json!(kept.aligned);
            }
            v["base"] = serde_json::json!(base.display().to_string());
            v["models"] = serde_json::json!(models
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>());
            *r = v.to_string();
        }
    }
    meta.extend(ours);
    meta
}

/// A file merge's inputs opened, overlaid and planned: what every process of a cluster merge
/// builds alike from the same paths and job.
pub(crate) struct Inputs {
    pub base: Checkpoint,
    pub models: Vec<Checkpoint>,
    pub plan: Vec<plan::TensorPlan>,
    pub differing: Vec<String>,
    pub kept: keep::Kept,
    /// The name of one input weight that is FP8 with scales (dequantized while read).
    pub scaled: Option<String>,
}

pub(crate) fn open_inputs(base: &Path, models: &[PathBuf], job: &Job) -> Result<Inputs> {
    let base_ck = Checkpoint::open(base)?;
    let mut model_cks = models
        .iter()
        .map(Checkpoint::open)
        .collect::<Result<Vec<_>>>()?;
    let mut base_ck = base_ck;
    for o in &job.overlays {
        let ck = match o.input {
            0 => &mut base_ck,
            i => model_cks.get_mut(i - 1).ok_or_else(|| {
                Error::param("overlays", format!("input {i} of {} models", models.len()))
            })?,
        };
        ck.overlay(&o.path, &o.label)?;
    }
    let out_dtype = job.out_dtype()?;
    let (plan, differing, scaled, kept) = {
        let (base_view, mut views, scaled) = job_views(job, &base_ck, &model_cks)?;
        let (mut plan, kept) = keep::plan(job, &base_view, &mut views, out_dtype)?;
        let differing = plan::differing_copies(&base_view, &views, &plan);
        // Scaled FP8 weights are written re-quantized with fresh scales, unless out_dtype asks
        // for them dequantized.
        if scaled.is_some() && out_dtype.is_none() {
            plan::requantize(&mut plan, &base_view);
        }
        (plan, differing, scaled, kept)
    };
    Ok(Inputs {
        base: base_ck,
        models: model_cks,
        plan,
        differing,
        kept,
        scaled,
    })
}

/// Where the output goes, as the base shapes it: shards as large as a sharded base's largest
/// unless the caller chose, and the file name a diffusers component's (or open_clip's) loader
/// looks for.
pub(crate) fn output_target(
    out: &Path,
    opts: &OutputOptions,
    base_ck: &Checkpoint,
) -> Result<writer::Target> {
    let mut target = writer::Target::new(out, opts.shard_size, opts.overwrite)?;
    if let (writer::Kind::Dir { shard_size: None }, Some(size)) =
        (target.kind, base_ck.largest_shard_bytes())
    {
        target.kind = writer::Kind::Dir {
            shard_size: Some(size.max(1)),
        };
    }
    target.stem = base_ck.weights_stem();
    if target.stem == reader::OPEN_CLIP_STEM && target.shard_size().is_some() {
        return Err(Error::param(
            "shard_size",
            "open_clip loads a single open_clip_model.safetensors and reads no shard index; write one file",
        ));
    }
    Ok(target)
}

pub(crate) fn open_files(
    base: &Path,
    models: &[PathBuf],
    out: &Path,
    opts: &OutputOptions,
    job: &Job,
    recipe: &Recipe,
) -> Result<Opened> {
    // The output's place is checked before any input is read.
    writer::Target::new(out, opts.shard_size, opts.overwrite)?;
    let inputs = open_inputs(base, models, job)?;
    let target = output_target(out, opts, &inputs.base)?;
    let Inputs {
        base: base_ck,
        models: model_cks,
        plan,
        differing,
        kept,
        scaled,
    } = inputs;
    let out_dtype = job.out_dtype()?;
    let mut inputs = base_ck.input_files();
    for m in &model_cks {
        inputs.extend(m.input_files());
    }
    let metadata = output_metadata(&base_ck, job, recipe, base, models, &kept);
    let (output, bytes_written) = writer::FileOutput::create(
        &target,
        &plan,
        &metadata,
        &inputs,
        writer::BaseDir {
            dir: base_ck.model_dir.as_deref(),
            modules: &base_ck.module_paths(),
        },
        out_dtype,
        scaled.is_some() && out_dtype.is_some(),
    )?;
    let mut output = output;
    output.set_layer_map(job.slices.as_ref().map(|s| s.base_layers()));
    if let Some(t) = &job.tokenizer {
        output.set_tokenizer(&t.dir, t.vocab_size)?;
    }
    Ok(Opened {
        base: base_ck,
        models: model_cks,
        plan,
        output,
        bytes_written,
        differing,
        kept,
        scaled: scaled.is_some(),
    })
}

impl Opened {
    /// Ends the reading: checks the maps for truncation, keeps the inputs' fingerprints, and
    /// unmaps in the background (page tables of gigabytes take a while) while publish waits
    /// for the disk.
    pub(crate) fn finish_reading(self, bytes_read: u64, start: Instant) -> Result<Prepared> {
        self.base.check_truncation()?;
        self.models
            .iter()
            .try_for_each(Checkpoint::check_truncation)?;
        let mut inputs = self.base.fingerprints();
        for m in &self.models {
            inputs.extend(m.fingerprints());
        }
        let (base, models) = (self.base, self.models);
        let unmap = std::thread::spawn(move || drop((base, models)));
        Ok(Prepared {
            output: self.output,
            inputs,
            differing: self.differing,
            kept: self.kept,
            bytes_read,
            bytes_written: self.bytes_written,
            start,
            unmap: Some(unmap),
        })
    }
}

/// Merges checkpoints on disk into the staging area of `out` (a `.safetensors` file or a
/// model directory); [`Prepared::publish`] then makes it visible. The two steps are apart so
/// that a caller can report progress one last time (and still cancel) before the publish.
pub fn prepare_files(
    base: &Path,
    models: &[PathBuf],
    out: &Path,
    opts: &OutputOptions,
    job: &Job,
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<Prepared> {
    let start = Instant::now();
    let recipe = job.recipe_cancellable(cancel)?;
    job.check_tasks(&recipe, job.tasks(models.len()))?;
    if recipe.method().external() {
        return Err(Error::param(
            "method",
            format!(
                "{} runs on the torch backend: use a Session",
                recipe.method().name()
            ),
        ));
    }
    let mut opened = open_files(base, models, out, opts, job, &recipe)?;
    let mut recipe = recipe;
    recipe.groups = job.tensor_groups(&opened.plan, job.tasks(models.len()), cancel)?;
    let bytes_read = {
        let (base_view, mut views, _) = job_views(job, &opened.base, &opened.models)?;
        job.share_names(&base_view, &mut views)?;
        pipeline::run(
            &base_view,
            &views,
            &opened.plan,
            &recipe,
            job.options(),
            &opened.output,
            progress,
            cancel,
            &[],
            pipeline::Part::default(),
        )?
    };
    opened.output.stage_extras(cancel)?;
    opened.finish_reading(bytes_read, start)
}

/// Which of `names` the regular expression `pattern` finds a match in (Python's `re.search`
/// semantics for the patterns both engines accept). Matching runs in linear time with a bounded
/// compiled size, so a pattern from a recipe such as `(a+)+$` cannot stall a run; syntax only
/// a backtracking engine has (look-around, back-references) is an error.
pub fn names_matching(what: &str, pattern: &str, names: &[String]) -> Result<Vec<bool>> {
    let re = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| {
            Error::param(
                what,
                format!(
                    "not a regular expression weightweave can match in linear time ({})",
                    e.to_string().lines().last().unwrap_or("")
                ),
            )
        })?;
    Ok(names.iter().map(|n| re.is_match(n)).collect())
}
