//! Speculative decoding. A proposer guesses up to k next tokens per decoding sequence (n-gram
//! prompt lookup or a small draft model, in the executor); one target forward pass scores them
//! inside the normal flattened batch; rejection sampling keeps the target's output distribution
//! exactly; and SmartSpec's controller picks k for each step to maximise expected tokens per
//! second (k = 0 turns speculation off when the batch is big enough that verifying costs more
//! than it saves).
//!
//! The scheduler owns the controller and reserves KV slots for the drafts, so it never learns
//! whether a model or the simulator proposes and verifies them.

pub mod control;
pub mod draft;
pub mod ngram;
pub mod verify;

pub use control::{Judged, SpecConfig, SpecController, SpecStats, MAX_SPEC_TOKENS};
pub use draft::DraftModel;
pub use verify::{check_draft, Verdict};
