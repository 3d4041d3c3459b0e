//! `tokenizer.json` through the `tokenizers` crate, plus incremental detokenization that never
//! emits half of a UTF-8 character.

use std::path::Path;

use crate::error::{HoraeError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| HoraeError::Model(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
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

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Streams text out of a growing list of token ids (vLLM's approach): decode a short window that
/// ends at the newest token, compare with the same window without it, and emit only the new
/// suffix, holding back anything that ends in an incomplete character (U+FFFD).
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// Start of the window of tokens that gives context to the new ones.
    prefix_offset: usize,
    /// Tokens before this index have been emitted as text.
    read_offset: usize,
    pub text: String,
}

impl IncrementalDetokenizer {
    /// Start after the prompt, so that the first output token gets the prompt's last tokens as
    /// context (a leading space decodes right).
    pub fn new(prompt: &[u32]) -> Self {
        let read = prompt.len();
        Self { prefix_offset: read.saturating_sub(5), read_offset: read, text: String::new() }
    }

    /// `all` is prompt + output tokens so far. Returns the newly complete text.
    pub fn step(&mut self, tok: &Tokenizer, all: &[u32]) -> Result<String> {
        let prefix = tok.decode(&all[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&all[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = all.len();
            self.text.push_str(&new);
            return Ok(new);
        }
        Ok(String::new())
    }
}
