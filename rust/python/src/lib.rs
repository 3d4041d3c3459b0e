//! `horae._core`: thin PyO3 wrappers over horae-core. Types and errors cross here; no logic lives
//! here that Python or Rust users would need twice.

use std::sync::Arc;

mod bench;
mod cuda;
mod engine;
mod route;
mod sim;
mod spec;

use horae_core::route::{RetryShed, RouterKind};
use horae_core::sched::{PolicyKind, Preemption, Prior, QueueDiscipline};
use horae_core::HoraeError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Past-Future's prior as Python gives it: a name ("uniform", "max-tokens") or output lengths
/// (`horae.priors` resolves bundled names and CSV files to lengths first).
#[derive(FromPyObject)]
pub(crate) enum PriorArg {
    Name(String),
    Lengths(Vec<u32>),
}

impl PriorArg {
    pub(crate) fn resolve(arg: Option<Self>) -> PyResult<Prior> {
        match arg {
            None => Ok(Prior::default()),
            Some(Self::Name(name)) => name.parse().map_err(PyValueError::new_err),
            Some(Self::Lengths(lengths)) => Ok(Prior::Lengths(Arc::from(lengths))),
        }
    }
}

pyo3::create_exception!(_core, HoraeCoreError, PyValueError, "An error reported by horae's Rust core.");

/// A core error as `HoraeCoreError`; a refused request's carries the field at fault as `param`.
pub(crate) fn to_py(e: HoraeError) -> PyErr {
    if let HoraeError::EngineDied(_) = e {
        // Not the caller's input (HoraeCoreError is a ValueError, a 400 in the server).
        return PyRuntimeError::new_err(e.to_string());
    }
    let err = HoraeCoreError::new_err(e.to_string());
    if let HoraeError::BadRequest { param: Some(param), .. } = e {
        Python::attach(|py| {
            let _ = err.value(py).setattr("param", param);
        });
    }
    err
}

/// The name `value` stands for as a `what` ("scheduler", "router", "retry rule", "queue" or
/// "preemption"), parsed as the core parses it (aliases, case, spaces, `_` for `-`), so that a
/// front end that checks a name before it reaches the core accepts and refuses exactly what the
/// core does, with the core's message (`unknown router "x": expected one of ...`).
#[pyfunction]
fn canonical_name(what: &str, value: &str) -> PyResult<&'static str> {
    let name = match what {
        "scheduler" => value.parse::<PolicyKind>().map(|k| k.as_str()),
        "router" => value.parse::<RouterKind>().map(|k| k.as_str()),
        "retry rule" => value.parse::<RetryShed>().map(|k| k.as_str()),
        "queue" => value.parse::<QueueDiscipline>().map(|k| k.as_str()),
        "preemption" => value.parse::<Preemption>().map(|k| k.as_str()),
        _ => {
            return Err(PyValueError::new_err(format!(
                "no choice named {what:?}: expected scheduler, router, retry rule, queue or preemption"
            )))
        }
    };
    name.map_err(to_py)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HoraeCoreError", m.py().get_type::<HoraeCoreError>())?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyStepOutput>()?;
    m.add("ROUTERS", RouterKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>())?;
    m.add("RETRY_RULES", RetryShed::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>())?;
    m.add("QUEUES", QueueDiscipline::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>())?;
    m.add("SCHEDULERS", PolicyKind::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>())?;
    m.add_function(wrap_pyfunction!(canonical_name, m)?)?;
    sim::register(m)?;
    bench::register(m)?;
    cuda::register(m)?;
    route::register(m)?;
    Ok(())
}
