//! A merge split across processes — Ray tasks on a cluster's nodes (`weightweave.cluster`) —
//! whose output is the one process's, bit for bit.
//!
//! The [`Driver`] opens the inputs, plans, and creates the output's staging area with every
//! file at its final size and header, exactly as a local run; it gathers the whole-model
//! statistics (TIES's and PCB's global scope) once, and splits the tensors into units. Each
//! unit ([`run_unit`], anywhere) opens the inputs itself, checks that it sees what the driver
//! saw (the plan, and every input file's size and modification time: one shared file system),
//! computes its tensors — their per-tensor statistics too, since a tensor's chunks all belong to
//! one unit — and writes their bytes at their final offsets in the staged files. A unit run
//! again writes the same bytes at the same places, so retries are harmless. The driver
//! publishes once every unit has reported, under the lock, as a local run.
//!
//! The core knows nothing of Ray: a unit is a ticket of bytes in and a byte count out.

mod unit;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pipeline::exchange::{encode, Exchange, Role};
use crate::pipeline::{self, ModelPart, ModelStats, Part};
use crate::plan::TensorPlan;
use crate::recipe::Recipe;
use crate::{Checkpoint, Job, Opened, OutputOptions, Prepared};
use unit::NoSink;
pub use unit::{gather_unit, run_unit};
pub(crate) use unit::{open_unit_inputs, UnitSink};

/// What a unit needs besides the paths and job every unit gets alike.
#[derive(Serialize, Deserialize)]
pub(crate) struct Ticket {
    /// The plan and inputs as the driver saw them ([`describe`]).
    seen: String,
    /// The tensors this unit writes, by plan index.
    tensors: Vec<usize>,
    /// Per staged file: (its path in the staging area, the path the user will see).
    files: Vec<(PathBuf, PathBuf)>,
    /// Per planned tensor: (file, byte offset of its data).
    loc: Vec<(usize, u64)>,
    /// The whole-model statistics ([`ModelStats`], encoded).
    model: Vec<u8>,
}

/// The plan and every input file's (size, mtime) in words, one line each: two machines that
/// agree on this read the same bytes.
pub(crate) fn describe(base: &Checkpoint, models: &[Checkpoint], plan: &[TensorPlan]) -> String {
    let mut s = String::new();
    let files = base
        .fingerprints()
        .into_iter()
        .chain(models.iter().flat_map(|m| m.fingerprints()));
    for (p, fp) in files {
        let (size, sec, nsec) = fp.shared();
        // The driver may have been given relative paths, the units absolute ones.
        let p = std::path::absolute(&p).unwrap_or(p);
        s += &format!(
            "input {} {size} bytes, modified {sec}.{nsec:09}\n",
            p.display()
        );
    }
    for t in plan {
        s += &format!(
            "tensor {} {:?} {} -> {} merged {}\n",
            t.name,
            t.shape,
            t.base_dtype.name(),
            t.out_dtype.name(),
            t.mergeable
        );
    }
    s
}

/// Refuses what a cluster merge does not take yet, before any work. `external`: whether the
/// torch backend computes the method's tensors ([`crate::session::Session::open_unit`]); a
/// unit of the core's own pipeline does not take those methods.
pub(crate) fn check_job(recipe: &Recipe, external: bool) -> Result<()> {
    let no = |name: &str, why: &str| {
        Err(Error::param(
            name,
            format!("{why}: a cluster merge does not take it yet; merge on one machine"),
        ))
    };
    if recipe.method().external() && !external {
        return Err(Error::param(
            "method",
            format!(
                "{} runs on the torch backend: its units are torch sessions",
                recipe.method().name()
            ),
        ));
    }
    if recipe.metagpt && recipe.method().external() {
        return no(
            "metagpt",
            "MetaGPT's weights on the torch backend need every tensor's norms first",
        );
    }
    if crate::scaling::auto_alpha_sets(recipe).iter().any(|&a| a) {
        return no(
            "lines_alpha",
            "LiNeS's α rule needs the whole merged task vector",
        );
    }
    Ok(())
}

/// The driver's side: the opened inputs and the staged output.
pub struct Driver {
    opened: Opened,
    recipe: Recipe,
    seen: String,
    files: Vec<(PathBuf, PathBuf)>,
    loc: Vec<(usize, u64)>,
    /// Bytes the driver's own passes read.
    bytes_read: u64,
    start: Instant,
}

impl Driver {
    /// Opens and validates every input and creates the output's staging area (under the lock):
    /// every check that can fail before any work has passed when this returns.
    pub fn open(
        base: &Path,
        models: &[PathBuf],
        out: &Path,
        opts: &OutputOptions,
        job: &Job,
        cancel: &AtomicBool,
    ) -> Result<Driver> {
        let start = Instant::now();
        let mut recipe = job.recipe_cancellable(cancel)?;
        job.check_tasks(&recipe, job.tasks(models.len()))?;
        let external = recipe.method().external();
        check_job(&recipe, true)?;
        if external && job.slices.is_some() {
            crate::session::refuse(&recipe, job, false, &[])?;
        }
        let opened = crate::open_files(base, models, out, opts, job, &recipe)?;
        if external {
            crate::session::refuse(&recipe, job, opened.scaled, &opened.models)?;
        }
        recipe.groups = job.tensor_groups(&opened.plan, job.tasks(models.len()), cancel)?;
        // What a unit rebuilds from the same paths and job: it must see the same.
        let seen = describe(&opened.base, &opened.models, &opened.plan);
        let (files, loc) = opened.output.staged();
        let files = files
            .into_iter()
            .map(|(staged, shown)| (std::path::absolute(&staged).unwrap_or(staged), shown))
            .collect();
        Ok(Driver {
            opened,
            recipe,
            seen,
            files,
            loc,
            bytes_read: 0,
            start,
        })
    }

    pub fn plan(&self) -> &[TensorPlan] {
        &self.opened.plan
    }

    /// Splits the tensors (`only`: those of them, in plan order) into at most `n` units of
    /// consecutive tensors, balanced by the bytes each reads and writes (a tensor is never
    /// split). Each with the bytes it reads.
    pub fn units(&self, n: usize, only: Option<&[usize]>) -> Result<Vec<(Vec<usize>, u64)>> {
        let tasks = self.opened.models.len() as u64;
        let plan = &self.opened.plan;
        let which: Vec<usize> = match only {
            None => (0..plan.len()).collect(),
            Some(o) => {
                if let Some(&t) = o.iter().find(|&&t| t >= plan.len()) {
                    return Err(Error::param("units", format!("no tensor {t} in the plan")));
                }
                let mut o = o.to_vec();
                o.sort_unstable();
                o.dedup();
                o
            }
        };
        Ok(split(plan, &which, self.opened.models.len(), n)
            .into_iter()
            .map(|u| {
                let read = u.iter().map(|&i| {
                    let t = &self.opened.plan[i];
                    (t.numel * t.base_dtype.size()) as u64 * if t.mergeable { tasks + 1 } else { 1 }
                });
                let read = read.sum();
                (u, read)
            })
            .collect())
    }

    /// Whether the recipe needs whole-model statistics (TIES's and PCB's global scope,
    /// MetaGPT's weights): then [`Driver::gather`] runs before the units.
    pub fn needs_model_stats(&self) -> bool {
        !self.recipe.tensor_local()
    }

    /// One step of gathering the whole-model statistics over the units, pass by pass
    /// (`pipeline::exchange`): given the merged results of the passes so far (`known`) and the
    /// units' partials of the next one, it merges them and says what comes next. The driver
    /// reads no tensor: every pass is the units'.
    pub fn gather(
        &mut self,
        job: &Job,
        known: Vec<Vec<u8>>,
        partials: Option<Vec<Vec<u8>>>,
        cancel: &AtomicBool,
    ) -> Result<Gathered> {
        let into = Mutex::new(ModelStats::new());
        let x = Exchange::new(known, Role::Driver(partials));
        let o = &self.opened;
        let ran = gather_pass(
            job,
            (&o.base, &o.models, &o.plan),
            &self.recipe,
            (&into, &x),
            &|_, _, _| {},
            cancel,
        );
        match ran {
            Ok(_) => Ok(Gathered::Done(encode(
                &into.into_inner().expect("not poisoned"),
            )?)),
            Err(Error::Suspended) => Ok(Gathered::Next(x.said())),
            Err(e) => Err(e),
        }
    }

    /// A unit's ticket: what [`run_unit`] needs besides the paths and the job.
    pub fn ticket(&self, tensors: &[usize], model: &[u8]) -> Result<Vec<u8>> {
        if let Some(&t) = tensors.iter().find(|&&t| t >= self.opened.plan.len()) {
            return Err(Error::param("units", format!("no tensor {t} in the plan")));
        }
        encode(&Ticket {
            seen: self.seen.clone(),
            tensors: tensors.to_vec(),
            files: self.files.clone(),
            loc: self.loc.clone(),
            model: model.to_vec(),
        })
    }

    /// Once every unit has reported (`done`: their tensors; `bytes_read`: what they read):
    /// checks that every tensor was written, stages the index and companion files, and leaves
    /// the output ready to publish ([`Prepared::publish`]: fsync, inputs unchanged, rename).
    pub fn finish(
        mut self,
        done: &[Vec<usize>],
        bytes_read: u64,
        cancel: &AtomicBool,
    ) -> Result<Prepared> {
        let mut written = vec![false; self.opened.plan.len()];
        for &t in done.iter().flatten() {
            if let Some(w) = written.get_mut(t) {
                *w = true;
            }
        }
        if let Some(t) = written.iter().position(|w| !w) {
            return Err(Error::Internal {
                what: format!(
                    "tensor '{}' was in no finished unit; nothing was published",
                    self.opened.plan[t].name
                ),
            });
        }
        self.opened.output.stage_extras(cancel)?;
        let read = self.bytes_read + bytes_read;
        self.opened.finish_reading(read, self.start)
    }
}

/// Runs the statistics of a gathering (`x` says whose part) over the inputs `(base, models,
/// plan)`; the driver's and every unit's run alike, so that they replay the same passes.
pub(crate) fn gather_pass(
    job: &Job,
    (base, models, plan): (&Checkpoint, &[Checkpoint], &[TensorPlan]),
    recipe: &Recipe,
    (into, x): (&Mutex<ModelStats>, &Exchange),
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<u64> {
    let (base_view, mut views, _) = crate::job_views(job, base, models)?;
    job.share_names(&base_view, &mut views)?;
    pipeline::run(
        &base_view,
        &views,
        plan,
        recipe,
        job.options(),
        &NoSink,
        progress,
        cancel,
        &[],
        Part {
            model: ModelPart::Gather(into, Some(x)),
            ..Part::default()
        },
    )
}

/// What [`Driver::gather`] found.
pub enum Gathered {
    /// The units' partials of the next pass are needed; with the merged result of the pass
    /// whose partials were given, to add to `known` first.
    Next(Option<Vec<u8>>),
    /// The whole-model statistics, encoded for [`Driver::ticket`].
    Done(Vec<u8>),
}

/// The tensors `which` (plan indices, ascending), consecutive, in at most `n` groups of about
/// equal bytes (read and written). A tensor computed from another (a re-quantized FP8 weight's
/// fresh scales) goes with it: the unit that merges the weight writes both.
fn split(plan: &[TensorPlan], which: &[usize], tasks: usize, n: usize) -> Vec<Vec<usize>> {
    let mut units = split_by_bytes(plan, which, tasks, n);
    let unit_of: std::collections::HashMap<usize, usize> = units
        .iter()
        .enumerate()
        .flat_map(|(u, ts)| ts.iter().map(move |&t| (t, u)))
        .collect();
    let mut moves = Vec::new();
    for (u, ts) in units.iter().enumerate() {
        for &t in ts {
            if let Some(&to) = plan[t].derived.and_then(|w| unit_of.get(&w)) {
                if to != u {
                    moves.push((t, u, to));
                }
            }
        }
    }
    for (t, from, to) in moves {
        units[from].retain(|&x| x != t);
        units[to].push(t);
        units[to].sort_unstable();
    }
    units.retain(|u| !u.is_empty());
    units
}

fn split_by_bytes(plan: &[TensorPlan], which: &[usize], tasks: usize, n: usize) -> Vec<Vec<usize>> {
    let cost = |t: &TensorPlan| {
        let read =
            (t.numel * t.base_dtype.size()) as u64 * if t.mergeable { tasks as u64 + 1 } else { 1 };
        read + t.out_bytes() as u64
    };
    let total: u64 = which.iter().map(|&i| cost(&plan[i])).sum();
    let n = n.max(1) as u64;
    let mut units: Vec<Vec<usize>> = vec![Vec::new()];
    let mut acc = 0u64;
    for (i, t) in which.iter().map(|&i| (i, &plan[i])) {
        // Unit k ends once the running total passes k/n of the whole.
        let k = units.len() as u64;
        if !units.last().expect("non-empty").is_empty() && acc * n >= total * k {
            units.push(Vec::new());
        }
        units.last_mut().expect("non-empty").push(i);
        acc += cost(t);
    }
    units.retain(|u| !u.is_empty());
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::exchange::decode;
    use crate::DType;

    fn tensor(numel: usize, mergeable: bool) -> TensorPlan {
        TensorPlan {
            name: format!("t{numel}"),
            shape: vec![numel],
            numel,
            base_dtype: DType::F32,
            out_dtype: DType::F32,
            mergeable,
            requant: None,
            derived: None,
        }
    }

    #[test]
    fn units_cover_every_tensor_once_in_order_and_balance_bytes() {
        let sizes = [10, 1000, 3, 3, 500, 500, 7, 2000, 1, 1, 1, 900];
        let plan: Vec<TensorPlan> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| tensor(n, i % 5 != 0))
            .collect();
        for n in 1..=16 {
            let all: Vec<usize> = (0..plan.len()).collect();
            let units = split(&plan, &all, 3, n);
            assert!(units.len() <= n && !units.is_empty());
            let flat: Vec<usize> = units.iter().flatten().copied().collect();
            assert_eq!(flat, (0..plan.len()).collect::<Vec<_>>(), "n = {n}");
            // No unit but one holding a single large tensor exceeds twice the fair share.
            let cost = |t: &TensorPlan| {
                (t.numel * 4) as u64 * if t.mergeable { 4 } else { 1 } + (t.numel * 4) as u64
            };
            let total: u64 = plan.iter().map(cost).sum();
            for u in &units {
                let c: u64 = u.iter().map(|&i| cost(&plan[i])).sum();
                assert!(u.len() == 1 || c * n as u64 <= 2 * total + cost(&plan[7]) * n as u64);
            }
        }
        let all: Vec<usize> = (0..plan.len()).collect();
        assert_eq!(split(&plan, &all, 3, 1).len(), 1);
        assert!(split(&[], &[], 3, 4).is_empty());
        // A computed scale tensor is in its weight's unit, whatever the cut.
        let mut scaled = plan.clone();
        scaled[8].derived = Some(7);
        scaled[2].derived = Some(11);
        for n in 1..=12 {
            let units = split(&scaled, &all, 3, n);
            let unit = |t: usize| units.iter().position(|u| u.contains(&t));
            assert_eq!(unit(8), unit(7), "n = {n}");
            assert_eq!(unit(2), unit(11), "n = {n}");
            let mut flat: Vec<usize> = units.concat();
            flat.sort_unstable();
            assert_eq!(flat, all, "n = {n}");
        }
        // A subset: only its tensors, in order, each once.
        let some = [1, 4, 5, 7, 11];
        for n in 1..=6 {
            let units = split(&plan, &some, 3, n);
            assert!(units.len() <= n.min(some.len()));
            assert_eq!(units.concat(), some.to_vec(), "n = {n}");
        }
    }

    #[test]
    fn a_ticket_from_another_version_is_refused() {
        let err = decode::<Ticket>(b"\x01\x02").err().expect("refused");
        assert!(err.to_string().contains("not a cluster message"), "{err}");
    }

    #[test]
    fn model_statistics_round_trip_bit_exactly() {
        use crate::methods::kernel::{Found, TensorStats};
        let mut m = ModelStats::new();
        m.metagpt.insert(2, vec![0.25, f32::MIN_POSITIVE]);
        m.tensors.insert(
            (1, "ties 0.3".into()),
            TensorStats {
                stages: vec![
                    Found::Trim {
                        thr: vec![f32::MIN_POSITIVE, -0.0, f32::NAN, 1.0e-45],
                        count: -7,
                    },
                    Found::Select(vec![0.1, 3.4e38]),
                ],
                ..Default::default()
            },
        );
        let back: ModelStats = decode(&encode(&m).expect("encodes")).expect("decodes");
        let bits = |s: &ModelStats| {
            format!(
                "{:?}",
                s.tensors
                    .values()
                    .map(|t| t
                        .stages
                        .iter()
                        .map(|f| match f {
                            Found::Trim { thr, count } =>
                                (thr.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), *count),
                            Found::Select(v) => (v.iter().map(|x| x.to_bits()).collect(), 0),
                            Found::Sums { .. } => (Vec::new(), 0),
                        })
                        .collect::<Vec<_>>())
                    .collect::<Vec<_>>()
            )
        };
        assert_eq!(bits(&back), bits(&m));
        assert_eq!(
            back.tensors.keys().collect::<Vec<_>>(),
            m.tensors.keys().collect::<Vec<_>>()
        );
        let w = |s: &ModelStats| {
            format!(
                "{:?}",
                s.metagpt
                    .iter()
                    .map(|(g, v)| (*g, v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
                    .collect::<Vec<_>>()
            )
        };
        assert_eq!(w(&back), w(&m));
    }
}
