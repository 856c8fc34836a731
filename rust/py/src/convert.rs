//! Python arguments → owned core values, done before the GIL is released. Every entry point
//! takes the recipe and run options as one `job` mapping, parsed here and only here.

use std::collections::BTreeMap;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use weightweave_core::recipe::tensors::{Cond, Module, PerTensor, Setting, Value};
use weightweave_core::recipe::{Overlay, TokenizerOut};
use weightweave_core::scaling::Lines;
use weightweave_core::source::slices::{Slice, Slices, Source};
use weightweave_core::{CustomPool, Error, Job, Mode, Param, Params, Space};

use crate::errors::ParamError;

fn param(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Param> {
    // bool before int: Python's bool is an int.
    if v.is_instance_of::<PyBool>() {
        Ok(Param::Bool(v.extract()?))
    } else if v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>() {
        Ok(Param::Num(v.extract()?))
    } else if v.is_instance_of::<PyString>() {
        Ok(Param::Str(v.extract()?))
    } else if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        let items: Vec<Bound<'_, PyAny>> = v.extract()?;
        let mut out = Vec::with_capacity(items.len());
        for x in items {
            if x.is_instance_of::<PyBool>()
                || !(x.is_instance_of::<PyInt>() || x.is_instance_of::<PyFloat>())
            {
                return Err(ParamError::new_err(format!(
                    "parameter '{key}': a list must hold numbers, got {}",
                    x.get_type().name()?
                )));
            }
            out.push(x.extract()?);
        }
        Ok(Param::List(out))
    } else {
        Err(ParamError::new_err(format!(
            "parameter '{key}': expected a number, bool, string or list of numbers, got {}",
            v.get_type().name()?
        )))
    }
}

fn params(d: &Bound<'_, PyDict>) -> PyResult<Params> {
    let mut out = BTreeMap::new();
    for (k, v) in d.iter() {
        let k: String = k.extract()?;
        let v = param(&k, &v)?;
        out.insert(k, v);
    }
    Ok(out)
}

/// A scalar parameter value (a number, bool or string).
fn scalar(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Param> {
    match param(key, v)? {
        Param::List(_) => Err(ParamError::new_err(format!(
            "parameter '{key}': a condition's value is one value or a gradient list"
        ))),
        p => Ok(p),
    }
}

/// A setting: a list of conditions `{"filter": str | None, "value": scalar | list}`.
fn setting(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Setting> {
    let conds: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| {
        ParamError::new_err(format!(
            "per-tensor '{key}': a setting is a list of conditions"
        ))
    })?;
    let mut out = Vec::with_capacity(conds.len());
    for c in conds {
        let c = c.cast::<PyDict>().map_err(|_| {
            ParamError::new_err(format!("per-tensor '{key}': a condition is a dict"))
        })?;
        let filter: Option<String> = item(c, "filter", None)?;
        let slice: Option<usize> = item(c, "slice", None)?;
        let module: Option<usize> = item(c, "module", None)?;
        let value = c.get_item("value")?.ok_or_else(|| {
            ParamError::new_err(format!("per-tensor '{key}': a condition needs a value"))
        })?;
        let value = if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
            let items: Vec<Bound<'_, PyAny>> = value.extract()?;
            Value::Steps(
                items
                    .iter()
                    .map(|x| scalar(key, x))
                    .collect::<PyResult<_>>()?,
            )
        } else {
            Value::One(scalar(key, &value)?)
        };
        out.push(Cond {
            filter,
            slice,
            module,
            value,
        });
    }
    Ok(out)
}

/// `per_tensor`: {"shared": {name: setting}, "per_model": {name: [setting per model]}}.
fn per_tensor(v: &Bound<'_, PyAny>) -> PyResult<PerTensor> {
    let d = v
        .cast::<PyDict>()
        .map_err(|_| ParamError::new_err("per_tensor must be a dict"))?;
    let mut pt = PerTensor::default();
    if let Some(s) = d.get_item("shared")? {
        for (k, v) in s.cast::<PyDict>()?.iter() {
            let k: String = k.extract()?;
            let st = setting(&k, &v)?;
            pt.shared.insert(k, st);
        }
    }
    if let Some(s) = d.get_item("per_model")? {
        for (k, v) in s.cast::<PyDict>()?.iter() {
            let k: String = k.extract()?;
            let items: Vec<Bound<'_, PyAny>> = v.extract()?;
            let per = items
                .iter()
                .map(|x| setting(&k, x))
                .collect::<PyResult<Vec<_>>>()?;
            pt.per_model.insert(k, per);
        }
    }
    if let Some(s) = d.get_item("modules")? {
        let items: Vec<Bound<'_, PyAny>> = s
            .extract()
            .map_err(|_| ParamError::new_err("modules must be a list of dicts"))?;
        for m in items {
            let m = m.cast::<PyDict>().map_err(|_| {
                ParamError::new_err("a module is a dict of name, prefixes and layered")
            })?;
            pt.modules.push(Module {
                name: item(m, "name", String::new())?,
                prefixes: item(m, "prefixes", Vec::new())?,
                layered: item(m, "layered", true)?,
                pins: item(m, "pins", Vec::new())?,
            });
        }
    }
    Ok(pt)
}

/// `slices`: [{"len": n, "lanes": [[input, start], ...]}] (lane 0 the base's).
fn slices(v: &Bound<'_, PyAny>) -> PyResult<Slices> {
    let items: Vec<Bound<'_, PyAny>> = v
        .extract()
        .map_err(|_| ParamError::new_err("slices must be a list of dicts"))?;
    let mut out = Vec::with_capacity(items.len());
    for s in items {
        let d = s
            .cast::<PyDict>()
            .map_err(|_| ParamError::new_err("a slice is a dict of len and lanes"))?;
        let len: usize = item(d, "len", 0)?;
        let lanes: Vec<Vec<usize>> = item(d, "lanes", Vec::new())?;
        let lanes = lanes
            .into_iter()
            .map(|l| match l[..] {
                [input, start] => Ok(Source { input, start }),
                _ => Err(ParamError::new_err("a lane is [input, first layer]")),
            })
            .collect::<PyResult<Vec<_>>>()?;
        out.push(Slice { len, lanes });
    }
    Ok(Slices(out))
}

/// `search`: a dict of value lists (a grid, in the dict's order) or a list of point dicts.
fn space(v: &Bound<'_, PyAny>) -> PyResult<Space> {
    if let Ok(d) = v.cast::<PyDict>() {
        let mut axes = Vec::new();
        for (k, vals) in d.iter() {
            let k: String = k.extract()?;
            let items: Vec<Bound<'_, PyAny>> = vals.extract().map_err(|_| {
                ParamError::new_err(format!("search: '{k}' must be a list of values"))
            })?;
            let vals = items
                .iter()
                .map(|x| param(&k, x))
                .collect::<PyResult<Vec<_>>>()?;
            axes.push((k, vals));
        }
        return Ok(Space::Grid(axes));
    }
    let items: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| {
        ParamError::new_err("search must be a dict of value lists (a grid) or a list of points")
    })?;
    let mut points = Vec::with_capacity(items.len());
    for (i, p) in items.iter().enumerate() {
        let d = p
            .cast::<PyDict>()
            .map_err(|_| ParamError::new_err(format!("search: point {i} is not a dict")))?;
        points.push(params(d)?);
    }
    Ok(Space::Points(points))
}

/// A Python callable as a pool: called with the GIL, a float32 array of shape (rows, cols).
fn pool_fn(f: Py<PyAny>) -> CustomPool {
    CustomPool(Arc::new(move |a, rows, cols, tensor, out| {
        Python::attach(|py| -> PyResult<()> {
            let np = py.import("numpy")?;
            let bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
            let arr = np
                .call_method1("frombuffer", (PyBytes::new(py, &bytes), "float32"))?
                .call_method1("reshape", ((rows, cols),))?;
            let r = f.call1(py, (arr,))?;
            let r = np.call_method1("asarray", (r, "float32"))?;
            let shape: Vec<usize> = r.getattr("shape")?.extract()?;
            if shape != [cols] {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "returned shape {shape:?}, expected ({cols},)"
                )));
            }
            let b: Vec<u8> = r
                .call_method0("tobytes")?
                .cast::<PyBytes>()?
                .as_bytes()
                .to_vec();
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
            // Its own cause, not the overflow check's "use a smaller λ" later on.
            if let Some(k) = out.iter().position(|x| !x.is_finite()) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "returned {} at column {k}: a pool must return finite values",
                    out[k]
                )));
            }
            Ok(())
        })
        .map_err(|e| Error::PoolFunction {
            tensor: tensor.to_owned(),
            reason: e.to_string(),
        })
    }))
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

/// Parses the `job` mapping: method, params, mode ("merge" | "weave"), lam, lambdas, search,
/// pool (a name or a function), include_deltas, seed, threads, chunk_size, out_dtype, weights,
/// compat, metagpt (bool), lines (None or {alpha, blocks}).
pub fn job(d: &Bound<'_, PyDict>) -> PyResult<Job> {
    let method: String = item(d, "method", String::new())?;
    let params = match d.get_item("params")? {
        Some(p) if !p.is_none() => params(p.cast::<PyDict>()?)?,
        _ => BTreeMap::new(),
    };
    let (mut pool, mut pool_fn_) = ("mean".to_owned(), None);
    if let Some(p) = d.get_item("pool")? {
        if p.is_callable() {
            pool_fn_ = Some(pool_fn(p.unbind()));
        } else if !p.is_none() {
            pool = p
                .extract()
                .map_err(|_| ParamError::new_err("pool must be a name or a function"))?;
        }
    }
    let space = match d.get_item("search")? {
        Some(v) if !v.is_none() => Some(space(&v)?),
        _ => None,
    };
    let mode = match item(d, "mode", "merge".to_owned())?.as_str() {
        "merge" => Mode::Merge {
            lam: item(d, "lam", None)?,
        },
        "weave" => Mode::Weave {
            lambdas: item(d, "lambdas", None)?,
            pool,
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
        space,
        pool_fn: pool_fn_,
        compat: item(d, "compat", None)?,
        load_dtype: item(d, "load_dtype", None)?,
        keep_base: item(d, "keep_base", None)?,
        metagpt: item(d, "metagpt", false)?,
        lines: match d.get_item("lines")? {
            Some(l) if !l.is_none() => {
                let l = l
                    .cast::<PyDict>()
                    .map_err(|_| ParamError::new_err("lines must be a dict of alpha and blocks"))?;
                Some(Lines {
                    alpha: item(l, "alpha", None)?,
                    blocks: item(l, "blocks", None)?,
                })
            }
            _ => None,
        },
        per_tensor: match d.get_item("per_tensor")? {
            Some(v) if !v.is_none() => Some(per_tensor(&v)?),
            _ => None,
        },
        slices: match d.get_item("slices")? {
            Some(v) if !v.is_none() => Some(slices(&v)?),
            _ => None,
        },
        overlays: item::<Vec<(usize, std::path::PathBuf, String)>>(d, "overlays", Vec::new())?
            .into_iter()
            .map(|(input, path, label)| Overlay { input, path, label })
            .collect(),
        tokenizer: match d.get_item("tokenizer")? {
            Some(v) if !v.is_none() => {
                let t = v.cast::<PyDict>().map_err(|_| {
                    ParamError::new_err("tokenizer must be a dict of dir and vocab_size")
                })?;
                Some(TokenizerOut {
                    dir: item(t, "dir", std::path::PathBuf::new())?,
                    vocab_size: item(t, "vocab_size", None)?,
                })
            }
            _ => None,
        },
    })
}
