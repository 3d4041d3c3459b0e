//! What `horae bench` and the model checks call: the scheduler's, queue's and router's costs,
//! the CPU kernels (which run, their GEMM and attention rates, the read bandwidth) and a model's
//! teacher-forced logits outside the engine.

use std::path::PathBuf;

use horae_core::backend::gemm::{self, Products, WeightDtype};
use horae_core::backend::isa::Isa;
use horae_core::bench::admission::admission_benchmark;
use horae_core::bench::queue::queue_benchmark;
use horae_core::bench::route::route_benchmark;
use horae_core::engine::builder::parse_cpu_dtype;
use horae_core::model::LlamaModel;
use horae_core::HoraeError;
use numpy::PyArrayMethods;
use pyo3::prelude::*;

use crate::{to_py, HoraeCoreError};

/// Microseconds per Past-Future admission decision at `running` requests, and the naive baseline.
#[pyfunction]
#[pyo3(signature = (running, iters = 2000, seed = 0))]
fn bench_admission(py: Python<'_>, running: usize, iters: usize, seed: u64) -> (f64, f64, f64) {
    let t = py.detach(|| admission_benchmark(running, iters, seed));
    (t.first_decision_us, t.next_decision_us, t.naive_decision_us)
}

/// `horae bench queue`: engine microseconds per step with FCFS and with the SLO queue, and the
/// modelled step's, at `running` running and `waiting` waiting requests.
#[pyfunction]
fn bench_queue(py: Python<'_>, running: usize, waiting: usize, steps: usize) -> PyResult<(f64, f64, f64)> {
    if running == 0 {
        return Err(HoraeCoreError::new_err("bench_queue needs at least one running request"));
    }
    let t = py.detach(|| queue_benchmark(running, waiting, steps));
    Ok((t.fcfs_us, t.slo_us, t.step_us))
}

/// `horae bench route`: microseconds per routing decision for each router.
#[pyfunction]
fn bench_route(
    py: Python<'_>,
    replicas: usize,
    cached_blocks: usize,
    prompt_blocks: usize,
    iters: usize,
) -> PyResult<Vec<(String, f64)>> {
    if replicas == 0 {
        return Err(HoraeCoreError::new_err("bench_route needs at least one replica"));
    }
    Ok(py
        .detach(|| route_benchmark(replicas, cached_blocks, prompt_blocks, iters))
        .into_iter()
        .map(|(k, us)| (k.as_str().to_string(), us))
        .collect())
}

/// Teacher-forced logits of a token sequence (`len x vocab`), outside the engine: for checks
/// against a reference and for users who want raw logits.
#[pyfunction]
#[pyo3(signature = (model_dir, token_ids, dtype = "auto"))]
fn model_logits<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    token_ids: Vec<u32>,
    dtype: &str,
) -> PyResult<Bound<'py, numpy::PyArray2<f32>>> {
    if token_ids.is_empty() {
        return Err(HoraeCoreError::new_err("token_ids is empty"));
    }
    let dtype = parse_dtype(dtype)?;
    let (logits, vocab) = py
        .detach(|| {
            let model = LlamaModel::load(&model_dir, dtype)?;
            Ok::<_, HoraeError>((model.logits(&token_ids)?, model.cfg.vocab_size))
        })
        .map_err(to_py)?;
    let rows = logits.len() / vocab;
    numpy::PyArray1::from_vec(py, logits).reshape([rows, vocab])
}

/// Linear-layer GFLOP/s on a model-shaped stack of layers at `m` rows: (faer f32 or None,
/// packed), the packed kernel the one named by `kernel` (see `cpu_kernels`) or the engine's.
#[pyfunction]
#[pyo3(signature = (shapes, layers, m, dtype = "float32", iters = 3, kernel = None))]
fn bench_linear(
    py: Python<'_>,
    shapes: Vec<(usize, usize)>,
    layers: usize,
    m: usize,
    dtype: &str,
    iters: usize,
    kernel: Option<&str>,
) -> PyResult<(Option<f64>, f64)> {
    let dtype = parse_dtype(dtype)?.unwrap_or(WeightDtype::F32);
    if shapes.is_empty() || layers == 0 || m == 0 {
        return Err(HoraeCoreError::new_err("bench_linear needs at least one shape, one layer and one row"));
    }
    if let (WeightDtype::Quant(q), Some(&(_, k))) =
        (dtype, shapes.iter().find(|(_, k)| !k.is_multiple_of(32) || *k == 0))
    {
        return Err(HoraeCoreError::new_err(format!("{} needs inputs in blocks of 32; a shape has {k}", q.name())));
    }
    // "amx": bf16 weights with a bf16 model's products on AMX bf16 tiles, or GGML blocks on AMX
    // int8 tiles, from AMX_MIN_ROWS rows; "avx512 bf16": bf16 weights with a bf16 model's products
    // through vdpbf16ps (at any row count), where AMX does not run.
    let amx = kernel == Some("amx");
    let dot = kernel == Some("avx512 bf16");
    if dot && !(dtype == WeightDtype::Bf16 && gemm::bf16_dot_runs()) {
        return Err(HoraeCoreError::new_err(
            "kernel \"avx512 bf16\" runs bfloat16 weights, where the CPU has AVX-512 BF16 and AMX does not run",
        ));
    }
    let tiles_run = match dtype {
        WeightDtype::Bf16 => gemm::amx_runs(),
        WeightDtype::Quant(_) => gemm::amx_int8_runs(),
        WeightDtype::F32 => false,
    };
    if amx && !tiles_run {
        return Err(HoraeCoreError::new_err(
            "kernel \"amx\" runs bfloat16 weights (bf16 tiles) and q8_0 or q4_1 weights (int8 tiles), where the CPU runs them",
        ));
    }
    let isa = match kernel {
        None => None,
        Some(_) if amx || dot => None,
        Some(name) => Some(Isa::available().into_iter().find(|i| i.name() == name).ok_or_else(|| {
            let mut names: Vec<_> = Isa::available().iter().map(|i| i.name()).collect();
            names.extend(gemm::amx_runs().then_some("amx"));
            HoraeCoreError::new_err(format!("kernel {name:?} does not run on this CPU; it runs: {}", names.join(", ")))
        })?),
    };
    let products = if amx || dot { Products::Bf16 } else { Products::F32 };
    Ok(py.detach(|| horae_core::bench::gemm::compare_with_faer(&shapes, layers, m, dtype, iters, isa, products)))
}

/// One layer's prefill attention over a `tokens`-token prompt, in seconds: (the row kernel,
/// [(kernel name, the tiled kernel)] for every kernel the CPU runs).
#[pyfunction]
#[pyo3(signature = (tokens, num_heads, num_kv_heads, head_dim, iters = 2))]
fn bench_attention(
    py: Python<'_>,
    tokens: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    iters: usize,
) -> PyResult<(f64, Vec<(&'static str, f64)>)> {
    if tokens == 0
        || num_kv_heads == 0
        || !num_heads.is_multiple_of(num_kv_heads)
        || !head_dim.is_multiple_of(16)
        || head_dim == 0
    {
        return Err(HoraeCoreError::new_err(
            "bench_attention needs tokens > 0, num_heads a multiple of num_kv_heads and head_dim a multiple of 16",
        ));
    }
    Ok(py.detach(|| {
        horae_core::bench::attention::compare_prefill_attention(tokens, num_heads, num_kv_heads, head_dim, iters)
    }))
}

/// The machine's memory read bandwidth in GB/s: every thread reading a `mib`-MiB buffer, best
/// of `iters` passes (many: on a shared machine single passes vary by a third).
#[pyfunction]
#[pyo3(signature = (mib = 1024, iters = 10))]
fn bench_read_bandwidth(py: Python<'_>, mib: usize, iters: usize) -> f64 {
    py.detach(|| horae_core::bench::memory::read_bandwidth_gbs(mib << 20, iters))
}

/// The CPU kernels: `{"selected": name, "available": [names], "amx_min_rows": rows or None,
/// "amx_int8_min_rows": rows or None, "avx512_bf16_min_rows": rows or None}` (names: "portable",
/// "avx2", "avx512"). `selected` is the vector kernel the engine runs: the best available, capped
/// by `HORAE_CPU_KERNEL` where set. Where AMX tiles run (and no cap is set), a bf16 model's linear
/// layers go through bf16 tiles from `amx_min_rows` rows, and a q8_0 or q4_1 model's through int8
/// tiles from `amx_int8_min_rows` (`bench_linear` names both kernels "amx"); elsewhere, where the
/// engine runs AVX-512 on a CPU with AVX-512 BF16, a bf16 model's go through `vdpbf16ps` from
/// `avx512_bf16_min_rows` (1: every product; "avx512 bf16").
#[pyfunction]
fn cpu_kernels(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("selected", Isa::detect().name())?;
    d.set_item("available", Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>())?;
    d.set_item("amx_min_rows", gemm::amx_runs().then_some(gemm::AMX_MIN_ROWS))?;
    d.set_item("amx_int8_min_rows", gemm::amx_int8_runs().then_some(gemm::AMX_MIN_ROWS))?;
    d.set_item("avx512_bf16_min_rows", gemm::bf16_dot_runs().then_some(1))?;
    Ok(d)
}

/// "auto" (the checkpoint's own), "float32" or "bfloat16".
fn parse_dtype(s: &str) -> PyResult<Option<WeightDtype>> {
    parse_cpu_dtype(s).map_err(to_py)
}

/// GFLOP/s of a plain f32 GEMM (`m x k` times `(n x k)^T`), best of `iters`.
#[pyfunction]
#[pyo3(signature = (m, n, k, iters = 20))]
fn bench_gemm(py: Python<'_>, m: usize, n: usize, k: usize, iters: usize) -> f64 {
    py.detach(|| horae_core::bench::gemm::measure_gemm_gflops(m, n, k, iters))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(model_logits, m)?)?;
    m.add_function(wrap_pyfunction!(bench_gemm, m)?)?;
    m.add_function(wrap_pyfunction!(bench_linear, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(bench_attention, m)?)?;
    m.add_function(wrap_pyfunction!(bench_read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(bench_admission, m)?)?;
    m.add_function(wrap_pyfunction!(bench_queue, m)?)?;
    m.add_function(wrap_pyfunction!(bench_route, m)?)?;
    Ok(())
}
