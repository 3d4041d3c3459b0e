//! bf16 products with f32 sums through AVX-512 BF16's `vdpbf16ps`, for the prefill attention's
//! tiles in a bf16 model. One instruction multiplies 16 pairs of bf16 values and adds both
//! products of each pair into an f32 lane: twice the products of an FMA. The operands are held
//! as `u32` pairs, the value at the lower address in the low half, which is the order the
//! instruction pairs them in. Conversions round to nearest even.
//!
//! Every entry point panics unless `runs_here` (AVX-512F with AVX-512 BF16); callers check it
//! once (`prefill_attention::bf16_runs`).

/// Whether this CPU has the instructions (std caches the detection).
pub fn runs_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[j]` = the bf16 pair (`lo[j]`, `hi[j]`); `hi` absent is zeros (the padding pair of an odd
/// count). Lengths are equal and a multiple of 16.
pub fn pair_rows(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    assert!(lo.len().is_multiple_of(16) && out.len() == lo.len() && hi.is_none_or(|h| h.len() == lo.len()));
    assert!(runs_here(), "bf16 pairs need AVX-512 BF16");
    // SAFETY: the CPU has the features (asserted); the lengths are as the kernel needs.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        simd::pair_rows(lo, hi, out)
    }
}

/// A row of f32 in bf16, consecutive values paired: `out[i]` = (`x[2i]`, `x[2i + 1]`).
/// `x.len()` is a multiple of 16 and twice `out.len()`.
pub fn pair_along(x: &[f32], out: &mut [u32]) {
    assert!(x.len().is_multiple_of(16) && out.len() * 2 == x.len());
    assert!(runs_here(), "bf16 pairs need AVX-512 BF16");
    // SAFETY: as in `pair_rows`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        simd::pair_along(x, out)
    }
}

/// What bf16 leaves of each value: `lo[i]` = `x[i]` less `x[i]` rounded to bf16 (nearest even, as
/// `pair_along` and `pair_rows` round), exact in f32. x = hi + lo to about 2^-17 once lo is
/// rounded too: the split that lets bf16 tiles multiply f32 operands (`hi hi + hi lo + lo hi`).
/// Lengths are equal and a multiple of 16.
pub fn residual(x: &[f32], lo: &mut [f32]) {
    assert!(x.len().is_multiple_of(16) && lo.len() == x.len());
    assert!(runs_here(), "bf16 rounding needs AVX-512 BF16");
    // SAFETY: as in `pair_rows`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        simd::residual(x, lo)
    }
}

/// `c[rows x n] (+)= a[rows x kp] b[kp x n]` over bf16 pairs with f32 sums: element (r, i) of
/// `a` at `a[r * ars + i * acs]`, row i of `b` at `b[i * ldb..]`, row r of `c` at `c[r * ldc..]`;
/// `n` a multiple of 16.
pub struct Product<'a> {
    pub a: &'a [u32],
    pub ars: usize,
    pub acs: usize,
    pub b: &'a [u32],
    pub ldb: usize,
    pub kp: usize,
    pub rows: usize,
    pub n: usize,
    pub ldc: usize,
}

/// Run `m` into `c`, adding to what `c` holds when `accumulate`.
pub fn product(m: &Product<'_>, c: &mut [f32], accumulate: bool) {
    assert!(m.n.is_multiple_of(16) && m.n <= m.ldb && m.n <= m.ldc && m.rows > 0 && m.kp > 0);
    assert!((m.rows - 1) * m.ars + (m.kp - 1) * m.acs < m.a.len(), "left operand");
    assert!(m.b.len() >= (m.kp - 1) * m.ldb + m.n && c.len() >= (m.rows - 1) * m.ldc + m.n, "right operand or output");
    assert!(runs_here(), "bf16 products need AVX-512 BF16");
    // SAFETY: every block lies inside a, b and c (asserted above); the CPU has the features.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        simd::product(m, c, accumulate)
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::Product;
    use std::arch::x86_64::*;

    /// # Safety
    /// `super::pair_rows`'s checks hold; the CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pair_rows(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
        for j in (0..lo.len()).step_by(16) {
            // SAFETY (the loads and the store): j + 16 <= the length of all three.
            let low = widen(_mm512_cvtneps_pbh(unsafe { _mm512_loadu_ps(lo.as_ptr().add(j)) }));
            let pair = match hi {
                Some(hi) => {
                    let high = widen(_mm512_cvtneps_pbh(unsafe { _mm512_loadu_ps(hi.as_ptr().add(j)) }));
                    _mm512_or_si512(low, _mm512_slli_epi32::<16>(high))
                }
                None => low,
            };
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(j) as *mut __m512i, pair) };
        }
    }

    /// # Safety
    /// `super::pair_along`'s checks hold; the CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pair_along(x: &[f32], out: &mut [u32]) {
        for j in (0..x.len()).step_by(16) {
            // SAFETY: 16 values from j, and 8 pairs from j / 2, are inside x and out.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(j)));
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(j / 2) as *mut __m256i,
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
        }
    }

    /// # Safety
    /// `super::residual`'s checks hold; the CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn residual(x: &[f32], lo: &mut [f32]) {
        for j in (0..x.len()).step_by(16) {
            // SAFETY: 16 values from j are inside x and lo.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(j));
                let hi =
                    crate::backend::bf16::x86::widen16(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)));
                _mm512_storeu_ps(lo.as_mut_ptr().add(j), _mm512_sub_ps(v, hi));
            }
        }
    }

    /// 16 bf16 values, each zero-extended into the low half of a 32-bit lane.
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn widen(h: __m256bh) -> __m512i {
        // SAFETY: a reinterpretation of a register of the same size.
        _mm512_cvtepu16_epi32(unsafe { std::mem::transmute::<__m256bh, __m256i>(h) })
    }

    /// Blocks of 6 rows by 4 vectors of 16 columns (24 of the 32 registers, the f32 tiles'
    /// block), then 16 columns at a time, then leftover rows one at a time.
    ///
    /// # Safety
    /// `super::product`'s checks hold; the CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn product(m: &Product<'_>, c: &mut [f32], accumulate: bool) {
        const R: usize = 6;
        const V: usize = 4;
        let wide = m.n / (16 * V) * (16 * V);
        let mut r0 = 0;
        while r0 < m.rows {
            let rows = R.min(m.rows - r0);
            // SAFETY: every block lies inside a, b and c (the caller's checks).
            unsafe {
                if rows == R {
                    (0..wide).step_by(16 * V).for_each(|j0| block::<R, V>(m, c, accumulate, r0, j0));
                    (wide..m.n).step_by(16).for_each(|j0| block::<R, 1>(m, c, accumulate, r0, j0));
                } else {
                    for r in r0..r0 + rows {
                        (0..wide).step_by(16 * V).for_each(|j0| block::<1, V>(m, c, accumulate, r, j0));
                        (wide..m.n).step_by(16).for_each(|j0| block::<1, 1>(m, c, accumulate, r, j0));
                    }
                }
            }
            r0 += rows;
        }
    }

    /// Rows `r0..r0 + BR`, columns `j0..j0 + 16 BV`, the accumulators in registers for all of `kp`.
    ///
    /// # Safety
    /// As `product`, for a block inside it.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn block<const BR: usize, const BV: usize>(
        m: &Product<'_>,
        c: &mut [f32],
        accumulate: bool,
        r0: usize,
        j0: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); BV]; BR];
        if accumulate {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: row r0 + r, 16 columns from j0 + 16 v, inside c.
                    *acc = unsafe { _mm512_loadu_ps(c.as_ptr().add((r0 + r) * m.ldc + j0 + 16 * v)) };
                }
            }
        }
        for i in 0..m.kp {
            // SAFETY: row i of b, 16 pairs from j0 + 16 v, is inside b.
            let b: [__m512bh; BV] = std::array::from_fn(|v| unsafe {
                let p = m.b.as_ptr().add(i * m.ldb + j0 + 16 * v) as *const __m512i;
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: element (r0 + r, i) of a is inside it.
                let pair = unsafe { *m.a.get_unchecked((r0 + r) * m.ars + i * m.acs) };
                // SAFETY: a reinterpretation of a register of the same size.
                let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
                for (acc, &b) in acc.iter_mut().zip(&b) {
                    *acc = _mm512_dpbf16_ps(*acc, b, a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm512_storeu_ps(c.as_mut_ptr().add((r0 + r) * m.ldc + j0 + 16 * v), acc) };
            }
        }
    }
}
