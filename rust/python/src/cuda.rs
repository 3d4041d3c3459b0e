//! The CUDA backend's Python surface: kernel compilation (what CI checks without a GPU), device
//! resolution, and the GPU benchmarks behind `python -m horae.gpu_check`.

use horae_core::backend::cuda::device::Gpu;
use horae_core::bench::cuda as bench;
use horae_core::model::ModelConfig;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{to_py, HoraeCoreError};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_kernel_files, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_ptx, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_kernel_source, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_device, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_bench_decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_bench_model, m)?)?;
    Ok(())
}

/// The CUDA kernel files compiled into the core (kernels/*.cu), in build order.
#[pyfunction]
fn cuda_kernel_files() -> Vec<&'static str> {
    horae_core::backend::cuda::compile::KERNEL_FILES.iter().map(|(n, _)| *n).collect()
}

/// PTX of one kernel file for compute capability `arch` (80, 90, ...), compiled by NVRTC
/// exactly as the GPU backend compiles it. Needs libnvrtc, not a GPU.
#[pyfunction]
fn cuda_compile_ptx(py: Python<'_>, file: &str, arch: u32) -> PyResult<String> {
    use horae_core::backend::cuda::compile::{compile, Output};
    match py.detach(|| compile(file, arch, false)).map_err(to_py)? {
        Output::Ptx(p) => Ok(p),
        Output::Cubin(_) => unreachable!("asked for PTX"),
    }
}

/// The full source NVRTC compiles for one kernel file (common.cuh pasted in).
#[pyfunction]
fn cuda_kernel_source(file: &str) -> PyResult<String> {
    horae_core::backend::cuda::compile::source(file).map_err(to_py)
}

/// Where `device` ("auto", "cpu", "cuda", "cuda:N") would run, and why not on a GPU when
/// "auto" falls back to the CPU: `(device, reason or None)`. Probing never fails hard.
#[pyfunction]
#[pyo3(signature = (device = "auto"))]
fn resolve_device(device: &str) -> PyResult<(String, Option<String>)> {
    use horae_core::backend::cuda::device::{check_device, resolve, Device, DeviceRequest};
    let req: DeviceRequest = device.parse().map_err(to_py)?;
    let (d, why) = resolve(req);
    if let Device::Cuda(n) = d {
        check_device(n).map_err(to_py)?;
    }
    Ok((d.to_string(), why))
}

/// Name, compute capability, free and total memory of GPU `ordinal` (opens it: compiles or
/// loads the kernels).
#[pyfunction]
#[pyo3(signature = (ordinal = 0))]
fn cuda_device_info<'py>(py: Python<'py>, ordinal: usize) -> PyResult<Bound<'py, PyDict>> {
    let gpu = py.detach(|| Gpu::open(ordinal)).map_err(to_py)?;
    let (free, total) = gpu.memory().map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("name", gpu.name.clone())?;
    d.set_item("compute_capability", gpu.arch)?;
    d.set_item("free_bytes", free)?;
    d.set_item("total_bytes", total)?;
    Ok(d)
}

/// Paged decode attention (bf16) against a device-to-device copy measured in the same run.
#[pyfunction]
#[pyo3(signature = (batch = 64, ctx = 4096, heads = 32, kv_heads = 8, head_dim = 128, block_size = 16, ordinal = 0))]
#[allow(clippy::too_many_arguments)]
fn cuda_bench_decode_attention<'py>(
    py: Python<'py>,
    batch: usize,
    ctx: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    ordinal: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let r = py
        .detach(|| {
            Gpu::open(ordinal)
                .and_then(|g| bench::decode_attention(&g, batch, ctx, heads, kv_heads, head_dim, block_size))
        })
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("ms", r.ms)?;
    d.set_item("kv_bytes", r.kv_bytes)?;
    d.set_item("gbps", r.gbps)?;
    d.set_item("copy_gbps", r.copy_gbps)?;
    Ok(d)
}

/// Decode (per batch size, every sequence at context `ctx`) and prefill throughput of a
/// random-weight bf16 model with the shapes of `config_json` (a config.json's text).
#[pyfunction]
#[pyo3(signature = (config_json, batches, ctx = 1024, prefill_tokens = 2048, ordinal = 0))]
fn cuda_bench_model<'py>(
    py: Python<'py>,
    config_json: &str,
    batches: Vec<usize>,
    ctx: usize,
    prefill_tokens: usize,
    ordinal: usize,
) -> PyResult<Bound<'py, PyDict>> {
    if batches.is_empty() || prefill_tokens == 0 {
        return Err(HoraeCoreError::new_err("batches and prefill_tokens must not be empty"));
    }
    let cfg = ModelConfig::from_json(config_json).map_err(to_py)?;
    let r = py
        .detach(|| Gpu::open(ordinal).and_then(|g| bench::model_throughput(g, cfg, &batches, ctx, prefill_tokens)))
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("gpu", r.gpu)?;
    d.set_item("params", r.params)?;
    d.set_item("weight_bytes", r.weight_bytes)?;
    d.set_item("copy_gbps", r.copy_gbps)?;
    d.set_item("decode", r.decode)?;
    d.set_item("prefill", r.prefill)?;
    Ok(d)
}
