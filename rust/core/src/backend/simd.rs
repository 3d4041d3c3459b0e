//! Small AVX2 + FMA building blocks shared by the CPU kernels. Callers check for the features at
//! run time (no `-march=native`), so these are only called from `avx2,fma` code.
#![cfg(target_arch = "x86_64")]

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
