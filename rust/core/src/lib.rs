//! weightweave-core: out-of-core merging of fine-tuned safetensors checkpoints and Weight
//! Weaving, with no Python in sight. The data path is
//! [`reader`] (mmap + validation) → [`plan`] (cross-model checks, chunks) → [`pipeline`]
//! (passes over chunks: [`methods`], [`select`] statistics, [`pool`]) → [`writer`].

pub mod dtype;
pub mod error;
pub mod header;
pub mod methods;
pub mod pipeline;
pub mod plan;
pub mod pool;
pub mod reader;
pub mod rng;
pub mod select;
pub mod session;
pub mod simd;
mod stats;
pub mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub use dtype::DType;
pub use error::{Error, Result};
pub use methods::{Method, Param, Params};
pub use pipeline::{Options, Recipe, Sink};
pub use pool::{Combine, Pool};
pub use reader::{Checkpoint, ModelView, TensorRef};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Elements per chunk when the caller gives none: small enough that (T+4) f32 buffers per worker
/// stay in the low megabytes, large enough to amortize per-chunk overhead.
pub const DEFAULT_CHUNK: usize = 1 << 18;

/// The largest chunk accepted.
pub const MAX_CHUNK: usize = 1 << 30;

/// Plain merge or Weight Weaving, as the caller asked (defaults not yet applied).
#[derive(Clone, Debug, PartialEq)]
pub enum Mode {
    Merge {
        lam: Option<f64>,
    },
    Weave {
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
}

/// What a finished merge did.
#[derive(Clone, Debug)]
pub struct Report {
    pub outputs: Vec<PathBuf>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

impl Job {
    /// Validates the job and resolves its defaults.
    pub fn recipe(&self) -> Result<Recipe> {
        let method = Method::parse(&self.method, &self.params)?;
        let combine = match &self.mode {
            Mode::Merge { lam } => {
                let lam = lam.unwrap_or_else(|| Method::default_lam(&self.method));
                if !lam.is_finite() {
                    return Err(Error::param("lam", format!("{lam} is not finite")));
                }
                Combine::Merge { lam: lam as f32 }
            }
            Mode::Weave {
                lambdas,
                pool,
                include_deltas,
            } => {
                let lambdas = match lambdas {
                    Some(l) => l.clone(),
                    None => {
                        Method::default_lambdas(&self.method).expect("every method has a default")
                    }
                };
                if lambdas.is_empty() || lambdas.len() > 1 << 20 {
                    return Err(Error::param(
                        "lambdas",
                        "must hold between 1 and 2^20 values",
                    ));
                }
                if lambdas.iter().any(|l| !l.is_finite())
                    || lambdas.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(Error::param(
                        "lambdas",
                        format!("must be finite and strictly increasing, got {lambdas:?}"),
                    ));
                }
                let pool = Pool::parse(pool).ok_or_else(|| {
                    Error::param(
                        "pool",
                        format!("'{pool}' is not one of mean, random, magmax"),
                    )
                })?;
                Combine::Weave {
                    lambdas: lambdas.iter().map(|&l| l as f32).collect(),
                    pool,
                    include_deltas: *include_deltas,
                }
            }
        };
        if self.chunk_size == Some(0) {
            return Err(Error::param("chunk_size", "must be positive"));
        }
        // Kernels count within a chunk in u32.
        if self.chunk_size.is_some_and(|c| c > MAX_CHUNK) {
            return Err(Error::param(
                "chunk_size",
                format!("at most {MAX_CHUNK} elements"),
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::param("threads", "must be positive"));
        }
        Ok(Recipe {
            method,
            combine,
            seed: self.seed,
        })
    }

    pub fn out_dtype(&self) -> Result<Option<DType>> {
        self.out_dtype
            .as_deref()
            .map(|s| {
                DType::parse(s)
                    .ok_or_else(|| Error::param("out_dtype", format!("unknown dtype '{s}'")))
            })
            .transpose()
    }

    pub fn options(&self) -> Options {
        Options {
            threads: self
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            chunk_size: self.chunk_size.unwrap_or(DEFAULT_CHUNK),
        }
    }

    /// The recipe recorded in the output's `__metadata__`.
    pub fn metadata(&self, recipe: &Recipe) -> BTreeMap<String, String> {
        let mut r = serde_json::json!({
            "method": recipe.method.name(),
            "params": recipe.method.params_json(),
            "seed": recipe.seed,
        });
        match &recipe.combine {
            Combine::Merge { lam } => {
                r["lam"] = serde_json::json!(lam);
            }
            Combine::Weave {
                lambdas,
                pool,
                include_deltas,
            } => {
                r["lambdas"] = serde_json::json!(lambdas);
                r["pool"] = serde_json::json!(pool.name());
                r["include_deltas"] = serde_json::json!(include_deltas);
            }
        }
        BTreeMap::from([
            ("format".to_owned(), "pt".to_owned()),
            ("weightweave.version".to_owned(), VERSION.to_owned()),
            ("weightweave.recipe".to_owned(), r.to_string()),
        ])
    }
}

fn check_tasks(models: usize) -> Result<()> {
    if models == 0 {
        return Err(Error::param(
            "models",
            "at least one fine-tuned model is needed",
        ));
    }
    Ok(())
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
    check_tasks(models.len())?;
    let recipe = job.recipe()?;
    let plan = plan::validate(base, models, job.out_dtype()?)?;
    let given = plan::given_for(&plan, given, &recipe)?;
    let opts = job.options();
    pipeline::run(
        base, models, &plan, &recipe, opts, sink, progress, cancel, &given,
    )?;
    Ok(plan)
}

/// Validates in-memory models and returns the output plan, without merging.
pub fn plan_views(
    base: &ModelView,
    models: &[ModelView],
    job: &Job,
) -> Result<Vec<plan::TensorPlan>> {
    check_tasks(models.len())?;
    job.recipe()?;
    plan::validate(base, models, job.out_dtype()?)
}

/// Merges checkpoints on disk into `out` (a `.safetensors` file or a model directory).
pub fn run_files(
    base: &Path,
    models: &[PathBuf],
    out: &Path,
    shard_size: Option<u64>,
    job: &Job,
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<Report> {
    let start = Instant::now();
    check_tasks(models.len())?;
    let recipe = job.recipe()?;
    if recipe.method.is_external() {
        return Err(Error::param(
            "method",
            format!(
                "{} runs on the torch backend: use a Session",
                recipe.method.name()
            ),
        ));
    }
    let target = writer::Target::from_path(out, shard_size)?;
    let base_ck = Checkpoint::open(base)?;
    let model_cks = models
        .iter()
        .map(Checkpoint::open)
        .collect::<Result<Vec<_>>>()?;
    let base_view = base_ck.view();
    let views: Vec<ModelView> = model_cks.iter().map(|m| m.view()).collect();
    let plan = plan::validate(&base_view, &views, job.out_dtype()?)?;
    let mut inputs = base_ck.input_files();
    for m in &model_cks {
        inputs.extend(m.input_files());
    }
    let layout = writer::Layout::new(&plan, &target, &job.metadata(&recipe));
    let bytes_written = layout.bytes();
    let output =
        writer::FileOutput::create(&target, layout, &inputs, base_ck.model_dir.as_deref())?;
    let bytes_read = pipeline::run(
        &base_view,
        &views,
        &plan,
        &recipe,
        job.options(),
        &output,
        progress,
        cancel,
        &[],
    )?;
    // Unmapping gigabytes of inputs takes a while (page tables); do it while commit waits for
    // the disk.
    drop(views);
    drop(base_view);
    let unmap = std::thread::spawn(move || drop((base_ck, model_cks)));
    let outputs = output.commit();
    let _ = unmap.join();
    let outputs = outputs?;
    Ok(Report {
        outputs,
        bytes_read,
        bytes_written,
        seconds: start.elapsed().as_secs_f64(),
    })
}
