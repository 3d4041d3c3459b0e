//! CPU ops on row-major f32 buffers. GEMMs go through faer (multi-threaded, runtime SIMD
//! dispatch, so no `-march=native` is needed). Paged attention lives in `attention.rs`.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

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

pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// RMSNorm of each row of `x` into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    let norm = |(row, o): (&[f32], &mut [f32])| {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    };
    if x.len() >= PAR_ELEMENTS {
        x.par_chunks_exact(d).zip(out.par_chunks_exact_mut(d)).for_each(norm);
    } else {
        x.chunks_exact(d).zip(out.chunks_exact_mut(d)).for_each(norm);
    }
}

/// Element-wise work on at least this many values is split over the cores: run on one thread
/// while the other waits, it was a sixth of a 32-sequence decode step's wall time.
const PAR_ELEMENTS: usize = 8192;

/// Cosines and sines of every (position, frequency) pair of a batch, computed once per step and
/// shared by all layers: `[tokens, head_dim / 2]` each.
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    pub fn new(positions: &[usize], inv_freq: &[f64]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half }
    }
}

/// Rotary embedding in the rotate-half (GPT-NeoX / HF Llama) layout, in place, for rows of
/// `heads * head_dim` values.
pub fn rope(x: &mut [f32], table: &RopeTable, heads: usize, head_dim: usize) {
    let half = table.half;
    debug_assert_eq!(head_dim, 2 * half);
    for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (cos, sin) = (&table.cos[r * half..(r + 1) * half], &table.sin[r * half..(r + 1) * half]);
        for h in row.chunks_exact_mut(head_dim) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// `out = silu(gate) * up`, with `gate_up` holding gate in the first half of each row.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { super::simd::silu_mul(gate, up, out) };
    }
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `silu_mul` on each row of `gate_up` (`[rows, 2 * inter]`: gate then up) into `out`
/// (`[rows, inter]`), rows in parallel when there are enough values.
pub fn silu_mul_rows(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    let row = |(gu, o): (&[f32], &mut [f32])| {
        let (gate, up) = gu.split_at(inter);
        silu_mul(gate, up, o);
    };
    if out.len() >= PAR_ELEMENTS {
        gate_up.par_chunks_exact(2 * inter).zip(out.par_chunks_exact_mut(inter)).for_each(row);
    } else {
        gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)).for_each(row);
    }
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
