//! The engine: requests in, steps run, stop conditions checked, one output per request per step.

mod clock;
#[allow(clippy::module_inception)]
mod engine;
mod stop;

pub use clock::{Clock, VirtualClock, WallClock};
pub use engine::{Engine, RequestOutput, StepResult, StepSample};
pub use stop::{check_stop, find_stop_string};
