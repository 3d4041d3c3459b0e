//! horae's engine core: paged KV block manager, schedulers (Past-Future and baselines), the engine
//! step loop behind an `Executor` seam, and a simulator that drives the same loop on traces.
//! No Python here; `horae-python` wraps it.

pub mod backend;
pub mod engine;
pub mod error;
pub mod kv;
pub mod model;
pub mod sample;
pub mod sched;
pub mod sim;
pub mod spec;

pub use error::{HoraeError, Result};
