//! GEMM benchmarks: the machine's plain f32 GEMM rate through faer, and faer against the packed
//! kernel of `backend::gemm` on model-shaped layers (how that kernel was chosen).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::backend::gemm::{PackedLinear, Products, WeightDtype};
use crate::backend::isa::Isa;
use crate::backend::team;

/// `out[m x n] = x[m x k] * w[n x k]^T` (a linear layer with weights stored as HF does).
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(out.len(), m * n);
    let a = MatRef::from_row_major_slice(x, m, k);
    let b = MatRef::from_row_major_slice(w, n, k).transpose();
    let c = MatMut::from_row_major_slice_mut(out, m, n);
    let par = if m * n * k >= 1 << 16 { Par::rayon(0) } else { Par::Seq };
    matmul(c, Accum::Replace, a, b, 1.0f32, par);
}

/// The machine's GEMM rate through `linear`, in GFLOP/s: the best of `iters` runs of an
/// `m x k` by `(n x k)^T` product. Benchmarks report model throughput as a ratio to this.
pub fn measure_gemm_gflops(m: usize, n: usize, k: usize, iters: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.01).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.01).collect();
    let mut out = vec![0.0; m * n];
    linear(&x, m, k, &w, n, &mut out); // warm-up
    let best = (0..iters.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            linear(&x, m, k, &w, n, &mut out);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    std::hint::black_box(&out);
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// GFLOP/s of a model-shaped stack of linear layers at `m` rows: `shapes` (`(n, k)` per layer)
/// repeated `layers` times with distinct weights, so weights come from memory as in a real step.
/// Returns (faer on row-major weights, packed with `dtype` through the `isa` kernel, or the one
/// the engine picks); faer is `None` for bf16, which it cannot take. Best of `iters` passes.
/// `Products::Bf16` runs `forward_products` as a bf16 model does: bf16 weights on AMX bf16 tiles
/// and GGML blocks on AMX int8 tiles, from `AMX_MIN_ROWS` rows where they run.
/// This is how the packed kernel was chosen (docs/benchmarks.md).
pub fn compare_with_faer(
    shapes: &[(usize, usize)],
    layers: usize,
    m: usize,
    dtype: WeightDtype,
    iters: usize,
    isa: Option<Isa>,
    products: Products,
) -> (Option<f64>, f64) {
    let isa = isa.unwrap_or_else(Isa::detect);
    let dims: Vec<(usize, usize)> = (0..layers).flat_map(|_| shapes.iter().copied()).collect();
    let weights: Vec<Vec<f32>> = dims
        .iter()
        .enumerate()
        .map(|(l, &(n, k))| (0..n * k).map(|i| ((i + l) % 13) as f32 * 0.01 - 0.06).collect())
        .collect();
    let xs: Vec<Vec<f32>> = dims.iter().map(|&(_, k)| (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect()).collect();
    let mut outs: Vec<Vec<f32>> = dims.iter().map(|&(n, _)| vec![0.0; m * n]).collect();
    let flops: f64 = dims.iter().map(|&(n, k)| 2.0 * (m * n * k) as f64).sum();
    // Timed as the engine's forward pass runs them (`LlamaModel::forward`): horae's kernels inside
    // a step (`team::step`: on one of rayon's workers, the other threads awake and taking the
    // parts of each product), faer on a worker, as its own library runs. Called from another
    // thread, each product's parallel region waits for a wake-up (bf16 at one row on one thread:
    // 21-23 GB/s from there, 29-31 from a worker). Inside a step or on a worker outside one, the
    // model's shapes time alike within this machine's noise (Zen 4, 1-512 rows); inside one is
    // what decode and prefill run.
    let mut time = |in_step: bool, f: &mut (dyn FnMut(usize, &mut [f32]) + Send)| {
        let outs = &mut outs;
        let mut passes = move || {
            (0..iters.max(1) + 1)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for (i, out) in outs.iter_mut().enumerate() {
                        f(i, out);
                    }
                    t.elapsed().as_secs_f64()
                })
                .skip(1) // warm-up
                .fold(f64::INFINITY, f64::min)
        };
        rayon::scope(move |_| if in_step { team::step(passes) } else { passes() })
    };
    let faer = (dtype == WeightDtype::F32).then(|| {
        let best = time(false, &mut |i, out| linear(&xs[i], m, dims[i].1, &weights[i], dims[i].0, out));
        flops / best / 1e9
    });
    let packed: Vec<PackedLinear> =
        weights.iter().zip(&dims).map(|(w, &(n, k))| PackedLinear::new_for(w, n, k, dtype, isa)).collect();
    drop(weights);
    let best = match products {
        Products::F32 => time(true, &mut |i, out| packed[i].forward_with(&xs[i], m, out, isa)),
        Products::Bf16 => time(true, &mut |i, out| packed[i].forward_products(&xs[i], m, out, products)),
    };
    (faer, flops / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_naive() {
        let (m, k, n) = (3, 5, 4);
        let x: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 - 7.0) * 0.05).collect();
        let mut out = vec![0.0; m * n];
        linear(&x, m, k, &w, n, &mut out);
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((out[i * n + j] - e).abs() < 1e-5);
            }
        }
    }
}
