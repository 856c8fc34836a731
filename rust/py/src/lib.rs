//! `weightweave._rust`: the binding module. Declarations only; each area lives in its own file.

mod arrays;
mod cluster;
mod convert;
mod errors;
mod files;
mod progress;
mod session;

use pyo3::prelude::*;

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", weightweave_core::VERSION)?;
    m.add_function(wrap_pyfunction!(files::merge_files, m)?)?;
    m.add_function(wrap_pyfunction!(files::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(files::default_lam, m)?)?;
    m.add_function(wrap_pyfunction!(files::default_params, m)?)?;
    m.add_function(wrap_pyfunction!(files::default_lambdas, m)?)?;
    m.add_function(wrap_pyfunction!(files::search_variable, m)?)?;
    m.add_function(wrap_pyfunction!(files::read_floor, m)?)?;
    m.add_function(wrap_pyfunction!(files::names_matching, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::plan_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::merge_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(arrays::metagpt_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(cluster::merge_unit, m)?)?;
    m.add_function(wrap_pyfunction!(cluster::gather_unit, m)?)?;
    m.add_class::<cluster::ClusterDriver>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<session::TensorBuffer>()?;
    errors::register(m)
}
