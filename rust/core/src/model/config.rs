//! `config.json` of an HF Llama-family model folder.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::backend::gemm::WeightDtype;
use crate::error::{HoraeError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3 (with llama3 rope scaling) and SmolLM2.
    Llama,
    /// Qwen2: bias on the q, k and v projections.
    Qwen2,
    Mistral,
}

/// Llama 3's frequency-dependent rope scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub qkv_bias: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The checkpoint's `torch_dtype` (`dtype` in transformers >= 5), e.g. "bfloat16".
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers >= 5 writes the rope settings (theta included) here instead.
    rope_parameters: Option<Value>,
    vocab_size: usize,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| HoraeError::Model(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| match e {
            HoraeError::Model(m) => HoraeError::Model(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| HoraeError::Model(format!("bad config.json: {e}")))?;
        // `architectures` names the class; configs written without it still carry `model_type`.
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first())
            .cloned()
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            other => {
                return Err(HoraeError::Model(format!(
                    "unsupported architecture '{other}' (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"
                )))
            }
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        if raw.num_attention_heads == 0 || num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(HoraeError::Model(format!(
                "{} attention heads cannot be grouped over {num_kv_heads} KV heads",
                raw.num_attention_heads
            )));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(HoraeError::Model(format!("head_dim must be even and positive, got {head_dim}")));
        }
        let rope_params = raw.rope_scaling.clone().filter(|v| !v.is_null()).or_else(|| raw.rope_parameters.clone());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|v| v.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10_000.0);
        // Either out of range runs, and writes nonsense (NaN angles or norms) without a word.
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(HoraeError::Model(format!("rope_theta must be a positive number, got {rope_theta}")));
        }
        if let Some(eps) = raw.rms_norm_eps.filter(|e| !(e.is_finite() && *e >= 0.0)) {
            return Err(HoraeError::Model(format!("rms_norm_eps must be a number >= 0, got {eps}")));
        }
        let rope_scaling = match &rope_params {
            None | Some(Value::Null) => None,
            Some(v) => {
                let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("");
                let f = |k: &str| v.get(k).and_then(Value::as_f64);
                match kind {
                    "llama3" => Some(Llama3Scaling {
                        factor: f("factor").unwrap_or(8.0),
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings").unwrap_or(8192.0),
                    }),
                    "default" | "" => None,
                    other => return Err(HoraeError::Model(format!("unsupported rope_scaling type '{other}'"))),
                }
            }
        };
        Ok(Self {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            qkv_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
            eos_token_ids: ids(&raw.eos_token_id),
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// Rotary inverse frequencies, with llama3 scaling applied when configured (as HF does).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d);
                let Some(s) = self.rope_scaling else { return f };
                let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }

    /// How weights are kept when the caller says "auto": a 16-bit checkpoint stays 16-bit (as
    /// bf16, the CPU's 16-bit float), anything else is f32.
    pub fn default_dtype(&self) -> WeightDtype {
        match self.torch_dtype.as_deref() {
            Some("bfloat16") | Some("float16") | Some("half") => WeightDtype::Bf16,
            _ => WeightDtype::F32,
        }
    }
}
