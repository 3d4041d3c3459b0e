//! `horae._core.Engine` and `StepOutput`: PyO3 conversion of `horae_core::engine`'s handle, nothing
//! more. The engine, its inbox, step loop, request checks and figures all live in the core.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use horae_core::engine::{self, EngineArgs, EngineHandle, EngineInfo, EngineStats, RequestOutput, StepEvents};
use horae_core::error::HoraeError;
use horae_core::grammar::Constraint;
use horae_core::request::{RequestParams, Slo, StopReason};
use horae_core::sample::{SamplingParams, TokenLogprobs};
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::to_py;

/// `(token, logprob, rank, [(top_token, logprob), ...])`
type Lp = (u32, f32, u32, Vec<(u32, f32)>);

fn lps(v: &[TokenLogprobs]) -> Vec<Lp> {
    v.iter().map(|l| (l.token, l.logprob, l.rank, l.top.clone())).collect()
}

/// What one request did in one engine step: only the new part of its output.
#[pyclass(name = "StepOutput", module = "horae._core", frozen, get_all)]
pub struct PyStepOutput {
    request_id: u64,
    new_token_ids: Vec<u32>,
    new_text: String,
    /// Per new token, when the request asked for logprobs: `(token, logprob, rank, [(top, logprob)])`.
    new_logprobs: Vec<Lp>,
    /// Prompt logprobs from position 1, with the request's first output (or its last, where
    /// only finished outputs are sent).
    prompt_logprobs: Vec<Lp>,
    /// Prompt tokens read from the prefix cache at the first admission, with the same output.
    num_cached_tokens: Option<u64>,
    /// "stop", "length", "abort", "error" or None while running.
    finish_reason: Option<&'static str>,
    /// The stop string (str) or stop token id (int) that ended it; None for end-of-sequence.
    stop_reason: Option<Py<PyAny>>,
    /// Why the request failed (finish_reason "error").
    error: Option<String>,
    /// With speculation on, once finished: draft tokens verified and accepted.
    num_draft_tokens: Option<u64>,
    num_accepted_tokens: Option<u64>,
}

impl PyStepOutput {
    fn new(py: Python<'_>, o: RequestOutput) -> PyResult<Self> {
        let stop_reason = match o.stop_reason {
            Some(StopReason::Token(t)) => Some(t.into_pyobject(py)?.into_any().unbind()),
            Some(StopReason::Text(s)) => Some(s.into_pyobject(py)?.into_any().unbind()),
            None => None,
        };
        Ok(Self {
            request_id: o.id,
            new_logprobs: lps(&o.new_logprobs),
            prompt_logprobs: lps(&o.prompt_logprobs),
            num_cached_tokens: o.num_cached_tokens,
            new_token_ids: o.new_token_ids,
            new_text: o.new_text,
            finish_reason: o.finish_reason.map(|f| f.as_str()),
            stop_reason,
            error: o.error,
            num_draft_tokens: o.spec.map(|s| s.0),
            num_accepted_tokens: o.spec.map(|s| s.1),
        })
    }
}

#[pymethods]
impl PyStepOutput {
    fn __repr__(&self) -> String {
        format!(
            "StepOutput(request_id={}, new_token_ids={:?}, new_text={:?}, finish_reason={:?})",
            self.request_id, self.new_token_ids, self.new_text, self.finish_reason
        )
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &EngineStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("running", s.running)?;
    d.set_item("waiting", s.waiting)?;
    d.set_item("kv_used_blocks", s.kv_used_blocks)?;
    d.set_item("kv_total_blocks", s.kv_total_blocks)?;
    d.set_item("block_size", s.block_size)?;
    d.set_item("predicted_peak_tokens", s.predicted_peak_tokens)?;
    d.set_item("preemptions", s.preemptions)?;
    d.set_item("prefix_hit_blocks", s.prefix_hit_blocks)?;
    d.set_item("prefix_queried_blocks", s.prefix_queried_blocks)?;
    d.set_item("step_seconds", s.step_seconds)?;
    if let Some(sp) = &s.spec {
        d.set_item("spec_num_drafts", sp.num_drafts)?;
        d.set_item("spec_draft_tokens", sp.draft_tokens)?;
        d.set_item("spec_accepted_tokens", sp.accepted_tokens)?;
        d.set_item("spec_alpha", sp.alpha)?;
        d.set_item("spec_k", sp.k)?;
    }
    Ok(d)
}

fn outputs(py: Python<'_>, events: StepEvents) -> PyResult<Vec<PyStepOutput>> {
    events.outputs.into_iter().map(|o| PyStepOutput::new(py, o)).collect()
}

/// A `{"ttft": s, "max_itl": s, "e2e": s}` dict as the core's `Slo` (each key and value checked).
fn slo_arg(slo: Option<HashMap<String, f64>>) -> PyResult<Slo> {
    Slo::from_pairs(slo.iter().flatten().map(|(k, v)| (k.as_str(), *v))).map_err(to_py)
}

/// The real engine on a model folder. `step()` releases the GIL while the model runs;
/// `start_loop(callback)` runs steps on a background thread instead.
#[pyclass(name = "Engine", module = "horae._core")]
pub struct PyEngine {
    handle: Arc<EngineHandle>,
    info: EngineInfo,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model_dir, *, scheduler = "past-future", kv_cache_tokens = None, block_size = 16,
                        max_num_seqs = 64, max_batched_tokens = 2048, seed = None, dtype = "auto",
                        kv_cache_dtype = "auto", history_window = 1000, max_output_bound = None, speculative = None,
                        device = "auto", gpu_memory_utilization = 0.9, max_model_len = None, queue_timeout = None,
                        max_itl_abort = None, history_file = None, history_prior = None,
                        history_prior_weight = None, long_prefill_token_threshold = None, queue = "fcfs",
                        slo = None, max_long_partial_prefills = 1, enable_prefix_caching = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        scheduler: &str,
        kv_cache_tokens: Option<usize>,
        block_size: usize,
        max_num_seqs: usize,
        max_batched_tokens: usize,
        seed: Option<u64>,
        dtype: &str,
        kv_cache_dtype: &str,
        history_window: usize,
        max_output_bound: Option<usize>,
        speculative: Option<Bound<'_, PyDict>>,
        device: &str,
        gpu_memory_utilization: f64,
        max_model_len: Option<usize>,
        queue_timeout: Option<f64>,
        max_itl_abort: Option<f64>,
        history_file: Option<PathBuf>,
        history_prior: Option<crate::PriorArg>,
        history_prior_weight: Option<usize>,
        long_prefill_token_threshold: Option<usize>,
        queue: &str,
        slo: Option<HashMap<String, f64>>,
        max_long_partial_prefills: usize,
        enable_prefix_caching: bool,
    ) -> PyResult<Self> {
        let speculative = match speculative.map(|d| crate::spec::parse(&d, false, seed.unwrap_or(0))).transpose()? {
            Some((cfg, crate::spec::Choice::Engine(method))) => Some(engine::SpecArgs { cfg, method }),
            _ => None,
        };
        let args = EngineArgs {
            policy: scheduler.parse().map_err(to_py)?,
            kv_cache_tokens,
            block_size,
            max_num_seqs,
            max_batched_tokens,
            seed,
            dtype: dtype.to_string(),
            kv_cache_dtype: kv_cache_dtype.to_string(),
            history_window,
            max_output_bound,
            speculative,
            device: device.to_string(),
            gpu_memory_utilization,
            max_model_len,
            rules: engine::ServerRules { queue_timeout, max_itl_abort },
            history_file,
            history_prior: crate::PriorArg::resolve(history_prior)?,
            history_prior_weight,
            long_prefill_token_threshold,
            max_long_partial_prefills,
            queue: queue.parse().map_err(to_py)?,
            default_slo: slo_arg(slo)?,
            prefix_caching: enable_prefix_caching,
            ..EngineArgs::new(model_dir)
        };
        let (handle, info) = py.detach(|| engine::build(args)).map_err(to_py)?;
        Ok(Self { handle: Arc::new(handle), info })
    }

    #[getter]
    fn model_dir(&self) -> PathBuf {
        self.info.model_dir.clone()
    }
    /// How the weights are held: "float32", "bfloat16", "q8_0", "q4_1" or "float16".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.info.dtype
    }
    /// What the KV cache holds: "float32", "bfloat16" or (GPU) "float16".
    #[getter]
    fn kv_cache_dtype(&self) -> &'static str {
        self.info.kv_cache_dtype
    }
    /// On the CPU: bytes of weights one decode step reads (None on a GPU).
    #[getter]
    fn decode_weight_bytes(&self) -> Option<usize> {
        self.info.decode_weight_bytes
    }
    /// Where the model runs: "cpu" or "cuda:N (name)".
    #[getter]
    fn device(&self) -> String {
        self.info.device.clone()
    }
    /// With device="auto" on the CPU: why no GPU was used (None otherwise).
    #[getter]
    fn cpu_fallback_reason(&self) -> Option<String> {
        self.info.cpu_fallback_reason.clone()
    }
    #[getter]
    fn vocab_size(&self) -> usize {
        self.info.config.vocab_size
    }
    /// The context limit of a request (prompt + max_tokens): the model's, or `max_model_len`.
    #[getter]
    fn max_model_len(&self) -> usize {
        self.info.limits.max_model_len
    }
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.info.eos_token_ids.clone()
    }
    /// Tokens the KV pool holds.
    #[getter]
    fn kv_cache_tokens(&self) -> usize {
        self.info.kv_cache_tokens
    }
    /// With a history file: `(warm, message)`, whether it was loaded and what was found.
    #[getter]
    fn history_status(&self) -> Option<(bool, String)> {
        self.info.history.as_ref().map(|h| (h.warm, h.message.clone()))
    }
    /// Past-Future's recorded output lengths, oldest first (None for other schedulers).
    fn history_lengths(&self) -> Option<Vec<u32>> {
        self.handle.recorded_lengths()
    }
    /// Write the history file now; False when there is none (or nothing to write).
    fn save_history(&self, py: Python<'_>) -> PyResult<bool> {
        let handle = self.handle.clone();
        py.detach(move || handle.save_history()).map_err(to_py)
    }

    #[pyo3(signature = (text, add_special_tokens = false))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        self.info.tokenizer.encode(text, add_special_tokens).map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        self.info.decode(&ids, skip_special_tokens).map_err(to_py)
    }

    /// A token's own bytes (`Tokenizer::token_bytes`).
    fn token_bytes<'py>(&self, py: Python<'py>, token: i64) -> PyResult<Bound<'py, PyBytes>> {
        let id = self.info.token_ids(&[token]).map_err(to_py)?[0];
        Ok(PyBytes::new(py, &self.info.tokenizer.token_bytes(id).map_err(to_py)?))
    }

    /// Check a request and queue it; returns its id. Every rule is the core's
    /// (`horae_core::request::RequestParams`); a refusal raises `HoraeCoreError` naming the field.
    /// `max_tokens=None` means up to the end of the context (16 by default, as vLLM). Never waits
    /// for a running step.
    #[pyo3(signature = (prompt_token_ids, *, max_tokens = Some(16), temperature = 1.0, top_k = 0, top_p = 1.0,
                        min_p = 0.0, repetition_penalty = 1.0, presence_penalty = 0.0, frequency_penalty = 0.0,
                        seed = None, ignore_eos = false, logprobs = None, min_tokens = 0, prompt_logprobs = None,
                        stop = Vec::new(), stop_token_ids = Vec::new(), include_stop_str_in_output = false,
                        skip_special_tokens = true, detokenize = true, logit_bias = None, allowed_token_ids = None,
                        bad_words = Vec::new(), structured_outputs = None, structured_outputs_after = String::new(),
                        slo = None, priority = 0, waited = 0.0, cache_salt = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &self,
        py: Python<'_>,
        prompt_token_ids: Vec<i64>,
        max_tokens: Option<i64>,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        seed: Option<i64>,
        ignore_eos: bool,
        logprobs: Option<i64>,
        min_tokens: i64,
        prompt_logprobs: Option<i64>,
        stop: Vec<String>,
        stop_token_ids: Vec<i64>,
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
        detokenize: bool,
        logit_bias: Option<HashMap<i64, f64>>,
        allowed_token_ids: Option<Vec<i64>>,
        bad_words: Vec<Vec<i64>>,
        structured_outputs: Option<(String, String)>,
        structured_outputs_after: String,
        slo: Option<HashMap<String, f64>>,
        priority: i64,
        waited: f64,
        cache_salt: Option<String>,
    ) -> PyResult<u64> {
        let sampling = SamplingParams {
            temperature,
            top_k: 0,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            skip_special_tokens,
            detokenize,
            ..Default::default()
        };
        let params = RequestParams {
            prompt_token_ids,
            max_tokens,
            sampling,
            top_k,
            seed,
            min_tokens,
            logprobs,
            prompt_logprobs,
            ignore_eos,
            stop,
            stop_token_ids,
            include_stop_str_in_output,
            logit_bias: logit_bias.map(|b| b.into_iter().collect()).unwrap_or_default(),
            allowed_token_ids,
            bad_words,
            structured_outputs: structured_outputs
                .map(|(kind, text)| Constraint::parse(&kind, &text))
                .transpose()
                .map_err(to_py)?,
            structured_outputs_after,
            slo: slo_arg(slo)?,
            priority,
            waited,
            cache_salt,
        };
        // A grammar compiles in the call (the vocabulary's trie at the first): without the GIL.
        py.detach(|| self.handle.add_request(params)).map_err(to_py)
    }

    /// Build what structured output compiles against (the vocabulary's trie) now, without the
    /// GIL; raises where this model cannot have structured output.
    fn prepare_structured_output(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.handle.prepare_structured_output()).map_err(to_py)
    }

    /// Teacher-forced logits (`len x vocab`) of `token_ids` on the loaded model, outside the
    /// engine's batch (the GIL is released meanwhile).
    fn logits<'py>(&self, py: Python<'py>, token_ids: Vec<i64>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let logits = py.detach(|| self.info.logits(&token_ids)).map_err(to_py)?;
        numpy::PyArray1::from_vec(py, logits).reshape([token_ids.len(), self.info.config.vocab_size])
    }

    /// Stop a request; its KV blocks are freed before the next step runs (at once when no step
    /// is running). Ids that already finished are ignored.
    fn abort(&self, py: Python<'_>, request_id: u64) {
        py.detach(|| self.handle.abort(request_id));
    }

    fn has_unfinished(&self, py: Python<'_>) -> bool {
        py.detach(|| self.handle.has_unfinished())
    }

    /// Forget the prefix cache; false while a request holds KV blocks (waits for a running step).
    fn reset_prefix_cache(&self, py: Python<'_>) -> bool {
        py.detach(|| self.handle.reset_prefix_cache())
    }

    /// The figures metrics report, now (waits for a running step).
    fn step_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| self.handle.stats());
        stats_dict(py, &s)
    }

    /// What this engine publishes for a router (Ray Serve's `record_routing_stats`): `waiting`,
    /// `running`, `waiting_tokens`, `capacity_tokens`, `predicted_peak_tokens`, `planned_output`,
    /// `block_size`, `cached_blocks` and `cached_bloom` (its prefix cache as a Bloom filter).
    fn routing_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (s, block_size) = py.detach(|| (self.handle.replica_stats(), self.handle.stats().block_size));
        crate::route::stats_dict(py, &s, block_size)
    }

    /// The steps run since the last call, as numpy arrays: `num_tokens`, `num_seqs`,
    /// `attention_pairs` (the simulator's cost-model features, see `horae.sim.fit_linear_cost`),
    /// `seconds` (measured), `running`, `waiting`, `kv_usage`, `spec_k` (0 when off). Clears it.
    fn take_step_log<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let log = py.detach(|| self.handle.take_step_log());
        let d = PyDict::new(py);
        let col = |f: &dyn Fn(&horae_core::engine::StepSample) -> f64| {
            log.iter().map(f).collect::<Vec<f64>>().into_pyarray(py)
        };
        d.set_item("num_tokens", col(&|s| s.features.num_tokens))?;
        d.set_item("num_seqs", col(&|s| s.features.num_seqs))?;
        d.set_item("attention_pairs", col(&|s| s.features.attention_pairs))?;
        d.set_item("seconds", col(&|s| s.duration))?;
        d.set_item("running", col(&|s| s.running as f64))?;
        d.set_item("waiting", col(&|s| s.waiting as f64))?;
        d.set_item("kv_usage", col(&|s| s.kv_usage as f64))?;
        d.set_item("spec_k", col(&|s| s.spec_k as f64))?;
        Ok(d)
    }

    /// One engine step: a `StepOutput` for every request that produced output or finished.
    /// Not allowed while the background loop runs.
    fn step(&self, py: Python<'_>) -> PyResult<Vec<PyStepOutput>> {
        let events = py.detach(|| self.handle.step()).map_err(to_py)?;
        outputs(py, events)
    }

    /// Run the step loop on a background thread: after each step that has something to say,
    /// `callback(outputs, stats)` is called with the step's `StepOutput`s and a dict of the
    /// engine's figures; on an engine error, `callback(None, message)`. The GIL is held only for
    /// the callback, so it should hand off quickly (e.g. `loop.call_soon_threadsafe`).
    fn start_loop(&self, callback: Py<PyAny>) -> PyResult<()> {
        self.handle
            .start_loop(move |result| {
                Python::attach(|py| {
                    let called = match result {
                        Ok(events) => stats_dict(py, &events.stats)
                            .and_then(|d| outputs(py, events).map(|o| (o, d)))
                            .and_then(|(o, d)| callback.call1(py, (o, d, false))),
                        // The third value: whether the engine died (the loop has ended).
                        Err(e) => {
                            let died = matches!(e, HoraeError::EngineDied(_));
                            callback.call1(py, (py.None(), e.to_string(), died))
                        }
                    };
                    if let Err(e) = called {
                        e.print(py);
                    }
                })
            })
            .map_err(to_py)
    }

    /// Stop the background loop (after its current step) and wait for it.
    fn stop_loop(&self, py: Python<'_>) {
        // The thread needs the GIL for its last callback: wait without holding it.
        if let Some(h) = self.handle.stop_loop() {
            let _ = py.detach(|| h.join());
        }
    }
}
