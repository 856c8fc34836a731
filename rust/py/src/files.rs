//! Paths in, files out: tensors never cross into Python on this path.

use std::path::PathBuf;

use pyo3::prelude::*;
use std::collections::BTreeMap;

use pyo3::intern;
use pyo3::types::{PyDict, PyList, PyString};
use weightweave_core::{prepare_files, Checkpoint, Method, OutputOptions, Report};

use crate::convert;
use crate::errors::{panic_error, PyWeaveErr};
use crate::progress::run_detached;

/// Merges or weaves checkpoints on disk. See `weightweave.merge` / `weightweave.weave`.
#[pyfunction]
#[pyo3(signature = (base, models, out, job, *, shard_size=None, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn merge_files<'py>(
    py: Python<'py>,
    base: PathBuf,
    models: Vec<PathBuf>,
    out: PathBuf,
    job: &Bound<'py, PyDict>,
    shard_size: Option<u64>,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let job = convert::job(job)?;
    let opts = OutputOptions {
        shard_size,
        overwrite,
    };
    let prepared = run_detached(py, progress, |report, cancel| {
        prepare_files(&base, &models, &out, &opts, &job, report, cancel)
    })?;
    let report = detach_catching(py, || prepared.publish())?;
    report_dict(py, &report)
}

/// Runs core work with the GIL released, turning a panic into a `WeaveError`.
pub fn detach_catching<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> weightweave_core::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(|e| PyWeaveErr(e).into()),
        Err(payload) => Err(panic_error(payload)),
    }
}

/// A finished merge's report as the dict `api.Report` is built from.
pub fn report_dict<'py>(py: Python<'py>, report: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let outputs: Vec<String> = report
        .outputs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    d.set_item("outputs", outputs)?;
    d.set_item("differing", report.differing.clone())?;
    d.set_item("kept", report.kept.copied.clone())?;
    d.set_item("left_out", report.kept.dropped.clone())?;
    d.set_item("aligned", report.kept.aligned.clone())?;
    d.set_item("skipped", report.skipped.clone())?;
    d.set_item("bytes_read", report.bytes_read)?;
    d.set_item("bytes_written", report.bytes_written)?;
    d.set_item("seconds", report.seconds)?;
    Ok(d)
}

/// Summary of a checkpoint: files, metadata, and every tensor's dtype, shape and size.
#[pyfunction]
pub fn inspect<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let ck = detach_catching(py, || Checkpoint::open(&path))?;
    // Headers may list millions of tensors: keys are interned and file and dtype names shared,
    // so each tensor costs its dict, name and shape only.
    let labels: Vec<Bound<'_, PyString>> = (0..ck.file_count())
        .map(|i| PyString::new(py, ck.file_label(i)))
        .collect();
    let mut dtypes: BTreeMap<&str, Bound<'_, PyString>> = BTreeMap::new();
    let mut items = Vec::new();
    let mut params = 0usize;
    for (name, file, e) in ck.entries() {
        let dt = dtypes
            .entry(e.dtype.name())
            .or_insert_with(|| PyString::new(py, e.dtype.name()));
        let t = PyDict::new(py);
        t.set_item(intern!(py, "name"), name)?;
        t.set_item(intern!(py, "dtype"), &*dt)?;
        t.set_item(intern!(py, "shape"), PyList::new(py, e.shape)?)?;
        t.set_item(intern!(py, "bytes"), e.end - e.start)?;
        t.set_item(intern!(py, "file"), &labels[file])?;
        t.set_item(intern!(py, "merged"), e.dtype.is_mergeable())?;
        items.push(t);
        params += e.shape.iter().product::<usize>();
    }
    let tensors = PyList::new(py, items)?;
    let d = PyDict::new(py);
    d.set_item("path", path.display().to_string())?;
    let files: Vec<String> = ck
        .input_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    d.set_item("files", files)?;
    d.set_item("metadata", ck.metadata().clone())?;
    d.set_item("tensors", tensors)?;
    d.set_item("num_params", params)?;
    d.set_item("data_bytes", ck.data_bytes())?;
    Ok(d)
}

/// A method's parameters with their defaults, as the output's recipe records them.
/// Parameters without a default (slerp's `t`) are shown as "required".
#[pyfunction]
pub fn default_params(py: Python<'_>, method: &str) -> PyResult<Py<PyAny>> {
    let mut params = weightweave_core::methods::Params::new();
    let mut required = Vec::new();
    let m = loop {
        match Method::parse(method, &params) {
            Err(weightweave_core::Error::InvalidParam { name, reason })
                if reason.starts_with("is required") && required.len() < 8 =>
            {
                params.insert(name.clone(), weightweave_core::methods::Param::Num(0.0));
                required.push(name);
            }
            other => break other.map_err(PyWeaveErr)?,
        }
    };
    let json = PyModule::import(py, "json")?;
    let d = json.call_method1("loads", (m.params_json().to_string(),))?;
    let d = d.cast_into::<PyDict>()?;
    for name in required {
        d.set_item(name, "required")?;
    }
    if d.contains("compat")? {
        d.del_item("compat")?;
    }
    Ok(d.into_any().unbind())
}

/// λ of a plain merge when none is given.
#[pyfunction]
pub fn default_lam(method: &str) -> f64 {
    Method::default_lam(method)
}

/// The parameter Weight Weaving grids over in place of λ (slerp's `t`), if any.
#[pyfunction]
pub fn search_variable(method: &str) -> Option<&'static str> {
    weightweave_core::methods::registry::search_variable(method)
}

/// The paper's default Λ for a method, or None for an unknown one.
#[pyfunction]
pub fn default_lambdas(method: &str) -> Option<Vec<f64>> {
    Method::default_lambdas(method)
}

/// Reads every tensor byte of the checkpoints once (the benchmarks' read floor).
/// Returns (bytes, checksum).
#[pyfunction]
#[pyo3(signature = (paths, threads=None))]
pub fn read_floor(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    threads: Option<usize>,
) -> PyResult<(u64, u64)> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(py
        .detach(|| weightweave_core::reader::read_floor(&paths, threads))
        .map_err(PyWeaveErr)?)
}

/// Which of `names` `pattern` finds a match in (linear-time engine): the torch backend's
/// `svd_exclude`.
#[pyfunction]
pub fn names_matching(what: &str, pattern: &str, names: Vec<String>) -> PyResult<Vec<bool>> {
    weightweave_core::names_matching(what, pattern, &names).map_err(|e| PyWeaveErr(e).into())
}
