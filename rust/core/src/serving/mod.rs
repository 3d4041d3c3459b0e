//! Serving the real engine: one builder that loads a model and its engine from options
//! (`builder`), one set of request rules (`validate`), and the handle that front ends talk to: an
//! inbox so adding or aborting a request never waits for a running step, the step loop on its
//! own thread, the engine's figures and its step log (`handle`). Python, a Rust server or a test
//! reach the same code.

pub mod builder;
pub mod handle;
pub mod validate;

pub use builder::{build, EngineArgs, EngineInfo, SpecArgs, SpecMethod};
pub use handle::{EngineHandle, EngineStats, StepEvents};
pub use validate::{RequestLimits, RequestParams};
