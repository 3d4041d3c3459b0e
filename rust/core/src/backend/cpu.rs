//! CPU ops on row-major f32 buffers: norms, RoPE, activations. GEMMs are `gemm/`, paged
//! attention `attention/`.

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
        return unsafe { avx2::silu_mul(gate, up, out) };
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

/// Small AVX2 + FMA building blocks shared by the CPU kernels (here and in `attention/simd.rs`).
/// Callers check for the features at run time (no `-march=native`), so these are only called
/// from `avx2,fma` code.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {

    use std::arch::x86_64::*;

    /// Sum of the eight lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA: callers check with `is_x86_feature_detected!` first.
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `exp(x)` for eight lanes (Cephes' `expf`: 2^n times a degree-6 polynomial on
    /// |r| <= ln2/2; about 2 ulp). Inputs are clamped to [-87.3, 88.3]: below, the result stays at about 1e-38,
    /// which is nothing next to a softmax's largest term, 1.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA: callers check with `is_x86_feature_detected!` first.
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // r = x - n ln2, with ln2 split in two so the subtraction stays exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n))
    }

    /// `silu(gate) * up` element-wise, eight at a time (`exp` through `exp8`), the tail in scalar code.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA: callers check with `is_x86_feature_detected!` first.
    #[target_feature(enable = "avx2,fma")]
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let body = n / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n <= each slice's length.
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
            }
        }
        for i in body..n {
            out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[cfg(target_arch = "x86_64")]
        #[test]
        fn exp8_is_accurate_over_the_softmax_range() {
            use std::arch::x86_64::*;
            if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
                return;
            }
            let mut worst = 0.0f64;
            for i in 0..40_000 {
                let x = -100.0 + i as f32 * 0.0025; // -100 ..= 0
                let mut out = [0.0f32; 8];
                // SAFETY: AVX2 and FMA checked above; `out` holds eight values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_set1_ps(x))) };
                let want = (x as f64).exp();
                let rel = if want < 1e-37 { out[0] as f64 } else { (out[0] as f64 - want).abs() / want };
                worst = worst.max(rel);
            }
            assert!(worst < 1e-6, "worst relative error {worst}");
        }

        #[test]
        fn silu_mul_matches_scalar() {
            if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
                return;
            }
            let gate: Vec<f32> = (0..37).map(|i| i as f32 * 0.7 - 12.0).collect();
            let up: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
            let mut out = vec![0.0; 37];
            // SAFETY: AVX2 and FMA checked above.
            unsafe { silu_mul(&gate, &up, &mut out) };
            for i in 0..37 {
                let want = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
                assert!((out[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "{i}: {} vs {want}", out[i]);
            }
        }
    }
}
