//! The engine: requests in, steps run, tokens and finished requests out.

mod clock;
#[allow(clippy::module_inception)]
mod engine;
mod executor;
mod request;

pub use clock::{Clock, VirtualClock, WallClock};
pub use engine::{Engine, StepSample, StepResult};
pub use executor::{ExecOutput, Executor};
pub use request::{FinishReason, Prompt, ReqId, Request, RequestSpec, RequestState, RequestTimes};
