//! Python arguments → owned core values, done before the GIL is released.

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

/// The keyword arguments shared by every merge entry point.
#[allow(clippy::too_many_arguments)]
pub fn job(
    method: String,
    params: Option<&Bound<'_, PyDict>>,
    mode: &str,
    lam: Option<f64>,
    lambdas: Option<Vec<f64>>,
    pool: &str,
    include_deltas: bool,
    seed: u64,
    threads: Option<usize>,
    chunk_size: Option<usize>,
    out_dtype: Option<String>,
) -> PyResult<Job> {
    let mut ps = BTreeMap::new();
    if let Some(d) = params {
        for (k, v) in d.iter() {
            let k: String = k.extract()?;
            let p = param(&k, &v)?;
            ps.insert(k, p);
        }
    }
    let mode = match mode {
        "merge" => Mode::Merge { lam },
        "weave" => Mode::Weave {
            lambdas,
            pool: pool.to_owned(),
            include_deltas,
        },
        other => {
            return Err(ParamError::new_err(format!(
                "mode must be 'merge' or 'weave', got '{other}'"
            )))
        }
    };
    Ok(Job {
        method,
        params: ps,
        mode,
        seed,
        threads,
        chunk_size,
        out_dtype,
    })
}
