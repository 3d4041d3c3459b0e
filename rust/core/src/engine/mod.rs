//! The engine: requests in, steps run, stop conditions checked, one output per request per step,
//! on any `Executor` and any `Clock` (`engine.rs`); the handle front ends serve it through, its
//! step loop on a thread of its own (`handle.rs`); the builder that loads a real model's engine from options (`builder.rs`); and
//! Past-Future's length history on disk (`history_file.rs`).

pub mod builder;
#[allow(clippy::module_inception)]
mod engine;
mod handle;
pub mod history_file;

pub use builder::{build, EngineArgs, EngineInfo, SpecArgs, SpecMethod};
pub use engine::{Clock, Engine, RequestOutput, ServerRules, StepResult, StepSample, VirtualClock, WallClock};
pub use handle::{EngineHandle, EngineStats, StepEvents};
pub use history_file::HistoryFile;
