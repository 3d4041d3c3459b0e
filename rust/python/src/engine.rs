//! `horae._core.Engine`: the real engine (scheduler + block manager + CPU model + tokenizer)
//! behind a lock, with an inbox so that adding or aborting a request never waits for a running
//! step, and an optional background thread that runs the step loop off the caller's thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use horae_core::engine::{Engine, Prompt, ReqId, RequestSpec, StepSample, WallClock};
use horae_core::model::{IncrementalDetokenizer, LlamaModel, ModelConfig, ModelExecutor, Proposer, Tokenizer};
use horae_core::spec::DraftModel;
use horae_core::sample::SamplingParams;
use horae_core::sched::{check_fits, PolicyKind, Scheduler, SchedulerConfig};
use horae_core::HoraeError;
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use horae_core::backend::cuda::device::{resolve as resolve_device, Device, DeviceRequest, Gpu};
use horae_core::backend::cuda::model::{CudaLlama, KvBudget};
use horae_core::backend::cuda::ops::Dt;
use std::sync::OnceLock;

use crate::spec::Method;

/// KV pool of a CPU engine when kv_cache_tokens is not given.
const DEFAULT_CPU_KV_TOKENS: usize = 16384;

/// The GPU runs 16-bit weights: "auto" is bfloat16 (every supported GPU has it).
fn parse_gpu_dtype(s: &str) -> PyResult<Dt> {
    match s {
        "auto" | "bfloat16" | "bf16" => Ok(Dt::Bf16),
        "float16" | "f16" | "half" => Ok(Dt::F16),
        _ => Err(HoraeCoreError::new_err(format!(
            "dtype '{s}' on the GPU: the CUDA backend runs 'bfloat16' or 'float16' (use device='cpu' for float32)"
        ))),
    }
}
use crate::{parse_dtype, to_py, HoraeCoreError};

type Lps = Vec<(u32, f32, Vec<(u32, f32)>)>;
/// `(request_id, new_token_ids, new_text, finish_reason or None, new_logprobs, prompt_logprobs,
/// (draft tokens, accepted) once finished with speculation on)`. A request the engine refused
/// after queueing comes back with reason "error" and the message as its text.
type Event = (u64, Vec<u32>, String, Option<&'static str>, Lps, Lps, Option<(u64, u64)>);

struct EngineState {
    engine: Engine,
    detok: HashMap<ReqId, IncrementalDetokenizer>,
    /// Requests the engine refused when the inbox was applied: reported with the next events.
    refused: Vec<(ReqId, String)>,
    /// Preemptions since the engine started (for metrics).
    preemptions: u64,
    /// Per step: the cost model's features and the measured seconds (see `take_step_log`).
    step_log: Vec<StepSample>,
}

/// Steps kept for `take_step_log` before the oldest are dropped.
const STEP_LOG_CAP: usize = 1 << 20;

/// Requests and aborts waiting for the engine lock. The lock is held for a whole step (tens of
/// milliseconds on a CPU); queueing here keeps `add_request` and `abort` at microseconds, so an
/// asyncio server calling them never stalls its event loop.
#[derive(Default)]
struct Inbox {
    adds: Vec<(ReqId, RequestSpec)>,
    aborts: Vec<ReqId>,
}

/// What the step loop and the Python methods share.
struct Shared {
    state: Mutex<EngineState>,
    inbox: Mutex<Inbox>,
    /// Signalled when the inbox gets work or the loop is told to stop.
    wake: Condvar,
    tokenizer: Tokenizer,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        // A panic while holding the lock would poison it; the state is still consistent because
        // every mutation goes through the core's own checks, so keep serving.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.apply_inbox(&mut st);
        st
    }

    fn apply_inbox(&self, st: &mut EngineState) {
        let inbox = std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, spec) in inbox.adds {
            let detok = match &spec.prompt {
                Prompt::Tokens(ids) => IncrementalDetokenizer::new(ids),
                Prompt::Synthetic { .. } => unreachable!("the binding only queues token prompts"),
            };
            match st.engine.add_request_with_id(id, spec) {
                Ok(()) => {
                    st.detok.insert(id, detok);
                }
                Err(e) => st.refused.push((id, e.to_string())),
            }
        }
        for id in inbox.aborts {
            st.detok.remove(&id);
            // An id that already finished (or was refused) has nothing left to free.
            let _ = st.engine.abort(id);
        }
    }

    /// One engine step, as events for the requests that moved, plus the step's figures.
    fn step(&self) -> Result<(Vec<Event>, StepStats), HoraeError> {
        let mut st = self.lock();
        let mut events: Vec<Event> =
            st.refused.drain(..).map(|(id, msg)| (id, Vec::new(), msg, Some("error"), Vec::new(), Vec::new(), None)).collect();
        if !st.engine.has_work() {
            return Ok((events, StepStats::of(&st, None)));
        }
        let out = st.engine.step()?;
        st.preemptions += out.preempted.len() as u64;
        // Requests the model failed on (a GPU fault): they end with the error as their text.
        for (id, msg) in &out.failed {
            st.detok.remove(id);
            events.push((*id, Vec::new(), msg.clone(), Some("error"), Vec::new(), Vec::new(), None));
        }
        let mut by_id: HashMap<u64, usize> = HashMap::new();
        let speculating = st.engine.scheduler().spec_k_max().is_some();
        for (id, token) in &out.tokens {
            let idx = *by_id.entry(*id).or_insert_with(|| {
                events.push((*id, Vec::new(), String::new(), None, Vec::new(), Vec::new(), None));
                events.len() - 1
            });
            events[idx].1.push(*token);
        }
        for r in &out.finished {
            let reason = r.finish_reason().map(|f| f.as_str());
            let plp: Lps = r.prompt_logprobs.iter().map(|l| (l.token, l.logprob, l.top.clone())).collect();
            let spec = speculating.then_some((r.spec_drafted, r.spec_accepted));
            match by_id.get(&r.id) {
                Some(&i) => {
                    events[i].3 = reason;
                    events[i].5 = plp;
                    events[i].6 = spec;
                }
                None => events.push((r.id, Vec::new(), String::new(), reason, Vec::new(), plp, spec)),
            }
        }
        let EngineState { engine, detok, .. } = &mut *st;
        for e in events.iter_mut().filter(|e| e.3 != Some("error")) {
            // The request, live or finished this step: new text and the new tokens' logprobs.
            let Some(r) = engine.scheduler().request(e.0).or_else(|| out.finished.iter().find(|r| r.id == e.0)) else {
                continue;
            };
            if let Some(d) = detok.get_mut(&e.0) {
                e.2 = d.step(&self.tokenizer, &r.output)?;
            }
            let n = e.1.len();
            if n > 0 && r.logprobs.len() >= n {
                e.4 = r.logprobs[r.logprobs.len() - n..].iter().map(|l| (l.token, l.logprob, l.top.clone())).collect();
            }
        }
        for r in &out.finished {
            detok.remove(&r.id);
        }
        if let Some(sample) = out.sample {
            if st.step_log.len() == STEP_LOG_CAP {
                st.step_log.drain(..STEP_LOG_CAP / 2);
            }
            st.step_log.push(sample);
        }
        let duration = out.sample.map(|s| s.duration);
        Ok((events, StepStats::of(&st, duration)))
    }

    /// Blocks until there is something to do (a queued request or abort, or running requests),
    /// or the loop is told to stop.
    fn wait_for_work(&self) {
        let busy = self.lock().engine.has_work();
        if busy {
            return;
        }
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner());
        if inbox.adds.is_empty() && inbox.aborts.is_empty() && !self.stop.load(Ordering::Acquire) {
            // The timeout only bounds a missed wake-up; every push notifies.
            let _ = self.wake.wait_timeout(inbox, Duration::from_millis(200));
        }
    }
}

/// The engine's figures after a step, for metrics.
struct StepStats {
    running: usize,
    waiting: usize,
    kv_used_blocks: usize,
    kv_total_blocks: usize,
    block_size: usize,
    predicted_peak_tokens: Option<u64>,
    preemptions: u64,
    prefix_hit_blocks: u64,
    prefix_queried_blocks: u64,
    step_seconds: Option<f64>,
    spec: Option<horae_core::spec::SpecStats>,
}

impl StepStats {
    fn of(st: &EngineState, step_seconds: Option<f64>) -> Self {
        let s = st.engine.scheduler();
        let pool = s.kv().pool();
        Self {
            running: s.num_running(),
            waiting: s.num_waiting(),
            kv_used_blocks: pool.num_used(),
            kv_total_blocks: pool.num_total(),
            block_size: s.kv().block_size(),
            predicted_peak_tokens: s.predicted_peak(),
            preemptions: st.preemptions,
            prefix_hit_blocks: pool.hit_blocks,
            prefix_queried_blocks: pool.queried_blocks,
            step_seconds,
            spec: s.spec_stats(),
        }
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("running", self.running)?;
        d.set_item("waiting", self.waiting)?;
        d.set_item("kv_used_blocks", self.kv_used_blocks)?;
        d.set_item("kv_total_blocks", self.kv_total_blocks)?;
        d.set_item("block_size", self.block_size)?;
        d.set_item("predicted_peak_tokens", self.predicted_peak_tokens)?;
        d.set_item("preemptions", self.preemptions)?;
        d.set_item("prefix_hit_blocks", self.prefix_hit_blocks)?;
        d.set_item("prefix_queried_blocks", self.prefix_queried_blocks)?;
        d.set_item("step_seconds", self.step_seconds)?;
        if let Some(s) = &self.spec {
            d.set_item("spec_num_drafts", s.num_drafts)?;
            d.set_item("spec_draft_tokens", s.draft_tokens)?;
            d.set_item("spec_accepted_tokens", s.accepted_tokens)?;
            d.set_item("spec_alpha", s.alpha)?;
            d.set_item("spec_k", s.k)?;
        }
        Ok(d)
    }
}

/// The real engine on a model folder. `step()` releases the GIL while the model runs;
/// `start_loop(callback)` runs steps on a background thread instead.
#[pyclass(name = "Engine", module = "horae._core")]
pub struct PyEngine {
    shared: Arc<Shared>,
    /// The CPU model: the engine's own on the CPU backend; on a GPU, loaded when `logits` is
    /// first called.
    model: OnceLock<Arc<LlamaModel>>,
    model_dir: PathBuf,
    device: String,
    cpu_fallback_reason: Option<String>,
    dtype: &'static str,
    config: ModelConfig,
    eos: Vec<u32>,
    kv_cache_tokens: usize,
    /// Tokens the pool holds: a request whose prompt + max_tokens exceeds it can never run.
    pool_tokens: usize,
    next_id: AtomicU64,
    looper: Mutex<Option<JoinHandle<()>>>,
}

impl PyEngine {
    fn push(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        self.shared.wake.notify_all();
    }

    fn looping(&self) -> bool {
        self.looper.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model_dir, *, scheduler = "past-future", kv_cache_tokens = None, block_size = 16,
                        max_num_seqs = 64, max_batched_tokens = 2048, seed = 0, dtype = "auto",
                        history_window = 1000, max_output_bound = None, speculative = None,
                        device = "auto", gpu_memory_utilization = 0.9))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        scheduler: &str,
        kv_cache_tokens: Option<usize>,
        block_size: usize,
        max_num_seqs: usize,
        max_batched_tokens: usize,
        seed: u64,
        dtype: &str,
        history_window: usize,
        max_output_bound: Option<usize>,
        speculative: Option<Bound<'_, PyDict>>,
        device: &str,
        gpu_memory_utilization: f64,
    ) -> PyResult<Self> {
        let request: DeviceRequest = device.parse().map_err(to_py)?;
        if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) {
            return Err(HoraeCoreError::new_err(format!("gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")));
        }
        let (device, cpu_reason) = resolve_device(request);
        let gpu_dtype = match device {
            Device::Cuda(_) => Some(parse_gpu_dtype(dtype)?),
            Device::Cpu => None,
        };
        let dtype = if gpu_dtype.is_some() { None } else { parse_dtype(dtype)? };
        let spec = speculative.map(|d| crate::spec::parse(&d, false, seed)).transpose()?;
        if matches!(device, Device::Cuda(_)) && matches!(spec.as_ref().map(|s| &s.method), Some(Method::Draft { .. })) {
            // The draft model runs on the CPU with a KV cache as large as the target's pool,
            // which on a GPU is millions of tokens.
            return Err(HoraeCoreError::new_err(
                "speculative decoding with a draft model runs on the CPU backend only; on a GPU use {\"method\": \"ngram\"} or device='cpu'",
            ));
        }
        let policy: PolicyKind = scheduler.parse().map_err(to_py)?;
        if policy == PolicyKind::Oracle {
            return Err(HoraeCoreError::new_err("the oracle scheduler needs true output lengths and runs only in the simulator"));
        }
        let config = ModelConfig::from_dir(&model_dir).map_err(to_py)?;
        let mut cfg = SchedulerConfig {
            policy,
            // The GPU pool size is known once the weights are loaded (set below).
            kv_cache_tokens: kv_cache_tokens.unwrap_or(DEFAULT_CPU_KV_TOKENS),
            block_size,
            max_num_seqs,
            max_batched_tokens,
            history_window,
            // Past-Future primes its length history with this: by default the whole context.
            max_output_bound: max_output_bound.unwrap_or(config.max_position_embeddings),
            seed,
            spec: spec.as_ref().map(|s| s.cfg.clone()),
            ..Default::default()
        };
        cfg.validate().map_err(to_py)?;
        let dir = model_dir.clone();
        let (exec, tokenizer) = py
            .detach(|| {
                let mut exec = match (device, gpu_dtype) {
                    (Device::Cuda(ordinal), Some(dt)) => {
                        let budget = kv_cache_tokens.map_or(KvBudget::MemoryFraction(gpu_memory_utilization), KvBudget::Tokens);
                        let model = CudaLlama::load(Gpu::open(ordinal)?, &dir, dt, budget, block_size, max_batched_tokens)?;
                        ModelExecutor::on_gpu(&dir, model)
                    }
                    _ => ModelExecutor::load(&dir, dtype, cfg.kv_cache_tokens / block_size, block_size)?,
                };
                let blocks = exec.num_blocks();
                match spec.map(|s| (s.method, s.cfg.k_max)) {
                    Some((Method::Ngram { min_n, max_n }, _)) => exec.set_proposer(Proposer::Ngram { min_n, max_n }),
                    Some((Method::Draft { model, num_layers }, k_max)) => {
                        let draft_dir = model.unwrap_or_else(|| dir.clone());
                        let vocab = exec.cfg.vocab_size;
                        let draft = DraftModel::load(&draft_dir, dtype, num_layers, vocab, blocks, block_size, max_num_seqs, k_max)?;
                        exec.set_proposer(Proposer::Draft(Box::new(draft)));
                    }
                    Some((Method::Simulated(_), _)) | None => {}
                }
                let tok = Tokenizer::from_dir(&dir)?;
                Ok::<_, HoraeError>((exec, tok))
            })
            .map_err(to_py)?;
        let eos = horae_core::engine::Executor::eos_token_ids(&exec);
        cfg.kv_cache_tokens = exec.num_blocks() * block_size;
        let pool_kv_tokens = cfg.kv_cache_tokens;
        let model = OnceLock::new();
        if let Some(m) = exec.cpu_model() {
            let _ = model.set(m);
        }
        let (device_name, dtype_name) = (exec.device(), exec.dtype_name());
        let sched = Scheduler::new(cfg, None).map_err(to_py)?;
        let pool_tokens = sched.kv().capacity_tokens();
        let engine = Engine::new(sched, Box::new(exec), Box::new(WallClock::default()));
        let state = EngineState { engine, detok: HashMap::new(), refused: Vec::new(), preemptions: 0, step_log: Vec::new() };
        let shared = Shared {
            state: Mutex::new(state),
            inbox: Mutex::new(Inbox::default()),
            wake: Condvar::new(),
            tokenizer,
            stop: AtomicBool::new(false),
        };
        Ok(Self {
            shared: Arc::new(shared),
            model,
            model_dir,
            device: device_name,
            cpu_fallback_reason: cpu_reason,
            dtype: dtype_name,
            config,
            eos,
            kv_cache_tokens: pool_kv_tokens,
            pool_tokens,
            next_id: AtomicU64::new(0),
            looper: Mutex::new(None),
        })
    }

    #[getter]
    fn model_dir(&self) -> PathBuf {
        self.model_dir.clone()
    }
    /// How the weights are held: "float32" or "bfloat16".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype
    }
    /// Where the model runs: "cpu" or "cuda:N (name)".
    #[getter]
    fn device(&self) -> String {
        self.device.clone()
    }
    /// With device="auto" on the CPU: why no GPU was used (None otherwise).
    #[getter]
    fn cpu_fallback_reason(&self) -> Option<String> {
        self.cpu_fallback_reason.clone()
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
        self.shared.tokenizer.encode(text, add_special_tokens).map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.shared.tokenizer.decode(&ids, skip_special_tokens).map_err(to_py)
    }

    /// Queue a request; returns its id. Raises on an empty prompt, token ids outside the
    /// vocabulary, a prompt that leaves no room in the context or can never fit the KV pool,
    /// or bad sampling values. Never waits for a running step.
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
        check_fits(n, max_tokens, self.pool_tokens).map_err(HoraeCoreError::new_err)?;
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
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let spec = RequestSpec { prompt: Prompt::Tokens(ids), max_tokens, ignore_eos, arrival: None, sampling };
        self.push(|inbox| inbox.adds.push((id, spec)));
        Ok(id)
    }

    /// Teacher-forced logits (`len x vocab`) of `token_ids` on the loaded model, outside the
    /// engine's batch (the GIL is released meanwhile).
    fn logits<'py>(&self, py: Python<'py>, token_ids: Vec<i64>) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
        let vocab = self.config.vocab_size;
        if token_ids.is_empty() {
            return Err(HoraeCoreError::new_err("token_ids is empty"));
        }
        if let Some(bad) = token_ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(HoraeCoreError::new_err(format!("token id {bad} is outside the vocabulary (0..{vocab})")));
        }
        if token_ids.len() > self.config.max_position_embeddings {
            return Err(HoraeCoreError::new_err("token_ids is longer than the model's context"));
        }
        let ids: Vec<u32> = token_ids.iter().map(|&t| t as u32).collect();
        // On a GPU engine the reference CPU model is loaded on first use (a checking tool: the
        // engine's KV cache is not disturbed).
        let dir = self.model_dir.clone();
        let model = py.detach(|| self.model.get().cloned().map_or_else(|| LlamaModel::load(&dir, None).map(Arc::new), Ok)).map_err(to_py)?;
        let model = self.model.get_or_init(|| model).clone();
        let logits = py.detach(|| model.logits(&ids)).map_err(to_py)?;
        numpy::PyArray1::from_vec(py, logits).reshape([ids.len(), vocab])
    }

    /// Stop a request; its KV blocks are freed before the next step runs (at once when no step
    /// is running). Ids that already finished are ignored.
    fn abort(&self, py: Python<'_>, request_id: u64) {
        self.push(|inbox| inbox.aborts.push(request_id));
        if !self.looping() {
            py.detach(|| drop(self.shared.lock())); // apply it now: no step can be running
        }
    }

    fn has_unfinished(&self, py: Python<'_>) -> bool {
        py.detach(|| self.shared.lock().engine.has_work())
    }

    /// KV blocks in use, total blocks, running, waiting (waits for a running step).
    fn stats(&self, py: Python<'_>) -> (usize, usize, usize, usize) {
        py.detach(|| {
            let st = self.shared.lock();
            let s = st.engine.scheduler();
            (s.kv().pool().num_used(), s.kv().pool().num_total(), s.num_running(), s.num_waiting())
        })
    }

    /// The figures metrics report (see `StepStats`), now.
    fn step_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = py.detach(|| StepStats::of(&self.shared.lock(), None));
        s.to_dict(py)
    }

    /// The steps run since the last call, as numpy arrays: `num_tokens`, `num_seqs`,
    /// `attention_pairs` (the simulator's cost-model features, see `horae.sim.fit_linear_cost`),
    /// `seconds` (measured), `running`, `waiting`, `kv_usage`, `spec_k` (speculation length; 0 when
    /// off). Clears the log.
    fn take_step_log<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let log = py.detach(|| std::mem::take(&mut self.shared.lock().step_log));
        let d = PyDict::new(py);
        let col = |f: &dyn Fn(&StepSample) -> f64| log.iter().map(f).collect::<Vec<f64>>().into_pyarray(py);
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

    /// One engine step. Returns `(request_id, new_token_ids, new_text, finish_reason or None,
    /// new_logprobs, prompt_logprobs)` for every request that produced a token or finished;
    /// `new_logprobs` holds `(token, logprob, [(top_token, logprob), ...])` per new token when the
    /// request asked for them, and `prompt_logprobs` the same per prompt token after the first,
    /// once, when the request finishes. Not allowed while the background loop runs.
    fn step(&self, py: Python<'_>) -> PyResult<Vec<Event>> {
        if self.looping() {
            return Err(HoraeCoreError::new_err("the background loop is running this engine; step() is not available"));
        }
        py.detach(|| self.shared.step()).map(|(events, _)| events).map_err(to_py)
    }

    /// Run the step loop on a background thread: after each step that has something to say,
    /// `callback(events, stats)` is called with `step()`'s events and a dict of the engine's
    /// figures; on an engine error, `callback(None, message)`. The GIL is held only for the
    /// callback, so it should hand off quickly (e.g. `loop.call_soon_threadsafe`).
    fn start_loop(&self, callback: Py<PyAny>) -> PyResult<()> {
        let mut looper = self.looper.lock().unwrap_or_else(|e| e.into_inner());
        if looper.is_some() {
            return Err(HoraeCoreError::new_err("the background loop is already running"));
        }
        self.shared.stop.store(false, Ordering::Release);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("horae-engine".into())
            .spawn(move || {
                while !shared.stop.load(Ordering::Acquire) {
                    shared.wait_for_work();
                    if shared.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let result = shared.step();
                    if matches!(&result, Ok((events, _)) if events.is_empty()) {
                        continue;
                    }
                    Python::attach(|py| {
                        let called = match result {
                            Ok((events, stats)) => stats.to_dict(py).and_then(|d| callback.call1(py, (events, d))),
                            Err(e) => callback.call1(py, (py.None(), e.to_string())),
                        };
                        if let Err(e) = called {
                            e.print(py);
                        }
                    });
                }
            })
            .map_err(|e| HoraeCoreError::new_err(format!("cannot start the engine thread: {e}")))?;
        *looper = Some(handle);
        Ok(())
    }

    /// Stop the background loop (after its current step) and wait for it.
    fn stop_loop(&self, py: Python<'_>) {
        let handle = self.looper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            self.shared.stop.store(true, Ordering::Release);
            self.shared.wake.notify_all();
            // The thread needs the GIL for its last callback: wait without holding it.
            let _ = py.detach(|| h.join());
        }
    }
}
