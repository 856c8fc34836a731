//! The one place core errors become Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
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
    MismatchError,
    WeaveError,
    "The models do not share the base's tensors, shapes or dtypes."
);
create_exception!(
    weightweave._rust,
    NonFiniteError,
    WeaveError,
    "An input tensor holds NaN or infinity."
);
create_exception!(
    weightweave._rust,
    ParamError,
    WeaveError,
    "An unknown method, or a parameter that is unknown or out of range."
);
create_exception!(
    weightweave._rust,
    OutputError,
    WeaveError,
    "The output cannot be written where asked (it is an input, or the place is unusable)."
);
create_exception!(
    weightweave._rust,
    WeaveIOError,
    WeaveError,
    "An operating-system error on a named path."
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
            Error::Header { .. } | Error::TensorHeader { .. } | Error::Quantized { .. } => {
                HeaderError::new_err(msg)
            }
            Error::MissingTensor { .. }
            | Error::ExtraTensor { .. }
            | Error::ShapeMismatch { .. }
            | Error::DtypeMismatch { .. } => MismatchError::new_err(msg),
            Error::NonFinite { .. } | Error::OutOfRange { .. } => NonFiniteError::new_err(msg),
            Error::UnknownMethod { .. } | Error::InvalidParam { .. } => ParamError::new_err(msg),
            Error::OutputIsInput { .. }
            | Error::BadOutput { .. }
            | Error::Overflow { .. }
            | Error::ArithmeticOverflow { .. }
            | Error::Locked { .. } => OutputError::new_err(msg),
            Error::Io { .. } | Error::InputChanged { .. } => WeaveIOError::new_err(msg),
            Error::Cancelled => CancelledError::new_err(msg),
            Error::Internal { .. } => WeaveError::new_err(msg),
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
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add("NonFiniteError", py.get_type::<NonFiniteError>())?;
    m.add("ParamError", py.get_type::<ParamError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("WeaveIOError", py.get_type::<WeaveIOError>())?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    Ok(())
}
