//! Speculative decoding's proposers and verifier. A proposer guesses up to k next tokens per
//! decoding sequence (n-gram prompt lookup, or a small draft model); one target forward pass scores
//! them inside the normal flattened batch; rejection sampling keeps the target's output
//! distribution exactly. SmartSpec's controller, which picks k for each step (k = 0 turns
//! speculation off when the batch is big enough that verifying costs more than it saves), sits with
//! the scheduler that owns it (`sched::smartspec`).

pub mod draft;
pub mod ngram;
pub mod verify;

pub use draft::DraftModel;
pub use verify::{check_draft, Verdict};
