//! Structured output: what a request's text must match (`Constraint`: a JSON schema, any JSON
//! object, a regular expression, one of a list of strings, or a Lark grammar, vLLM's
//! `StructuredOutputsParams`), compiled against the model's vocabulary by llguidance (vLLM's
//! "guidance" backend, llama.cpp's too) into a `Grammar` that a request carries. Each step
//! that samples for the request reads the `Grammar`'s mask of the tokens that keep the text
//! inside the language; each token drawn moves it on.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

use crate::error::{HoraeError, Result};
use crate::tokenizer::Tokenizer;

/// What a request's output must match (one of vLLM's `StructuredOutputsParams` fields).
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON value valid under this JSON schema (its text).
    Json(String),
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text in this Lark grammar's language (llguidance's Lark dialect).
    Grammar(String),
}

/// How JSON output is laid out, unless a schema says otherwise (llguidance's `x-guidance`
/// key): on one line, as Python's `json.dumps` writes it. Any whitespace anywhere (llguidance's
/// default) let a small model write newlines until `max_tokens`, never closing the value.
fn json_layout() -> serde_json::Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// The field every refusal names (vLLM's request field).
const FIELD: &str = "structured_outputs";

fn refused(message: String) -> HoraeError {
    HoraeError::BadRequest { param: Some(FIELD), message }
}

impl Constraint {
    /// From a kind and its text, as the binding passes them: `json` (a schema's JSON text),
    /// `json_object` (no text), `regex`, `choice` (a JSON list of strings) or `grammar` (Lark).
    pub fn parse(kind: &str, text: &str) -> Result<Self> {
        let c = match kind {
            "json" => Self::Json(text.to_string()),
            "json_object" => Self::JsonObject,
            "regex" => Self::Regex(text.to_string()),
            "choice" => Self::Choice(
                serde_json::from_str(text)
                    .map_err(|e| refused(format!("structured_outputs: choice must be a list of strings ({e})")))?,
            ),
            "grammar" => Self::Grammar(text.to_string()),
            other => {
                return Err(refused(format!(
                "structured_outputs: unknown kind {other:?}; choose one of json, json_object, regex, choice, grammar"
            )))
            }
        };
        Ok(c)
    }

    /// The grammar llguidance compiles.
    fn top_level(&self) -> Result<TopLevelGrammar> {
        let empty = |what: &str| refused(format!("structured_outputs: {what} must not be empty"));
        Ok(match self {
            Self::Json(schema) => {
                let v: serde_json::Value = serde_json::from_str(schema)
                    .map_err(|e| refused(format!("structured_outputs: json is not a JSON schema ({e})")))?;
                let serde_json::Value::Object(mut schema) = v else {
                    return Err(refused("structured_outputs: json must be a JSON schema (an object)".into()));
                };
                schema.entry("x-guidance").or_insert_with(json_layout);
                TopLevelGrammar::from_json_schema(schema.into())
            }
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object", "x-guidance": json_layout()}))
            }
            Self::Regex(rx) if rx.is_empty() => return Err(empty("regex")),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(c) if c.is_empty() || c.iter().any(|s| s.is_empty()) => {
                return Err(empty("choice (and each of its strings)"))
            }
            Self::Choice(c) => {
                // Lark's string literals are JSON strings, so any choice is written exactly.
                let alts: Vec<String> =
                    c.iter().map(|s| serde_json::to_string(s).expect("a string serializes")).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Self::Grammar(g) if g.trim().is_empty() => return Err(empty("grammar")),
            Self::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// A request's place in its language: the mask of tokens it may draw next, moved on by each
/// token it draws.
pub struct Grammar {
    matcher: Matcher,
    /// Kept here: a matcher that failed no longer answers for its vocabulary.
    eos: u32,
    vocab_size: usize,
    /// Each token's text, for `after`.
    vocab: TokEnv,
    /// The text after which the language starts (a reasoning model's end of thinking, as
    /// vLLM's structured output waits for its reasoning parser); empty once written, or from
    /// the start. Until then the output is free: no masks, nothing consumed, not done. Text,
    /// not tokens: a tag that is not one token is tokenized with what comes before it.
    after: Vec<u8>,
    /// The output's last bytes while `after` is awaited (fewer than its length).
    tail: Vec<u8>,
}

impl Grammar {
    /// This grammar, starting only once the output has written `tag`; the language starts
    /// with the token after the one that completes it.
    pub fn starting_after(mut self, tag: &str) -> Self {
        self.after = tag.as_bytes().to_vec();
        self
    }

    /// `tail` moved on by `token`'s text; true where the awaited tag is then complete.
    fn sees_tag(&self, tail: &mut Vec<u8>, token: u32) -> bool {
        tail.extend_from_slice(&self.vocab.tok_trie().decode(&[token]));
        if tail.windows(self.after.len()).any(|w| w == self.after.as_slice()) {
            return true;
        }
        let keep = self.after.len() - 1;
        tail.drain(..tail.len().saturating_sub(keep));
        false
    }

    /// Where in `draft` the awaited tag would be complete (the index of the token completing it).
    fn tag_ends_in(&self, draft: &[u32]) -> Option<usize> {
        let mut tail = self.tail.clone();
        draft.iter().position(|&t| self.sees_tag(&mut tail, t))
    }

    /// The tokens that keep the output inside the language (bit `t % 32` of word `t / 32`);
    /// once the language allows nothing more, only end-of-sequence. An internal failure of the
    /// matcher (it has a step budget) also leaves only end-of-sequence, so the request ends
    /// rather than runs on unchecked.
    pub fn mask(&mut self) -> Vec<u32> {
        self.matcher.compute_mask_or_eos().map(|m| m.as_slice().to_vec()).unwrap_or_else(|_| {
            let mut m = vec![0u32; self.vocab_size.div_ceil(32)];
            m[self.eos as usize / 32] |= 1 << (self.eos % 32);
            m
        })
    }

    /// How many of `draft` (a proposer's guesses at the next tokens) stay in the language, in
    /// order, before any end-of-sequence: the drafts worth verifying. The grammar does not move.
    pub fn valid_drafts(&mut self, draft: &[u32]) -> usize {
        if !self.after.is_empty() {
            // Free text until the tag; the draft that would end it is drawn as the step's last
            // token instead, so no row of this step needs the language's masks.
            return self.tag_ends_in(draft).unwrap_or(draft.len());
        }
        let upto = draft.iter().position(|&t| t == self.eos).unwrap_or(draft.len());
        self.matcher.validate_tokens(&draft[..upto]).unwrap_or(0)
    }

    /// The masks of a step that verifies `draft` (taken by `valid_drafts`): the next token's,
    /// then the one after each draft, for the row that verifies the next draft or draws past
    /// them all. The grammar is moved through the drafts and back.
    pub fn masks_through(&mut self, draft: &[u32]) -> Vec<Vec<u32>> {
        if !self.after.is_empty() {
            return Vec::new(); // free text until the tag (no draft ends it: `valid_drafts`)
        }
        let mut masks = Vec::with_capacity(draft.len() + 1);
        masks.push(self.mask());
        for &t in draft {
            // A draft it refused (never, after `valid_drafts`) fails the matcher: the masks
            // from there allow only end-of-sequence, and the request ends.
            let _ = self.matcher.consume_token(t);
            masks.push(self.mask());
        }
        let _ = self.matcher.rollback(draft.len());
        masks
    }

    /// Move on by a drawn token: end-of-sequence where the language may end stops it; a token
    /// outside its mask (drawn only where other rules, such as `allowed_token_ids`, left the
    /// mask's tokens no chance) fails it, which counts as done, so what follows is only
    /// end-of-sequence.
    pub fn accept(&mut self, token: u32) {
        if self.after.is_empty() {
            let _ = self.matcher.consume_token(token);
            return;
        }
        let mut tail = std::mem::take(&mut self.tail);
        if self.sees_tag(&mut tail, token) {
            self.after.clear(); // the language starts with the next token
        } else {
            self.tail = tail;
        }
    }

    /// Whether the output is complete: the language allows nothing more (or the matcher
    /// stopped), so the request ends here.
    pub fn is_done(&self) -> bool {
        self.after.is_empty() && self.matcher.is_stopped()
    }
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos,
            vocab_size: self.vocab_size,
            vocab: self.vocab.clone(),
            after: self.after.clone(),
            tail: self.tail.clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_done() { "Grammar(done)" } else { "Grammar" })
    }
}

/// The vocabulary as llguidance reads it: each token's bytes, and our tokenizer for the
/// strings a grammar forces.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The model's own tokens for `s` where they spell it exactly; else the trie's greedy
    /// tokens (bytes that are not whole UTF-8, or a tokenizer that maps what it does not know
    /// to an unknown token).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode(text, false).ok())
            .filter(|ids| self.trie.decode_raw(ids) == s)
            .unwrap_or_else(|| self.trie.greedy_tokenize(s))
    }
}

/// Compiles a `Constraint` for one model's vocabulary. The vocabulary's trie is built at the
/// first compile (a tenth of a second for 49,152 tokens), so engines never asked for structured
/// output never pay for it.
pub struct Compiler {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos: u32,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl Compiler {
    /// For a model with this tokenizer, whose logits have `vocab_size` rows and whose
    /// end-of-sequence is `eos`.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: u32) -> Self {
        Self { tokenizer, vocab_size, eos, factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        let f = self.factory.get_or_init(|| {
            let mut words = self.tokenizer.vocab_bytes()?.to_vec();
            // Rows of the logits past the tokenizer's ids (padding) are never allowed.
            words.resize(self.vocab_size.max(words.len()), Vec::new());
            let info = TokRxInfo::new(words.len() as u32, self.eos);
            let trie = TokTrie::from(&info, &words);
            let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: self.tokenizer.clone() });
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        // The caller's 400: the request is well formed, this model cannot serve it.
        f.as_ref().map_err(|e| refused(format!("structured_outputs: not available for this model: {e}")))
    }

    /// Build the vocabulary's trie now rather than at the first compile (a server does it before
    /// it listens, so the first structured request does not hold up the others); the error says
    /// why this model cannot have structured output.
    pub fn prepare(&self) -> Result<()> {
        self.factory().map(|_| ())
    }

    /// A fresh `Grammar` for `c`, or a refusal naming `structured_outputs` with llguidance's
    /// reason (a schema it cannot compile, a regex or Lark syntax error).
    pub fn compile(&self, c: &Constraint) -> Result<Grammar> {
        let grammar = c.top_level()?;
        let factory = self.factory()?;
        // A grammar is the caller's text: a panic compiling it is the caller's 400, not the
        // server's 500 (llguidance guards its own steps the same way).
        let parser =
            llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| factory.create_parser(grammar)))
                .map_err(|e| refused(format!("structured_outputs: cannot compile it: {e}")))?;
        Ok(Grammar {
            matcher: Matcher::new(Ok(parser)),
            eos: self.eos,
            vocab_size: self.vocab_size,
            vocab: factory.tok_env().clone(),
            after: Vec::new(),
            tail: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_bad_ones_name_the_field() {
        assert_eq!(
            Constraint::parse("choice", r#"["yes","no"]"#).unwrap(),
            Constraint::Choice(vec!["yes".into(), "no".into()])
        );
        assert_eq!(Constraint::parse("json_object", "").unwrap(), Constraint::JsonObject);
        for (kind, text) in [("xml", ""), ("choice", "yes")] {
            let e = Constraint::parse(kind, text).unwrap_err();
            assert!(matches!(e, HoraeError::BadRequest { param: Some(FIELD), .. }), "{e}");
        }
        for c in [
            Constraint::Choice(vec![]),
            Constraint::Choice(vec!["a".into(), String::new()]),
            Constraint::Regex(String::new()),
            Constraint::Grammar(" ".into()),
            Constraint::Json("[1, 2]".into()),
            Constraint::Json("{not json".into()),
        ] {
            assert!(c.top_level().is_err(), "{c:?}");
        }
    }
}
