//! Benchmarks behind `horae bench ...`, compiled only with the `bench` feature (the Python
//! extension enables it): none of this is on the engine's path.

pub mod admission;
pub mod attention;
pub mod cuda;
pub mod gemm;
pub mod memory;
pub mod queue;
pub mod route;
