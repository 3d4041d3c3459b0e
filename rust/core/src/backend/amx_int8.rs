//! A quantized model's many-row products on AMX int8 tiles (Intel Xeon since Sapphire Rapids):
//! Q8_0 and Q4_1 weights (`quant`) in prefill and batched decode, from `gemm::AMX_MIN_ROWS` rows.
//!
//! The weights are integers with a scale per block of 32 (`d * q`, Q4_1 `d * q + m`), so a
//! block's products can be integer ones if the activations are integers too. Each row of x is
//! quantized per block of 32 as well, to 22 bits (`x = s * a`, `|a| <= 127 * 128 * 128`, `s` the
//! block's largest magnitude over that), held as three int8 digits (`a = 16384 hi + 128 mid +
//! lo`). One `tdpbssd` per digit (Q4_1's unsigned nibbles: `tdpbsud`) multiplies 16 rows by 16
//! columns over a block, and the three int32 tiles give `sum a q` exactly; the sums are then
//! scaled per block in f32: `out += s d sum(a q) + m sum(x)` (`sum(x)` in f32). llama.cpp
//! quantizes activations to 8 bits (`Q8_1`). Here 15 bits (two digits) put the default model's
//! teacher-forced logits 0.017 from HF's, past the goldens' 1e-3; 22 bits keep them within it
//! (the error is a 4-millionth of a block's largest value, near f32's own rounding).
//!
//! A task takes a range of rows and of panels. It turns its panels' blocks into the order a B
//! tile reads (8 rows of 16 columns x 4 consecutive values of k: one `vpermb` per 64 bytes, Q4_1
//! splitting its nibbles first) once, into a strip that stays in L2. Then, for each tile of 16
//! rows and each block, it loads the three A tiles once and runs every panel's B tile past
//! them; the f32 sums of the row tile stay in L1. What bounds it is taking each block's three
//! int32 tiles out to memory and scaling them (AVX-512), not the tile unit.

use rayon::prelude::*;

use super::quant::{QPanels, QuantKind, QK};

/// Rows of an A and a C tile.
const TR: usize = 16;
/// Columns of a panel (and of a C tile).
const NR: usize = 16;
/// Bytes of one block's B tile (8 rows of 64).
const B_TILE: usize = 512;
/// Rows of x a task runs against each panel's strip: 256 rows of two 1,536-wide planes are 768
/// KiB, inside a 2 MiB L2.
const TASK_ROWS: usize = 256;
/// The largest activation, `127 * 128 * 128` (22 bits), so the high plane is `-127..=127`.
const A_MAX: f32 = 2_080_768.0;

/// Whether this CPU and OS run AMX int8 tiles (with the AVX-512 VBMI byte permutes that lay the
/// weights out for them).
pub fn runs_here() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    // CPUID.7.0:EDX bit 25 is AMX-INT8; `amx::runs_here` checked the tiles, the OS and the
    // permission.
    super::amx::runs_here()
        && std::arch::x86_64::__cpuid_count(7, 0).edx >> 25 & 1 == 1
        && std::is_x86_feature_detected!("avx512vbmi")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Bytes of one plane's A tile (16 rows of a block).
const A_TILE: usize = TR * QK;
/// Bytes of one block's three A tiles.
const A_BLOCK: usize = 3 * A_TILE;

/// x quantized per block of 32, in the order the A tiles read: for each tile of 16 rows (the
/// last zero-padded) and each block, the high, middle and low planes' 16 x 32 bytes one after
/// the other, so a tile is one 512-byte load; each block's scale `s` and exact sum of x as
/// `[row tile][block][16 rows]`.
#[derive(Default)]
struct Acts {
    planes: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<f32>,
}

/// A block of 32 values of one row: (scale, sum), its three digits written. The reference for
/// `simd::quantize_tile`, which gives the same digits and scale.
#[cfg(test)]
fn quantize_block(x: &[f32], hi: &mut [i8], mid: &mut [i8], lo: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let s = amax / A_MAX;
    let inv = if amax > 0.0 { A_MAX / amax } else { 0.0 };
    let mut sum = 0.0f32;
    for (((&v, h), md), l) in x.iter().zip(hi.iter_mut()).zip(mid.iter_mut()).zip(lo.iter_mut()) {
        sum += v;
        let a = ((v * inv).round_ties_even() as i32).clamp(-(A_MAX as i32), A_MAX as i32);
        // Each digit rounded to nearest (ties up): hi in -127..=127, mid in -64..=64, lo in -64..=63.
        let high = (a + 8192) >> 14;
        let rest = a - (high << 14);
        let middle = (rest + 64) >> 7;
        *h = high as i8;
        *md = middle as i8;
        *l = (rest - (middle << 7)) as i8;
    }
    (s, sum)
}

fn quantize(x: &[f32], m: usize, k: usize, acts: &mut Acts) {
    let (tiles, blocks) = (m.div_ceil(TR), k / QK);
    acts.planes.clear();
    acts.planes.resize(tiles * blocks * A_BLOCK, 0);
    acts.scale.clear();
    acts.scale.resize(tiles * blocks * TR, 0.0);
    acts.sum.clear();
    acts.sum.resize(tiles * blocks * TR, 0.0);
    // One row tile: (its index, its planes), its scales, its sums.
    type Tile<'a> = (((usize, &'a mut [i8]), &'a mut [f32]), &'a mut [f32]);
    let tile = |(((t, planes), scale), sum): Tile<'_>| {
        let rows = &x[t * TR * k..((t + 1) * TR).min(m) * k];
        // SAFETY: `gemm` runs only where AMX int8 (and so AVX-512 BW) runs; the buffers are one
        // row tile's.
        unsafe { simd::quantize_tile(rows, k, planes, scale, sum) }
    };
    let (per, sums) = (blocks * A_BLOCK, blocks * TR);
    // Row tiles are independent: split over the cores when big enough (a prefill's are MBs);
    // small ones stay on this thread (a minimum length past the count never splits).
    let min_len = if m * k >= 1 << 14 { 1 } else { usize::MAX };
    acts.planes
        .par_chunks_exact_mut(per)
        .enumerate()
        .zip(acts.scale.par_chunks_exact_mut(sums))
        .zip(acts.sum.par_chunks_exact_mut(sums))
        .with_min_len(min_len)
        .for_each(tile);
}

thread_local! {
    /// x quantized, kept between calls (a prefill's is MBs).
    static ACTS: std::cell::RefCell<Acts> = std::cell::RefCell::new(Acts::default());
    /// A task's strips and sums, per thread.
    static STRIP: std::cell::RefCell<Strip> = std::cell::RefCell::new(Strip::default());
}

/// A task's panels in B-tile order (`[panel][block][512 bytes]`), their scales and offsets in f32
/// (`[panel][block][16]`), and the f32 sums of one row tile (`[panel][16 rows][16]`).
#[derive(Default)]
struct Strip {
    b: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    acc: Vec<f32>,
}

struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint blocks of the output (see `gemm`).
unsafe impl Sync for OutPtr {}

/// `out[m x n] = x[m x k] W^T` for quantized panels `w`, on AMX int8 tiles. Panics unless
/// `runs_here()`.
pub(super) fn gemm(w: &QPanels, x: &[f32], m: usize, out: &mut [f32]) {
    assert!(runs_here(), "AMX int8 tiles do not run on this CPU");
    let (n, k) = (w.n(), w.k());
    assert!(x.len() == m * k && out.len() == m * n && k.is_multiple_of(QK), "shapes");
    if m == 0 || n == 0 {
        return;
    }
    let mut acts = ACTS.with_borrow_mut(std::mem::take);
    quantize(x, m, k, &mut acts);
    let out_ptr = OutPtr(out.as_mut_ptr());
    super::amx::for_each_task(m, TASK_ROWS, n.div_ceil(NR), |rows, panels| {
        let job = Job { acts: &acts, rows, panels, m, n, k, out: &out_ptr };
        STRIP.with_borrow_mut(|strip| {
            // SAFETY: runs_here (asserted) checked the CPU and the permission; the job's block
            // of `out` (its rows x its panels' columns) is its own and in bounds; `acts` holds
            // whole tiles of rows.
            unsafe { simd::job(w, &job, strip) }
        });
    });
    ACTS.with_borrow_mut(|a| *a = acts);
}

/// One task: rows (from a whole tile) x panels of the output.
struct Job<'a> {
    acts: &'a Acts,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    m: usize,
    n: usize,
    k: usize,
    out: &'a OutPtr,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Job, QPanels, QuantKind, Strip, A_BLOCK, A_MAX, A_TILE, B_TILE, NR, QK, TR};
    use crate::backend::amx::TileConfig;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// tmm0-2 the int32 sums of the high, middle and low digits (16 x 16), tmm3-5 the digits' A
    /// tiles (16 rows x 32 values of k), tmm6 a block's B tile (8 rows of 16 columns x 4 values
    /// of k).
    const CONFIG: TileConfig = TileConfig::new([64, 64, 64, 32, 32, 32, 64, 0], [16, 16, 16, 16, 16, 16, 8, 0]);

    /// Where a B tile row's byte `4 j + t` (column j, value t of four) comes from in 64 bytes
    /// holding four rows of k with 16 columns each: `16 t + j`.
    const TO_TILE: [u8; 64] = {
        let mut idx = [0u8; 64];
        let mut o = 0;
        while o < 64 {
            idx[o] = ((o % 4) * 16 + o / 4) as u8;
            o += 1;
        }
        idx
    };

    /// The three planes' int32 sums of one block, as the tiles store them.
    #[repr(C, align(64))]
    struct Sums([[i32; 16]; 3 * TR]);

    /// One tile of rows of x (`rows.len() / k` of them, at most 16) into its planes, scales and
    /// sums (`quantize`'s layout): per block, `s = max |x| / A_MAX`, each value `x / s` rounded to
    /// the nearest integer (ties to even, the default rounding of `vcvtps2dq`) and cut into
    /// three digits.
    ///
    /// # Safety
    /// The CPU runs AVX-512 BW; `planes` holds a tile's blocks (`k / 32 * A_BLOCK` bytes),
    /// `scale` and `sum` `k / 32 * 16` values.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_tile(rows: &[f32], k: usize, planes: &mut [i8], scale: &mut [f32], sum: &mut [f32]) {
        let blocks = k / QK;
        assert!(rows.len() <= TR * k && planes.len() >= blocks * A_BLOCK && scale.len() >= blocks * TR);
        assert!(sum.len() == scale.len());
        let limit = A_MAX as i32;
        for (r, row) in rows.chunks_exact(k).enumerate() {
            for b in 0..blocks {
                // SAFETY: 32 values of the row, and 16 + 16 bytes of each plane's row r of block
                // b, all inside the slices (asserted above).
                unsafe {
                    let src = row.as_ptr().add(b * QK);
                    let (v0, v1) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                    let inv = _mm512_set1_ps(if amax > 0.0 { A_MAX / amax } else { 0.0 });
                    scale[b * TR + r] = amax / A_MAX;
                    sum[b * TR + r] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
                    let dst = planes.as_mut_ptr().add(b * A_BLOCK + r * QK);
                    for (half, v) in [(0, v0), (16, v1)] {
                        let a = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
                        let a =
                            _mm512_max_epi32(_mm512_min_epi32(a, _mm512_set1_epi32(limit)), _mm512_set1_epi32(-limit));
                        let high = _mm512_srai_epi32::<14>(_mm512_add_epi32(a, _mm512_set1_epi32(8192)));
                        let rest = _mm512_sub_epi32(a, _mm512_slli_epi32::<14>(high));
                        let middle = _mm512_srai_epi32::<7>(_mm512_add_epi32(rest, _mm512_set1_epi32(64)));
                        let low = _mm512_sub_epi32(rest, _mm512_slli_epi32::<7>(middle));
                        for (plane, digit) in [(0, high), (1, middle), (2, low)] {
                            _mm_storeu_si128(dst.add(plane * A_TILE + half).cast(), _mm512_cvtepi32_epi8(digit));
                        }
                    }
                }
            }
        }
    }

    /// The task's panels into `strip`: B tiles, scales and (Q4_1) offsets in f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,f16c")]
    unsafe fn fill_strip(w: &QPanels, panels: std::ops::Range<usize>, strip: &mut Strip) {
        let blocks = w.k() / QK;
        let count = panels.len() * blocks;
        strip.b.resize(count * B_TILE, 0);
        strip.d.resize(count * NR, 0.0);
        strip.m.resize(count * NR, 0.0);
        let bytes = w.bytes();
        // SAFETY: every block read lies inside the panels (`offset` of a block of a panel of
        // `w`), every write inside the strip (sized above); the CPU has the features enabled.
        unsafe {
            let idx = _mm512_loadu_si512(TO_TILE.as_ptr().cast());
            let nibble = _mm512_set1_epi8(15);
            for (i, p) in panels.enumerate() {
                for kb in 0..blocks {
                    let blk = bytes[w.offset(p, kb * QK)..].as_ptr();
                    let at = i * blocks + kb;
                    let b = strip.b.as_mut_ptr().add(at * B_TILE);
                    _mm512_storeu_ps(
                        strip.d.as_mut_ptr().add(at * NR),
                        _mm512_cvtph_ps(_mm256_loadu_si256(blk.cast())),
                    );
                    match w.kind() {
                        QuantKind::Q8_0 => {
                            // `[32][16]` i8: four rows of k are 64 contiguous bytes.
                            for i in 0..8 {
                                let rows = _mm512_loadu_si512(blk.add(2 * NR + 64 * i).cast());
                                _mm512_storeu_si512(b.add(64 * i).cast(), _mm512_permutexvar_epi8(idx, rows));
                            }
                        }
                        QuantKind::Q4_1 => {
                            let offs = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2 * NR).cast()));
                            _mm512_storeu_ps(strip.m.as_mut_ptr().add(at * NR), offs);
                            // `[16][16]` bytes, byte i of a column holding k = i (low nibble) and
                            // k = i + 16 (high).
                            for i in 0..4 {
                                let rows = _mm512_loadu_si512(blk.add(4 * NR + 64 * i).cast());
                                let low = _mm512_and_si512(rows, nibble);
                                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(rows), nibble);
                                _mm512_storeu_si512(b.add(64 * i).cast(), _mm512_permutexvar_epi8(idx, low));
                                _mm512_storeu_si512(b.add(64 * (i + 4)).cast(), _mm512_permutexvar_epi8(idx, high));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each row tile of the job against every panel: per block, the three A tiles are loaded
    /// once and every panel's B tile goes past them (A came from L2 for each panel when the
    /// panels were the outer loop: a third of the time in its loads); the f32 sums of the row
    /// tile stay in the strip's `acc` (L1).
    ///
    /// # Safety
    /// The CPU runs AMX-INT8 and AVX-512 VBMI with the tile permission granted; the job's rows
    /// (starting at a whole tile) and panels lie inside the output, which no other job writes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,f16c")]
    pub unsafe fn job(w: &QPanels, job: &Job<'_>, strip: &mut Strip) {
        let blocks = job.k / QK;
        let q4 = w.kind() == QuantKind::Q4_1;
        let np = job.panels.len();
        // SAFETY: the job's panels are panels of `w`.
        unsafe { fill_strip(w, job.panels.clone(), strip) };
        strip.acc.resize(np * TR * NR, 0.0);
        let mut sums = [Sums([[0; 16]; 3 * TR]), Sums([[0; 16]; 3 * TR])];
        let bufs = [sums[0].0.as_mut_ptr(), sums[1].0.as_mut_ptr()];
        // SAFETY: the caller's contract: the CPU runs AMX with the permission granted.
        unsafe { CONFIG.load() };
        for r0 in job.rows.clone().step_by(TR) {
            let t = r0 / TR;
            strip.acc.fill(0.0);
            for kb in 0..blocks {
                let at = (t * blocks + kb) * TR;
                // SAFETY (this block): the row tile's block of planes lies inside `planes` (whole
                // tiles of rows), its scales and sums inside theirs; each panel's B tile, scales
                // and offsets inside the strip (filled for the job's panels); the sums go to
                // `sums` (three 1 KiB tiles) and the f32 sums to the strip's `acc`.
                unsafe {
                    let a = job.acts.planes.as_ptr().add(at / TR * A_BLOCK);
                    asm!(
                        "tileloadd tmm3, [{hi} + {lda}*1]",
                        "tileloadd tmm4, [{mid} + {lda}*1]",
                        "tileloadd tmm5, [{lo} + {lda}*1]",
                        hi = in(reg) a,
                        mid = in(reg) a.add(A_TILE),
                        lo = in(reg) a.add(2 * A_TILE),
                        lda = in(reg) QK,
                        options(nostack, readonly),
                    );
                    let (scale, sum) = (job.acts.scale.as_ptr().add(at), job.acts.sum.as_ptr().add(at));
                    // Panel i's tiles into `sums[i % 2]`.
                    let dot = |i: usize| {
                        let b = strip.b.as_ptr().add((i * blocks + kb) * B_TILE);
                        let c = bufs[i % 2] as *mut u8;
                        macro_rules! dot {
                            ($op:literal) => {
                                asm!(
                                    "tileloadd tmm6, [{b} + {ldb}*1]",
                                    "tilezero tmm0",
                                    "tilezero tmm1",
                                    "tilezero tmm2",
                                    concat!($op, " tmm0, tmm3, tmm6"),
                                    concat!($op, " tmm1, tmm4, tmm6"),
                                    concat!($op, " tmm2, tmm5, tmm6"),
                                    "tilestored [{c0} + {ldc}*1], tmm0",
                                    "tilestored [{c1} + {ldc}*1], tmm1",
                                    "tilestored [{c2} + {ldc}*1], tmm2",
                                    b = in(reg) b,
                                    c0 = in(reg) c,
                                    c1 = in(reg) c.add(TR * 64),
                                    c2 = in(reg) c.add(2 * TR * 64),
                                    ldb = in(reg) 64usize,
                                    ldc = in(reg) 64usize,
                                    options(nostack),
                                )
                            };
                        }
                        // Q4_1's nibbles are unsigned; Q8_0's weights and every plane signed.
                        if q4 {
                            dot!("tdpbsud");
                        } else {
                            dot!("tdpbssd");
                        }
                    };
                    dot(0);
                    for i in 0..np {
                        // The next panel's tiles go first, so the tile unit runs them while
                        // this panel's sums are scaled.
                        if i + 1 < np {
                            dot(i + 1);
                        }
                        let strip_at = i * blocks + kb;
                        let d = _mm512_loadu_ps(strip.d.as_ptr().add(strip_at * NR));
                        let offs = _mm512_loadu_ps(strip.m.as_ptr().add(strip_at * NR));
                        let acc = strip.acc.as_mut_ptr().add(i * TR * NR);
                        let planes = bufs[i % 2];
                        for r in 0..TR {
                            // 16384 hi + (128 mid + lo): the second part fits in an int32 (the
                            // first may not), and f32 rounds each by at most 2^-24.
                            let hi = _mm512_cvtepi32_ps(_mm512_load_si512(planes.add(r).cast()));
                            let mid = _mm512_load_si512(planes.add(TR + r).cast());
                            let lo = _mm512_load_si512(planes.add(2 * TR + r).cast());
                            let rest = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32::<7>(mid), lo));
                            let dot = _mm512_fmadd_ps(hi, _mm512_set1_ps(16384.0), rest);
                            let scaled = _mm512_mul_ps(d, _mm512_set1_ps(*scale.add(r)));
                            let mut v = _mm512_fmadd_ps(dot, scaled, _mm512_loadu_ps(acc.add(r * NR)));
                            if q4 {
                                v = _mm512_fmadd_ps(offs, _mm512_set1_ps(*sum.add(r)), v);
                            }
                            _mm512_storeu_ps(acc.add(r * NR), v);
                        }
                    }
                }
            }
            for (i, p) in job.panels.clone().enumerate() {
                let cols = (job.n - p * NR).min(NR);
                let mask = if cols == NR { !0 } else { (1u16 << cols) - 1 };
                for r in 0..TR.min(job.m - r0) {
                    // SAFETY: row r0 + r < m, columns p * 16 .. + cols <= n: this job's block;
                    // the sums are inside the strip's `acc`.
                    unsafe {
                        let v = _mm512_loadu_ps(strip.acc.as_ptr().add((i * TR + r) * NR));
                        _mm512_mask_storeu_ps(job.out.0.add((r0 + r) * job.n + p * NR), mask, v);
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    /// Never called: `runs_here` is false off x86_64.
    pub unsafe fn quantize_tile(_: &[f32], _: usize, _: &mut [i8], _: &mut [f32], _: &mut [f32]) {
        unreachable!("AMX is x86_64 only")
    }

    /// Never called: `runs_here` is false off x86_64.
    pub unsafe fn job(_: &super::QPanels, _: &super::Job<'_>, _: &mut super::Strip) {
        unreachable!("AMX is x86_64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gemm::PackedLinear;
    use crate::backend::isa::Isa;
    use crate::backend::quant::{dequantize_row, quantize_row};

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Quantizing a block and putting it back is within half a step of 22 bits (and f32's
    /// rounding), the digits in range, the sum exact; the AVX-512 quantizer gives the same digits
    /// and scales on a partial tile of rows, where it runs.
    #[test]
    fn blocks_quantize_to_22_bits() {
        let k = 96;
        let mut x = data(11 * k, 7);
        x[5] = 1e4; // a block with an outlier
        x[k + 32..k + 64].fill(0.0); // and a block of zeros
        x[2 * k + 3] = -3e-3; // and a small one
        let blocks = k / QK;
        let mut want = (vec![0i8; blocks * A_BLOCK], vec![0.0f32; blocks * TR], vec![0.0f32; blocks * TR]);
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (bi, b) in row.chunks_exact(QK).enumerate() {
                let (mut hi, mut mid, mut lo) = ([0i8; QK], [0i8; QK], [0i8; QK]);
                let (s, sum) = quantize_block(b, &mut hi, &mut mid, &mut lo);
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (((&v, &h), &md), &l) in b.iter().zip(&hi).zip(&mid).zip(&lo) {
                    assert!((-127..=127).contains(&h) && (-64..=64).contains(&md) && (-64..=63).contains(&l));
                    let back = s as f64 * (16384.0 * h as f64 + 128.0 * md as f64 + l as f64);
                    // Half a step, and f32's rounding of s and of x / s (values up to 2^21).
                    assert!((back - v as f64).abs() <= amax as f64 * (0.5 / A_MAX as f64 + 2e-7), "{v} -> {back}");
                }
                assert!((sum - b.iter().sum::<f32>()).abs() <= 1e-6 * amax * QK as f32);
                for (plane, digits) in [hi, mid, lo].iter().enumerate() {
                    want.0[bi * A_BLOCK + plane * A_TILE + r * QK..][..QK].copy_from_slice(digits);
                }
                (want.1[bi * TR + r], want.2[bi * TR + r]) = (s, sum);
            }
        }
        if !std::is_x86_feature_detected!("avx512bw") {
            return;
        }
        let mut got = (vec![0i8; blocks * A_BLOCK], vec![0.0f32; blocks * TR], vec![0.0f32; blocks * TR]);
        // SAFETY: AVX-512 BW runs (checked); the buffers are one tile's.
        unsafe { simd::quantize_tile(&x, k, &mut got.0, &mut got.1, &mut got.2) };
        assert_eq!(got.0, want.0);
        assert_eq!(got.1, want.1);
        for (g, w) in got.2.iter().zip(&want.2) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    /// The tiles against the arithmetic they stand for, done in plain f64 (every block's
    /// activations quantized the same way, times the dequantized weights), and against the
    /// portable kernel within 22 bits' error. Ragged rows and columns, more than one task of
    /// rows, both formats. Prints whether the tiles ran.
    #[test]
    fn tiles_match_the_quantized_reference() {
        println!("AMX int8 tiles run here: {}", runs_here());
        if !runs_here() {
            return;
        }
        for &(m, n, k) in &[(16, 16, 32), (17, 37, 64), (33, 200, 576), (300, 70, 1536), (600, 16, 96)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            for kind in QuantKind::ALL {
                let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quantize_row(kind, r)).collect();
                let mut deq = vec![0.0; n * k];
                for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
                    dequantize_row(kind, r, o);
                }
                // x as the tiles see it.
                let mut xq = vec![0.0f64; m * k];
                for (src, dst) in x.chunks_exact(QK).zip(xq.chunks_exact_mut(QK)) {
                    let (mut hi, mut mid, mut lo) = ([0i8; QK], [0i8; QK], [0i8; QK]);
                    let (s, _) = quantize_block(src, &mut hi, &mut mid, &mut lo);
                    for (((d, &h), &md), &l) in dst.iter_mut().zip(&hi).zip(&mid).zip(&lo) {
                        *d = s as f64 * (16384.0 * h as f64 + 128.0 * md as f64 + l as f64);
                    }
                }
                // Q4_1's offsets m (f16, bytes 2..4 of a block) multiply the exact sum of x.
                let bb = kind.block_bytes();
                let offset = |j: usize, t: usize| match kind {
                    QuantKind::Q8_0 => 0.0,
                    QuantKind::Q4_1 => {
                        let at = (j * k + t) / QK * bb;
                        half::f16::from_le_bytes([raw[at + 2], raw[at + 3]]).to_f64()
                    }
                };
                let panels = QPanels::from_ggml(kind, &raw, n, k).unwrap();
                let mut got = vec![f32::NAN; m * n];
                gemm(&panels, &x, m, &mut got);
                // The portable kernel (f32 activations) on the same blocks.
                let mut portable = vec![f32::NAN; m * n];
                PackedLinear::from_ggml(kind, &raw, n, k).unwrap().forward_with(&x, m, &mut portable, Isa::Portable);
                let mut worst = 0.0f32;
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut exact) = (0.0f64, 0.0f64);
                        for t in 0..k {
                            let (wt, mt) = (deq[j * k + t] as f64, offset(j, t));
                            want += xq[i * k + t] * (wt - mt) + x[i * k + t] as f64 * mt;
                            exact += x[i * k + t] as f64 * wt;
                        }
                        let g = got[i * n + j] as f64;
                        worst = crate::backend::worst(worst, (g - want).abs() as f32);
                        let f = portable[i * n + j] as f64;
                        assert!(
                            (g - f).abs() <= 4e-7 * k as f64 + 1e-5,
                            "{kind:?} m={m} n={n} k={k} [{i},{j}]: {g} vs the portable kernel's {f}"
                        );
                        // 22 bits. error on each of k values below 1 against weights below 1.
                        assert!(
                            (g - exact).abs() <= 4e-7 * k as f64 + 1e-5,
                            "{kind:?} m={m} n={n} k={k} [{i},{j}]: {g} vs {exact}"
                        );
                    }
                }
                println!("{kind:?} m={m} n={n} k={k}: worst {worst:e}");
                // The same arithmetic up to f32 rounding of the sums.
                assert!(worst <= 4e-6 + 2e-8 * k as f32, "{kind:?} m={m} n={n} k={k}: {worst}");
            }
        }
    }
}
