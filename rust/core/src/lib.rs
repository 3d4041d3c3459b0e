//! horae's engine core: paged KV block manager, schedulers (Past-Future and baselines), the engine
//! step loop behind an `Executor` seam, the model runtimes, and a simulator that drives the same
//! loop on traces. No Python here; `horae-python` only converts types.
//!
//! Layers, lowest first; a module imports only from layers below its own (docs/architecture.md):
//! 1. `error`, then `names` (enums chosen by name), then `stepcost`, `sample`, `kv`, `tokenizer`,
//!    then `grammar` (structured output's token masks, over the tokenizer's vocabulary)
//! 2. `request` (one request's whole state, its checks and its stop rules), `route` (which
//!    replica a request goes to)
//! 3. `plan` (the step plan and the `Executor` seam)
//! 4. `sched` (admission policies, the scheduling loop, SmartSpec's controller), `backend` (kernels)
//! 5. `model` (Llama on the CPU and on a GPU)
//! 6. `spec` (draft proposers and verification)
//! 7. `runner` (`ModelExecutor`: a model behind the `Executor` seam)
//! 8. `engine` (the step loop and per-step outputs; for a real model, its builder and the handle
//!    front ends hold: request inbox, step thread, figures)
//! 9. `sim` (the simulator)

pub mod backend;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv;
pub mod model;
pub mod names;
pub mod plan;
pub mod request;
pub mod route;
pub mod runner;
pub mod sample;
pub mod sched;
pub mod sim;
pub mod spec;
pub mod stepcost;
pub mod tokenizer;

#[cfg(feature = "bench")]
pub mod bench;

pub use error::{HoraeError, Result};
