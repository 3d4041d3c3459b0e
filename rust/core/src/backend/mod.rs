//! Operations a model needs. `cpu` is the reference backend (and the CPU runtime); CUDA kernels
//! will be checked against it.

mod amx;
pub mod attention;
mod bf16_dot;
pub mod cpu;
pub mod cuda;
pub mod gemm;
pub(crate) mod huge;
mod muladd;
pub mod prefill_attention;
pub mod quant;
