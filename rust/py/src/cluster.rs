//! A merge split across processes (`weightweave.cluster`, on Ray): the driver's object and the
//! function each unit runs. Mirrors `core::cluster`; Ray itself lives in Python.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use weightweave_core::cluster::{gather_unit as core_gather_unit, run_unit, Driver, Gathered};
use weightweave_core::{Job, OutputOptions};

use crate::convert;
use crate::errors::{PyWeaveErr, WeaveError};
use crate::files::{detach_catching, report_dict};
use crate::progress::run_detached;

/// One output tensor as Python sees it: (name, base dtype, shape, merged?).
type TensorRow = (String, &'static str, Vec<usize>, bool);

/// The driver of a cluster merge: inputs opened, output staged under its lock. Dropping it (or
/// `abort`) removes the staging area; `publish` makes the output visible.
#[pyclass(frozen, module = "weightweave._rust")]
pub struct ClusterDriver {
    inner: Mutex<Option<Driver>>,
    job: Job,
}

fn closed() -> PyErr {
    WeaveError::new_err("the cluster merge is published or aborted")
}

impl ClusterDriver {
    fn with<T>(&self, f: impl FnOnce(&mut Driver) -> PyResult<T>) -> PyResult<T> {
        let mut guard = self.inner.lock().map_err(|_| closed())?;
        f(guard.as_mut().ok_or_else(closed)?)
    }
}

#[pymethods]
impl ClusterDriver {
    #[new]
    #[pyo3(signature = (base, models, out, job, *, shard_size=None, overwrite=false))]
    fn new(
        py: Python<'_>,
        base: PathBuf,
        models: Vec<PathBuf>,
        out: PathBuf,
        job: &Bound<'_, PyDict>,
        shard_size: Option<u64>,
        overwrite: bool,
    ) -> PyResult<ClusterDriver> {
        let job = convert::job(job)?;
        let opts = OutputOptions {
            shard_size,
            overwrite,
        };
        let driver = detach_catching(py, || {
            Driver::open(&base, &models, &out, &opts, &job, &AtomicBool::new(false))
        })?;
        Ok(ClusterDriver {
            inner: Mutex::new(Some(driver)),
            job,
        })
    }

    /// At most `n` units of consecutive tensors (`only`: of those tensors) balanced by bytes:
    /// [(tensor indices, bytes the unit reads)].
    #[pyo3(signature = (n, only=None))]
    fn units(&self, n: usize, only: Option<Vec<usize>>) -> PyResult<Vec<(Vec<usize>, u64)>> {
        self.with(|d| {
            d.units(n, only.as_deref())
                .map_err(|e| PyWeaveErr(e).into())
        })
    }

    /// Every output tensor: (name, base dtype, shape, merged?), as `Session.tensors`.
    fn tensors(&self) -> PyResult<Vec<TensorRow>> {
        self.with(|d| {
            Ok(d.plan()
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        t.base_dtype.name(),
                        t.shape.clone(),
                        t.mergeable,
                    )
                })
                .collect())
        })
    }

    /// Whether `gather` must run before the units (whole-model statistics).
    fn needs_model_stats(&self) -> PyResult<bool> {
        self.with(|d| Ok(d.needs_model_stats()))
    }

    /// One step of gathering the whole-model statistics over the units: ("next", merged result
    /// of the given partials' pass or None) or ("done", the statistics for `ticket`).
    #[pyo3(signature = (known, partials=None))]
    fn gather<'py>(
        &self,
        py: Python<'py>,
        known: Vec<Vec<u8>>,
        partials: Option<Vec<Vec<u8>>>,
    ) -> PyResult<(&'static str, Option<Bound<'py, PyBytes>>)> {
        let mut guard = self.inner.lock().map_err(|_| closed())?;
        let d = guard.as_mut().ok_or_else(closed)?;
        let job = &self.job;
        let step = run_detached(py, None, |_, cancel| d.gather(job, known, partials, cancel))?;
        Ok(match step {
            Gathered::Next(b) => ("next", b.map(|b| PyBytes::new(py, &b))),
            Gathered::Done(b) => ("done", Some(PyBytes::new(py, &b))),
        })
    }

    /// What unit `tensors` runs with (`merge_unit`'s ticket).
    fn ticket<'py>(
        &self,
        py: Python<'py>,
        tensors: Vec<usize>,
        model: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let t = self.with(|d| d.ticket(&tensors, model).map_err(|e| PyWeaveErr(e).into()))?;
        Ok(PyBytes::new(py, &t))
    }

    /// Checks that the units `done` wrote every tensor, then publishes as a local run does.
    fn publish<'py>(
        &self,
        py: Python<'py>,
        done: Vec<Vec<usize>>,
        bytes_read: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let d = self
            .inner
            .lock()
            .map_err(|_| closed())?
            .take()
            .ok_or_else(closed)?;
        let report = detach_catching(py, || {
            d.finish(&done, bytes_read, &AtomicBool::new(false))?
                .publish()
        })?;
        report_dict(py, &report)
    }

    /// Removes the staging area and releases the lock (nothing is published).
    fn abort(&self, py: Python<'_>) {
        let d = self.inner.lock().ok().and_then(|mut g| g.take());
        py.detach(|| drop(d));
    }
}

/// Runs one unit of a cluster merge on this machine; returns the bytes it read.
#[pyfunction]
#[pyo3(signature = (base, models, job, ticket, *, progress=None))]
pub fn merge_unit(
    py: Python<'_>,
    base: PathBuf,
    models: Vec<PathBuf>,
    job: &Bound<'_, PyDict>,
    ticket: &[u8],
    progress: Option<Py<PyAny>>,
) -> PyResult<u64> {
    let job = convert::job(job)?;
    let ticket = ticket.to_vec();
    run_detached(py, progress, |report, cancel| {
        run_unit(&base, &models, &job, &ticket, report, cancel)
    })
}

/// A unit's partial of the next statistics pass of `ClusterDriver.gather`: (partial, bytes read).
#[pyfunction]
#[pyo3(signature = (base, models, job, ticket, known, *, progress=None))]
pub fn gather_unit<'py>(
    py: Python<'py>,
    base: PathBuf,
    models: Vec<PathBuf>,
    job: &Bound<'py, PyDict>,
    ticket: &[u8],
    known: Vec<Vec<u8>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(Bound<'py, PyBytes>, u64)> {
    let job = convert::job(job)?;
    let ticket = ticket.to_vec();
    let (partial, read) = run_detached(py, progress, |report, cancel| {
        core_gather_unit(&base, &models, &job, &ticket, known, report, cancel)
    })?;
    Ok((PyBytes::new(py, &partial), read))
}
