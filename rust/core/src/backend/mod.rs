//! Operations a model needs. `cpu` is the reference backend (and the CPU runtime); CUDA kernels
//! will be checked against it.

mod amx;
mod amx_int8;
pub mod attention;
pub(crate) mod bf16;
mod bf16_dot;
pub mod cpu;
pub mod cuda;
pub mod gemm;
pub(crate) mod huge;
pub mod isa;
pub mod kv_cache;
mod muladd;
pub mod prefill_attention;
pub mod quant;
pub(crate) mod team;

/// Test support for the kernels' checks: the larger of a running maximum error and a new error,
/// NaN counting as infinite (`f32::max` drops NaN, so an output left NaN, or made NaN by an
/// overflow, would pass).
#[cfg(test)]
pub(crate) fn worst(m: f32, e: f32) -> f32 {
    if m.is_nan() || e.is_nan() {
        f32::INFINITY
    } else {
        m.max(e)
    }
}
