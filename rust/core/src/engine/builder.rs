//! From options to a running engine: resolve the device, load the model (CPU or GPU) and a draft
//! model, size the KV pool, build the scheduler and the engine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::history_file::{HistoryFile, Loaded};
use super::{Engine, EngineHandle, ServerRules, WallClock};
use crate::backend::cuda::device::{resolve as resolve_device, Device, DeviceRequest, Gpu};
use crate::backend::cuda::ops::Dt;
use crate::backend::gemm::WeightDtype;
use crate::backend::kv_cache::KvDtype;
use crate::error::{HoraeError, Result};
use crate::grammar::Compiler;
use crate::model::cuda_llama::{CudaLlama, KvBudget};
use crate::model::{LlamaModel, ModelConfig};
use crate::plan::Executor;
use crate::request::{RequestLimits, Slo};
use crate::runner::{ModelExecutor, Proposer};
use crate::sched::{PolicyKind, Prior, QueueDiscipline, Scheduler, SchedulerConfig, SpecConfig};
use crate::spec::DraftModel;
use crate::tokenizer::Tokenizer;

/// KV pool of a CPU engine when `kv_cache_tokens` is not given.
pub const DEFAULT_CPU_KV_TOKENS: usize = 16384;

/// Where speculative drafts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SpecMethod {
    /// Prompt lookup with n-grams of `min_n ..= max_n` tokens.
    Ngram { min_n: usize, max_n: usize },
    /// A draft model: `model` (default: the target's own folder), its first `num_layers`.
    Draft { model: Option<PathBuf>, num_layers: Option<usize> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpecArgs {
    pub cfg: SpecConfig,
    pub method: SpecMethod,
}

/// Everything that configures a served engine (the names of vLLM's engine arguments).
#[derive(Debug, Clone)]
pub struct EngineArgs {
    pub model_dir: PathBuf,
    pub policy: PolicyKind,
    /// `None`: 16,384 tokens on the CPU; on a GPU what fits in `gpu_memory_utilization`.
    pub kv_cache_tokens: Option<usize>,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    /// `Some`: every unseeded request draws from a stream derived from it (a reproducible run);
    /// `None`: fresh entropy.
    pub seed: Option<u64>,
    /// "auto", "float32", "bfloat16" (CPU) or "auto", "bfloat16", "float16" (GPU).
    pub dtype: String,
    /// What the KV cache holds (vLLM's `kv_cache_dtype`): "auto" (the model's: bf16 for a bf16
    /// model, else f32 on the CPU; the weights' 16-bit type on a GPU), "float32" or "bfloat16"
    /// (CPU).
    pub kv_cache_dtype: String,
    pub history_window: usize,
    /// `None`: the model's context.
    pub max_output_bound: Option<usize>,
    /// Past-Future's prior: what its history samples from until requests finish (up to
    /// `max_output_bound`), and how many entries of it (`None`: the default weight).
    pub history_prior: Prior,
    pub history_prior_weight: Option<usize>,
    /// Where Past-Future's history is loaded from at start and saved to as requests finish and
    /// when the engine stops: a restarted server starts warm.
    pub history_file: Option<PathBuf>,
    pub speculative: Option<SpecArgs>,
    /// "auto", "cpu", "cuda" or "cuda:N".
    pub device: String,
    pub gpu_memory_utilization: f64,
    /// A context limit below the model's (prompt + max_tokens); `None`: the model's.
    pub max_model_len: Option<usize>,
    /// The most tokens of one prompt prefilled in a step (see `SchedulerConfig`).
    pub long_prefill_token_threshold: Option<usize>,
    /// Long prefills that may advance in one step (see `SchedulerConfig`).
    pub max_long_partial_prefills: usize,
    /// The server's rules: a queue deadline and a gap abort (off by default).
    pub rules: ServerRules,
    /// Queue discipline and the SLO a request's own bounds are filled from (see `SchedulerConfig`).
    pub queue: QueueDiscipline,
    pub default_slo: Slo,
    /// Prompt blocks reused across requests (vLLM's `enable_prefix_caching`, on by default);
    /// off, every prompt is computed whole, as a baseline for what the cache saves.
    pub prefix_caching: bool,
}

impl EngineArgs {
    pub fn new(model_dir: PathBuf) -> Self {
        Self {
            model_dir,
            policy: PolicyKind::PastFuture,
            kv_cache_tokens: None,
            block_size: 16,
            max_num_seqs: 64,
            max_batched_tokens: 2048,
            seed: None,
            dtype: "auto".into(),
            kv_cache_dtype: "auto".into(),
            history_window: 1000,
            max_output_bound: None,
            history_prior: Prior::default(),
            history_prior_weight: None,
            history_file: None,
            speculative: None,
            device: "auto".into(),
            gpu_memory_utilization: 0.9,
            max_model_len: None,
            long_prefill_token_threshold: None,
            max_long_partial_prefills: 1,
            rules: ServerRules::default(),
            queue: QueueDiscipline::Fcfs,
            default_slo: Slo::default(),
            prefix_caching: true,
        }
    }
}

/// What a built engine is, for front ends to report.
pub struct EngineInfo {
    pub model_dir: PathBuf,
    pub config: ModelConfig,
    /// "cpu" or "cuda:N (name)".
    pub device: String,
    /// With device "auto" on the CPU: why no GPU was used.
    pub cpu_fallback_reason: Option<String>,
    /// How the weights are held: "float32", "bfloat16", "q8_0", "q4_1" or "float16".
    pub dtype: &'static str,
    /// What the KV cache holds: "float32", "bfloat16" or (GPU) "float16".
    pub kv_cache_dtype: &'static str,
    /// On the CPU: bytes of weights a decode step streams (`LlamaModel::decode_weight_bytes`).
    pub decode_weight_bytes: Option<usize>,
    pub eos_token_ids: Vec<u32>,
    pub kv_cache_tokens: usize,
    /// With a history file: what loading it found (warm, or cold and why).
    pub history: Option<Loaded>,
    pub limits: RequestLimits,
    pub tokenizer: Arc<Tokenizer>,
    /// The CPU model for teacher-forced logits: the engine's own on the CPU; on a GPU, loaded on
    /// first use (a checking tool: the engine's KV cache is not disturbed).
    cpu_model: OnceLock<Arc<LlamaModel>>,
}

impl EngineInfo {
    /// Token ids as a caller gave them, refused outside the vocabulary.
    pub fn token_ids(&self, ids: &[i64]) -> Result<Vec<u32>> {
        crate::tokenizer::checked_ids(ids, self.config.vocab_size)
    }

    /// The text of token ids.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(&self.token_ids(ids)?, skip_special_tokens)
    }

    /// Teacher-forced logits (`ids.len() x vocab`, row-major) of a token sequence, outside the
    /// engine's batch.
    pub fn logits(&self, ids: &[i64]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(HoraeError::BadRequest { param: Some("tokens"), message: "token_ids is empty".into() });
        }
        if ids.len() > self.config.max_position_embeddings {
            let message = format!(
                "{} token ids are more than the model's context ({})",
                ids.len(),
                self.config.max_position_embeddings
            );
            return Err(HoraeError::BadRequest { param: Some("tokens"), message });
        }
        let ids = self.token_ids(ids)?;
        let model = match self.cpu_model.get() {
            Some(m) => m.clone(),
            None => {
                let m = Arc::new(LlamaModel::load(&self.model_dir, None)?);
                self.cpu_model.get_or_init(|| m).clone()
            }
        };
        model.logits(&ids)
    }
}

/// "auto" (the checkpoint's own), "float32", "bfloat16", "q8_0" or "q4_1" for the CPU runtime.
pub fn parse_cpu_dtype(s: &str) -> Result<Option<WeightDtype>> {
    if s == "auto" {
        return Ok(None);
    }
    WeightDtype::parse(s).map(Some).ok_or_else(|| {
        let hint = if s == "float16" || s == "half" {
            " (float16 runs on a GPU, device='cuda'; the CPU backend keeps 16-bit weights as bfloat16)"
        } else {
            ""
        };
        HoraeError::InvalidConfig(format!(
            "unknown dtype '{s}': use 'auto', 'float32', 'bfloat16', 'q8_0' or 'q4_1'{hint}"
        ))
    })
}

/// "auto" (the model's), "float32" or "bfloat16" for the CPU's KV cache. On a GPU (`gpu`: its
/// weights' type) the cache holds the weights' 16-bit type: "auto", or that type named.
fn parse_kv_dtype(s: &str, gpu: Option<Dt>) -> Result<Option<KvDtype>> {
    let dtype = match s {
        "auto" => return Ok(None),
        "float32" | "fp32" => KvDtype::F32,
        "bfloat16" | "bf16" => KvDtype::Bf16,
        _ => {
            return Err(HoraeError::InvalidConfig(format!(
                "unknown kv_cache_dtype '{s}': use 'auto' (the model's), 'float32' or 'bfloat16'"
            )))
        }
    };
    match gpu {
        None => Ok(Some(dtype)),
        Some(Dt::Bf16) if dtype == KvDtype::Bf16 => Ok(None),
        Some(dt) => Err(HoraeError::InvalidConfig(format!(
            "kv_cache_dtype '{s}' on the GPU: its KV cache holds the weights' {}; use 'auto' (or device='cpu')",
            if dt == Dt::Bf16 { "bfloat16" } else { "float16" }
        ))),
    }
}

/// The GPU runs 16-bit weights: "auto" is bfloat16 (every supported GPU has it).
fn parse_gpu_dtype(s: &str) -> Result<Dt> {
    match s {
        "auto" | "bfloat16" | "bf16" => Ok(Dt::Bf16),
        "float16" | "f16" | "half" => Ok(Dt::F16),
        _ => Err(HoraeError::InvalidConfig(format!(
            "dtype '{s}' on the GPU: the CUDA backend runs 'bfloat16' or 'float16' (use device='cpu' for float32, q8_0 or q4_1)"
        ))),
    }
}

/// Load the model and start an engine for `args` (the step loop is not started).
pub fn build(args: EngineArgs) -> Result<(EngineHandle, EngineInfo)> {
    args.rules.validate()?; // before any weight is loaded
    let request: DeviceRequest = args.device.parse()?;
    let g = args.gpu_memory_utilization;
    if !(g > 0.0 && g <= 1.0) {
        return Err(HoraeError::InvalidConfig(format!("gpu_memory_utilization must be in (0, 1], got {g}")));
    }
    if args.policy == PolicyKind::Oracle {
        return Err(HoraeError::InvalidConfig(
            "the oracle scheduler needs true output lengths and runs only in the simulator".into(),
        ));
    }
    let (device, cpu_fallback_reason) = resolve_device(request);
    let gpu_dtype = match device {
        Device::Cuda(_) => Some(parse_gpu_dtype(&args.dtype)?),
        Device::Cpu => None,
    };
    let dtype = if gpu_dtype.is_some() { None } else { parse_cpu_dtype(&args.dtype)? };
    let kv_dtype = parse_kv_dtype(&args.kv_cache_dtype, gpu_dtype)?;
    if matches!(device, Device::Cuda(_))
        && matches!(args.speculative.as_ref().map(|s| &s.method), Some(SpecMethod::Draft { .. }))
    {
        // The draft model runs on the CPU with a KV cache as large as the target's pool, which on
        // a GPU is millions of tokens.
        return Err(HoraeError::InvalidConfig(
            "speculative decoding with a draft model runs on the CPU backend only; on a GPU use {\"method\": \"ngram\"} or device='cpu'".into(),
        ));
    }
    let config = ModelConfig::from_dir(&args.model_dir)?;
    let max_model_len = match args.max_model_len {
        Some(m) if !(2..=config.max_position_embeddings).contains(&m) => {
            return Err(HoraeError::InvalidConfig(format!(
                "max_model_len must be between 2 and the model's context ({}), got {m}",
                config.max_position_embeddings
            )))
        }
        m => m.unwrap_or(config.max_position_embeddings),
    };
    let mut cfg = SchedulerConfig {
        policy: args.policy,
        // The GPU pool size is known once the weights are loaded (set below).
        kv_cache_tokens: args.kv_cache_tokens.unwrap_or(DEFAULT_CPU_KV_TOKENS),
        block_size: args.block_size,
        max_num_seqs: args.max_num_seqs,
        max_batched_tokens: args.max_batched_tokens,
        long_prefill_token_threshold: args.long_prefill_token_threshold,
        max_long_partial_prefills: args.max_long_partial_prefills,
        queue: args.queue,
        default_slo: args.default_slo,
        prefix_caching: args.prefix_caching,
        history_window: args.history_window,
        // Past-Future primes its length history with this: by default the whole context.
        max_output_bound: args.max_output_bound.unwrap_or(config.max_position_embeddings),
        seed: args.seed.unwrap_or(0),
        spec: args.speculative.as_ref().map(|s| s.cfg.clone()),
        ..Default::default()
    };
    cfg.history_start.prior = args.history_prior.clone();
    cfg.history_start.prior_weight = args.history_prior_weight;
    let history_file =
        args.history_file.as_ref().map(|p| HistoryFile::new(p, model_identity(&args.model_dir, &config)));
    let history = history_file.as_ref().map(HistoryFile::load);
    if let Some(h) = &history {
        cfg.history_start.recorded = Arc::from(h.lengths.as_slice());
    }
    cfg.validate()?;
    let dir = &args.model_dir;
    let mut exec = match (device, gpu_dtype) {
        (Device::Cuda(ordinal), Some(dt)) => {
            let budget = args.kv_cache_tokens.map_or(KvBudget::MemoryFraction(g), KvBudget::Tokens);
            let model =
                CudaLlama::load(Gpu::open(ordinal)?, dir, dt, budget, args.block_size, args.max_batched_tokens)?;
            ModelExecutor::on_gpu(dir, model)
        }
        _ => ModelExecutor::load(dir, dtype, kv_dtype, cfg.kv_cache_tokens / args.block_size, args.block_size)?,
    };
    exec.set_seed(args.seed);
    let blocks = exec.num_blocks();
    match args.speculative.map(|s| (s.method, s.cfg.k_max)) {
        Some((SpecMethod::Ngram { min_n, max_n }, _)) => exec.set_proposer(Proposer::Ngram { min_n, max_n }),
        Some((SpecMethod::Draft { model, num_layers }, k_max)) => {
            let draft_dir = model.unwrap_or_else(|| dir.clone());
            let vocab = exec.cfg.vocab_size;
            let draft = DraftModel::load(
                &draft_dir,
                dtype,
                kv_dtype,
                num_layers,
                vocab,
                blocks,
                args.block_size,
                args.max_num_seqs,
                k_max,
            )?;
            exec.set_proposer(Proposer::Draft(Box::new(draft)));
        }
        None => {}
    }
    let tokenizer = Arc::new(Tokenizer::from_dir(dir)?);
    let eos_token_ids = exec.eos_token_ids();
    cfg.kv_cache_tokens = blocks * args.block_size;
    let cpu_model = OnceLock::new();
    if let Some(m) = exec.cpu_model() {
        let _ = cpu_model.set(m);
    }
    let (device_name, dtype_name, kv_dtype_name) = (exec.device(), exec.dtype_name(), exec.kv_dtype_name());
    let sched = Scheduler::new(cfg, None)?;
    let limits =
        RequestLimits { vocab_size: config.vocab_size, max_model_len, pool_tokens: sched.kv().capacity_tokens() };
    let kv_cache_tokens = limits.pool_tokens;
    let engine = Engine::new(sched, Box::new(exec), Box::new(WallClock::default()))
        .with_tokenizer(tokenizer.clone())
        .with_rules(args.rules)?;
    let info = EngineInfo {
        model_dir: args.model_dir,
        config,
        device: device_name,
        cpu_fallback_reason,
        dtype: dtype_name,
        kv_cache_dtype: kv_dtype_name,
        decode_weight_bytes: cpu_model.get().map(|m| m.decode_weight_bytes()),
        eos_token_ids,
        kv_cache_tokens,
        history,
        limits,
        tokenizer,
        cpu_model,
    };
    let mut handle = EngineHandle::new(engine, limits).with_history_file(history_file);
    // Structured output ends at end-of-sequence, so a model without one cannot have it.
    if let Some(&eos) = info.eos_token_ids.first() {
        handle = handle.with_grammars(Compiler::new(info.tokenizer.clone(), info.config.vocab_size, eos));
    }
    Ok((handle, info))
}

/// What a history file is checked against: the model folder's name and the shapes that make it
/// that model (a fine-tune with the same shapes under the same name counts as the same model).
fn model_identity(dir: &Path, c: &ModelConfig) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{name} (layers {}, hidden {}, vocab {})", c.num_layers, c.hidden_size, c.vocab_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU's cache holds its weights' type: naming that type is accepted (vLLM users name it),
    /// anything else is refused with the reason; on the CPU either dtype is taken.
    #[test]
    fn kv_cache_dtype_by_device() {
        assert_eq!(parse_kv_dtype("auto", None).unwrap(), None);
        assert_eq!(parse_kv_dtype("bfloat16", None).unwrap(), Some(KvDtype::Bf16));
        assert_eq!(parse_kv_dtype("float32", None).unwrap(), Some(KvDtype::F32));
        assert_eq!(parse_kv_dtype("bfloat16", Some(Dt::Bf16)).unwrap(), None);
        let refused = |s, gpu| parse_kv_dtype(s, gpu).unwrap_err().to_string();
        assert!(refused("float32", Some(Dt::Bf16)).contains("holds the weights' bfloat16; use 'auto'"));
        assert!(refused("bfloat16", Some(Dt::F16)).contains("holds the weights' float16; use 'auto'"));
        assert!(refused("fp8", None).contains("unknown kv_cache_dtype 'fp8'"));
    }
}
