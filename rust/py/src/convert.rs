//! Python arguments → owned core values, done before the GIL is released. Every entry point
//! takes the recipe and run options as one `job` mapping, parsed here and only here.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use weightweave_core::{Job, Mode, Param};

use crate::errors::ParamError;

fn param(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Param> {
    // bool before int: Python's bool is an int.
    if v.is_instance_of::<PyBool>() {
        Ok(Param::Bool(v.extract()?))
    } else if v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>() {
        Ok(Param::Num(v.extract()?))
    } else if v.is_instance_of::<PyString>() {
        Ok(Param::Str(v.extract()?))
    } else {
        Err(ParamError::new_err(format!(
            "parameter '{key}': expected a number, bool or string, got {}",
            v.get_type().name()?
        )))
    }
}

/// The value of `key`, or `default` when the key is absent or None.
fn item<'py, T>(d: &Bound<'py, PyDict>, key: &str, default: T) -> PyResult<T>
where
    T: for<'a> FromPyObject<'a, 'py>,
    for<'a> <T as FromPyObject<'a, 'py>>::Error: Into<PyErr>,
{
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract::<T>().map_err(|e| {
            let e: PyErr = e.into();
            ParamError::new_err(format!("{key}: {e}"))
        }),
        _ => Ok(default),
    }
}

/// Parses the `job` mapping: method, params, mode ("merge" | "weave"), lam, lambdas, pool,
/// include_deltas, seed, threads, chunk_size, out_dtype.
pub fn job(d: &Bound<'_, PyDict>) -> PyResult<Job> {
    let method: String = item(d, "method", String::new())?;
    let mut params = BTreeMap::new();
    if let Some(p) = d.get_item("params")? {
        if !p.is_none() {
            for (k, v) in p.cast::<PyDict>()?.iter() {
                let k: String = k.extract()?;
                let v = param(&k, &v)?;
                params.insert(k, v);
            }
        }
    }
    let mode = match item(d, "mode", "merge".to_owned())?.as_str() {
        "merge" => Mode::Merge {
            lam: item(d, "lam", None)?,
        },
        "weave" => Mode::Weave {
            lambdas: item(d, "lambdas", None)?,
            pool: item(d, "pool", "mean".to_owned())?,
            include_deltas: item(d, "include_deltas", true)?,
        },
        other => {
            return Err(ParamError::new_err(format!(
                "mode must be 'merge' or 'weave', got '{other}'"
            )))
        }
    };
    Ok(Job {
        method,
        params,
        mode,
        seed: item(d, "seed", 0)?,
        threads: item(d, "threads", None)?,
        chunk_size: item(d, "chunk_size", None)?,
        out_dtype: item(d, "out_dtype", None)?,
        weights: item(d, "weights", None)?,
    })
}
