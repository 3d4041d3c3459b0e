//! Operations a model needs. `cpu` is the reference backend (and the CPU runtime); CUDA kernels
//! will be checked against it.

pub mod attention;
pub mod cpu;
pub mod cuda;
pub mod gemm;
pub mod prefill_attention;
