//! `tokenizer.json` through the `tokenizers` crate, plus incremental detokenization that never
//! emits half of a UTF-8 character, and each token's own bytes (llguidance's reading of the same
//! file), which structured output's trie and logprobs' `bytes` read.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{HoraeError, Result};

/// What llguidance's reading of `tokenizer.json` puts before a special token's text.
const SPECIAL_TOKEN_MARKER: u8 = llguidance::toktrie::TokTrie::SPECIAL_TOKEN_MARKER;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Every token's bytes, read at the first use (structured output's trie, logprobs' `bytes`).
    vocab_bytes: OnceLock<std::result::Result<Vec<Vec<u8>>, String>>,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| HoraeError::Model(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner, path, vocab_bytes: OnceLock::new() })
    }

    /// Every token's bytes by id, as llguidance reads `tokenizer.json` (byte-level BPE or
    /// byte fallback), a special token's text after `SPECIAL_TOKEN_MARKER`. A token holding part
    /// of a character is its bytes here, where its decoded text is a replacement character.
    pub fn vocab_bytes(&self) -> std::result::Result<&[Vec<u8>], String> {
        let read = self.vocab_bytes.get_or_init(|| {
            let text =
                std::fs::read_to_string(&self.path).map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            // llguidance asserts on vocabularies it does not expect: a reason, not a panic.
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
                .map_err(|_| "llguidance cannot read this vocabulary".to_string())?
                .map_err(|e| e.to_string())
        });
        read.as_ref().map(|v| v.as_slice()).map_err(|e| e.clone())
    }

    /// A token's own bytes (OpenAI's logprob `bytes`: joined over a text's tokens, they are its
    /// UTF-8), a special token's its text's; its decoded text's where the vocabulary cannot be
    /// read as bytes.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        match self.vocab_bytes().ok().and_then(|v| v.get(id as usize)).filter(|b| !b.is_empty()) {
            Some(bytes) => Ok(match bytes.split_first() {
                Some((&SPECIAL_TOKEN_MARKER, text)) if !text.is_empty() => text.to_vec(),
                _ => bytes.clone(),
            }),
            None => Ok(self.decode(&[id], false)?.into_bytes()),
        }
    }

    /// Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are parsed.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| HoraeError::InvalidConfig(format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| HoraeError::InvalidConfig(format!("cannot detokenize: {e}")))
    }
}

/// Token ids as a caller gave them, refused outside the vocabulary (`0..vocab`).
pub fn checked_ids(ids: &[i64], vocab: usize) -> Result<Vec<u32>> {
    let vocab = vocab as i64;
    match ids.iter().find(|&&t| t < 0 || t >= vocab) {
        Some(bad) => Err(HoraeError::BadRequest {
            param: Some("tokens"),
            message: format!("token id {bad} is outside the vocabulary (0..{vocab})"),
        }),
        None => Ok(ids.iter().map(|&t| t as u32).collect()),
    }
}

/// Streams text out of a growing list of output tokens (vLLM's approach): decode a short window
/// that ends at the newest token, compare with the same window without it, and emit only the new
/// suffix, holding back anything that ends in an incomplete character (U+FFFD). Only the window is
/// decoded, so a step costs the same however long the sequence is.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// The prompt's last few tokens: context for the first output tokens (a leading space decodes
    /// right). Positions below index into `context ++ output`.
    context: Vec<u32>,
    /// Start of the window of tokens that gives context to the new ones.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
    /// Special tokens' text is left out (vLLM's `skip_special_tokens`).
    skip_special_tokens: bool,
    pub text: String,
}

impl IncrementalDetokenizer {
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let context = prompt[prompt.len().saturating_sub(5)..].to_vec();
        let read_offset = context.len();
        Self { context, prefix_offset: 0, read_offset, skip_special_tokens, text: String::new() }
    }

    fn window(&self, output: &[u32], from: usize, to: usize) -> Vec<u32> {
        let c = self.context.len();
        (from..to).map(|i| if i < c { self.context[i] } else { output[i - c] }).collect()
    }

    /// `output` is every output token so far. Returns the newly complete text.
    pub fn step(&mut self, tok: &Tokenizer, output: &[u32]) -> Result<String> {
        let end = self.context.len() + output.len();
        let skip = self.skip_special_tokens;
        let prefix = tok.decode(&self.window(output, self.prefix_offset, self.read_offset), skip)?;
        let full = tok.decode(&self.window(output, self.prefix_offset, end), skip)?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = end;
            self.text.push_str(&new);
            return Ok(new);
        }
        Ok(String::new())
    }
}
