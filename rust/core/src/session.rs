//! A merge driven tensor by tensor from outside: the torch backend reads a tensor's inputs
//! (zero-copy from the maps), computes M for it — an SVD the core does not do — and hands M back;
//! the core pools it with the deltas exactly as for every other method and writes it. Tensors the
//! caller does not hand back take the mean of the deltas (or are copied) at [`Session::complete`].
//! The output stays in its staging area until [`Session::publish`]; dropping the session
//! discards it. A cluster unit's session ([`Session::open_unit`]) does the same for the unit's
//! tensors only, writing them at their final offsets in the driver's staged files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::pipeline::{self, Options};
use crate::plan::{self, TensorPlan};
use crate::reader::{Checkpoint, ModelView, TensorRef};
use crate::recipe::Recipe;
use crate::writer::FileOutput;
use crate::{Job, OutputOptions, Report};

/// Where a session writes.
enum Target {
    /// A local run's own staged output, published by [`Session::publish`].
    Local(Box<FileOutput>),
    /// A cluster unit's share of the driver's staged files ([`Session::open_unit`]).
    Unit(crate::cluster::UnitSink),
}

/// What the torch backend does not take yet, refused before any work (a local run's and a
/// cluster's alike).
pub(crate) fn refuse(
    recipe: &Recipe,
    job: &Job,
    scaled: bool,
    models: &[crate::Checkpoint],
) -> Result<()> {
    let name = recipe.method().name();
    if job.slices.is_some() {
        return Err(Error::param(
            "slices",
            format!("{name} runs on the torch backend, which merges whole models"),
        ));
    }
    if scaled {
        return Err(Error::param(
            "models",
            format!(
                "{name} does not take FP8 weights with scale tensors yet; dequantize them first"
            ),
        ));
    }
    if let Some(m) = models.iter().find(|m| m.lora.is_some()) {
        return Err(Error::param(
            "models",
            format!(
                "{} is a LoRA adapter; {name} does not take adapters yet (merge it into a full fine-tune first)",
                m.path.display()
            ),
        ));
    }
    if crate::scaling::auto_alpha_sets(recipe).iter().any(|&a| a) {
        return Err(Error::param(
            "lines_alpha",
            format!(
                "LiNeS's α rule needs the whole merged task vector before the first tensor is written, which {name} computes tensor by tensor; give lines_alpha"
            ),
        ));
    }
    Ok(())
}

pub struct Session {
    base: Arc<Checkpoint>,
    models: Vec<Arc<Checkpoint>>,
    plan: Vec<TensorPlan>,
    recipe: Recipe,
    opts: Options,
    output: Target,
    differing: Vec<String>,
    kept: crate::keep::Kept,
    written: Mutex<Vec<bool>>,
    bytes_written: u64,
    done: AtomicU64,
    total: u64,
    start: Instant,
}

impl Session {
    /// Opens and validates every input, and creates the output's staging area.
    pub fn open(
        base: &Path,
        models: &[PathBuf],
        out: &Path,
        opts: &OutputOptions,
        job: &Job,
    ) -> Result<Session> {
        let start = Instant::now();
        let recipe = job.recipe()?;
        if job.slices.is_some() {
            refuse(&recipe, job, false, &[])?;
        }
        job.check_tasks(&recipe, models.len())?;

        let opened = crate::open_files(base, models, out, opts, job, &recipe)?;
        refuse(&recipe, job, opened.scaled, &opened.models)?;
        let tasks = models.len() as u64;
        let total = opened
            .plan
            .iter()
            .map(|t| {
                (t.numel * t.base_dtype.size()) as u64 * if t.mergeable { tasks + 1 } else { 1 }
            })
            .sum();
        Ok(Session {
            written: Mutex::new(vec![false; opened.plan.len()]),
            base: Arc::new(opened.base),
            models: opened.models.into_iter().map(Arc::new).collect(),
            plan: opened.plan,
            recipe,
            opts: job.options(),
            output: Target::Local(Box::new(opened.output)),
            bytes_written: opened.bytes_written,
            differing: opened.differing,
            kept: opened.kept,
            done: AtomicU64::new(0),
            total,
            start,
        })
    }

    pub fn plan(&self) -> &[TensorPlan] {
        &self.plan
    }

    /// The tensors this session writes (a cluster unit's, or all).
    pub fn mine(&self) -> Vec<usize> {
        match &self.output {
            Target::Local(_) => (0..self.plan.len()).collect(),
            Target::Unit(u) => (0..self.plan.len()).filter(|&i| u.owns(i)).collect(),
        }
    }

    /// The checkpoints, for callers that hand out views of their maps.
    pub fn checkpoints(&self) -> (&Arc<Checkpoint>, &[Arc<Checkpoint>]) {
        (&self.base, &self.models)
    }

    /// Zero-copy inputs of one tensor: (base, models).
    pub fn inputs(&self, tensor: usize) -> (TensorRef<'_>, Vec<TensorRef<'_>>) {
        let name = &self.plan[tensor].name;
        let b = self.base.view().tensors[name];
        let ms = self.models.iter().map(|m| m.view().tensors[name]).collect();
        (b, ms)
    }

    /// τ_t = (θ_t − θ_base)·w of one tensor, decoded to f32 into `out` (`base` is scratch), as
    /// the torch backend consumes it: two f32 operations, rounded each, as torch's `m − b` then
    /// `· w`. The conversion runs here, so that no torch operation competes with the SVD for
    /// torch's threads. Returns whether every value is finite.
    pub fn delta_into(
        &self,
        tensor: usize,
        t: usize,
        weight: Option<f32>,
        base: &mut Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<bool> {
        let p = self
            .plan
            .get(tensor)
            .ok_or_else(|| Error::param("tensor", format!("index {tensor} out of range")))?;
        let (b, ms) = self.inputs(tensor);
        let m = ms
            .get(t)
            .ok_or_else(|| Error::param("model", format!("index {t} out of range")))?;
        let n = p.numel;
        base.resize(n, 0.0);
        out.resize(n, 0.0);
        crate::dtype::decode(b.dtype, &b.data[..n * b.dtype.size()], base);
        crate::dtype::decode(m.dtype, &m.data[..n * m.dtype.size()], out);
        for (o, &x) in out.iter_mut().zip(base.iter()) {
            *o -= x;
        }
        if let Some(w) = weight {
            for o in out.iter_mut() {
                *o *= w;
            }
        }
        Ok(out.iter().all(|v| v.is_finite()))
    }

    /// Finds MetaGPT's weights when the recipe asks for them (a pass over every input; before
    /// any tensor is written) and returns the weights every task's delta takes, if any.
    pub fn resolve_weights(
        &mut self,
        progress: pipeline::Progress,
        cancel: &AtomicBool,
    ) -> Result<Option<Vec<f32>>> {
        if self.recipe.metagpt {
            let views: Vec<ModelView> = self.models.iter().map(|m| m.view()).collect();
            let (w, bytes) = pipeline::metagpt_weights(
                &self.base.view(),
                &views,
                &self.plan,
                &self.recipe,
                self.opts,
                progress,
                cancel,
            )?;
            self.done.fetch_add(bytes, Ordering::Relaxed);
            self.total += bytes;
            self.recipe.metagpt = false;
            self.recipe.weights = Some(w.clone());
            for s in &mut self.recipe.sets {
                s.weights.get_or_insert_with(|| w.clone());
            }
        }
        Ok(self.recipe.weights.clone())
    }

    /// Starts reading a tensor's inputs in the background (I/O overlapped with the caller's work).
    pub fn prefetch(&self, tensor: usize) {
        let name = &self.plan[tensor].name;
        self.base.will_need(name);
        for m in &self.models {
            m.will_need(name);
        }
    }

    /// An error naming the first NaN, infinity or out-of-f32-range value among tensor
    /// `tensor`'s inputs (the torch backend checks before an SVD sees them).
    pub fn check_finite(&self, tensor: usize) -> Result<()> {
        let t = self
            .plan
            .get(tensor)
            .ok_or_else(|| Error::param("tensor", format!("index {tensor} out of range")))?;
        if !t.mergeable {
            return Ok(());
        }
        let (b, ms) = self.inputs(tensor);
        let mut buf = Vec::new();
        for r in std::iter::once(&b).chain(&ms) {
            for c in plan::tensor_chunks(&self.plan, tensor, self.opts.chunk_size) {
                buf.resize(c.len, 0.0);
                pipeline::decode_checked(r, &t.name, &c, &mut buf)?;
            }
        }
        Ok(())
    }

    /// (bytes processed, bytes to process).
    pub fn progress(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total)
    }

    /// Pools and writes one tensor, with `m` as its merged task vector (`None`: the mean of
    /// the deltas for a mergeable tensor, a copy of the base otherwise).
    pub fn write(&self, tensor: usize, m: Option<&[f32]>, cancel: &AtomicBool) -> Result<()> {
        let t = self
            .plan
            .get(tensor)
            .ok_or_else(|| Error::param("tensor", format!("index {tensor} out of range")))?;
        if self.recipe.metagpt {
            return Err(Error::param(
                "session",
                "MetaGPT's weights are not found yet: call resolve_weights() before writing",
            ));
        }
        if let Some(m) = m {
            if !t.mergeable || m.len() != t.numel {
                return Err(Error::param(
                    "m",
                    format!("'{}' takes no M of {} elements", t.name, m.len()),
                ));
            }
        }
        if let Target::Unit(u) = &self.output {
            if !u.owns(tensor) {
                return Err(Error::param(
                    "tensor",
                    format!("'{}' is not this cluster unit's", t.name),
                ));
            }
        }
        {
            let mut w = self.written.lock().expect("not poisoned");
            if w[tensor] {
                return Err(Error::param(
                    "tensor",
                    format!("'{}' was already written", t.name),
                ));
            }
            w[tensor] = true;
        }
        let chunks = plan::tensor_chunks(&self.plan, tensor, self.opts.chunk_size);
        let (merge, copy): (&[_], &[_]) = if t.mergeable {
            (&chunks, &[])
        } else {
            (&[], &chunks)
        };
        let mut given = vec![None; self.plan.len()];
        given[tensor] = m;
        let views: Vec<ModelView> = self.models.iter().map(|m| m.view()).collect();
        let bytes = pipeline::run_chunks(
            &self.base.view(),
            &views,
            &self.plan,
            &self.recipe,
            self.opts,
            (merge, copy),
            match &self.output {
                Target::Local(o) => &**o as &dyn pipeline::Sink,
                Target::Unit(u) => u,
            },
            &|_, _, _| {},
            cancel,
            &given,
            pipeline::Part::default(),
        )?;
        self.done.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Writes every tensor not written yet (mean or copy).
    pub fn complete(&self, cancel: &AtomicBool) -> Result<()> {
        let pending: Vec<usize> = {
            let w = self.written.lock().expect("not poisoned");
            (0..self.plan.len()).filter(|&i| !w[i]).collect()
        };
        for i in pending {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            self.write(i, None, cancel)?;
        }
        Ok(())
    }

    /// Copies the companion files into the output's staging area, checking `cancel`; the
    /// caller runs it where Ctrl-C is watched, before [`Session::publish`].
    pub fn stage_extras(&mut self, cancel: &AtomicBool) -> Result<()> {
        self.local_output()?.stage_extras(cancel)
    }

    fn local_output(&mut self) -> Result<&mut FileOutput> {
        match &mut self.output {
            Target::Local(o) => Ok(o),
            Target::Unit(_) => Err(Error::param(
                "session",
                "a cluster unit's session is finished with finish_unit(); the driver publishes",
            )),
        }
    }

    /// Opens a cluster unit's share of a merge on the torch backend: the inputs (checked
    /// against what the driver saw) and the staged files, where [`Session::write`] and
    /// [`Session::complete`] write the ticket's tensors only.
    pub fn open_unit(base: &Path, models: &[PathBuf], job: &Job, ticket: &[u8]) -> Result<Session> {
        let start = Instant::now();
        let recipe = job.recipe()?;
        if job.slices.is_some() {
            refuse(&recipe, job, false, &[])?;
        }
        let (ins, sink, mine) = crate::cluster::open_unit_inputs(base, models, job, ticket)?;
        refuse(&recipe, job, ins.scaled.is_some(), &ins.models)?;
        if recipe.metagpt {
            return Err(Error::param(
                "metagpt",
                "MetaGPT's weights need every tensor's norms: a cluster merge does not take them yet",
            ));
        }
        let tasks = models.len() as u64;
        let total = ins
            .plan
            .iter()
            .zip(&mine)
            .filter(|(_, &m)| m)
            .map(|(t, _)| {
                (t.numel * t.base_dtype.size()) as u64 * if t.mergeable { tasks + 1 } else { 1 }
            })
            .sum();
        Ok(Session {
            written: Mutex::new(mine.iter().map(|m| !m).collect()),
            base: Arc::new(ins.base),
            models: ins.models.into_iter().map(Arc::new).collect(),
            plan: ins.plan,
            recipe,
            opts: job.options(),
            output: Target::Unit(sink),
            bytes_written: 0,
            differing: ins.differing,
            kept: ins.kept,
            done: AtomicU64::new(0),
            total,
            start,
        })
    }

    /// A cluster unit's end: every tensor of its ticket written, the inputs unchanged since
    /// they were opened, the staged files fsynced. Returns the bytes read.
    pub fn finish_unit(self) -> Result<u64> {
        let Target::Unit(sink) = &self.output else {
            return Err(Error::param("session", "not a cluster unit's session"));
        };
        if let Some(i) = self
            .written
            .lock()
            .expect("not poisoned")
            .iter()
            .position(|w| !w)
        {
            return Err(Error::param(
                "session",
                format!(
                    "'{}' is still unwritten: call complete() first",
                    self.plan[i].name
                ),
            ));
        }
        self.base.check_truncation()?;
        self.models.iter().try_for_each(|m| m.check_truncation())?;
        sink.sync()?;
        Ok(self.done.load(Ordering::Relaxed))
    }

    /// Publishes the output once every tensor is written and no input changed.
    pub fn publish(self) -> Result<Report> {
        if self
            .written
            .lock()
            .expect("not poisoned")
            .iter()
            .any(|w| !w)
        {
            return Err(Error::param(
                "session",
                "tensors are still unwritten: call complete() before publish()",
            ));
        }
        self.base.check_truncation()?;
        self.models.iter().try_for_each(|m| m.check_truncation())?;
        let mut inputs = self.base.fingerprints();
        for m in &self.models {
            inputs.extend(m.fingerprints());
        }
        let verify = || {
            inputs
                .iter()
                .try_for_each(|(p, fp)| crate::watch::verify(p, fp))
        };
        let bytes_read = self.done.load(Ordering::Relaxed);
        let Target::Local(output) = self.output else {
            return Err(Error::param(
                "session",
                "a cluster unit's session is finished with finish_unit(); the driver publishes",
            ));
        };
        let skipped = output.skipped().to_vec();
        let outputs = output.publish(&verify)?;
        Ok(Report {
            outputs,
            differing: self.differing,
            kept: self.kept,
            skipped,
            bytes_read,
            bytes_written: self.bytes_written,
            seconds: self.start.elapsed().as_secs_f64(),
        })
    }
}
