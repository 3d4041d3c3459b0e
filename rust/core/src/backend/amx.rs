//! bf16 linear layers through AMX tiles (Intel Xeon since Sapphire Rapids), for a bf16 model's
//! many-row products: prefill and batched decode.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 tile of bf16 activations by a 32 x 16 tile of bf16
//! weights into 16 x 16 f32 sums: 16,384 products, where an AVX-512 FMA does 16. Those products
//! round the activations to bf16, as HF transformers and every GPU kernel do in a bf16 model, so
//! the kernel runs only where the model's products are bf16 (`gemm::Products`); with f32 products
//! the AVX-512 kernel keeps the exact path that the goldens check.
//!
//! The weights stay in `gemm`'s panels, the layout a batch-1 decode streams fastest; no second
//! copy. A task turns each pair of its panels into the tile layout AMX reads (pairs of
//! consecutive k for each column: `[k / 2][16][2]`) once, into a scratch buffer that stays in
//! L2, and then runs every row block of its rows against it; one `vpermt2w` makes a tile row.
//! C is 32 x 32 (four tiles), the 2 x 2 blocking that keeps all eight tile registers busy: per
//! 32 values of k, two A tiles and two B tiles are loaded for four products.
//!
//! Linux only lets a process use the tile registers after asking (`arch_prctl`); `runs_here`
//! asks once. Tiles are released at the end of every task, so a thread that is switched out
//! between calls saves no tile state.

use rayon::prelude::*;

/// Rows of a tile (A and C).
const TR: usize = 16;
/// bf16 values of k in an A tile row and a B tile (16 pairs).
const TK: usize = 32;
/// Rows of C a block covers: two A tiles.
pub(super) const BLOCK_ROWS: usize = 2 * TR;
/// Rows of x a task runs against the panels it converts once: 256 rows of 1,536 bf16 values
/// are 768 KiB, inside a 2 MiB L2 with the converted panels beside them.
const TASK_ROWS: usize = 512;

/// Whether this CPU and OS run AMX bf16 tiles (asked once, with the permission request).
pub fn runs_here() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    // CPUID.7.0:EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the tile kernel's glue is AVX-512BW.
    // SAFETY: CPUID exists on every x86_64 CPU.
    let (basic, leaf7) = (__cpuid(1), __cpuid_count(7, 0));
    let cpu = leaf7.edx >> 22 & 1 == 1 && leaf7.edx >> 24 & 1 == 1;
    if !cpu || !std::is_x86_feature_detected!("avx512bw") {
        return false;
    }
    // The OS must save tile state (XCR0 bits 17 and 18), readable only with OSXSAVE (CPUID.1:ECX 27).
    if basic.ecx >> 27 & 1 == 0 {
        return false;
    }
    // SAFETY: XGETBV exists where OSXSAVE is set (checked above).
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 >> 17 & 3 != 3 {
        return false;
    }
    // Linux 5.16+: ask for the tile data state (XFEATURE_XTILEDATA = 18) for the whole process.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a syscall with two integer arguments; it changes only this process's permissions.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
    if !granted {
        eprintln!("horae: this CPU has AMX but the kernel refused the tile permission; bf16 GEMMs use AVX-512");
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Where a bf16 weight matrix's panels sit: 16 columns a panel, each panel row 16 bf16 values
/// with column `j` at `slot[j]`.
pub(super) struct Panels<'a, F: Fn(usize, usize) -> usize + Sync> {
    pub values: &'a [u16],
    /// Index of row `kk` of panel `p` in `values`.
    pub offset: F,
    pub slot: [u8; 16],
    /// Panels stored (the last may be partly padding: columns past `n` are zero).
    pub count: usize,
}

/// `out[m x n] = bf16(x[m x k]) W^T`, f32 sums. Panics unless `runs_here()`.
pub(super) fn gemm_bf16<F: Fn(usize, usize) -> usize + Sync>(
    w: &Panels<'_, F>,
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    assert!(runs_here(), "AMX bf16 tiles do not run on this CPU");
    assert!(x.len() == m * k && out.len() == m * n && w.count * 16 >= n, "shapes");
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.next_multiple_of(TK);
    let mut a = ROWS.with_borrow_mut(std::mem::take);
    to_bf16_rows(x, m, k, kp, &mut a);
    let pairs = w.count.div_ceil(2);
    let row_tasks = m.div_ceil(TASK_ROWS);
    let groups = (rayon::current_num_threads() * 4).div_ceil(row_tasks).min(pairs);
    let per_task = pairs.div_ceil(groups);
    let groups = pairs.div_ceil(per_task);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (r0, pair0) = ((task / groups) * TASK_ROWS, (task % groups) * per_task);
        let job = Job {
            a: &a,
            kp,
            k,
            rows: r0..(r0 + TASK_ROWS).min(m),
            pairs: pair0..(pair0 + per_task).min(pairs),
            m,
            n,
            out: &out_ptr,
        };
        SCRATCH.with_borrow_mut(|b| {
            // SAFETY: runs_here (asserted above) checked the CPU features and the permission;
            // the job's blocks of `out` are its own (disjoint rows x pairs), in bounds (shapes
            // asserted), and `a` holds `m.next_multiple_of(BLOCK_ROWS)` rows of `kp` values.
            unsafe { simd::job(w, &job, b) }
        });
    };
    let tasks = row_tasks * groups;
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    ROWS.with_borrow_mut(|buf| *buf = a);
}

thread_local! {
    /// x in bf16, kept between calls (a prefill's is MBs).
    static ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's panels in tile layout.
    static SCRATCH: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x[m x k]` rounded to bf16 (nearest even) as `[m'][kp]`, consecutive values paired in a u32
/// (the lower-indexed one in the low half, as a tile row reads them), `m'` rounded up to whole
/// blocks, padding zero: a tile reads 32 values of a row and 32 rows of a block.
fn to_bf16_rows(x: &[f32], m: usize, k: usize, kp: usize, a: &mut Vec<u32>) {
    a.clear();
    a.resize(m.next_multiple_of(BLOCK_ROWS) * kp / 2, 0);
    let convert = |(r, row): (usize, &mut [u32])| {
        if r < m {
            let src = &x[r * k..(r + 1) * k];
            // 16 at a time through `vcvtneps2bf16` (AMX CPUs have AVX-512 BF16), the rest one by one.
            let wide = k / 16 * 16;
            super::bf16_dot::pair_along(&src[..wide], &mut row[..wide / 2]);
            for (i, &v) in src.iter().enumerate().skip(wide) {
                row[i / 2] |= (half::bf16::from_f32(v).to_bits() as u32) << (16 * (i % 2));
            }
        }
    };
    if m * k >= 1 << 14 {
        a.par_chunks_mut(kp / 2).enumerate().for_each(convert);
    } else {
        a.chunks_mut(kp / 2).enumerate().for_each(convert);
    }
}

struct OutPtr(*mut f32);
// SAFETY: jobs write disjoint blocks of the output (see `gemm_bf16`).
unsafe impl Sync for OutPtr {}

/// One task: rows × panel pairs of the output.
struct Job<'a> {
    /// x in bf16 pairs (`to_bf16_rows`).
    a: &'a [u32],
    kp: usize,
    k: usize,
    rows: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    m: usize,
    n: usize,
    out: &'a OutPtr,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Job, Panels, BLOCK_ROWS, TK, TR};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// The tile configuration: palette 1, eight tiles of 16 rows by 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: Config = Config {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Bytes of one tile.
    const TILE: usize = TR * 64;

    /// # Safety
    /// The CPU has AMX-TILE, AMX-BF16 and AVX-512BW with the tile permission granted; `job`'s
    /// rows and pairs lie inside the output, which no other job writes; `job.a` holds every
    /// block of `job.rows` in full.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn job<F: Fn(usize, usize) -> usize + Sync>(w: &Panels<'_, F>, job: &Job<'_>, scratch: &mut Vec<u16>) {
        let kb = job.kp / TK;
        // Two panels of tile rows: [kb][2][16 rows][32 values].
        scratch.resize(kb * 2 * TILE / 2, 0);
        let mut partial = [[0f32; 2 * TR]; BLOCK_ROWS];
        // SAFETY: CONFIG is a valid palette-1 configuration, 64-byte aligned.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        for pair in job.pairs.clone() {
            for half in 0..2 {
                // SAFETY: the caller's guarantee; `convert` checks its panel and k against the matrix.
                unsafe { convert(w, 2 * pair + half, job.k, kb, &mut scratch[half * TILE / 2..]) };
            }
            let b = scratch.as_ptr() as *const u8;
            let col0 = pair * 32;
            for r0 in job.rows.clone().step_by(BLOCK_ROWS) {
                let a = job.a[r0 * job.kp / 2..].as_ptr() as *const u8;
                let lda = job.kp * 2;
                // SAFETY: tiles 4 and 5 read rows r0..r0+32 of `a` (whole blocks are there),
                // 64 bytes from k0; tiles 6 and 7 read the two converted panels' tile at kb.
                unsafe {
                    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    for t in 0..kb {
                        asm!(
                            "tileloadd tmm4, [{a0} + {lda}*1]",
                            "tileloadd tmm6, [{b0} + {ldb}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1} + {ldb}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tileloadd tmm5, [{a1} + {lda}*1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            a0 = in(reg) a.add(t * 64),
                            a1 = in(reg) a.add(TR * lda + t * 64),
                            b0 = in(reg) b.add(t * 2 * TILE),
                            b1 = in(reg) b.add(t * 2 * TILE + TILE),
                            lda = in(reg) lda,
                            ldb = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                }
                let rows = (job.m - r0).min(BLOCK_ROWS);
                let cols = (job.n - col0).min(32);
                let ldc = job.n * 4;
                if rows == BLOCK_ROWS && cols == 32 {
                    // SAFETY: the 32 x 32 block at (r0, col0) is inside the output and this job's.
                    unsafe {
                        let c = job.out.0.add(r0 * job.n + col0) as *mut u8;
                        asm!(
                            "tilestored [{c00} + {ldc}*1], tmm0",
                            "tilestored [{c01} + {ldc}*1], tmm1",
                            "tilestored [{c10} + {ldc}*1], tmm2",
                            "tilestored [{c11} + {ldc}*1], tmm3",
                            c00 = in(reg) c,
                            c01 = in(reg) c.add(64),
                            c10 = in(reg) c.add(TR * ldc),
                            c11 = in(reg) c.add(TR * ldc + 64),
                            ldc = in(reg) ldc,
                            options(nostack),
                        );
                    }
                } else {
                    // SAFETY: `partial` is 32 x 32 f32, 128 bytes a row.
                    unsafe {
                        let c = partial.as_mut_ptr() as *mut u8;
                        asm!(
                            "tilestored [{c00} + {ldc}*1], tmm0",
                            "tilestored [{c01} + {ldc}*1], tmm1",
                            "tilestored [{c10} + {ldc}*1], tmm2",
                            "tilestored [{c11} + {ldc}*1], tmm3",
                            c00 = in(reg) c,
                            c01 = in(reg) c.add(64),
                            c10 = in(reg) c.add(TR * 128),
                            c11 = in(reg) c.add(TR * 128 + 64),
                            ldc = in(reg) 128usize,
                            options(nostack),
                        );
                    }
                    for (r, row) in partial.iter().enumerate().take(rows) {
                        // SAFETY: row r0 + r < m, columns col0..col0 + cols < n: this job's block.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(job.out.0.add((r0 + r) * job.n + col0), cols) };
                        dst.copy_from_slice(&row[..cols]);
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Panel `p` of `w` as `kb` tiles of 16 rows of 32 bf16 values, each row the pairs (k, k + 1)
    /// of the panel's 16 columns, written every `TILE` bytes apart from the next panel's
    /// (`dst[t * TILE..]`, in u16: `t * TILE` values is two tiles). A panel past the matrix, or
    /// rows past k, are zeros.
    ///
    /// # Safety
    /// AVX-512BW; `dst` holds `kb * TILE` values; `w.offset` gives indices inside `w.values` for
    /// every stored panel and every row below `k`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn convert<F: Fn(usize, usize) -> usize + Sync>(
        w: &Panels<'_, F>,
        p: usize,
        k: usize,
        kb: usize,
        dst: &mut [u16],
    ) {
        // Word j of a tile row: even j the column j / 2 of row k, odd j the same column of row k + 1.
        let idx: [u16; 32] = std::array::from_fn(|j| w.slot[j / 2] as u16 + if j % 2 == 1 { 32 } else { 0 });
        // SAFETY: 32 u16 values.
        let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
        let row = |kk: usize| {
            if p < w.count && kk < k {
                let at = (w.offset)(p, kk);
                assert!(at + 16 <= w.values.len(), "panel row out of bounds");
                // SAFETY: 16 values at `at`, inside `values` (asserted).
                unsafe { _mm512_zextsi256_si512(_mm256_loadu_si256(w.values.as_ptr().add(at) as *const __m256i)) }
            } else {
                _mm512_setzero_si512()
            }
        };
        assert!(dst.len() >= (kb - 1) * TILE + TILE / 2, "scratch");
        for t in 0..kb {
            for r in 0..TR {
                let kk = t * TK + 2 * r;
                let v = _mm512_permutex2var_epi16(row(kk), idx, row(kk + 1));
                // SAFETY: tile t's row r: (t * TILE + r * 32) + 32 <= dst.len() (asserted).
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().add(t * TILE + r * 32) as *mut __m512i, v) };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    /// Never called: `runs_here` is false off x86_64.
    pub unsafe fn job<F: Fn(usize, usize) -> usize + Sync>(
        _: &super::Panels<'_, F>,
        _: &super::Job<'_>,
        _: &mut Vec<u16>,
    ) {
        unreachable!("AMX is x86_64 only")
    }
}
