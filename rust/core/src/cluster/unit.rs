//! A unit's side of a cluster merge: it opens the inputs itself, checks that it sees what the
//! driver saw, and either folds its tensors into a statistics pass's partial or writes them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use super::{check_job, describe, Ticket};
use crate::error::{Error, Result};
use crate::pipeline::exchange::{decode, Exchange, Role};
use crate::pipeline::{self, ModelPart, ModelStats, Part, Sink};
use crate::plan::TensorPlan;
use crate::{Checkpoint, Job};

/// A unit's partial of the next statistics pass of [`Driver::gather`](super::Driver::gather) over its tensors, and the
/// bytes it read.
pub fn gather_unit(
    base: &Path,
    models: &[PathBuf],
    job: &Job,
    ticket: &[u8],
    known: Vec<Vec<u8>>,
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<(Vec<u8>, u64)> {
    let t: Ticket = decode(ticket)?;
    let mut recipe = job.recipe_cancellable(cancel)?;
    let ins = open_checked(base, models, job, &t)?;
    recipe.groups = job.tensor_groups(&ins.plan, job.tasks(models.len()), cancel)?;
    let mut mine = vec![false; ins.plan.len()];
    for &i in &t.tensors {
        mine[i] = true;
    }
    let x = Exchange::new(known, Role::Unit(mine));
    let into = Mutex::new(ModelStats::new());
    let ran = super::gather_pass(
        job,
        (&ins.base, &ins.models, &ins.plan),
        &recipe,
        (&into, &x),
        progress,
        cancel,
    );
    match (ran, x.said()) {
        (Err(Error::Suspended), Some(partial)) => {
            ins.base.check_truncation()?;
            ins.models
                .iter()
                .try_for_each(Checkpoint::check_truncation)?;
            Ok((partial, x.read()))
        }
        (Err(e), _) if !matches!(e, Error::Suspended) => Err(e),
        _ => Err(Error::Internal {
            what: "a unit was asked for a statistics pass the driver already has".into(),
        }),
    }
}

/// A torch unit's inputs (checked against the driver's view), its writes into the staged files,
/// and which tensors are its own ([`crate::session::Session::open_unit`]).
pub(crate) fn open_unit_inputs(
    base: &Path,
    models: &[PathBuf],
    job: &Job,
    ticket: &[u8],
) -> Result<(crate::Inputs, UnitSink, Vec<bool>)> {
    let t: Ticket = decode(ticket)?;
    let ins = open_checked(base, models, job, &t)?;
    let sink = UnitSink::open(&t, &ins.plan)?;
    let mine = sink.mine.clone();
    Ok((ins, sink, mine))
}

/// Opens a unit's inputs and checks that they are what the driver saw.
fn open_checked(base: &Path, models: &[PathBuf], job: &Job, t: &Ticket) -> Result<crate::Inputs> {
    let ins = crate::open_inputs(base, models, job).map_err(|e| match e {
        Error::Io { .. } => Error::NotShared {
            reason: format!(
                "{} cannot read an input ({e}); every node must read the inputs from one shared file system (NFS, Lustre, a cloud file store)",
                hostname()
            ),
        },
        e => e,
    })?;
    let here = describe(&ins.base, &ins.models, &ins.plan);
    if here != t.seen {
        return Err(not_shared(&t.seen, &here));
    }
    Ok(ins)
}

/// Runs one unit of a cluster merge: opens the inputs, checks that this machine sees what the
/// driver saw, computes the unit's tensors and writes them into the staged files (fsynced
/// before it returns). Returns the bytes read.
pub fn run_unit(
    base: &Path,
    models: &[PathBuf],
    job: &Job,
    ticket: &[u8],
    progress: pipeline::Progress,
    cancel: &AtomicBool,
) -> Result<u64> {
    let t: Ticket = decode(ticket)?;
    let mut recipe = job.recipe_cancellable(cancel)?;
    check_job(&recipe, false)?;
    let ins = open_checked(base, models, job, &t)?;
    let sink = UnitSink::open(&t, &ins.plan)?;
    if t.tensors.is_empty() {
        return Ok(0);
    }
    recipe.groups = job.tensor_groups(&ins.plan, job.tasks(models.len()), cancel)?;
    // None gathered (no method of the recipe has whole-model statistics): none given.
    let model: ModelStats = if t.model.is_empty() {
        ModelStats::new()
    } else {
        decode(&t.model)?
    };
    let mut mine = vec![false; ins.plan.len()];
    for &i in &t.tensors {
        mine[i] = true;
    }
    let bytes = {
        let (base_view, mut views, _) = crate::job_views(job, &ins.base, &ins.models)?;
        job.share_names(&base_view, &mut views)?;
        pipeline::run(
            &base_view,
            &views,
            &ins.plan,
            &recipe,
            job.options(),
            &sink,
            progress,
            cancel,
            &[],
            Part {
                tensors: Some(&mine),
                model: ModelPart::Given(&model),
                ..Part::default()
            },
        )?
    };
    ins.base.check_truncation()?;
    ins.models
        .iter()
        .try_for_each(Checkpoint::check_truncation)?;
    sink.sync()?;
    Ok(bytes)
}

/// The first line where this machine's view differs from the driver's, in words.
fn not_shared(driver: &str, here: &str) -> Error {
    let host = hostname();
    let mut d = driver.lines();
    let mut h = here.lines();
    loop {
        match (d.next(), h.next()) {
            (Some(a), Some(b)) if a == b => continue,
            (a, b) => {
                let (a, b) = (a.unwrap_or("nothing"), b.unwrap_or("nothing"));
                return Error::NotShared {
                    reason: format!(
                        "{host} does not see the inputs the driver saw (the driver: {a}; {host}: {b}); every node must read the inputs from one shared file system (NFS, Lustre, a cloud file store)"
                    ),
                };
            }
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a writable buffer of the given length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "this node".into()
    };
    format!("node {name}")
}

/// A unit's writes into the staged files: only its own tensors, within their bounds.
pub(crate) struct UnitSink {
    files: Vec<(File, PathBuf)>,
    loc: Vec<(usize, u64)>,
    bytes: Vec<u64>,
    mine: Vec<bool>,
}

impl UnitSink {
    fn open(t: &Ticket, plan: &[TensorPlan]) -> Result<UnitSink> {
        let host = hostname();
        let files = t
            .files
            .iter()
            .map(|(staged, shown)| {
                OpenOptions::new()
                    .write(true)
                    .open(staged)
                    .map(|f| (f, shown.clone()))
                    .map_err(|e| Error::NotShared {
                        reason: format!(
                            "{host} cannot open the output's staging file {} for {} ({e}); the output's directory must be on a file system every node sees",
                            staged.display(),
                            shown.display()
                        ),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if t.loc.len() != plan.len() {
            return Err(Error::Internal {
                what: "a unit's ticket does not match its plan".into(),
            });
        }
        let mut mine = vec![false; plan.len()];
        for &i in &t.tensors {
            mine[i] = true;
        }
        Ok(UnitSink {
            files,
            loc: t.loc.clone(),
            bytes: plan.iter().map(|p| p.out_bytes() as u64).collect(),
            mine,
        })
    }

    pub(crate) fn owns(&self, tensor: usize) -> bool {
        self.mine.get(tensor).copied().unwrap_or(false)
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.files
            .iter()
            .try_for_each(|(f, shown)| f.sync_all().map_err(|e| Error::io(shown, e)))
    }
}

impl Sink for UnitSink {
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()> {
        let end = offset as u64 + data.len() as u64;
        if !self.mine[tensor] || end > self.bytes[tensor] {
            return Err(Error::Internal {
                what: format!("a unit wrote outside its tensors (tensor {tensor})"),
            });
        }
        let (f, at) = self.loc[tensor];
        let (file, shown) = &self.files[f];
        file.write_all_at(data, at + offset as u64)
            .map_err(|e| Error::io(shown, e))
    }
}

/// The driver's statistics pass writes nothing.
pub(crate) struct NoSink;

impl Sink for NoSink {
    fn write(&self, _: usize, _: usize, _: &[u8]) -> Result<()> {
        Err(Error::Internal {
            what: "a statistics pass wrote output".into(),
        })
    }
}
