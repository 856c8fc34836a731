//! The in-memory path: state dicts of numpy arrays (bf16 as uint16 storage) merged zero-copy
//! through the buffer protocol. Python allocates the outputs from `plan_buffers`; the core writes
//! each chunk straight into them.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use weightweave_core::plan::{differing_copies, TensorPlan};
use weightweave_core::{plan_views, run_views, DType, ModelView, Result, Sink, TensorRef};

use crate::convert;
use crate::errors::ParamError;
use crate::progress::run_detached;
use crate::session::f32_slice;

/// One tensor handed over from Python: (name, dtype, shape, buffer).
type Entry<'py> = (String, String, Vec<usize>, Bound<'py, PyAny>);

struct Owned {
    label: String,
    tensors: Vec<(String, DType, Vec<usize>, PyUntypedBuffer)>,
}

fn owned(label: String, entries: Vec<Entry<'_>>) -> PyResult<Owned> {
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, dtype, shape, obj) in entries {
        let buf = PyUntypedBuffer::get(&obj)?;
        let dt = DType::parse(&dtype).ok_or_else(|| {
            ParamError::new_err(format!("{label}: tensor '{name}': unknown dtype '{dtype}'"))
        })?;
        let need = shape.iter().product::<usize>() * dt.size();
        if !buf.is_c_contiguous() || buf.len_bytes() != need {
            return Err(ParamError::new_err(format!(
                "{label}: tensor '{name}': buffer of {} bytes (contiguous: {}) does not hold shape {shape:?} of {dtype}",
                buf.len_bytes(),
                buf.is_c_contiguous()
            )));
        }
        tensors.push((name, dt, shape, buf));
    }
    Ok(Owned { label, tensors })
}

impl Owned {
    fn view(&self) -> ModelView<'_> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, buf)| {
                let len = buf.len_bytes();
                // SAFETY: the buffer is held (and its exporter kept alive) for as long as `self`,
                // its length was checked above, and it is only read.
                let data = if len == 0 {
                    &[][..]
                } else {
                    unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, len) }
                };
                let r = TensorRef {
                    delta: None,
                    scale: None,
                    dtype: *dtype,
                    shape,
                    data,
                    file: &self.label,
                };
                (name.clone(), r)
            })
            .collect();
        ModelView {
            label: self.label.clone(),
            tensors,
            maps: Vec::new(),
        }
    }
}

fn inputs(base: Vec<Entry<'_>>, models: Vec<Vec<Entry<'_>>>) -> PyResult<(Owned, Vec<Owned>)> {
    let base = owned("base".to_owned(), base)?;
    let models = models
        .into_iter()
        .enumerate()
        .map(|(i, m)| owned(format!("models[{i}]"), m))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((base, models))
}

/// Validates in-memory models; returns (name, out dtype, shape) of every output tensor.
#[pyfunction]
pub fn plan_buffers<'py>(
    py: Python<'py>,
    base: Vec<Entry<'py>>,
    models: Vec<Vec<Entry<'py>>>,
    job: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyList>> {
    let job = convert::job(job)?;
    let (b, ms) = inputs(base, models)?;
    let views: Vec<ModelView> = ms.iter().map(|m| m.view()).collect();
    let base_view = b.view();
    // Detached and watched: resolving a million-point search takes seconds, and Ctrl-C works.
    let plan = run_detached(py, None, |_, cancel| {
        plan_views(&base_view, &views, &job, cancel)
    })?;
    let out = PyList::empty(py);
    for t in plan {
        out.append((t.name, t.out_dtype.name(), t.shape))?;
    }
    Ok(out)
}

/// MetaGPT's weights of in-memory models (the torch backend needs them before it computes M).
#[pyfunction]
pub fn metagpt_buffers<'py>(
    py: Python<'py>,
    base: Vec<Entry<'py>>,
    models: Vec<Vec<Entry<'py>>>,
    job: &Bound<'py, PyDict>,
) -> PyResult<Vec<f32>> {
    let job = convert::job(job)?;
    let (b, ms) = inputs(base, models)?;
    let views: Vec<ModelView> = ms.iter().map(|m| m.view()).collect();
    let base_view = b.view();
    run_detached(py, None, |report, cancel| {
        let plan = plan_views(&base_view, &views, &job, cancel)?;
        let recipe = job.recipe_cancellable(cancel)?;
        let opts = job.options();
        weightweave_core::pipeline::metagpt_weights(
            &base_view, &views, &plan, &recipe, opts, report, cancel,
        )
        .map(|(w, _)| w)
    })
}

struct MemSink {
    /// Per planned tensor: (address, length) of the caller's writable buffer.
    targets: Vec<(usize, usize)>,
}

impl Sink for MemSink {
    fn write(&self, tensor: usize, offset: usize, data: &[u8]) -> Result<()> {
        let (addr, len) = self.targets[tensor];
        assert!(offset + data.len() <= len, "chunk beyond its output buffer");
        // SAFETY: the buffer is writable and alive for the whole call (held by the caller's frame),
        // the range is in bounds, and chunks of one tensor never overlap, so no two writes alias.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), (addr as *mut u8).add(offset), data.len())
        };
        Ok(())
    }
}

/// Merges in-memory models into caller-allocated output buffers (name → writable buffer).
/// `given`: for the SVD methods, name → float32 buffer of that tensor's M.
#[pyfunction]
#[pyo3(signature = (base, models, outputs, job, *, progress=None, given=None))]
pub fn merge_buffers<'py>(
    py: Python<'py>,
    base: Vec<Entry<'py>>,
    models: Vec<Vec<Entry<'py>>>,
    outputs: Vec<(String, Bound<'py, PyAny>)>,
    job: &Bound<'py, PyDict>,
    progress: Option<Py<PyAny>>,
    given: Option<Vec<(String, Bound<'py, PyAny>)>>,
) -> PyResult<(Vec<String>, Vec<String>)> {
    let job = convert::job(job)?;
    let (b, ms) = inputs(base, models)?;
    let views: Vec<ModelView> = ms.iter().map(|m| m.view()).collect();
    let base_view = b.view();
    let plan: Vec<TensorPlan> = run_detached(py, None, |_, cancel| {
        plan_views(&base_view, &views, &job, cancel)
    })?;
    let mut targets = Vec::with_capacity(plan.len());
    // Held until the merge returns, so the exporters keep the memory alive and writable.
    let mut held = Vec::with_capacity(plan.len());
    for t in &plan {
        let Some((_, obj)) = outputs.iter().find(|(n, _)| *n == t.name) else {
            return Err(ParamError::new_err(format!(
                "no output buffer for tensor '{}'",
                t.name
            )));
        };
        let buf = PyUntypedBuffer::get(obj)?;
        if buf.readonly() || !buf.is_c_contiguous() || buf.len_bytes() != t.out_bytes() {
            return Err(ParamError::new_err(format!(
                "output buffer for '{}' must be writable, contiguous and {} bytes",
                t.name,
                t.out_bytes()
            )));
        }
        targets.push((buf.buf_ptr() as usize, buf.len_bytes()));
        held.push(buf);
    }
    let sink = MemSink { targets };
    let given_bufs = given
        .unwrap_or_default()
        .into_iter()
        .map(|(n, o)| Ok((n, PyUntypedBuffer::get(&o)?)))
        .collect::<PyResult<Vec<_>>>()?;
    let mut given = std::collections::BTreeMap::new();
    for (n, b) in &given_bufs {
        given.insert(n.clone(), f32_slice(b)?);
    }
    let r = run_detached(py, progress, |report, cancel| {
        let plan = run_views(&base_view, &views, &job, &given, &sink, report, cancel)?;
        // The integer tensors that differ, among those the models share with the base, and
        // the names aligned to the base's (said by the caller).
        let mut views = views.clone();
        let kept = job.share_names(&base_view, &mut views)?;
        Ok((differing_copies(&base_view, &views, &plan), kept.aligned))
    });
    drop(held);
    r
}
