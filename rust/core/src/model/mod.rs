//! Llama-family models from HF folders (`config.json` + safetensors), and the executor that runs
//! them behind the engine.

pub mod config;
pub mod llama;
pub mod runner;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use llama::{KvCache, LlamaModel};
pub use runner::{ModelExecutor, Proposer};
pub use tokenizer::{IncrementalDetokenizer, Tokenizer};
