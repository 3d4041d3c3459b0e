//! The CUDA backend: kernels from `kernels/*.cu` compiled at run time by NVRTC and launched with
//! cudarc, GEMMs through cuBLAS. Everything is loaded dynamically, so the crate builds and the
//! wheel installs and runs on machines without CUDA; `device::probe` says why a GPU cannot be used.
//! The model that runs on these kernels is `model::cuda_llama`.

pub mod compile;
pub mod device;
pub mod ops;
pub mod sampler;
