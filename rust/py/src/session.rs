//! The torch backend's view of a merge: tensor-by-tensor access to the inputs (zero-copy
//! buffers over the memory maps) and hand-back of each tensor's M. Mirrors `core::session`.

use std::ffi::c_int;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList};
use weightweave_core::session::Session as CoreSession;
use weightweave_core::{Checkpoint, OutputOptions};

use crate::convert;
use crate::errors::{ParamError, PyWeaveErr, WeaveError};
use crate::files::{detach_catching, report_dict};

/// Read-only bytes of one tensor inside a memory map; keeps the map alive while viewed.
#[pyclass(frozen, module = "weightweave._rust")]
pub struct TensorBuffer {
    _owner: Arc<Checkpoint>,
    ptr: usize,
    len: isize,
}

#[pymethods]
impl TensorBuffer {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        use pyo3::ffi;
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("tensor buffers are read-only"));
        }
        let (buf, len) = {
            let this = slf.get();
            (this.ptr, this.len)
        };
        // SAFETY: `view` is a valid Py_buffer to fill (CPython's contract); the memory stays
        // mapped while `obj` (this object, holding an Arc of the checkpoint) is referenced.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = buf as *mut std::ffi::c_void;
            (*view).len = len;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                ptr::null_mut()
            };
            (*view).suboffsets = ptr::null_mut();
            (*view).internal = ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}

    fn __len__(&self) -> usize {
        self.len as usize
    }
}

/// A merge whose 2-D tensors' M is computed by the caller (see `weightweave.torch_backend`).
#[pyclass(frozen, module = "weightweave._rust")]
pub struct Session {
    inner: RwLock<Option<CoreSession>>,
}

fn closed() -> PyErr {
    WeaveError::new_err("the session is finished or aborted")
}

impl Session {
    /// The session itself, leaving this object closed (to finish it).
    fn take(&self) -> PyResult<CoreSession> {
        self.inner
            .write()
            .map_err(|_| closed())?
            .take()
            .ok_or_else(closed)
    }

    fn with<T>(&self, f: impl FnOnce(&CoreSession) -> PyResult<T>) -> PyResult<T> {
        let guard = self.inner.read().map_err(|_| closed())?;
        f(guard.as_ref().ok_or_else(closed)?)
    }
}

#[pymethods]
impl Session {
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
    ) -> PyResult<Session> {
        let job = external_job(job)?;
        let opts = OutputOptions {
            shard_size,
            overwrite,
        };
        let s = detach_catching(py, || CoreSession::open(&base, &models, &out, &opts, &job))?;
        Ok(Session {
            inner: RwLock::new(Some(s)),
        })
    }

    /// A cluster unit's share of a merge on the torch backend (`weightweave.cluster`): the
    /// ticket's tensors are written, at their final offsets in the driver's staged files; end it
    /// with `finish_unit`.
    #[staticmethod]
    fn unit(
        py: Python<'_>,
        base: PathBuf,
        models: Vec<PathBuf>,
        job: &Bound<'_, PyDict>,
        ticket: &[u8],
    ) -> PyResult<Session> {
        let job = external_job(job)?;
        let s = detach_catching(py, || CoreSession::open_unit(&base, &models, &job, ticket))?;
        Ok(Session {
            inner: RwLock::new(Some(s)),
        })
    }

    /// A unit's end (after `complete`): checks, fsyncs the staged files; returns the bytes read.
    fn finish_unit(&self, py: Python<'_>) -> PyResult<u64> {
        let s = self.take()?;
        detach_catching(py, || s.finish_unit())
    }

    /// The tensors this session writes: a cluster unit's, or every one.
    fn mine(&self) -> PyResult<Vec<usize>> {
        self.with(|s| Ok(s.mine()))
    }

    /// Every output tensor: (name, base dtype, shape, merged?).
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.with(|s| {
            let out = PyList::empty(py);
            for t in s.plan() {
                out.append((
                    t.name.clone(),
                    t.base_dtype.name(),
                    t.shape.clone(),
                    t.mergeable,
                ))?;
            }
            Ok(out)
        })
    }

    /// Zero-copy inputs of tensor `i`: ((dtype, buffer) of the base, [(dtype, buffer) per model]).
    #[allow(clippy::type_complexity)]
    fn inputs(
        &self,
        py: Python<'_>,
        i: usize,
    ) -> PyResult<((String, Py<TensorBuffer>), Vec<(String, Py<TensorBuffer>)>)> {
        self.with(|s| {
            if i >= s.plan().len() {
                return Err(ParamError::new_err(format!(
                    "tensor index {i} out of range"
                )));
            }
            let (bck, mcks) = s.checkpoints();
            let (b, ms) = s.inputs(i);
            let wrap = |ck: &Arc<Checkpoint>,
                        r: &weightweave_core::TensorRef|
             -> PyResult<(String, Py<TensorBuffer>)> {
                let buf = TensorBuffer {
                    _owner: ck.clone(),
                    ptr: r.data.as_ptr() as usize,
                    len: r.data.len() as isize,
                };
                Ok((r.dtype.name().to_owned(), Py::new(py, buf)?))
            };
            let base = wrap(bck, &b)?;
            let models = mcks
                .iter()
                .zip(&ms)
                .map(|(ck, r)| wrap(ck, r))
                .collect::<PyResult<Vec<_>>>()?;
            Ok((base, models))
        })
    }

    /// τ_t of tensor `i` as a float32 bytearray ((θ_t − θ_base)·weight), converted here with
    /// the GIL released, so the torch backend's prefetch runs no torch operation beside the SVD;
    /// and whether every value is finite.
    #[pyo3(signature = (i, t, weight=None))]
    fn delta<'py>(
        &self,
        py: Python<'py>,
        i: usize,
        t: usize,
        weight: Option<f32>,
    ) -> PyResult<(Bound<'py, PyByteArray>, bool)> {
        let (v, finite) = self.with(|s| {
            detach_catching(py, || {
                let (mut base, mut out) = (Vec::new(), Vec::new());
                let finite = s.delta_into(i, t, weight, &mut base, &mut out)?;
                Ok((out, finite))
            })
        })?;
        let arr = PyByteArray::new_with(py, v.len() * 4, |buf| {
            for (dst, x) in buf.chunks_exact_mut(4).zip(&v) {
                dst.copy_from_slice(&x.to_le_bytes());
            }
            Ok(())
        })?;
        Ok((arr, finite))
    }

    /// Raises `NonFiniteError` naming the first NaN/infinity among tensor `i`'s inputs.
    fn check_finite(&self, py: Python<'_>, i: usize) -> PyResult<()> {
        self.with(|s| detach_catching(py, || s.check_finite(i)))
    }

    /// Hints the OS to read tensor `i`'s inputs now.
    fn prefetch(&self, i: usize) -> PyResult<()> {
        self.with(|s| {
            if i < s.plan().len() {
                s.prefetch(i);
            }
            Ok(())
        })
    }

    /// Pools tensor `i` with `m` (a contiguous float32 buffer) as its M, or the mean if None.
    #[pyo3(signature = (i, m=None))]
    fn write(&self, py: Python<'_>, i: usize, m: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let held = m.map(PyUntypedBuffer::get).transpose()?;
        let slice = match &held {
            None => None,
            Some(b) => Some(f32_slice(b)?),
        };
        self.with(|s| detach_catching(py, || s.write(i, slice, &AtomicBool::new(false))))
    }

    /// (bytes processed, bytes to process).
    /// MetaGPT's weights, found in a pass over the inputs when the job asks for them (call before
    /// any `delta` or `write`); the weights every task's delta takes (None: unweighted).
    #[pyo3(signature = (progress=None))]
    fn resolve_weights(
        &self,
        py: Python<'_>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Option<Vec<f32>>> {
        let mut g = self.inner.write().map_err(|_| closed())?;
        let s = g.as_mut().ok_or_else(closed)?;
        crate::progress::run_detached(py, progress, |report, cancel| {
            s.resolve_weights(report, cancel)
        })
    }

    fn progress(&self) -> PyResult<(u64, u64)> {
        self.with(|s| Ok(s.progress()))
    }

    /// Writes what is left (the mean of the deltas, or copies).
    fn complete(&self, py: Python<'_>) -> PyResult<()> {
        self.with(|s| detach_catching(py, || s.complete(&AtomicBool::new(false))))
    }

    /// Publishes the output; returns the report as a dict. Call after `complete`.
    fn publish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.take()?;
        let mut s = s;
        // Companions are copied where Ctrl-C is watched; the publish after it only renames.
        crate::progress::run_detached(py, None, |_, cancel| s.stage_extras(cancel))?;
        let r = detach_catching(py, || s.publish())?;
        report_dict(py, &r)
    }

    /// Discards the output (its temporaries are removed).
    fn abort(&self) -> PyResult<()> {
        if let Ok(mut g) = self.inner.write() {
            g.take();
        }
        Ok(())
    }
}

/// The job of a session: its method must be one whose M the caller computes.
fn external_job(job: &Bound<'_, PyDict>) -> PyResult<weightweave_core::Job> {
    let job = convert::job(job)?;
    if !job.recipe().map_err(PyWeaveErr)?.method().external() {
        return Err(ParamError::new_err(format!(
            "method '{}' does not take M from outside",
            job.method
        )));
    }
    Ok(job)
}

/// A float32 view of a contiguous, aligned buffer.
pub fn f32_slice(b: &PyUntypedBuffer) -> PyResult<&[f32]> {
    let ptr = b.buf_ptr() as *const f32;
    if !b.is_c_contiguous()
        || !b.len_bytes().is_multiple_of(4)
        || b.item_size() != 4
        || !ptr.is_aligned()
    {
        return Err(ParamError::new_err(
            "M must be a contiguous, aligned float32 buffer",
        ));
    }
    if b.len_bytes() == 0 {
        return Ok(&[]);
    }
    // SAFETY: checked contiguous, aligned and sized; the buffer is held by the caller for the
    // lifetime of the returned slice and only read.
    Ok(unsafe { std::slice::from_raw_parts(ptr, b.len_bytes() / 4) })
}
