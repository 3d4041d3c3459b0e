use super::PagedKv;
use crate::backend::cpu::avx2::{exp8, hsum};
use crate::backend::kv_cache::KvElem;
use std::arch::x86_64::*;

/// `super::attend_piece` with explicit FMA code, written once for a vector width: `$lanes`
/// f32 lanes of type `$v`, through the intrinsics named after it, for `G` query heads
/// sharing the KV head (GQA's group) and `head_dim` a multiple of `$dims` (four registers).
///
/// Every head of the group is taken together, so each K and V row is read from memory once
/// for all of them, not once a head: positions go in blocks of `$lanes`, whose K rows stay in
/// L1 while each head's scores for the block are taken (one accumulator a position, reduced
/// together by `$sums`, a transpose by shuffles), and each V row is loaded once into
/// registers and added into every head's output (`G x $dims / $lanes` accumulators). The
/// rows `AHEAD` positions on are prefetched, and on KV head 0's walk the rest of each row
/// too, into L2, for the walks of the other KV heads over the same positions (batch-1
/// decode of the default model after 2,000 tokens, Zen 4: 93-97 -> 98-105 tok/s in four
/// alternations; after 4,000, 55-63 -> 60-66, faster in three pairs of four). Head by
/// head, each row was read once a head and each score reduced on its own; batch-1 decode
/// of the default model (Q4_1) on the 2-core Xeon after 2,000 / 4,000 tokens of context
/// went from 75-85 / 51-56 tok/s to 90-95 / 62-65 (AVX-512), and from 58-62 / 41-42 to
/// 60-66 / 44-47 with the AVX2 kernel.
macro_rules! attend_piece {
    ($any:ident, $chunk:expr, $name:ident, $features:literal, $dims:expr, $lanes:expr, $v:ty, $zero:ident,
     $load:ident, $load_kv:ident, $fmadd:ident, $mul:ident, $splat:ident, $store:ident, $reduce:expr, $sums:ident) => {
        /// The kernel below for any number of query heads, in chunks of up to `$chunk` (so that
        /// their V accumulators stay in registers).
        ///
        /// # Safety
        /// As the kernel's.
        pub unsafe fn $any<E: KvElem>(q: &[f32], slots: &[usize], kvh: usize, kv: PagedKv<'_, E>, part: &mut [f32]) {
            let d = kv.shape.head_dim;
            for (q, part) in q.chunks($chunk * d).zip(part.chunks_mut($chunk * (d + 2))) {
                // SAFETY: passed on.
                unsafe {
                    match q.len() / d {
                        1 => $name::<E, 1>(q, slots, kvh, kv, part),
                        2 => $name::<E, 2>(q, slots, kvh, kv, part),
                        3 => $name::<E, 3>(q, slots, kvh, kv, part),
                        _ => $name::<E, $chunk>(q, slots, kvh, kv, part),
                    }
                }
            }
        }

        /// # Safety
        /// The CPU has the function's features; every offset in `slots`, plus `head_dim`
        /// values for each KV head, is inside both caches (`by_pieces` checks the largest).
        #[target_feature(enable = $features)]
        unsafe fn $name<E: KvElem, const G: usize>(
            q: &[f32],
            slots: &[usize],
            kvh: usize,
            kv: PagedKv<'_, E>,
            part: &mut [f32],
        ) {
            let d = kv.shape.head_dim;
            let scale = $splat(1.0 / (d as f32).sqrt());
            assert!(q.len() == G * d && part.len() == G * (d + 2) && d.is_multiple_of($dims));
            let (k_cache, v_cache) = (kv.k.as_ptr(), kv.v.as_ptr());
            let n = slots.len();
            // Bytes of one value of the cache, and of one KV head's share of a row.
            let (size, head_bytes) = (size_of::<E>(), d * size_of::<E>());
            // Head h's scores at [h * n..(h + 1) * n].
            let mut scores = vec![0.0f32; G * n];
            let blocks = n / $lanes * $lanes;
            for b0 in (0..blocks).step_by($lanes) {
                // The next block's K rows, asked for now (a prefetch never faults).
                for &ahead in slots.iter().skip(b0 + $lanes).take($lanes) {
                    let a = k_cache.wrapping_add(ahead + kvh * d) as *const i8;
                    for l in (0..head_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(l));
                    }
                    if kvh == 0 {
                        // The first of a piece's walks (one per KV head) asks for the rest of
                        // each row too, into L2, where the piece is sized to stay: the later
                        // walks then read their thirds from there, not again from memory.
                        let row = k_cache.wrapping_add(ahead) as *const i8;
                        for l in (head_bytes..kv.shape.num_kv_heads * head_bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(l));
                        }
                    }
                }
                for h in 0..G {
                    let qh = &q[h * d..(h + 1) * d];
                    let mut acc: [$v; $lanes] = [$zero(); $lanes];
                    for i in (0..d).step_by($lanes) {
                        // SAFETY: i + lanes <= d: inside the head's row of q.
                        let qv = unsafe { $load(qh.as_ptr().add(i)) };
                        for (j, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: slot + kvh * d + d is inside the cache (the caller's
                            // contract), and i + lanes <= d.
                            *acc = $fmadd(qv, unsafe { $load_kv(k_cache.add(slots[b0 + j] + kvh * d + i)) }, *acc);
                        }
                    }
                    // SAFETY: positions b0..b0 + lanes of head h's scores.
                    unsafe { $store(scores.as_mut_ptr().add(h * n + b0), $mul($sums(&acc), scale)) };
                }
            }
            for p in blocks..n {
                // SAFETY: as above.
                let k = unsafe { k_cache.add(slots[p] + kvh * d) };
                for h in 0..G {
                    let mut acc = $zero();
                    for i in (0..d).step_by($lanes) {
                        // SAFETY: i + lanes <= d: inside the head's row of q and K.
                        acc = unsafe { $fmadd($load(q.as_ptr().add(h * d + i)), $load_kv(k.add(i)), acc) };
                    }
                    scores[h * n + p] = $reduce($mul(acc, scale));
                }
            }
            let mut stats = [(0.0f32, 0.0f32); G];
            for (h, st) in stats.iter_mut().enumerate() {
                let sc = &mut scores[h * n..(h + 1) * n];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                *st = (max, exp_in_place(sc, max));
            }
            for i in (0..d).step_by($dims) {
                let mut acc: [[$v; $dims / $lanes]; G] = [[$zero(); $dims / $lanes]; G];
                for (p, &slot) in slots.iter().enumerate() {
                    // The V row `AHEAD` positions on, asked for now.
                    if let Some(&ahead) = slots.get(p + AHEAD) {
                        let a = v_cache.wrapping_add(ahead + kvh * d + i) as *const i8;
                        for l in (0..$dims * size).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(l));
                        }
                        if kvh == 0 && i == 0 {
                            // As for K above.
                            let row = v_cache.wrapping_add(ahead) as *const i8;
                            for l in (head_bytes..kv.shape.num_kv_heads * head_bytes).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(l));
                            }
                        }
                    }
                    // SAFETY: as for K above.
                    let v = unsafe { v_cache.add(slot + kvh * d + i) };
                    let row: [$v; $dims / $lanes] = std::array::from_fn(|j| unsafe { $load_kv(v.add($lanes * j)) });
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let w = $splat(scores[h * n + p]);
                        for (acc, &x) in acc.iter_mut().zip(&row) {
                            *acc = $fmadd(w, x, *acc);
                        }
                    }
                }
                for (h, acc) in acc.iter().enumerate() {
                    for (j, &acc) in acc.iter().enumerate() {
                        // SAFETY: i + lanes (j + 1) <= d, inside head h's output.
                        unsafe { $store(part.as_mut_ptr().add(h * (d + 2) + i + $lanes * j), acc) };
                    }
                }
            }
            for (h, &(max, sum)) in stats.iter().enumerate() {
                part[h * (d + 2) + d..][..2].copy_from_slice(&[max, sum]);
            }
        }
    };
}

/// Lane j of the result is the sum of `v[j]`'s eight lanes: the 8 x 8 transpose by shuffles
/// that adds as it goes (21 instructions for eight sums).
#[target_feature(enable = "avx2,fma")]
fn sums8(v: &[__m256; 8]) -> __m256 {
    // Pairs: each 128-bit half of w[i] holds, interleaved, partial sums of v[2i] and v[2i + 1].
    let w: [__m256; 4] = std::array::from_fn(|i| {
        _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]))
    });
    // Quads: each 128-bit half of x holds partial sums of v[4i..4i + 4], in order.
    let quad = |a: __m256, b: __m256| {
        let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
        _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)))
    };
    let (x0, x1) = (quad(w[0], w[1]), quad(w[2], w[3]));
    // Halves: the low half of the result is x0's two halves added, the high half x1's.
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x0, x1), _mm256_permute2f128_ps::<0x31>(x0, x1))
}

/// Lane j of the result is the sum of `v[j]`'s sixteen lanes (`sums8` at AVX-512 width).
#[target_feature(enable = "avx512f")]
fn sums16(v: &[__m512; 16]) -> __m512 {
    let w: [__m512; 8] = std::array::from_fn(|i| {
        _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
    });
    let quad = |a: __m512, b: __m512| {
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
    };
    // Each 128-bit lane L of x[i] holds lane L's partial sums of v[4i..4i + 4], in order.
    let x: [__m512; 4] = std::array::from_fn(|i| quad(w[2 * i], w[2 * i + 1]));
    // Add the 128-bit lanes: lanes 0 + 2 and 1 + 3 of two x's at a time, then the two.
    let half =
        |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    let (z0, z1) = (half(x[0], x[1]), half(x[2], x[3]));
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(z0, z1), _mm512_shuffle_f32x4::<0xDD>(z0, z1))
}

/// Positions ahead whose K or V rows a kernel asks for (`_mm_prefetch`) while it works on
/// the present one. A head's share of a cache row is 256 of its 768 bytes (SmolLM2), a
/// stride the hardware prefetchers followed too slowly: the V loop waited on its loads.
const AHEAD: usize = 32;
/// Head dimensions the AVX2 kernel takes at a time (4 registers of 8).
pub const DIMS: usize = 32;
/// Head dimensions the AVX-512 kernel takes at a time (4 registers of 16).
pub const DIMS_512: usize = 64;

// AVX2 + FMA.
attend_piece!(
    attend_piece,
    2,
    attend_group,
    "avx2,fma",
    DIMS,
    8,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    load_kv8,
    _mm256_fmadd_ps,
    _mm256_mul_ps,
    _mm256_set1_ps,
    _mm256_storeu_ps,
    hsum,
    sums8
);
// AVX-512.
attend_piece!(
    attend_piece_512,
    4,
    attend_group_512,
    "avx512f,avx2,fma",
    DIMS_512,
    16,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    load_kv16,
    _mm512_fmadd_ps,
    _mm512_mul_ps,
    _mm512_set1_ps,
    _mm512_storeu_ps,
    _mm512_reduce_add_ps,
    sums16
);

/// Eight values of the cache from `p`, as f32: bf16 widened by a shift (it is f32's top half).
///
/// # Safety
/// Eight values from `p` are readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_kv8<E: KvElem>(p: *const E) -> __m256 {
    // SAFETY: the caller's.
    unsafe {
        if E::BF16 {
            crate::backend::bf16::x86::load8(p.cast())
        } else {
            _mm256_loadu_ps(p.cast())
        }
    }
}

/// `load_kv8` at AVX-512's width: sixteen values.
///
/// # Safety
/// Sixteen values from `p` are readable.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn load_kv16<E: KvElem>(p: *const E) -> __m512 {
    // SAFETY: the caller's.
    unsafe {
        if E::BF16 {
            crate::backend::bf16::x86::load16(p.cast())
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }
}

/// `sc[i] = exp(sc[i] - max)`, eight lanes at a time; returns their sum.
#[target_feature(enable = "avx2,fma")]
fn exp_in_place(sc: &mut [f32], max: f32) -> f32 {
    let (body, tail) = sc.split_at_mut(sc.len() / 8 * 8);
    let mut sum = _mm256_setzero_ps();
    let maxv = _mm256_set1_ps(max);
    for c in body.chunks_exact_mut(8) {
        // SAFETY: `c` holds exactly eight values.
        unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), maxv));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
        }
    }
    let mut total = hsum(sum);
    if !tail.is_empty() {
        let mut buf = [f32::NEG_INFINITY; 8];
        buf[..tail.len()].copy_from_slice(tail);
        // SAFETY: `buf` holds eight values; padding lanes come out about 1e-38 and are dropped.
        let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), maxv)) };
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), e) };
        tail.copy_from_slice(&buf[..tail.len()]);
        total += buf[..tail.len()].iter().sum::<f32>();
    }
    total
}
