//! CPU ops on row-major f32 buffers: norms, RoPE, activations. GEMMs are `gemm.rs`, paged
//! attention `attention.rs`.

use rayon::prelude::*;

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
