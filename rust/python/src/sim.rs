//! The simulator from Python: request traces (`Trace`, `load_trace`, `synthetic_trace`),
//! `simulate` (one engine or a cluster over a trace, its figures as numpy columns) and the step
//! cost model's fit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use horae_core::engine::ServerRules;
use horae_core::request::Slo;
use horae_core::route::RouterKind;
use horae_core::sched::{Censoring, HistoryStart, PolicyKind, SchedulerConfig, Tuning};
use horae_core::sim::{
    self, ClusterConfig, CostModel, LengthDist, LoadModel, SimConfig, StepFeatures, Trace, TraceFormat,
};
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict};

use crate::{spec, to_py, HoraeCoreError, PriorArg};
use horae_core::HoraeError;

/// `value` as the unsigned count or seed `name`. pyo3's own conversion fails a negative one with
/// a bare "can't convert negative int to unsigned" that names no argument.
/// A bool is refused, as `horae.checks.unsigned_ints` refuses it.
fn unsigned(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    let not_an_integer = || {
        let shown = value.repr().map_or_else(|_| "?".to_string(), |r| r.to_string());
        PyTypeError::new_err(format!("{name} must be an integer, got {shown}"))
    };
    if value.is_instance_of::<PyBool>() {
        return Err(not_an_integer());
    }
    value.extract::<u64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(value.py()) {
            PyValueError::new_err(format!("{name} must be a whole number >= 0 (below 2^64), got {value}"))
        } else {
            not_an_integer()
        }
    })
}

/// A request trace: arrival times and prompt/output lengths.
#[pyclass(name = "Trace", module = "horae._core", frozen)]
#[derive(Clone)]
struct PyTrace {
    inner: Trace,
}

#[pymethods]
impl PyTrace {
    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }
    /// Whether the requests have arrival times (length-only sets need `with_arrivals`).
    #[getter]
    fn timed(&self) -> bool {
        self.inner.timed
    }
    fn __len__(&self) -> usize {
        self.inner.requests.len()
    }
    fn __repr__(&self) -> String {
        let span = self.inner.requests.last().map_or(0.0, |r| r.arrival);
        format!(
            "Trace(name={:?}, requests={}, timed={}, span={:.1}s)",
            self.inner.name,
            self.inner.requests.len(),
            self.inner.timed,
            span
        )
    }
    fn arrivals<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<f64>> {
        self.inner.requests.iter().map(|r| r.arrival).collect::<Vec<_>>().into_pyarray(py)
    }
    fn prompt_lens<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<u32>> {
        self.inner.requests.iter().map(|r| r.prompt_len).collect::<Vec<_>>().into_pyarray(py)
    }
    fn output_lens<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<u32>> {
        self.inner.requests.iter().map(|r| r.output_len).collect::<Vec<_>>().into_pyarray(py)
    }
    /// The first `n` requests.
    fn head(&self, n: &Bound<'_, PyAny>) -> PyResult<Self> {
        let n = unsigned("n", n)?;
        if n == 0 {
            return Err(HoraeCoreError::new_err("head(n) needs n >= 1"));
        }
        let mut t = self.inner.clone();
        t.requests.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(Self { inner: t })
    }
    /// The same requests arriving `scale` times as fast.
    fn scaled(&self, scale: f64) -> PyResult<Self> {
        if !self.inner.timed {
            return Err(HoraeCoreError::new_err("this trace has no arrival times; use with_arrivals(rate) first"));
        }
        Ok(Self { inner: sim::scale_rate(&self.inner, scale).map_err(to_py)? })
    }
    /// New arrival times from a Gamma process (burstiness 1 = Poisson) at `rate` requests/s.
    #[pyo3(signature = (rate, burstiness = 1.0, seed = None))]
    fn with_arrivals(&self, rate: f64, burstiness: f64, seed: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let seed = seed.map(|s| unsigned("seed", s)).transpose()?.unwrap_or(0);
        let mut t = self.inner.clone();
        sim::assign_arrivals(&mut t, rate, burstiness, seed).map_err(to_py)?;
        Ok(Self { inner: t })
    }
}

#[pyfunction]
#[pyo3(signature = (path, format = None))]
fn load_trace(py: Python<'_>, path: PathBuf, format: Option<&str>) -> PyResult<PyTrace> {
    let format = format.map(str::parse::<TraceFormat>).transpose().map_err(to_py)?;
    let inner = py.detach(|| sim::load_trace(&path, format)).map_err(to_py)?;
    Ok(PyTrace { inner })
}

#[pyfunction]
#[pyo3(signature = (dist, n, seed = None))]
fn synthetic_trace(dist: &str, n: &Bound<'_, PyAny>, seed: Option<&Bound<'_, PyAny>>) -> PyResult<PyTrace> {
    let n = usize::try_from(unsigned("n", n)?).map_err(|_| PyValueError::new_err("n is too large"))?;
    let seed = seed.map(|s| unsigned("seed", s)).transpose()?.unwrap_or(0);
    let dist: LengthDist = dist.parse().map_err(to_py)?;
    Ok(PyTrace { inner: sim::synthetic(dist, n, seed).map_err(to_py)? })
}

/// Run one scheduler over one trace in the simulator. Returns (summary JSON, per-request arrays,
/// per-step arrays).
#[pyfunction]
#[pyo3(signature = (
    trace, scheduler, *, clients = None, model = "llama-2-7b", hardware = "a100-80gb",
    cost_coef = None, kv_cache_tokens = 120_000, block_size = 16, max_num_seqs = 256,
    max_batched_tokens = 2048, max_tokens = 4096, prefix_caching = true, history_window = 1000,
    reserve = 0.05, watermark = 0.95, seed = 0, ttft = None, tpot = None, max_itl = None, e2e = None,
    speculative = None, queue_timeout = None, max_itl_abort = None, retry_failed = false,
    history = None, history_prior = None, history_prior_weight = None, scenarios = None, quantile = None,
    redraw = false, fitted_tail = false, censoring = None, bootstrap = true, linear_tail = true, max_admit_per_step = None,
    long_prefill_token_threshold = None, queue = "fcfs", slo_classes = None, preemption = None,
    replicas = None, router = "forecast", staleness = 1.0, max_long_partial_prefills = 1, retry_shed = "always",
))]
#[allow(clippy::too_many_arguments)]
fn simulate<'py>(
    py: Python<'py>,
    trace: &PyTrace,
    scheduler: &str,
    clients: Option<usize>,
    model: &str,
    hardware: &str,
    cost_coef: Option<[f64; 4]>,
    kv_cache_tokens: usize,
    block_size: usize,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    max_tokens: usize,
    prefix_caching: bool,
    history_window: usize,
    reserve: f64,
    watermark: f64,
    seed: u64,
    ttft: Option<f64>,
    tpot: Option<f64>,
    max_itl: Option<f64>,
    e2e: Option<f64>,
    speculative: Option<Bound<'py, PyDict>>,
    queue_timeout: Option<f64>,
    max_itl_abort: Option<f64>,
    retry_failed: bool,
    history: Option<Vec<u32>>,
    history_prior: Option<PriorArg>,
    history_prior_weight: Option<usize>,
    scenarios: Option<usize>,
    quantile: Option<f64>,
    redraw: bool,
    fitted_tail: bool,
    censoring: Option<&str>,
    bootstrap: bool,
    linear_tail: bool,
    max_admit_per_step: Option<usize>,
    long_prefill_token_threshold: Option<usize>,
    queue: &str,
    slo_classes: Option<Vec<HashMap<String, f64>>>,
    preemption: Option<&str>,
    replicas: Option<usize>,
    router: &str,
    staleness: f64,
    max_long_partial_prefills: usize,
    retry_shed: &str,
) -> PyResult<SimOutput<'py>> {
    let policy: PolicyKind = scheduler.parse().map_err(to_py)?;
    let slo_classes = slo_classes
        .unwrap_or_default()
        .iter()
        .map(|c| Slo::from_pairs(c.iter().map(|(k, v)| (k.as_str(), *v))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(to_py)?;
    let spec = speculative.map(|d| spec::parse(&d, true, seed)).transpose()?;
    let (spec, acceptance) = match spec {
        Some((cfg, spec::Choice::Simulated(a))) => (Some(cfg), Some(a)),
        _ => (None, None),
    };
    let cost = match cost_coef {
        Some(coef) => CostModel::Linear { coef },
        None => CostModel::roofline(model, hardware).map_err(to_py)?,
    };
    let cfg = SimConfig {
        sched: SchedulerConfig {
            policy,
            kv_cache_tokens,
            block_size,
            max_num_seqs,
            max_batched_tokens,
            long_prefill_token_threshold,
            max_long_partial_prefills,
            prefix_caching,
            history_window,
            max_output_bound: max_tokens.max(1),
            history_start: HistoryStart {
                prior: PriorArg::resolve(history_prior)?,
                prior_weight: history_prior_weight,
                recorded: history.map(Arc::from).unwrap_or_default(),
            },
            tuning: Tuning {
                scenarios,
                quantile,
                redraw,
                fitted_tail,
                censoring: censoring
                    .map(str::parse::<Censoring>)
                    .transpose()
                    .map_err(PyValueError::new_err)?
                    .unwrap_or_default(),
                bootstrap,
                linear_tail,
            },
            max_admit_per_step,
            queue: queue.parse().map_err(to_py)?,
            preemption: preemption.map(str::parse).transpose().map_err(to_py)?,
            default_slo: Slo { ttft, tpot, max_itl, e2e },
            reserve,
            watermark,
            seed,
            spec,
        },
        cost,
        max_tokens,
        load: clients.map_or(LoadModel::Open, |clients| LoadModel::Closed { clients }),
        acceptance,
        rules: ServerRules { queue_timeout, max_itl_abort },
        retry_failed,
        slo_classes,
    };
    let inner = &trace.inner;
    if let Some(replicas) = replicas {
        let router: RouterKind = router.parse().map_err(to_py)?;
        let retry = retry_shed.parse().map_err(to_py)?;
        let cluster = ClusterConfig { sim: cfg, replicas, router, staleness, retry };
        let result = py.detach(|| sim::simulate_cluster(inner, &cluster)).map_err(to_py)?;
        let mut summary = serde_json::to_value(result.summary()).map_err(|e| HoraeCoreError::new_err(e.to_string()))?;
        summary["policy"] = scheduler.into();
        summary["router"] = router.as_str().into();
        summary["replicas"] = replicas.into();
        summary["prefix_hit_rate"] = result.prefix_hit_rate.into();
        summary["load_imbalance"] = result.load_imbalance.into();
        summary["per_replica"] = result
            .replicas
            .iter()
            .map(|r| {
                serde_json::json!({"requests": r.requests, "preemptions": r.stats.preemptions,
                                   "prefix_hit_rate": r.prefix_hit_rate, "mean_running": r.mean_running})
            })
            .collect::<Vec<_>>()
            .into();
        let req = request_columns(py, &result.records)?;
        return Ok((summary.to_string(), req, PyDict::new(py), None));
    }
    let (result, summary) = py
        .detach(|| {
            let r = sim::simulate(inner, &cfg)?;
            let s = r.summary();
            Ok::<_, HoraeError>((r, s))
        })
        .map_err(to_py)?;
    let mut summary = serde_json::to_value(summary).map_err(|e| HoraeCoreError::new_err(e.to_string()))?;
    summary["policy"] = result.policy.clone().into();
    summary["prefix_hit_rate"] = result.prefix_hit_rate.into();
    summary["num_steps"] = result.steps.len().into();
    if let Some(s) = result.spec {
        summary["spec"] = serde_json::json!({
            "num_drafts": s.num_drafts,
            "draft_tokens": s.draft_tokens,
            "accepted_tokens": s.accepted_tokens,
            "alpha": s.alpha,
        });
    }

    let req = request_columns(py, &result.records)?;
    let st = step_columns(py, &result.steps)?;
    Ok((summary.to_string(), req, st, result.history))
}

/// `dict[name] = numpy array of f over src`.
macro_rules! col {
    ($py:expr, $dict:ident, $name:literal, $src:expr, $f:expr) => {
        $dict.set_item($name, $src.iter().map($f).collect::<Vec<_>>().into_pyarray($py))?;
    };
}

/// The per-step arrays of a simulation.
fn step_columns<'py>(py: Python<'py>, steps: &[horae_core::engine::StepSample]) -> PyResult<Bound<'py, PyDict>> {
    let st = PyDict::new(py);
    col!(py, st, "time", steps, |s| s.time);
    col!(py, st, "duration", steps, |s| s.duration);
    col!(py, st, "running", steps, |s| s.running);
    col!(py, st, "waiting", steps, |s| s.waiting);
    col!(py, st, "batched_tokens", steps, |s| s.batched_tokens);
    col!(py, st, "kv_usage", steps, |s| s.kv_usage);
    col!(py, st, "spec_k", steps, |s| s.spec_k);
    col!(py, st, "predicted_peak", steps, |s| s.predicted_peak.map_or(f64::NAN, |p| p as f64));
    Ok(st)
}

/// The per-request arrays of a simulation, in trace order.
fn request_columns<'py>(py: Python<'py>, recs: &[sim::RequestRecord]) -> PyResult<Bound<'py, PyDict>> {
    let req = PyDict::new(py);
    col!(py, req, "arrival", recs, |r| r.arrival);
    col!(py, req, "first_scheduled", recs, |r| r.first_scheduled);
    col!(py, req, "first_token", recs, |r| r.first_token);
    col!(py, req, "finished", recs, |r| r.finished);
    col!(py, req, "prompt_len", recs, |r| r.prompt_len);
    col!(py, req, "output_len", recs, |r| r.output_len);
    col!(py, req, "ttft", recs, |r| r.ttft());
    col!(py, req, "tpot", recs, |r| r.tpot());
    col!(py, req, "max_itl", recs, |r| r.max_itl);
    col!(py, req, "e2e", recs, |r| r.e2e());
    col!(py, req, "preemptions", recs, |r| r.preemptions);
    col!(py, req, "recomputed_tokens", recs, |r| r.recomputed_tokens);
    col!(py, req, "cached_tokens", recs, |r| r.cached_tokens);
    col!(py, req, "rejected", recs, |r| r.rejected);
    col!(py, req, "completed", recs, |r| r.completed);
    col!(py, req, "attempts", recs, |r| r.attempts);
    col!(py, req, "wasted_tokens", recs, |r| r.wasted_tokens);
    col!(py, req, "timed_out", recs, |r| r.timed_out);
    req.set_item("finish_reason", recs.iter().map(|r| r.finish_reason).collect::<Vec<_>>())?;
    col!(py, req, "met_sla", recs, |r| r.meets());
    Ok(req)
}

/// `simulate`'s answer: summary JSON, per-request arrays, per-step arrays, and Past-Future's
/// recorded lengths at the end (None for the other policies).
type SimOutput<'py> = (String, Bound<'py, PyDict>, Bound<'py, PyDict>, Option<Vec<u32>>);

/// Least-squares fit of `t = c0 + c1*num_tokens + c2*num_seqs + c3*attention_pairs` to measured
/// step times; pass the result as `cost_coef` to `simulate`.
#[pyfunction]
fn fit_linear_cost(
    num_tokens: PyReadonlyArray1<'_, f64>,
    num_seqs: PyReadonlyArray1<'_, f64>,
    attention_pairs: PyReadonlyArray1<'_, f64>,
    seconds: PyReadonlyArray1<'_, f64>,
) -> PyResult<[f64; 4]> {
    let (a, b, c, t) = (num_tokens.as_slice()?, num_seqs.as_slice()?, attention_pairs.as_slice()?, seconds.as_slice()?);
    if a.len() != t.len() || b.len() != t.len() || c.len() != t.len() {
        return Err(HoraeCoreError::new_err("fit_linear_cost: all arrays must have the same length"));
    }
    let samples: Vec<(StepFeatures, f64)> = (0..t.len())
        .map(|i| {
            let f = StepFeatures { num_tokens: a[i], num_seqs: b[i], context_tokens: c[i], attention_pairs: c[i] };
            (f, t[i])
        })
        .collect();
    match CostModel::fit_linear(&samples).map_err(to_py)? {
        CostModel::Linear { coef } => Ok(coef),
        CostModel::Roofline { .. } => unreachable!("fit_linear returns a linear model"),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTrace>()?;
    m.add_function(wrap_pyfunction!(load_trace, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic_trace, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(fit_linear_cost, m)?)?;
    m.add("MODEL_PRESETS", sim::ModelSpec::PRESETS.to_vec())?;
    m.add("HARDWARE_PRESETS", sim::HardwareSpec::PRESETS.to_vec())?;
    Ok(())
}
