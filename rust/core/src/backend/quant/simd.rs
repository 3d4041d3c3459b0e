//! The x86 kernels: the portable kernel's loop with the widening written in intrinsics (the
//! compiler did not vectorise the generic byte-to-float code: 1-7 GFLOP/s).

use super::super::gemm::PREFETCH;
use super::{Format, QTile, QuantKind, MR, NR, OFFSETS, QK};
use std::arch::x86_64::*;

/// A Q4_1 panel block's raw weight rows i and i + 16 (the low and high nibbles of byte row
/// i) as f32, unscaled: the one place the AVX-512 kernels read Q4_1's weight layout.
///
/// # Safety
/// `blk` points at a whole Q4_1 panel block, i < 16; called from AVX-512F code.
#[inline(always)]
unsafe fn q4_raw(blk: *const u8, i: usize) -> (__m512, __m512) {
    // SAFETY: byte row i of the [16][16] nibble pairs after the scales and offsets.
    unsafe {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(QuantKind::Q4_1.weights_at() + i * NR) as *const __m128i));
        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(15)));
        (lo, _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q)))
    }
}

/// A Q8_0 panel block's raw weight row kk as f32, unscaled (as `q4_raw` for Q8_0).
///
/// # Safety
/// `blk` points at a whole Q8_0 panel block, kk < 32; called from AVX-512F code.
#[inline(always)]
unsafe fn q8_raw(blk: *const u8, kk: usize) -> __m512 {
    // SAFETY: row kk of the [32][16] i8 weights after the scales.
    unsafe {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            blk.add(QuantKind::Q8_0.weights_at() + kk * NR) as *const __m128i
        )))
    }
}

/// `q4_raw`'s rows widened as `d q + m`, one FMA each: the many-rows kernel's and
/// `widen_avx512`'s widening.
///
/// # Safety
/// As `q4_raw`.
#[inline(always)]
unsafe fn q4_rows(blk: *const u8, i: usize, d: __m512, m: __m512) -> (__m512, __m512) {
    let (lo, hi) = unsafe { q4_raw(blk, i) };
    (_mm512_fmadd_ps(lo, d, m), _mm512_fmadd_ps(hi, d, m))
}

/// `q8_raw`'s row widened as `d q`.
///
/// # Safety
/// As `q8_raw`.
#[inline(always)]
unsafe fn q8_row(blk: *const u8, kk: usize, d: __m512) -> __m512 {
    _mm512_mul_ps(unsafe { q8_raw(blk, kk) }, d)
}

/// AVX-512: `P` panels of 16 columns, one register each, `R` rows.
///
/// # Safety
/// `run`'s contract; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn avx512<const R: usize, const P: usize, Q: Format>(t: &QTile) {
    let pb = Q::KIND.panel_block_bytes();
    // Two accumulator sets, summed at the end: for many rows, Q4_1's low and high nibbles go
    // to one each; for one or two rows, `acc2` takes the offsets' term (`m * sum x`).
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut acc2 = [[_mm512_setzero_ps(); P]; R];
    // SAFETY (every read below): block kb of panel p lies inside the panel (kb < kc / 32);
    // its scales, offsets and weight rows are at the offsets `QPanels` writes them; the
    // packed rows hold kc x MR values.
    for kb in 0..t.kc / QK {
        let blk: [*const u8; P] = std::array::from_fn(|p| unsafe { t.b.add(p * t.stride + kb * pb) });
        let d: [__m512; P] =
            std::array::from_fn(|p| unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(blk[p] as *const __m256i)) });
        let a = |kk: usize, r: usize| unsafe { _mm512_set1_ps(*t.a.add((kb * QK + kk) * MR + r)) };
        if R * P <= 8 {
            // Few rows (decode): the scales come out of the sums, sum_k x (d q + m) =
            // d sum_k x q + m sum_k x, so the loop multiplies raw q and the scales are applied
            // once a block: one FMA a weight row fewer, and 2 x R x P independent chains.
            let mut sq = [[_mm512_setzero_ps(); P]; R];
            let mut sq2 = [[_mm512_setzero_ps(); P]; R];
            let lines = pb.div_ceil(64);
            for i in 0..QK / 2 {
                if i < lines {
                    // The decode streams are latency-bound: line i of the block PREFETCH
                    // bytes ahead, in each panel (as the f32/bf16 decode tiles do).
                    for b in &blk {
                        let ahead = b.wrapping_add(PREFETCH + i * 64) as *const i8;
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                    }
                }
                // Q4_1: nibbles i (low) and i + 16 (high); Q8_0: rows 2i and 2i + 1.
                let (k1, k2) = if Q::Q4 { (i, i + QK / 2) } else { (2 * i, 2 * i + 1) };
                let (w1, w2): ([__m512; P], [__m512; P]) = if Q::Q4 {
                    let q: [(__m512, __m512); P] = std::array::from_fn(|p| unsafe { q4_raw(blk[p], i) });
                    (std::array::from_fn(|p| q[p].0), std::array::from_fn(|p| q[p].1))
                } else {
                    let row = |p: usize, kk: usize| unsafe { q8_raw(blk[p], kk) };
                    (std::array::from_fn(|p| row(p, k1)), std::array::from_fn(|p| row(p, k2)))
                };
                for r in 0..R {
                    let (x1, x2) = (a(k1, r), a(k2, r));
                    for p in 0..P {
                        sq[r][p] = _mm512_fmadd_ps(x1, w1[p], sq[r][p]);
                        sq2[r][p] = _mm512_fmadd_ps(x2, w2[p], sq2[r][p]);
                    }
                }
            }
            for r in 0..R {
                for p in 0..P {
                    acc[r][p] = _mm512_fmadd_ps(d[p], _mm512_add_ps(sq[r][p], sq2[r][p]), acc[r][p]);
                }
            }
            if Q::Q4 {
                for (r, acc2) in acc2.iter_mut().enumerate() {
                    // sum_k x over the block, in four partial sums (a chain of 32 adds is long).
                    let mut part = [0.0f32; 4];
                    for kk in 0..QK {
                        part[kk % 4] += unsafe { *t.a.add((kb * QK + kk) * MR + r) };
                    }
                    let xs = _mm512_set1_ps((part[0] + part[1]) + (part[2] + part[3]));
                    for (acc2, blk) in acc2.iter_mut().zip(&blk) {
                        let m = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(OFFSETS) as *const __m256i)) };
                        *acc2 = _mm512_fmadd_ps(m, xs, *acc2);
                    }
                }
            }
        } else if Q::Q4 {
            let m: [__m512; P] = std::array::from_fn(|p| unsafe {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk[p].add(OFFSETS) as *const __m256i))
            });
            for i in 0..QK / 2 {
                let w: [(__m512, __m512); P] = std::array::from_fn(|p| unsafe { q4_rows(blk[p], i, d[p], m[p]) });
                let lo: [__m512; P] = std::array::from_fn(|p| w[p].0);
                let hi: [__m512; P] = std::array::from_fn(|p| w[p].1);
                for (r, (acc, acc2)) in acc.iter_mut().zip(acc2.iter_mut()).enumerate() {
                    let (x_lo, x_hi) = (a(i, r), a(i + QK / 2, r));
                    for p in 0..P {
                        acc[p] = _mm512_fmadd_ps(x_lo, lo[p], acc[p]);
                        acc2[p] = _mm512_fmadd_ps(x_hi, hi[p], acc2[p]);
                    }
                }
            }
        } else {
            for kk in 0..QK {
                let w: [__m512; P] = std::array::from_fn(|p| unsafe { q8_row(blk[p], kk, d[p]) });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = a(kk, r);
                    for p in 0..P {
                        acc[p] = _mm512_fmadd_ps(x, w[p], acc[p]);
                    }
                }
            }
        }
    }
    for (r, (acc, acc2)) in acc.iter().zip(&acc2).enumerate() {
        for (p, (&v, &v2)) in acc.iter().zip(acc2).enumerate() {
            // SAFETY: row r < rows of `out`, panel p's 16 values.
            unsafe { _mm512_storeu_ps(t.out.add(r * t.out_stride + p * NR), _mm512_add_ps(v, v2)) };
        }
    }
}

/// `super::widen_panels` for one panel block on AVX-512, with the `avx512` kernel's widening.
///
/// # Safety
/// `blk` points at a whole panel block; `dst` holds 32 x 16 values; the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn widen_avx512<Q: Format>(blk: *const u8, dst: &mut [f32]) {
    assert!(dst.len() >= QK * NR);
    let out = dst.as_mut_ptr();
    // SAFETY (every read and write below): the block's scales, offsets and weight rows at
    // the offsets `QPanels` writes them; rows kk < 32 of 16 values in `dst`.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
        if Q::Q4 {
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(OFFSETS) as *const __m256i));
            for i in 0..QK / 2 {
                let (lo, hi) = q4_rows(blk, i, d, m);
                _mm512_storeu_ps(out.add(i * NR), lo);
                _mm512_storeu_ps(out.add((i + QK / 2) * NR), hi);
            }
        } else {
            for kk in 0..QK {
                _mm512_storeu_ps(out.add(kk * NR), q8_row(blk, kk, d));
            }
        }
    }
}

/// AVX2: one panel as two 8-wide halves, `R` rows (`P` is 1).
///
/// # Safety
/// `run`'s contract; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn avx2<const R: usize, const P: usize, Q: Format>(t: &QTile) {
    debug_assert_eq!(P, 1);
    let pb = Q::KIND.panel_block_bytes();
    let nibble = _mm256_set1_epi32(15);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // SAFETY (every read below): as in `avx512`, for panel 0.
    for kb in 0..t.kc / QK {
        let blk = unsafe { t.b.add(kb * pb) };
        let half = |p: *const u8| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) };
        let d = [half(blk), half(unsafe { blk.add(NR) })];
        let a = |kk: usize, r: usize| unsafe { _mm256_broadcast_ss(&*t.a.add((kb * QK + kk) * MR + r)) };
        // 8 weights of one row: bytes at `p` widened (zero- or sign-extended) to f32.
        let widen_u8 = |p: *const u8| unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)) };
        if Q::Q4 {
            let m = [half(unsafe { blk.add(OFFSETS) }), half(unsafe { blk.add(OFFSETS + NR) })];
            for i in 0..QK / 2 {
                let row = unsafe { blk.add(Q::KIND.weights_at() + i * NR) };
                let q = [widen_u8(row), widen_u8(unsafe { row.add(8) })];
                for (shift, kk) in [(0, i), (4, i + QK / 2)] {
                    let w: [__m256; 2] = std::array::from_fn(|h| {
                        let v = _mm256_and_si256(_mm256_srlv_epi32(q[h], _mm256_set1_epi32(shift)), nibble);
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), d[h], m[h])
                    });
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = a(kk, r);
                        acc[0] = _mm256_fmadd_ps(x, w[0], acc[0]);
                        acc[1] = _mm256_fmadd_ps(x, w[1], acc[1]);
                    }
                }
            }
        } else {
            for kk in 0..QK {
                let row = unsafe { blk.add(Q::KIND.weights_at() + kk * NR) };
                let w: [__m256; 2] = std::array::from_fn(|h| unsafe {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(row.add(8 * h) as *const __m128i));
                    _mm256_mul_ps(_mm256_cvtepi32_ps(q), d[h])
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = a(kk, r);
                    acc[0] = _mm256_fmadd_ps(x, w[0], acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, w[1], acc[1]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: row r < rows of `out`, 16 values.
        unsafe {
            _mm256_storeu_ps(t.out.add(r * t.out_stride), acc[0]);
            _mm256_storeu_ps(t.out.add(r * t.out_stride + 8), acc[1]);
        }
    }
}
