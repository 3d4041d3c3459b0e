//! The simulator: the real scheduler, block manager and step loop, with a cost-model executor and
//! a virtual clock, driven by real request traces.

pub mod cluster;
pub mod cost_model;
pub mod executor;
pub mod report;
pub mod runner;
pub mod trace;
pub mod workload;

pub use cluster::{simulate_cluster, ClusterConfig, ClusterResult, ReplicaReport};
pub use cost_model::{CostModel, HardwareSpec, ModelSpec, StepFeatures};
pub use executor::{Acceptance, SimExecutor};
pub use report::{Percentiles, RequestRecord, Summary};
pub use runner::{simulate, LoadModel, SimConfig, SimResult};
pub use trace::{load_trace, Trace, TraceFormat, TraceRequest};
pub use workload::{assign_arrivals, scale_rate, synthetic, LengthDist};
