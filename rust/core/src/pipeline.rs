//! The streaming engine. Every pass walks the same list of chunks on a rayon pool; a chunk reads
//! one element range of the base and of every fine-tune, converts it to f32 and forms the deltas.
//! Statistics passes reduce integer histograms and counts (order-free, so thread count and chunk
//! size cannot change a result); the final pass computes M, pools, encodes and writes each chunk
//! at its final offset. Anonymous memory is a few chunk-sized buffers per worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::dtype::{decode, decode_delta, decode_finite, encode, first_non_finite};
use crate::error::{Error, Result};
use crate::methods::pcb::{self, Clamp};
use crate::methods::ties::{self, TiesStats};
use crate::methods::{breadcrumbs, elementwise, Method, Scope};
use crate::plan::{Chunk, TensorPlan};
use crate::pool::{self, Combine};
use crate::reader::{ModelView, TensorRef};
use crate::rng::{Stream, POOL_STREAM};
use crate::source::{lora, scaled};

/// Where finished chunks go: a file writer or caller-owned memory.
pub trait Sink: Sync {
    /// Writes `data` at byte `offset` of output tensor `tensor`.
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()>;
}

/// What to compute.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub method: Method,
    pub combine: Combine,
    pub seed: u64,
    /// Per-model weights: every method, and A*, use w_t·τ_t in place of τ_t.
    pub weights: Option<Vec<f32>>,
}

impl Recipe {
    /// Σ_t w_t, summed in f64 (T when every weight is 1).
    pub fn weight_sum(&self, tasks: usize) -> f32 {
        match &self.weights {
            Some(w) => w.iter().map(|&x| x as f64).sum::<f64>() as f32,
            None => tasks as f32,
        }
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

/// Called with (bytes processed, bytes to process, stage) after every chunk; must be cheap.
/// The stage is 0 for the output pass and k ≥ 1 for the k-th statistics pass.
pub type Progress<'a> = &'a (dyn Fn(u64, u64, u32) + Sync);

/// Per-worker buffers, reused from chunk to chunk.
#[derive(Default)]
pub(crate) struct Work {
    pub(crate) base: Vec<f32>,
    pub(crate) raw: Vec<Vec<f32>>,
    pub(crate) dared: Vec<Vec<f32>>,
    pub(crate) m: Vec<f32>,
    pub(crate) scratch: Vec<f32>,
    pub(crate) out: Vec<f32>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) keys: Vec<u64>,
    pub(crate) scores: Vec<Vec<f32>>,
    pub(crate) signed: Vec<f32>,
    /// Decoded LoRA factors (A, B) of the tensor being read.
    pub(crate) lora: (Vec<f32>, Vec<f32>),
}

/// The statistics the output pass needs.
#[derive(Default)]
pub(crate) struct Stats {
    /// TIES, indexed by scope (0 for global, the tensor index for per-tensor).
    pub(crate) ties: Vec<Option<TiesStats>>,
    /// PCB clamps of |X| and of B, per task.
    pub(crate) pcb: Option<(Vec<Clamp>, Vec<Clamp>)>,
    /// Breadcrumbs' cuts for the pieces of long rows, by (tensor, chunk start), per task.
    pub(crate) crumbs: BTreeMap<(usize, usize), Vec<Option<breadcrumbs::Piece>>>,
}

pub(crate) struct Engine<'a> {
    pub(crate) models: &'a [ModelView<'a>],
    pub(crate) plan: &'a [TensorPlan],
    pub(crate) recipe: &'a Recipe,
    pub(crate) base_refs: Vec<TensorRef<'a>>,
    pub(crate) model_refs: Vec<Vec<TensorRef<'a>>>,
    pub(crate) done: AtomicU64,
    pub(crate) total: u64,
    pub(crate) progress: Progress<'a>,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) given: Given<'a>,
    /// Worker buffers handed from pass to pass (a pass per tensor is common with scope=tensor).
    pub(crate) spare: Mutex<Vec<Work>>,
    /// Σ λ, computed once.
    pub(crate) lam_sum: f32,
    /// Σ w_t (T without weights), for `linear`.
    pub(crate) weight_sum: f32,
    /// Statistics passes started so far, and whether the output pass has begun (the stage
    /// progress reports).
    pub(crate) stats_passes: AtomicU32,
    pub(crate) in_output: AtomicBool,
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
) -> Result<u64> {
    let whole_rows = matches!(recipe.method, Method::Breadcrumbs { .. });
    let (merge, copy) = crate::plan::chunks(plan, opts.chunk_size.max(1), whole_rows);
    run_chunks(
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
    )
}

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
) -> Result<u64> {
    let tasks = models.len() as u64;
    let merge_bytes: u64 = merge
        .iter()
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
        .sum();
    let copy_bytes: u64 = copy
        .iter()
        .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64)
        .sum();
    // Statistics passes when the sampled windows hold (a radix fallback adds one per select).
    let passes = match recipe.method {
        Method::Ties(_) | Method::DareTies(..) => 2,
        Method::Pcb { .. } => 3,
        _ => 1,
    };
    // Breadcrumbs' long rows take a windowed select and a counting pass more.
    let long_rows: u64 = match recipe.method {
        Method::Breadcrumbs { .. } => merge
            .iter()
            .filter(|c| plan[c.tensor].has_long_rows(opts.chunk_size))
            .map(|c| (c.len * plan[c.tensor].base_dtype.size()) as u64 * (tasks + 1))
            .sum(),
        _ => 0,
    };
    let engine = Engine {
        models,
        plan,
        recipe,
        base_refs: plan.iter().map(|t| base.tensors[&t.name]).collect(),
        model_refs: models
            .iter()
            .map(|m| plan.iter().map(|t| m.tensors[&t.name]).collect())
            .collect(),
        done: AtomicU64::new(0),
        total: merge_bytes * passes + copy_bytes + 2 * long_rows,
        progress,
        cancel,
        given,
        spare: Mutex::new(Vec::new()),
        lam_sum: recipe.combine.lam_sum(),
        weight_sum: recipe.weight_sum(models.len()),
        stats_passes: AtomicU32::new(0),
        in_output: AtomicBool::new(false),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::param("threads", e.to_string()))?;
    pool.install(|| {
        let debug = std::env::var_os("WEIGHTWEAVE_DEBUG").is_some();
        let t0 = std::time::Instant::now();
        let stats = engine.statistics(merge, opts.chunk_size)?;
        if debug {
            eprintln!("statistics: {:.2}s", t0.elapsed().as_secs_f64());
        }
        let t1 = std::time::Instant::now();
        engine.output(merge, copy, &stats, sink)?;
        if debug {
            eprintln!("output: {:.2}s", t1.elapsed().as_secs_f64());
        }
        Ok::<(), Error>(())
    })?;
    Ok(engine.total)
}

impl<'a> Engine<'a> {
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

    /// [`Self::pass`] without progress reports (samples are not counted in the total).
    pub(crate) fn pass_quiet<A, I, F, R>(
        &self,
        chunks: &[Chunk],
        init: I,
        f: F,
        merge: R,
    ) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        self.pass_impl(chunks, init, f, merge, false)
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
        chunks
            .par_iter()
            .try_fold(
                || (self.spare_work(), init()),
                |(mut w, mut acc), c| {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    crate::simd!({
                        let loaded = self.load(&mut w, c);
                        loaded.and_then(|()| f(&mut w, c, &mut acc))
                    })?;
                    if report {
                        let size = self.plan[c.tensor].base_dtype.size() as u64;
                        let bytes = c.len as u64 * size * (self.tasks() as u64 + 1);
                        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                        (self.progress)(done.min(self.total), self.total, stage);
                    }
                    Ok((w, acc))
                },
            )
            .map(|r| {
                r.map(|(w, acc)| {
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

    /// Decodes the chunk of the base and of every model and forms the deltas (and DARE's).
    #[inline(always)]
    fn load(&self, w: &mut Work, c: &Chunk) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let tasks = self.tasks();
        // Buffers only grow (and keep stale data past n): zeroing megabytes whenever a short
        // chunk or a sample run came before a full one cost more than the work itself.
        grow(&mut w.base, n);
        w.raw.resize_with(tasks, Vec::new);
        let b = &self.base_refs[c.tensor];
        let size = b.dtype.size();
        let base = &mut w.base[..n];
        let bytes = &b.data[c.start * size..(c.start + c.len) * size];
        if !decode_finite(b.dtype, bytes, base) {
            decode_checked(b, &t.name, c, base)?;
        }
        if let Some(s) = &b.scale {
            scaled::apply(s, &t.name, t.row_len(), c.start, base, &mut w.lora.0)?;
        }
        for (k, refs) in self.model_refs.iter().enumerate() {
            grow(&mut w.raw[k], n);
            let d = &mut w.raw[k][..n];
            let r = &refs[c.tensor];
            if let Some(delta) = &r.delta {
                lora::fill(delta, &t.name, t.row_len(), c.start, d, &mut w.lora)?;
                continue;
            }
            let size = r.dtype.size();
            let bytes = &r.data[c.start * size..(c.start + c.len) * size];
            if let Some(s) = &r.scale {
                if !decode_finite(r.dtype, bytes, d) {
                    decode_checked(r, &t.name, c, d)?;
                }
                scaled::apply(s, &t.name, t.row_len(), c.start, d, &mut w.lora.0)?;
                for (x, b) in d.iter_mut().zip(&w.base[..n]) {
                    *x -= b;
                }
                continue;
            }
            if !decode_delta(r.dtype, bytes, &w.base[..n], d) {
                // Rare path: find and report the offending element.
                decode_checked(r, &t.name, c, d)?;
            }
        }
        if let Some(ws) = &self.recipe.weights {
            for (d, &wt) in w.raw.iter_mut().zip(ws) {
                for x in &mut d[..n] {
                    *x *= wt;
                }
            }
        }
        if let Some(p) = self.recipe.method.dare() {
            w.dared.resize_with(tasks, Vec::new);
            for k in 0..tasks {
                grow(&mut w.dared[k], n);
                let stream = Stream::new(self.recipe.seed, k as u64, &t.name);
                let (raw, dared) = (&w.raw[k][..n], &mut w.dared[k][..n]);
                elementwise::dare(raw, dared, &stream, c.start as u64, p);
            }
        }
        grow(&mut w.m, n);
        grow(&mut w.scratch, n);
        grow(&mut w.out, n);
        Ok(())
    }

    fn output(
        &self,
        merge: &[Chunk],
        copy: &[Chunk],
        stats: &Stats,
        sink: &dyn Sink,
    ) -> Result<()> {
        self.in_output.store(true, Ordering::Relaxed);
        self.pass(
            merge,
            || (),
            #[inline(always)]
            |w, c, _| self.output_chunk(w, c, stats, sink),
            |_, _| (),
        )?;
        copy.par_iter().try_for_each(|c| {
            let t = &self.plan[c.tensor];
            let size = t.base_dtype.size();
            let data = &self.base_refs[c.tensor].data[c.start * size..(c.start + c.len) * size];
            sink.write(c.tensor, c.start * size, data)?;
            let done =
                self.done.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            (self.progress)(done, self.total, 0);
            Ok(())
        })
    }

    #[inline(always)]
    fn output_chunk(&self, w: &mut Work, c: &Chunk, stats: &Stats, sink: &dyn Sink) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let Work {
            base,
            raw,
            dared,
            m,
            scratch,
            out,
            bytes,
            keys,
            scores,
            signed,
            ..
        } = w;
        let deltas = if dared.is_empty() { &*raw } else { &*dared };
        match self.recipe.method {
            Method::TaskArithmetic | Method::Dare(_) => elementwise::sum(deltas, n, m),
            Method::Linear { normalize } => {
                elementwise::sum(deltas, n, m);
                if normalize {
                    let total = self.weight_sum;
                    for x in &mut m[..n] {
                        *x /= total;
                    }
                }
            }
            Method::MagMax => elementwise::magmax(deltas, n, m),
            Method::Ties(p) | Method::DareTies(_, p) => {
                let scope = if p.scope == Scope::Global {
                    0
                } else {
                    c.tensor
                };
                let s = stats.ties[scope]
                    .as_ref()
                    .expect("statistics of a non-empty scope");
                ties::merge(deltas, s, n, m, scratch, out);
            }
            Method::Breadcrumbs { density, gamma } => {
                match stats.crumbs.get(&(c.tensor, c.start)) {
                    Some(cuts) => breadcrumbs::merge_pieces(deltas, n, cuts, m),
                    None => breadcrumbs::merge(
                        deltas,
                        n,
                        t.row_len(),
                        t.shape.is_empty(),
                        (density, gamma),
                        keys,
                        m,
                    ),
                }
            }
            Method::Tsv | Method::IsoC => match self.given.get(c.tensor).copied().flatten() {
                Some(g) => m[..n].copy_from_slice(&g[c.start..c.start + n]),
                None => elementwise::mean(deltas, n, m),
            },
            Method::Pcb { .. } => {
                let (abs, score) = stats.pcb.as_ref().expect("pcb statistics");
                scores.resize_with(self.tasks(), Vec::new);
                for s in scores.iter_mut() {
                    grow(s, n);
                }
                pcb::merge(raw, n, abs, score, scores, signed, m);
            }
        }
        let stream = Stream::new(self.recipe.seed, POOL_STREAM, &t.name);
        // For task arithmetic M already is Σ_t τ_t, which the mean pool would sum again.
        let m_is_sum = matches!(self.recipe.method, Method::TaskArithmetic);
        let limit = t.out_dtype.overflow_at();
        let size = t.out_dtype.size();
        if bytes.len() < n * size {
            bytes.resize(n * size, 0);
        }
        let mut in_range = true;
        // Pool, range check and encode block by block, while each block is still in L1.
        for start in (0..n).step_by(OUT_BLOCK) {
            let r = start..(start + OUT_BLOCK).min(n);
            let raw: Vec<&[f32]> = raw.iter().map(|d| &d[r.clone()]).collect();
            let out = &mut out[r.clone()];
            pool::apply(
                &self.recipe.combine,
                &raw,
                &m[r.clone()],
                m_is_sum,
                self.lam_sum,
                &base[r.clone()],
                out,
                &stream,
                (c.start + start) as u64,
            );
            in_range &= out.iter().fold(true, |ok, v| ok & (v.abs() < limit));
            encode(t.out_dtype, out, &mut bytes[r.start * size..r.end * size]);
        }
        if !in_range {
            let n = n.min(out.len());
            return Err(if out[..n].iter().any(|v| !v.is_finite()) {
                Error::ArithmeticOverflow {
                    tensor: t.name.clone(),
                }
            } else {
                Error::Overflow {
                    tensor: t.name.clone(),
                    dtype: t.out_dtype.name(),
                    max: t.out_dtype.max_finite(),
                }
            });
        }
        sink.write(c.tensor, c.start * size, &bytes[..n * size])
    }
}

/// Elements per block of the output stage.
const OUT_BLOCK: usize = 4096;

/// Makes `v` at least `n` long without touching what it holds.
#[inline]
pub(crate) fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
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
