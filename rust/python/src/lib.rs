//! `horae._core`: thin PyO3 wrappers over horae-core. Types and errors cross here; no logic lives
//! here that Python or Rust users would need twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use horae_core::backend::gemm::WeightDtype;
use horae_core::engine::{Engine, Prompt, ReqId, RequestSpec, WallClock};
use horae_core::model::{IncrementalDetokenizer, LlamaModel, ModelConfig, ModelExecutor, Tokenizer};
use horae_core::sample::SamplingParams;
use horae_core::sched::{bench::admission_benchmark, PolicyKind, Scheduler, SchedulerConfig};
use horae_core::sim::{self, CostModel, LengthDist, LoadModel, SimConfig, Sla, StepFeatures, Trace, TraceFormat};
use horae_core::HoraeError;
use numpy::{IntoPyArray, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(_core, HoraeCoreError, PyValueError, "An error reported by horae's Rust core.");

fn to_py(e: HoraeError) -> PyErr {
    HoraeCoreError::new_err(e.to_string())
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
    fn head(&self, n: usize) -> PyResult<Self> {
        if n == 0 {
            return Err(HoraeCoreError::new_err("head(n) needs n >= 1"));
        }
        let mut t = self.inner.clone();
        t.requests.truncate(n);
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
    #[pyo3(signature = (rate, burstiness = 1.0, seed = 0))]
    fn with_arrivals(&self, rate: f64, burstiness: f64, seed: u64) -> PyResult<Self> {
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
#[pyo3(signature = (dist, n, seed = 0))]
fn synthetic_trace(dist: &str, n: usize, seed: u64) -> PyResult<PyTrace> {
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
) -> PyResult<(String, Bound<'py, PyDict>, Bound<'py, PyDict>)> {
    let policy: PolicyKind = scheduler.parse().map_err(to_py)?;
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
            prefix_caching,
            history_window,
            max_output_bound: max_tokens.max(1),
            reserve,
            watermark,
            seed,
        },
        cost,
        max_tokens,
        load: clients.map_or(LoadModel::Open, |clients| LoadModel::Closed { clients }),
    };
    let sla = Sla { ttft, tpot, max_itl, e2e };
    let inner = &trace.inner;
    let (result, summary) = py
        .detach(|| {
            let r = sim::simulate(inner, &cfg)?;
            let s = r.summary(&sla);
            Ok::<_, HoraeError>((r, s))
        })
        .map_err(to_py)?;
    let mut summary = serde_json::to_value(summary).map_err(|e| HoraeCoreError::new_err(e.to_string()))?;
    summary["policy"] = result.policy.clone().into();
    summary["prefix_hit_rate"] = result.prefix_hit_rate.into();
    summary["num_steps"] = result.steps.len().into();

    let recs = &result.records;
    let req = PyDict::new(py);
    macro_rules! col {
        ($dict:ident, $name:literal, $src:expr, $f:expr) => {
            $dict.set_item($name, $src.iter().map($f).collect::<Vec<_>>().into_pyarray(py))?;
        };
    }
    col!(req, "arrival", recs, |r| r.arrival);
    col!(req, "first_scheduled", recs, |r| r.first_scheduled);
    col!(req, "first_token", recs, |r| r.first_token);
    col!(req, "finished", recs, |r| r.finished);
    col!(req, "prompt_len", recs, |r| r.prompt_len);
    col!(req, "output_len", recs, |r| r.output_len);
    col!(req, "ttft", recs, |r| r.ttft());
    col!(req, "tpot", recs, |r| r.tpot());
    col!(req, "max_itl", recs, |r| r.max_itl);
    col!(req, "e2e", recs, |r| r.e2e());
    col!(req, "preemptions", recs, |r| r.preemptions);
    col!(req, "recomputed_tokens", recs, |r| r.recomputed_tokens);
    col!(req, "cached_tokens", recs, |r| r.cached_tokens);
    col!(req, "rejected", recs, |r| r.rejected);
    col!(req, "completed", recs, |r| r.completed);
    col!(req, "met_sla", recs, |r| r.meets(&sla));

    let steps = &result.steps;
    let st = PyDict::new(py);
    col!(st, "time", steps, |s| s.time);
    col!(st, "duration", steps, |s| s.duration);
    col!(st, "running", steps, |s| s.running);
    col!(st, "waiting", steps, |s| s.waiting);
    col!(st, "batched_tokens", steps, |s| s.batched_tokens);
    col!(st, "kv_usage", steps, |s| s.kv_usage);
    col!(st, "predicted_peak", steps, |s| s.predicted_peak.map_or(f64::NAN, |p| p as f64));
    Ok((summary.to_string(), req, st))
}

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

/// Microseconds per Past-Future admission decision at `running` requests, and the naive baseline.
#[pyfunction]
#[pyo3(signature = (running, iters = 2000, seed = 0))]
fn bench_admission(py: Python<'_>, running: usize, iters: usize, seed: u64) -> (f64, f64, f64) {
    let t = py.detach(|| admission_benchmark(running, iters, seed));
    (t.first_decision_us, t.next_decision_us, t.naive_decision_us)
}

struct EngineState {
    engine: Engine,
    detok: HashMap<ReqId, IncrementalDetokenizer>,
}

/// The real engine on a model folder: scheduler + block manager + CPU model runtime + tokenizer.
/// `step()` releases the GIL while the model runs.
#[pyclass(name = "Engine", module = "horae._core")]
struct PyEngine {
    state: Mutex<EngineState>,
    model: std::sync::Arc<LlamaModel>,
    tokenizer: Tokenizer,
    model_dir: PathBuf,
    config: ModelConfig,
    eos: Vec<u32>,
    kv_cache_tokens: usize,
}

impl PyEngine {
    fn lock(&self) -> std::sync::MutexGuard<'_, EngineState> {
        // A panic while holding the lock would poison it; the state is still consistent because
        // every mutation goes through the core's own checks, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model_dir, *, scheduler = "past-future", kv_cache_tokens = 16384, block_size = 16,
                        max_num_seqs = 64, max_batched_tokens = 2048, seed = 0, dtype = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        scheduler: &str,
        kv_cache_tokens: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_batched_tokens: usize,
        seed: u64,
        dtype: &str,
    ) -> PyResult<Self> {
        let dtype = parse_dtype(dtype)?;
        let policy: PolicyKind = scheduler.parse().map_err(to_py)?;
        if policy == PolicyKind::Oracle {
            return Err(HoraeCoreError::new_err("the oracle scheduler needs true output lengths and runs only in the simulator"));
        }
        let config = ModelConfig::from_dir(&model_dir).map_err(to_py)?;
        let cfg = SchedulerConfig {
            policy,
            kv_cache_tokens,
            block_size,
            max_num_seqs,
            max_batched_tokens,
            max_output_bound: config.max_position_embeddings,
            seed,
            ..Default::default()
        };
        cfg.validate().map_err(to_py)?;
        let dir = model_dir.clone();
        let (exec, tokenizer) = py
            .detach(|| {
                let exec = ModelExecutor::load(&dir, dtype, kv_cache_tokens / block_size, block_size)?;
                let tok = Tokenizer::from_dir(&dir)?;
                Ok::<_, HoraeError>((exec, tok))
            })
            .map_err(to_py)?;
        let eos = horae_core::engine::Executor::eos_token_ids(&exec);
        let model = exec.model.clone();
        let sched = Scheduler::new(cfg, None).map_err(to_py)?;
        let engine = Engine::new(sched, Box::new(exec), Box::new(WallClock::default()));
        Ok(Self {
            state: Mutex::new(EngineState { engine, detok: HashMap::new() }),
            model,
            tokenizer,
            model_dir,
            config,
            eos,
            kv_cache_tokens,
        })
    }

    #[getter]
    fn model_dir(&self) -> PathBuf {
        self.model_dir.clone()
    }
    /// How the weights are held: "float32" or "bfloat16".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.model.dtype.name()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    #[getter]
    fn max_model_len(&self) -> usize {
        self.config.max_position_embeddings
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }
    #[getter]
    fn kv_cache_tokens(&self) -> usize {
        self.kv_cache_tokens
    }

    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        self.tokenizer.encode(text, add_special_tokens).map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.tokenizer.decode(&ids, skip_special_tokens).map_err(to_py)
    }

    /// Queue a request; returns its id. Raises on an empty prompt, token ids outside the
    /// vocabulary, a prompt that leaves no room in the context, or bad sampling values.
    #[pyo3(signature = (prompt_token_ids, *, max_tokens = 16, temperature = 1.0, top_k = 0, top_p = 1.0,
                        min_p = 0.0, repetition_penalty = 1.0, presence_penalty = 0.0, frequency_penalty = 0.0,
                        seed = None, ignore_eos = false, logprobs = None, min_tokens = 0, prompt_logprobs = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &self,
        prompt_token_ids: Vec<i64>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        seed: Option<u64>,
        ignore_eos: bool,
        logprobs: Option<usize>,
        min_tokens: usize,
        prompt_logprobs: Option<usize>,
    ) -> PyResult<u64> {
        let err = |m: String| Err(HoraeCoreError::new_err(m));
        if prompt_token_ids.is_empty() {
            return err("the prompt is empty".into());
        }
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = prompt_token_ids.iter().find(|&&t| t < 0 || t >= vocab) {
            return err(format!("token id {bad} is outside the vocabulary (0..{vocab})"));
        }
        if max_tokens < 1 {
            return err(format!("max_tokens must be at least 1, got {max_tokens}"));
        }
        if top_k < 0 {
            return err(format!("top_k must be >= 0 (0 = off), got {top_k}"));
        }
        let ctx = self.config.max_position_embeddings;
        let n = prompt_token_ids.len();
        if n >= ctx {
            return err(format!("the prompt has {n} tokens, more than the model's context of {ctx} allows"));
        }
        // Like vLLM, max_tokens is capped to what the context leaves.
        let max_tokens = (max_tokens as usize).min(ctx - n);
        let sampling = SamplingParams {
            temperature,
            top_k: top_k as usize,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            logprobs,
            min_tokens,
            prompt_logprobs,
        };
        sampling.validate().map_err(to_py)?;
        let ids: Vec<u32> = prompt_token_ids.iter().map(|&t| t as u32).collect();
        let mut st = self.lock();
        let detok = IncrementalDetokenizer::new(&ids);
        let spec = RequestSpec { prompt: Prompt::Tokens(ids), max_tokens, ignore_eos, arrival: None, sampling };
        let id = st.engine.add_request(spec).map_err(to_py)?;
        st.detok.insert(id, detok);
        Ok(id)
    }

    /// Teacher-forced logits (`len x vocab`) of `token_ids` on the loaded model, outside the
    /// engine's batch (the GIL is released meanwhile).
    fn logits<'py>(&self, py: Python<'py>, token_ids: Vec<i64>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let vocab = self.config.vocab_size;
        if token_ids.is_empty() {
            return Err(HoraeCoreError::new_err("token_ids is empty"));
        }
        if let Some(bad) = token_ids.iter().find(|&&t| t < 0 || t >= vocab as i64) {
            return Err(HoraeCoreError::new_err(format!("token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        if token_ids.len() > self.config.max_position_embeddings {
            return Err(HoraeCoreError::new_err("token_ids is longer than the model's context"));
        }
        let ids: Vec<u32> = token_ids.iter().map(|&t| t as u32).collect();
        let model = self.model.clone();
        let logits = py.detach(|| model.logits(&ids)).map_err(to_py)?;
        numpy::PyArray1::from_vec(py, logits).reshape([ids.len(), vocab])
    }

    /// Stop a request now; its KV blocks are freed at once. Unknown ids raise.
    fn abort(&self, request_id: u64) -> PyResult<()> {
        let mut st = self.lock();
        st.detok.remove(&request_id);
        st.engine.abort(request_id).map(|_| ()).map_err(to_py)
    }

    fn has_unfinished(&self) -> bool {
        self.lock().engine.has_work()
    }

    /// KV blocks in use, total blocks, running, waiting.
    fn stats(&self) -> (usize, usize, usize, usize) {
        let st = self.lock();
        let s = st.engine.scheduler();
        (s.kv().pool().num_used(), s.kv().pool().num_total(), s.num_running(), s.num_waiting())
    }

    /// One engine step. Returns `(request_id, new_token_ids, new_text, finish_reason or None,
    /// new_logprobs, prompt_logprobs)` for every request that produced a token or finished;
    /// `new_logprobs` holds `(token, logprob, [(top_token, logprob), ...])` per new token when the
    /// request asked for them, and `prompt_logprobs` the same per prompt token after the first,
    /// once, when the request finishes.
    #[allow(clippy::type_complexity)]
    fn step(&self, py: Python<'_>) -> PyResult<Vec<(u64, Vec<u32>, String, Option<&'static str>, Vec<(u32, f32, Vec<(u32, f32)>)>, Vec<(u32, f32, Vec<(u32, f32)>)>)>> {
        let tok = &self.tokenizer;
        py.detach(|| {
            let mut st = self.lock();
            let out = st.engine.step()?;
            type Lps = Vec<(u32, f32, Vec<(u32, f32)>)>;
            type Event = (u64, Vec<u32>, String, Option<&'static str>, Lps, Lps);
            let mut events: Vec<Event> = Vec::new();
            let mut by_id: HashMap<u64, usize> = HashMap::new();
            for (id, token) in &out.tokens {
                let idx = *by_id.entry(*id).or_insert_with(|| {
                    events.push((*id, Vec::new(), String::new(), None, Vec::new(), Vec::new()));
                    events.len() - 1
                });
                events[idx].1.push(*token);
            }
            for r in &out.finished {
                let reason = r.finish_reason().map(|f| f.as_str());
                let plp: Lps = r.prompt_logprobs.iter().map(|l| (l.token, l.logprob, l.top.clone())).collect();
                match by_id.get(&r.id) {
                    Some(&i) => {
                        events[i].3 = reason;
                        events[i].5 = plp;
                    }
                    None => events.push((r.id, Vec::new(), String::new(), reason, Vec::new(), plp)),
                }
            }
            let EngineState { engine, detok } = &mut *st;
            for e in events.iter_mut() {
                // The request, live or finished this step: new text and the new tokens' logprobs.
                let Some(r) = engine.scheduler().request(e.0).or_else(|| out.finished.iter().find(|r| r.id == e.0))
                else {
                    continue;
                };
                if let Some(d) = detok.get_mut(&e.0) {
                    e.2 = d.step(tok, &r.output)?;
                }
                let n = e.1.len();
                if n > 0 && r.logprobs.len() >= n {
                    e.4 = r.logprobs[r.logprobs.len() - n..].iter().map(|l| (l.token, l.logprob, l.top.clone())).collect();
                }
            }
            for r in &out.finished {
                detok.remove(&r.id);
            }
            Ok::<_, HoraeError>(events)
        })
        .map_err(to_py)
    }
}

/// Teacher-forced logits of a token sequence (`len x vocab`), outside the engine: for checks
/// against a reference and for users who want raw logits.
#[pyfunction]
#[pyo3(signature = (model_dir, token_ids, dtype = "auto"))]
fn model_logits<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    token_ids: Vec<u32>,
    dtype: &str,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    if token_ids.is_empty() {
        return Err(HoraeCoreError::new_err("token_ids is empty"));
    }
    let dtype = parse_dtype(dtype)?;
    let (logits, vocab) = py
        .detach(|| {
            let model = LlamaModel::load(&model_dir, dtype)?;
            Ok::<_, HoraeError>((model.logits(&token_ids)?, model.cfg.vocab_size))
        })
        .map_err(to_py)?;
    let rows = logits.len() / vocab;
    numpy::PyArray1::from_vec(py, logits).reshape([rows, vocab])
}

/// Linear-layer GFLOP/s on a model-shaped stack of layers at `m` rows: (faer f32 or None, packed).
#[pyfunction]
#[pyo3(signature = (shapes, layers, m, dtype = "float32", iters = 3))]
fn bench_linear(py: Python<'_>, shapes: Vec<(usize, usize)>, layers: usize, m: usize, dtype: &str, iters: usize) -> PyResult<(Option<f64>, f64)> {
    let dtype = parse_dtype(dtype)?.unwrap_or(WeightDtype::F32);
    if shapes.is_empty() || layers == 0 || m == 0 {
        return Err(HoraeCoreError::new_err("bench_linear needs at least one shape, one layer and one row"));
    }
    Ok(py.detach(|| horae_core::backend::gemm::compare_with_faer(&shapes, layers, m, dtype, iters)))
}

/// "auto" (the checkpoint's own), "float32" or "bfloat16".
fn parse_dtype(s: &str) -> PyResult<Option<WeightDtype>> {
    if s == "auto" {
        return Ok(None);
    }
    WeightDtype::parse(s).map(Some).ok_or_else(|| {
        let hint = if s == "float16" || s == "half" { " (the CPU backend keeps 16-bit weights as bfloat16)" } else { "" };
        HoraeCoreError::new_err(format!("unknown dtype '{s}': use 'auto', 'float32' or 'bfloat16'{hint}"))
    })
}

/// GFLOP/s of a plain f32 GEMM (`m x k` times `(n x k)^T`), best of `iters`.
#[pyfunction]
#[pyo3(signature = (m, n, k, iters = 20))]
fn bench_gemm(py: Python<'_>, m: usize, n: usize, k: usize, iters: usize) -> f64 {
    py.detach(|| horae_core::backend::cpu::measure_gemm_gflops(m, n, k, iters))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HoraeCoreError", m.py().get_type::<HoraeCoreError>())?;
    m.add_class::<PyTrace>()?;
    m.add_class::<PyEngine>()?;
    m.add_function(wrap_pyfunction!(model_logits, m)?)?;
    m.add_function(wrap_pyfunction!(bench_gemm, m)?)?;
    m.add_function(wrap_pyfunction!(bench_linear, m)?)?;
    m.add_function(wrap_pyfunction!(load_trace, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic_trace, m)?)?;
    m.add_function(wrap_pyfunction!(simulate, m)?)?;
    m.add_function(wrap_pyfunction!(fit_linear_cost, m)?)?;
    m.add_function(wrap_pyfunction!(bench_admission, m)?)?;
    m.add("MODEL_PRESETS", horae_core::sim::ModelSpec::PRESETS.to_vec())?;
    m.add("HARDWARE_PRESETS", horae_core::sim::HardwareSpec::PRESETS.to_vec())?;
    m.add("SCHEDULERS", PolicyKind::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>())?;
    Ok(())
}
