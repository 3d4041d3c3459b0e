//! One error type for the whole core. The Python bindings turn each variant into an exception whose
//! message names the problem, so nothing here may panic on bad input.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum HoraeError {
    /// A configuration that can never work (block size 0, a pool smaller than one block, ...).
    #[error("invalid config: {0}")]
    InvalidConfig(String),

    /// A request that is malformed or can never be served with this configuration.
    #[error("invalid request {id}: {reason}")]
    InvalidRequest { id: u64, reason: String },

    /// A request refused before it was queued: the field at fault (`param`, OpenAI's name for it)
    /// and a message that names it and the bound.
    #[error("{message}")]
    BadRequest { param: Option<&'static str>, message: String },

    #[error("unknown request id {0}")]
    UnknownRequest(u64),

    #[error("duplicate request id {0}")]
    DuplicateRequest(u64),

    /// A trace file that cannot be read or parsed; `line` is 1-based where known.
    #[error("trace {path}: {}{reason}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Trace { path: String, line: Option<usize>, reason: String },

    /// The KV pool has no free block; callers normally prevent this by asking `can_allocate` first.
    #[error("out of KV blocks")]
    OutOfBlocks,

    /// The scheduler planned nothing although requests are queued: a bug, reported, never a hang.
    #[error("scheduler stalled: {0}")]
    Stalled(String),

    /// A model folder that cannot be loaded: missing or corrupt files, unsupported architecture,
    /// a tensor of the wrong shape.
    #[error("model: {0}")]
    Model(String),

    #[error("executor failed: {0}")]
    Executor(String),

    /// A step panicked (a bug), on the loop's thread or the caller's: the engine's state is not to
    /// be trusted, so nothing more runs on it (the loop, if any, has ended). A server reports itself unhealthy, to be
    /// restarted.
    #[error("the engine died (a step panicked: {0}); restart it")]
    EngineDied(String),

    /// The CUDA backend cannot start or a GPU step failed: no GPU, a driver or NVRTC missing or
    /// too old, out of GPU memory, a kernel error. The message says what to change.
    #[error("cuda: {0}")]
    Cuda(String),

    /// A file the engine writes (its length history) could not be written.
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, HoraeError>;
