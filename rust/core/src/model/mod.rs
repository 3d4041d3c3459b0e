//! Llama-family models from HF folders (`config.json` + safetensors): the CPU runtime (`llama`)
//! and the GPU one (`cuda_llama`), loading weights by the names in `weights::names`.

pub mod config;
pub mod cuda_llama;
pub mod llama;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{KvCache, LlamaModel};
