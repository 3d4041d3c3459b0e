use super::{mm, softmax, Fused, Mm, Online};
use std::arch::x86_64::*;

/// # Safety
/// `mm`'s contract; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn mm_avx512(m: &Mm) {
    // 6 rows x 64 columns: 24 of the 32 vector registers.
    // SAFETY: passed on.
    unsafe { mm::<6, 64, Fused>(m) }
}

/// # Safety
/// `mm`'s contract; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn mm_avx2(m: &Mm) {
    // 6 rows x 16 columns: 12 of the 16 vector registers (the GEMM's AVX2 block).
    // SAFETY: passed on.
    unsafe { mm::<6, 16, Fused>(m) }
}

/// `softmax_step` in strips of 64 columns (then 16), as `softmax_pairs` runs: a strip's rows
/// stay in L1 from the max to the weights, where whole rows (S^T is 384 KiB with SmolLM2's
/// heads) came from L2 in each of three passes. The weights are `pow2_exact` (f32's own
/// precision, as the f32 products want).
///
/// # Safety
/// The CPU has AVX-512F; `cols` is a multiple of 16 and `st` holds whole rows of it.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_avx512(st: &mut [f32], cols: usize, online: &mut Online) {
    let o = &*online;
    assert!(cols.is_multiple_of(16) && st.len().is_multiple_of(cols));
    assert!(o.max.len() == cols && o.sum.len() == cols && o.alpha.len() == cols);
    let wide = cols / 64 * 64;
    for j in (0..wide).step_by(64) {
        // SAFETY: a strip inside the columns (asserted).
        unsafe { strip_f32::<4>(st, cols, j, online) }
    }
    for j in (wide..cols).step_by(16) {
        // SAFETY: as above.
        unsafe { strip_f32::<1>(st, cols, j, online) }
    }
}

/// `softmax_avx512` on columns `j..j + 16 W`.
///
/// # Safety
/// As `softmax_avx512`, with the strip inside the columns.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn strip_f32<const W: usize>(st: &mut [f32], cols: usize, j: usize, online: &mut Online) {
    let n = st.len() / cols;
    // SAFETY (every load and store): row c < n of `st` and the online state, 16 W values
    // from column j, are in bounds (the caller's checks).
    let load = |v: &[f32], at: usize| -> [__m512; W] {
        std::array::from_fn(|w| unsafe { _mm512_loadu_ps(v.as_ptr().add(at + 16 * w)) })
    };
    let old = load(&online.max, j);
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let store = |v: &mut [f32], x: [__m512; W]| {
        for (w, x) in x.into_iter().enumerate() {
            unsafe { _mm512_storeu_ps(v.as_mut_ptr().add(j + 16 * w), x) };
        }
    };
    // Lazy rescaling, as `strip` (the bf16 pairs') does. The weights are written over the
    // scores, so a score that passes the shift by more than 2^LAZY raises that column's
    // shift on the spot: the weights already written, the sum and alpha scale down by the
    // same power of two (exactly), which is rare once the running max has settled.
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    if (0..W).all(|w| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(old[w], neg_inf) == 0) {
        let mut shift: [__m512; W] = std::array::from_fn(|w| _mm512_mul_ps(old[w], log2e));
        let mut sum = load(&online.sum, j);
        let mut alpha = [_mm512_set1_ps(1.0); W];
        let limit = _mm512_set1_ps(LAZY);
        for c in 0..n {
            let x = load(st, c * cols + j);
            for w in 0..W {
                let mut t = _mm512_fmsub_ps(x[w], log2e, shift[w]);
                let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, limit);
                if over != 0 {
                    // Those lanes' shift rises by a whole number near this score's t
                    // (so that `vscalefps`, which takes the floor of its power, scales the
                    // weights already written exactly; t ends within 0.5 of 0 there).
                    let rise = _mm512_maskz_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(over, t);
                    let down = _mm512_sub_ps(_mm512_setzero_ps(), rise);
                    for r in 0..c {
                        let at = r * cols + j + 16 * w;
                        unsafe {
                            let v = _mm512_loadu_ps(st.as_ptr().add(at));
                            _mm512_storeu_ps(st.as_mut_ptr().add(at), _mm512_scalef_ps(v, down));
                        }
                    }
                    sum[w] = _mm512_scalef_ps(sum[w], down);
                    alpha[w] = _mm512_scalef_ps(alpha[w], down);
                    shift[w] = _mm512_add_ps(shift[w], rise);
                    t = _mm512_sub_ps(t, rise);
                }
                let p = pow2_exact(t);
                sum[w] = _mm512_add_ps(sum[w], p);
                unsafe { _mm512_storeu_ps(st.as_mut_ptr().add(c * cols + j + 16 * w), p) };
            }
        }
        let inv_log2e = _mm512_set1_ps(std::f32::consts::LN_2);
        store(&mut online.max, std::array::from_fn(|w| _mm512_mul_ps(shift[w], inv_log2e)));
        store(&mut online.sum, sum);
        store(&mut online.alpha, alpha);
        return;
    }
    // SAFETY: as above.
    let Settled { max, shift, alpha, mut sum } = unsafe { settle::<W>(st, n, cols, j, online, |t| pow2_exact(t)) };
    let weights =
        |x: [__m512; W]| -> [__m512; W] { std::array::from_fn(|w| pow2_exact(_mm512_fmsub_ps(x[w], log2e, shift[w]))) };
    for c in 0..n {
        let p = weights(load(st, c * cols + j));
        for (w, p) in p.into_iter().enumerate() {
            sum[w] = _mm512_add_ps(sum[w], p);
            unsafe { _mm512_storeu_ps(st.as_mut_ptr().add(c * cols + j + 16 * w), p) };
        }
    }
    store(&mut online.max, max);
    store(&mut online.sum, sum);
    store(&mut online.alpha, alpha);
}

/// The weights of rows `0..n` of a strip (`weights` of their scores), added into `sum` and
/// written to P^T's pairs: rows 2c and 2c + 1 in one conversion (`even` in the low 16
/// words), then interleaved; an odd last row is paired with zeros. `SPLIT` writes each
/// pair's lo part (`Kernel::AmxSplit`) `lo_at` rows after its hi one.
///
/// # Safety
/// As `softmax_pairs`, with the strip inside the columns.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn weigh_pairs<const W: usize, const SPLIT: bool>(
    st: &[f32],
    n: usize,
    cols: usize,
    j: usize,
    pt2: &mut [u32],
    lo_at: usize,
    sum: &mut [__m512; W],
    mut weights: impl FnMut([__m512; W]) -> [__m512; W],
) {
    // SAFETY: rows c < n of the strip are inside `st` (the caller's contract).
    let load = |at: usize| -> [__m512; W] {
        std::array::from_fn(|w| unsafe { _mm512_loadu_ps(st.as_ptr().add(at + 16 * w)) })
    };
    // Word 2i of a pair vector is word i of `both`, word 2i + 1 is word 16 + i.
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    for c in (0..n).step_by(2) {
        let even = weights(load(c * cols + j));
        let odd = if c + 1 < n { weights(load((c + 1) * cols + j)) } else { [_mm512_setzero_ps(); W] };
        for w in 0..W {
            sum[w] = _mm512_add_ps(sum[w], _mm512_add_ps(even[w], odd[w]));
            // SAFETY: a reinterpretation of a register of the same size.
            let both = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(odd[w], even[w])) };
            let pair = _mm512_permutexvar_epi16(interleave, both);
            // SAFETY (the stores): row c / 2 of the strip, and for `SPLIT` row
            // `lo_at + c / 2`, are inside `pt2` (the caller's contract).
            let out = pt2.as_mut_ptr();
            let store = |row: usize, pair: __m512i| unsafe {
                _mm512_storeu_si512(out.add(row * cols + j + 16 * w) as *mut __m512i, pair)
            };
            if !SPLIT {
                store(c / 2, pair);
                continue;
            }
            // The lo part, `lo_at` rows on: the weights less their bf16 (the hi part, `both`),
            // rounded in turn.
            // SAFETY: this kernel runs with AVX-512F.
            let widen = |h: __m256i| unsafe { crate::backend::bf16::x86::widen16(h) };
            let even_lo = _mm512_sub_ps(even[w], widen(_mm512_castsi512_si256(both)));
            let odd_lo = _mm512_sub_ps(odd[w], widen(_mm512_extracti64x4_epi64::<1>(both)));
            // SAFETY: as above.
            let rest = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(odd_lo, even_lo)) };
            store(c / 2, pair);
            store(lo_at + c / 2, _mm512_permutexvar_epi16(interleave, rest));
        }
    }
}

/// The exact step's start for a strip of 16 W columns: the new running max (over the old
/// one and the tile's `n` rows of scores), its shift in log2 units, alpha, and the old sum
/// rescaled by alpha.
struct Settled<const W: usize> {
    max: [__m512; W],
    shift: [__m512; W],
    alpha: [__m512; W],
    sum: [__m512; W],
}

/// # Safety
/// The CPU has AVX-512F; rows `0..n` of `st` and the online state hold columns
/// `j..j + 16 W`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn settle<const W: usize>(
    st: &[f32],
    n: usize,
    cols: usize,
    j: usize,
    online: &Online,
    pow2: impl Fn(__m512) -> __m512,
) -> Settled<W> {
    // SAFETY: inside the strip (the caller's contract).
    let load = |v: &[f32], at: usize| -> [__m512; W] {
        std::array::from_fn(|w| unsafe { _mm512_loadu_ps(v.as_ptr().add(at + 16 * w)) })
    };
    let old = load(&online.max, j);
    let mut max = old;
    for c in 0..n {
        let row = load(st, c * cols + j);
        for w in 0..W {
            max[w] = _mm512_max_ps(max[w], row[w]);
        }
    }
    // e^(x - max) = 2^(x log2 e - max log2 e), one FMA before `pow2`.
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let shift: [__m512; W] = std::array::from_fn(|w| _mm512_mul_ps(max[w], log2e));
    // A column whose max holds (-inf included: nothing visible yet) rescales nothing,
    // exactly: the FMA leaves x log2 e's rounding error, and the callers skip a whole
    // rescale of O when every factor is 1.
    let alpha: [__m512; W] = std::array::from_fn(|w| {
        let rescale = pow2(_mm512_fmsub_ps(old[w], log2e, shift[w]));
        let kept = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(max[w], old[w]);
        _mm512_mask_blend_ps(kept, rescale, _mm512_set1_ps(1.0))
    });
    let sum = load(&online.sum, j);
    let sum = std::array::from_fn(|w| _mm512_mul_ps(sum[w], alpha[w]));
    Settled { max, shift, alpha, sum }
}

/// # Safety
/// `super::softmax_pairs`'s checks hold; the CPU has AVX-512F and AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn softmax_pairs(
    st: &[f32],
    n: usize,
    cols: usize,
    online: &mut Online,
    pt2: &mut [u32],
    lo_at: Option<usize>,
) {
    // Strips of 4 vectors (a cache line of each row), then of one: a strip of one vector
    // ran its max and its sum as single chains, waiting on their latency (1.6x slower).
    let wide = cols / 64 * 64;
    for j in (0..wide).step_by(64) {
        // SAFETY: passed on, for a strip inside the columns.
        unsafe {
            match lo_at {
                Some(at) => strip::<4, true>(st, n, cols, j, online, pt2, at),
                None => strip::<4, false>(st, n, cols, j, online, pt2, 0),
            }
        }
    }
    for j in (wide..cols).step_by(16) {
        // SAFETY: as above.
        unsafe {
            match lo_at {
                Some(at) => strip::<1, true>(st, n, cols, j, online, pt2, at),
                None => strip::<1, false>(st, n, cols, j, online, pt2, 0),
            }
        }
    }
}

/// `softmax_pairs` on columns `j..j + 16 W`.
///
/// # Safety
/// As `softmax_pairs`, with the strip inside the columns.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn strip<const W: usize, const SPLIT: bool>(
    st: &[f32],
    n: usize,
    cols: usize,
    j: usize,
    online: &mut Online,
    pt2: &mut [u32],
    lo_at: usize,
) {
    // Split weights are multiplied to about 2^-17: they take the exact 2^t.
    let pow2 = |t| if SPLIT { pow2_exact(t) } else { pow2_16(t) };
    // SAFETY (every load and store): row c < n of `st`, pair c < n / 2 of `pt2` and the
    // online state, 16 W values from column j, are in bounds (the caller's checks).
    let load = |v: &[f32], at: usize| -> [__m512; W] {
        std::array::from_fn(|w| unsafe { _mm512_loadu_ps(v.as_ptr().add(at + 16 * w)) })
    };
    let old = load(&online.max, j);
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    // Lazy rescaling (FlashAttention-4's): once every column has a running max, weigh the
    // tile against it as it stands, and keep that unless a score passes it by more than
    // 2^LAZY (far inside f32's and bf16's range; the softmax is the same whatever the
    // shift, only overflow needs a new one). That skips the pass for the tile's max (a
    // read of S^T from L2) and, with alpha 1, the caller's rescale of O.
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    if (0..W).all(|w| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(old[w], neg_inf) == 0) {
        let shift: [__m512; W] = std::array::from_fn(|w| _mm512_mul_ps(old[w], log2e));
        let mut top = [neg_inf; W];
        let weights = |x: [__m512; W]| -> [__m512; W] {
            std::array::from_fn(|w| {
                let t = _mm512_fmsub_ps(x[w], log2e, shift[w]);
                top[w] = _mm512_max_ps(top[w], t);
                pow2(t)
            })
        };
        let mut sum = load(&online.sum, j);
        // SAFETY: as above.
        unsafe { weigh_pairs::<W, SPLIT>(st, n, cols, j, pt2, lo_at, &mut sum, weights) };
        let limit = _mm512_set1_ps(LAZY);
        if (0..W).all(|w| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(top[w], limit) == 0) {
            for (w, sum) in sum.into_iter().enumerate() {
                unsafe { _mm512_storeu_ps(online.sum.as_mut_ptr().add(j + 16 * w), sum) };
                unsafe { _mm512_storeu_ps(online.alpha.as_mut_ptr().add(j + 16 * w), _mm512_set1_ps(1.0)) };
            }
            return;
        }
        // A score passed the running max by too much: the exact step below redoes the
        // strip (its pairs are written again).
    }
    // SAFETY: as above.
    let Settled { max, shift, alpha, mut sum } = unsafe { settle::<W>(st, n, cols, j, online, pow2) };
    let weights =
        |x: [__m512; W]| -> [__m512; W] { std::array::from_fn(|w| pow2(_mm512_fmsub_ps(x[w], log2e, shift[w]))) };
    // SAFETY: as above.
    unsafe { weigh_pairs::<W, SPLIT>(st, n, cols, j, pt2, lo_at, &mut sum, weights) };
    let store = |v: &mut [f32], x: [__m512; W]| {
        for (w, x) in x.into_iter().enumerate() {
            unsafe { _mm512_storeu_ps(v.as_mut_ptr().add(j + 16 * w), x) };
        }
    };
    store(&mut online.max, max);
    store(&mut online.sum, sum);
    store(&mut online.alpha, alpha);
}

/// Lazy rescaling's bound, in powers of two: a score may pass the shift its column's weights
/// are taken against by this much before the shift must rise (2^16 is far inside f32's and
/// bf16's range). Both softmaxes (`strip_f32`, `strip`) use it.
const LAZY: f32 = 16.0;

/// 2^t on 16 lanes for bf16 weights: `pow2` with a degree-4 polynomial fitted for relative
/// error (2.7e-6 at most, against bf16's rounding of 2^-9: the weights it makes are rounded
/// to bf16).
#[target_feature(enable = "avx512f")]
fn pow2_16(t: __m512) -> __m512 {
    pow2(t, 9.570_098_5e-3, [5.591_786_7e-2, 2.402_474_4e-1, 6.931_218e-1, 9.999_993e-1])
}

/// 2^t on 16 lanes to f32's precision: `pow2` with a degree-6 polynomial (2^f's Taylor
/// series in f ln 2, 1.2e-7 relative at |f| = 0.5), for the f32 products.
#[target_feature(enable = "avx512f")]
fn pow2_exact(t: __m512) -> __m512 {
    pow2(t, 1.540_353_1e-4, [1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 2.402_265e-1, std::f32::consts::LN_2, 1.0])
}

/// 2^t on 16 lanes: 2^round(t) (`vscalefps`) times a polynomial in the rest, in [-0.5, 0.5]
/// (`top`, then `rest` by Horner's rule). t is clamped at -125 (NaN, from -inf minus -inf,
/// too: `vmaxps` returns its second operand then), so that no result is a denormal: each
/// vector holding one took a microcode assist, and the causal mask's -inf made enough of
/// them to cost a third of the softmax's time. A masked score weighs 2^-125, nothing next
/// to a column's largest weight (1 or more).
#[target_feature(enable = "avx512f")]
#[inline]
fn pow2<const N: usize>(t: __m512, top: f32, rest: [f32; N]) -> __m512 {
    let t = _mm512_max_ps(t, _mm512_set1_ps(-125.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(top);
    for c in rest {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_avx2(st: &mut [f32], cols: usize, online: &mut Online) {
    softmax::<Fused>(st, cols, online)
}
