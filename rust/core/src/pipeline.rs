//! The streaming engine. Every pass walks the same list of chunks on a rayon pool; a chunk reads
//! one element range of the base and of every fine-tune, converts it to f32 and forms the deltas.
//! Statistics passes reduce integer histograms and counts (order-free, so thread count and chunk
//! size cannot change a result); the final pass computes M, pools, encodes and writes each chunk
//! at its final offset. Anonymous memory is a few chunk-sized buffers per worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rayon::prelude::*;

use crate::dtype::{decode, decode_delta, decode_finite, encode, first_non_finite};
use crate::error::{Error, Result};
use crate::methods::pcb::{self, Clamp};
use crate::methods::ties::{self, TiesStats};
use crate::methods::{breadcrumbs, elementwise, int_frac, Method, Scope};
use crate::plan::{Chunk, TensorPlan};
use crate::pool::{self, Combine};
use crate::reader::{ModelView, TensorRef};
use crate::rng::{Stream, POOL_STREAM};
use crate::select::{key, unkey, Buckets, Hist, Request, Windowed, Windows};

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

/// Called with (bytes processed, bytes to process) after every chunk; must be cheap.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Per-worker buffers, reused from chunk to chunk.
#[derive(Default)]
struct Work {
    base: Vec<f32>,
    raw: Vec<Vec<f32>>,
    dared: Vec<Vec<f32>>,
    m: Vec<f32>,
    scratch: Vec<f32>,
    out: Vec<f32>,
    bytes: Vec<u8>,
    keys: Vec<u64>,
    scores: Vec<Vec<f32>>,
    signed: Vec<f32>,
}

/// The statistics the output pass needs.
#[derive(Default)]
struct Stats {
    /// TIES, indexed by scope (0 for global, the tensor index for per-tensor).
    ties: Vec<Option<TiesStats>>,
    /// PCB clamps of |X| and of B, per task.
    pcb: Option<(Vec<Clamp>, Vec<Clamp>)>,
}

struct Engine<'a> {
    models: &'a [ModelView<'a>],
    plan: &'a [TensorPlan],
    recipe: &'a Recipe,
    base_refs: Vec<TensorRef<'a>>,
    model_refs: Vec<Vec<TensorRef<'a>>>,
    done: AtomicU64,
    total: u64,
    progress: Progress<'a>,
    cancel: &'a AtomicBool,
    given: Given<'a>,
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
        Method::Ties(_) | Method::DareTies(..) => 3,
        Method::Pcb { .. } => 3,
        _ => 1,
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
        total: merge_bytes * passes + copy_bytes,
        progress,
        cancel,
        given,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::param("threads", e.to_string()))?;
    pool.install(|| {
        let debug = std::env::var_os("WEIGHTWEAVE_DEBUG").is_some();
        let t0 = std::time::Instant::now();
        let stats = engine.statistics(merge)?;
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
    fn tasks(&self) -> usize {
        self.models.len()
    }

    /// Runs `f` on every chunk in parallel, folding per-worker accumulators with `merge`.
    fn pass<A, I, F, R>(&self, chunks: &[Chunk], init: I, f: F, merge: R) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        self.pass_impl(chunks, init, f, merge, true)
    }

    /// [`Self::pass`] without progress reports (samples are not counted in the total).
    fn pass_quiet<A, I, F, R>(&self, chunks: &[Chunk], init: I, f: F, merge: R) -> Result<A>
    where
        A: Send,
        I: Fn() -> A + Sync + Send,
        F: Fn(&mut Work, &Chunk, &mut A) -> Result<()> + Sync + Send,
        R: Fn(A, A) -> A + Sync + Send,
    {
        self.pass_impl(chunks, init, f, merge, false)
    }

    fn pass_impl<A, I, F, R>(
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
        chunks
            .par_iter()
            .try_fold(
                || (Work::default(), init()),
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
                        (self.progress)(done.min(self.total), self.total);
                    }
                    Ok((w, acc))
                },
            )
            .map(|r| r.map(|(_, acc)| acc))
            .try_reduce(&init, |a, b| Ok(merge(a, b)))
    }

    /// Decodes the chunk of the base and of every model and forms the deltas (and DARE's).
    #[inline(always)]
    fn load(&self, w: &mut Work, c: &Chunk) -> Result<()> {
        let n = c.len;
        let t = &self.plan[c.tensor];
        let tasks = self.tasks();
        w.base.resize(n, 0.0);
        w.raw.resize_with(tasks, Vec::new);
        let b = &self.base_refs[c.tensor];
        let size = b.dtype.size();
        if !decode_finite(
            b.dtype,
            &b.data[c.start * size..(c.start + c.len) * size],
            &mut w.base,
        ) {
            decode_checked(b, &t.name, c, &mut w.base)?;
        }
        for (k, refs) in self.model_refs.iter().enumerate() {
            let d = &mut w.raw[k];
            d.resize(n, 0.0);
            let r = &refs[c.tensor];
            let size = r.dtype.size();
            let bytes = &r.data[c.start * size..(c.start + c.len) * size];
            if !decode_delta(r.dtype, bytes, &w.base, d) {
                // Rare path: find and report the offending element.
                decode_checked(r, &t.name, c, d)?;
            }
        }
        if let Some(p) = self.recipe.method.dare() {
            w.dared.resize_with(tasks, Vec::new);
            for k in 0..tasks {
                w.dared[k].resize(n, 0.0);
                let stream = Stream::new(self.recipe.seed, k as u64, &t.name);
                elementwise::dare(&w.raw[k], &mut w.dared[k], &stream, c.start as u64, p);
            }
        }
        w.m.resize(n, 0.0);
        w.scratch.resize(n, 0.0);
        w.out.resize(n, 0.0);
        Ok(())
    }

    fn statistics(&self, merge: &[Chunk]) -> Result<Stats> {
        let mut stats = Stats::default();
        if let Some(p) = self.recipe.method.ties() {
            let scopes: Vec<(usize, Vec<Chunk>)> = match p.scope {
                Scope::Global => vec![(0, merge.to_vec())],
                Scope::Tensor => (0..self.plan.len())
                    .map(|i| (i, merge.iter().filter(|c| c.tensor == i).copied().collect()))
                    .collect(),
            };
            let n_scopes = if p.scope == Scope::Global {
                1
            } else {
                self.plan.len()
            };
            stats.ties = vec![None; n_scopes];
            for (scope, chunks) in scopes {
                let d: usize = chunks.iter().map(|c| c.len).sum();
                if d == 0 {
                    continue;
                }
                stats.ties[scope] = Some(self.ties_stats(&chunks, d, &p)?);
            }
        }
        if let Method::Pcb { ratio } = self.recipe.method {
            stats.pcb = self.pcb_stats(merge, ratio)?;
        }
        Ok(stats)
    }

    fn ties_stats(
        &self,
        chunks: &[Chunk],
        d: usize,
        p: &crate::methods::TiesParams,
    ) -> Result<TiesStats> {
        let tasks = self.tasks();
        let thr = match ties::threshold_rank(d, p) {
            None => vec![0.0; tasks],
            Some(rank) => {
                let requests = (0..tasks).map(|row| Request { row, rank }).collect();
                self.select(chunks, tasks, requests, &|w: &mut Work, n, emit| {
                    let deltas = if w.dared.is_empty() { &w.raw } else { &w.dared };
                    for (t, d) in deltas.iter().enumerate() {
                        crate::simd!(abs_into(&d[..n], &mut w.scratch[..n]));
                        emit(t, &w.scratch[..n]);
                    }
                })?
            }
        };
        let count = self.pass(
            chunks,
            || 0i64,
            #[inline(always)]
            |w, c, acc| {
                let deltas = if w.dared.is_empty() { &w.raw } else { &w.dared };
                *acc += ties::sign_count(deltas, &thr, c.len, &mut w.scratch);
                Ok(())
            },
            |a, b| a + b,
        )?;
        Ok(TiesStats {
            thr,
            majority: count.signum() as f32,
        })
    }

    fn pcb_stats(&self, chunks: &[Chunk], ratio: f64) -> Result<Option<(Vec<Clamp>, Vec<Clamp>)>> {
        let d: usize = chunks.iter().map(|c| c.len).sum();
        let tasks = self.tasks();
        if d == 0 || tasks == 0 {
            return Ok(None);
        }
        let pairs = |(a, b): (u64, u64)| -> Vec<Request> {
            (0..tasks)
                .flat_map(|row| [Request { row, rank: a }, Request { row, rank: b }])
                .collect()
        };
        let to_clamps = |v: Vec<f32>| -> Vec<Clamp> {
            v.chunks(2).map(|p| Clamp { a: p[0], b: p[1] }).collect()
        };
        let (lo, hi) = pcb::ABS_CLAMP;
        let abs = to_clamps(self.select(
            chunks,
            tasks,
            pairs(pcb::clamp_ranks(d, lo, hi)),
            &|w: &mut Work, n, emit| {
                for (t, x) in w.raw.iter().enumerate() {
                    crate::simd!(abs_into(&x[..n], &mut w.scratch[..n]));
                    emit(t, &w.scratch[..n]);
                }
            },
        )?);
        let score_ranks = (int_frac(d, 1.0 - ratio).min(d - 1) as u64, d as u64 - 1);
        let score = to_clamps(self.select(
            chunks,
            tasks,
            pairs(score_ranks),
            &|w: &mut Work, n, emit| {
                w.scores.resize_with(tasks, Vec::new);
                for s in &mut w.scores {
                    s.resize(n, 0.0);
                }
                crate::simd!(pcb::scores(&w.raw, n, &abs, &mut w.scores, &mut w.signed));
                for (t, s) in w.scores.iter().enumerate() {
                    emit(t, &s[..n]);
                }
            },
        )?);
        Ok(Some((abs, score)))
    }

    /// Exact order statistics of per-task rows produced by `rows`: one windowed pass guided by
    /// a sample, or (when the guess misses) the two-pass radix select.
    #[allow(clippy::type_complexity)]
    fn select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: &(dyn Fn(&mut Work, usize, &mut dyn FnMut(usize, &[f32])) + Sync),
    ) -> Result<Vec<f32>> {
        // Tests set this to exercise the fallback, which small models would otherwise never reach.
        if std::env::var_os("WEIGHTWEAVE_FORCE_RADIX").is_some() {
            return self.radix_select(chunks, n_rows, requests, rows);
        }
        let total: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let t0 = std::time::Instant::now();
        let samples = self.sample(chunks, n_rows, total, rows)?;
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!("sample: {:.2}s", t0.elapsed().as_secs_f64());
        }
        if samples.iter().map(|s| s.len() as u64).max() == Some(total) {
            // Small scopes are sampled whole: the sorted sample is the data.
            return Ok(requests
                .iter()
                .map(|r| unkey(samples[r.row][r.rank as usize]))
                .collect());
        }
        let windows = Windows::from_sample(requests.clone(), &samples, total, 6.0);
        drop(samples);
        let acc = self.pass(
            chunks,
            || windows.acc(),
            #[inline(always)]
            |w, c, a| {
                rows(w, c.len, &mut |row, v| {
                    crate::simd!(a.count(&windows, row, v))
                });
                Ok(())
            },
            Windowed::merge,
        )?;
        if std::env::var_os("WEIGHTWEAVE_DEBUG").is_some() {
            eprintln!(
                "select: total {total} windows {:?} cap {} {}",
                windows.bounds,
                windows.cap,
                acc.describe()
            );
        }
        if let Some(v) = acc.finish(&windows) {
            return Ok(v);
        }
        self.radix_select(chunks, n_rows, requests, rows)
    }

    /// Sorted keys per row from short evenly spaced runs covering about 1/256 of the scope
    /// (at least 2^15 elements; everything when the scope is small).
    #[allow(clippy::type_complexity)]
    fn sample(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        total: u64,
        rows: &(dyn Fn(&mut Work, usize, &mut dyn FnMut(usize, &[f32])) + Sync),
    ) -> Result<Vec<Vec<u32>>> {
        const RUN: u64 = 64;
        let want = (total / 256).max(1 << 15);
        let runs = (want / RUN).max(1);
        let step = (total / runs).max(RUN);
        let mut picks = Vec::new();
        let mut offset = 0u64; // global position of the current chunk's start
        let mut next = 0u64;
        for c in chunks {
            let end = offset + c.len as u64;
            while next < end {
                let at = next - offset;
                let len = RUN.min(end - next) as usize;
                picks.push(Chunk {
                    tensor: c.tensor,
                    start: c.start + at as usize,
                    len,
                });
                next += step;
            }
            offset = end;
        }
        let mut samples = self.pass_quiet(
            &picks,
            || vec![Vec::new(); n_rows],
            |w, c, acc: &mut Vec<Vec<u32>>| {
                rows(w, c.len, &mut |row, v| {
                    acc[row].extend(v.iter().map(|&x| key(x)))
                });
                Ok(())
            },
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    x.extend(y);
                }
                a
            },
        )?;
        for s in &mut samples {
            s.sort_unstable();
        }
        Ok(samples)
    }

    /// The two-pass radix select: exact whatever the data.
    #[allow(clippy::type_complexity)]
    fn radix_select(
        &self,
        chunks: &[Chunk],
        n_rows: usize,
        requests: Vec<Request>,
        rows: &(dyn Fn(&mut Work, usize, &mut dyn FnMut(usize, &[f32])) + Sync),
    ) -> Result<Vec<f32>> {
        let high = self.pass(
            chunks,
            || Hist::new(n_rows),
            #[inline(always)]
            |w, c, h| {
                rows(w, c.len, &mut |row, v| crate::simd!(h.count_high(row, v)));
                Ok(())
            },
            Hist::merge,
        )?;
        let found = Buckets::resolve(&high, requests);
        drop(high);
        let low = self.pass(
            chunks,
            || found.low_hist(),
            #[inline(always)]
            |w, c, h| {
                rows(w, c.len, &mut |row, v| {
                    crate::simd!(h.count_low(&found, row, v))
                });
                Ok(())
            },
            Hist::merge,
        )?;
        Ok(found.finish(&low))
    }

    fn output(
        &self,
        merge: &[Chunk],
        copy: &[Chunk],
        stats: &Stats,
        sink: &dyn Sink,
    ) -> Result<()> {
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
            (self.progress)(done, self.total);
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
        } = w;
        let deltas = if dared.is_empty() { &*raw } else { &*dared };
        match self.recipe.method {
            Method::TaskArithmetic | Method::Dare(_) => elementwise::sum(deltas, n, m),
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
            Method::Breadcrumbs { density, gamma } => breadcrumbs::merge(
                deltas,
                n,
                t.row_len(),
                t.shape.is_empty(),
                (density, gamma),
                keys,
                m,
            ),
            Method::Tsv | Method::IsoC => match self.given.get(c.tensor).copied().flatten() {
                Some(g) => m[..n].copy_from_slice(&g[c.start..c.start + n]),
                None => elementwise::mean(deltas, n, m),
            },
            Method::Pcb { .. } => {
                let (abs, score) = stats.pcb.as_ref().expect("pcb statistics");
                scores.resize_with(self.tasks(), Vec::new);
                for s in scores.iter_mut() {
                    s.resize(n, 0.0);
                }
                pcb::merge(raw, n, abs, score, scores, signed, m);
            }
        }
        let stream = Stream::new(self.recipe.seed, POOL_STREAM, &t.name);
        // For task arithmetic M already is Σ_t τ_t, which the mean pool would sum again.
        let m_is_sum = matches!(self.recipe.method, Method::TaskArithmetic);
        pool::apply(
            &self.recipe.combine,
            raw,
            m,
            m_is_sum,
            base,
            out,
            &stream,
            c.start as u64,
        );
        let limit = t.out_dtype.overflow_at();
        if !out[..n].iter().fold(true, |ok, v| ok & (v.abs() < limit)) {
            return Err(Error::Overflow {
                tensor: t.name.clone(),
                dtype: t.out_dtype.name(),
            });
        }
        let size = t.out_dtype.size();
        bytes.resize(n * size, 0);
        encode(t.out_dtype, &out[..n], bytes);
        sink.write(c.tensor, c.start * size, bytes)
    }
}

#[inline(always)]
fn abs_into(src: &[f32], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.abs();
    }
}

fn decode_checked(r: &TensorRef, name: &str, c: &Chunk, out: &mut [f32]) -> Result<()> {
    let size = r.dtype.size();
    decode(
        r.dtype,
        &r.data[c.start * size..(c.start + c.len) * size],
        out,
    );
    if let Some((i, value)) = first_non_finite(out) {
        return Err(Error::NonFinite {
            file: r.file.to_owned(),
            tensor: name.to_owned(),
            index: c.start + i,
            value,
        });
    }
    Ok(())
}
