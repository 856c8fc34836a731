//! The one place core errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyTuple, PyType};
use weightweave_core::Error;

create_exception!(
    weightweave._rust,
    WeaveError,
    PyException,
    "Base of every error weightweave raises on bad input, bad parameters or I/O."
);
create_exception!(
    weightweave._rust,
    HeaderError,
    WeaveError,
    "A safetensors file or shard index is malformed."
);
create_exception!(
    weightweave._rust,
    NonFiniteError,
    WeaveError,
    "An input tensor holds NaN or infinity."
);
create_exception!(
    weightweave._rust,
    OutputError,
    WeaveError,
    "The output cannot be written where asked (it is an input, or the place is unusable)."
);

/// An exception class with a second, built-in base, so that generic handlers catch it too
/// (`except ValueError`, `except OSError`). `create_exception!` takes one base, so the class is
/// made once through `PyErr_NewExceptionWithDoc`, which takes a tuple.
macro_rules! two_base_exception {
    ($name:ident, $qualname:literal, $doc:literal, $builtin:ty) => {
        pub struct $name;

        impl $name {
            pub fn type_object(py: Python<'_>) -> &Bound<'_, PyType> {
                static TYPE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
                TYPE.get_or_init(py, || {
                    let bases = PyTuple::new(
                        py,
                        [
                            py.get_type::<WeaveError>().into_any(),
                            py.get_type::<$builtin>().into_any(),
                        ],
                    )
                    .expect("a tuple of two types");
                    // SAFETY: NUL-terminated literals and a valid tuple; the call returns a new
                    // reference or NULL with an exception set, which from_owned_ptr_or_err takes.
                    let ty = unsafe {
                        let ptr = pyo3::ffi::PyErr_NewExceptionWithDoc(
                            $qualname.as_ptr(),
                            $doc.as_ptr(),
                            bases.as_ptr(),
                            std::ptr::null_mut(),
                        );
                        Bound::from_owned_ptr_or_err(py, ptr)
                    };
                    ty.expect("creating an exception class")
                        .cast_into::<PyType>()
                        .expect("an exception class is a type")
                        .unbind()
                })
                .bind(py)
            }

            pub fn new_err(msg: impl Into<String>) -> PyErr {
                let msg = msg.into();
                Python::attach(|py| PyErr::from_type(Self::type_object(py).clone(), msg))
            }
        }
    };
}

two_base_exception!(
    MismatchError,
    c"weightweave._rust.MismatchError",
    c"The models do not share the base's tensors, shapes or dtypes.",
    PyValueError
);
two_base_exception!(
    ParamError,
    c"weightweave._rust.ParamError",
    c"An unknown method, or a parameter that is unknown or out of range.",
    PyValueError
);
two_base_exception!(
    WeaveIOError,
    c"weightweave._rust.WeaveIOError",
    c"An operating-system error on a named path, or an input that changed during the run.",
    PyOSError
);

create_exception!(
    weightweave._rust,
    CancelledError,
    WeaveError,
    "The merge was cancelled; nothing was written."
);

/// Newtype so `?` converts core errors (the orphan rule forbids `From<Error> for PyErr` here).
pub struct PyWeaveErr(pub Error);

impl From<Error> for PyWeaveErr {
    fn from(e: Error) -> Self {
        PyWeaveErr(e)
    }
}

/// Names inside messages come from files: control characters (newlines, ANSI escapes) are
/// shown escaped, so a hostile tensor name cannot forge output lines or drive the terminal.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl From<PyWeaveErr> for PyErr {
    fn from(PyWeaveErr(e): PyWeaveErr) -> PyErr {
        let msg = escape_controls(&e.to_string());
        match e {
            Error::Header { .. }
            | Error::NotAModel { .. }
            | Error::Checkpoint { .. }
            | Error::TensorHeader { .. }
            | Error::Quantized { .. } => HeaderError::new_err(msg),
            Error::MissingTensor { .. }
            | Error::ExtraTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::DtypeMismatch { .. } => MismatchError::new_err(msg),
            Error::NonFinite { .. } | Error::OutOfRange { .. } | Error::LoadOverflow { .. } => {
                NonFiniteError::new_err(msg)
            }
            Error::UnknownMethod { .. } | Error::InvalidParam { .. } => ParamError::new_err(msg),
            Error::OutputIsInput { .. }
            | Error::BadOutput { .. }
            | Error::Overflow { .. }
            | Error::ScaleOverflow { .. }
            | Error::ArithmeticOverflow { .. }
            | Error::Locked { .. } => OutputError::new_err(msg),
            Error::Io { .. } | Error::InputChanged { .. } | Error::NotShared { .. } => {
                WeaveIOError::new_err(msg)
            }
            Error::Cancelled => CancelledError::new_err(msg),
            Error::Internal { .. } | Error::PoolFunction { .. } | Error::Suspended => {
                WeaveError::new_err(msg)
            }
        }
    }
}

/// A panic in the engine, as the error every caller already handles.
pub fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    PyWeaveErr(Error::Internal { what }).into()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("WeaveError", py.get_type::<WeaveError>())?;
    m.add("HeaderError", py.get_type::<HeaderError>())?;
    m.add("MismatchError", MismatchError::type_object(py))?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("ParamError", ParamError::type_object(py))?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("WeaveIOError", WeaveIOError::type_object(py))?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    Ok(())
}
