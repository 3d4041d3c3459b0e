//! Tensors from `*.safetensors` (one file, or shards listed in `model.safetensors.index.json`),
//! memory-mapped and widened to f32 (from f32, bf16 or f16).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{HoraeError, Result};

/// The HF names of a Llama-family checkpoint's tensors: the one table every loader (the CPU and
/// the GPU runtime, tests that write checkpoints) reads them by.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub const INPUT_NORM: &str = "input_layernorm.weight";
    pub const POST_NORM: &str = "post_attention_layernorm.weight";
    pub const Q: &str = "self_attn.q_proj.weight";
    pub const K: &str = "self_attn.k_proj.weight";
    pub const V: &str = "self_attn.v_proj.weight";
    pub const O: &str = "self_attn.o_proj.weight";
    pub const Q_BIAS: &str = "self_attn.q_proj.bias";
    pub const K_BIAS: &str = "self_attn.k_proj.bias";
    pub const V_BIAS: &str = "self_attn.v_proj.bias";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";

    /// Layer `i`'s tensor `part` (one of the per-layer names above).
    pub fn layer(i: usize, part: &str) -> String {
        format!("model.layers.{i}.{part}")
    }
}

pub struct Weights {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn model_err(m: impl Into<String>) -> HoraeError {
    HoraeError::Model(m.into())
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(model_err(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display())));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| model_err(format!("{}: {e}", index.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| model_err(format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| model_err(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

impl Weights {
    pub fn load(dir: &Path) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in shard_files(dir)? {
            let file = File::open(&path).map_err(|e| model_err(format!("{}: {e}", path.display())))?;
            // SAFETY: the file is opened read-only and not modified while mapped.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| model_err(format!("{}: {e}", path.display())))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| model_err(format!("{} is not a valid safetensors file: {e}", path.display())))?;
            for (name, view) in st.tensors() {
                let bytes = view.data();
                let data: Vec<f32> = match view.dtype() {
                    Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                    other => {
                        return Err(model_err(format!(
                            "{}: tensor {name} has unsupported dtype {other:?}",
                            path.display()
                        )))
                    }
                };
                tensors.insert(name, (view.shape().to_vec(), data));
            }
        }
        Ok(Self { tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Remove a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (got, data) = self.tensors.remove(name).ok_or_else(|| model_err(format!("missing tensor {name}")))?;
        if got != shape {
            return Err(model_err(format!("tensor {name} has shape {got:?}, expected {shape:?}")));
        }
        Ok(data)
    }
}
