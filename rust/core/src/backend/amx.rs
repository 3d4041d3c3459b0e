//! A bf16 model's many-row products on AMX tiles (Intel Xeon since Sapphire Rapids): its linear
//! layers in prefill and batched decode (`gemm_bf16`), and its prefill attention's (`product`).
//!
//! One `tdpbf16ps` multiplies a 16 x 32 tile of bf16 activations by a 32 x 16 tile of bf16
//! weights into 16 x 16 f32 sums: 16,384 products, where an AVX-512 FMA does 16. Those products
//! round the activations to bf16, as HF transformers and every GPU kernel do in a bf16 model, so
//! the kernel runs only where the model's products are bf16 (`gemm::Products`); with f32 products
//! the AVX-512 kernel keeps the exact path that the goldens check.
//!
//! Where AMX runs, a bf16 matrix is packed in the order the tiles read (`TileOrder`: for each
//! panel of 16 columns, tiles of 32 values of k stored as 16 rows of (k, k + 1) pairs), so a tile
//! is one 1 KiB load straight from the weights; the AVX-512 kernel reads the same order for the
//! rows below `AMX_MIN_ROWS` (`gemm`), so there is one copy. Turning the usual panels into tiles
//! on every call cost 0.7-0.85x at 512 rows and more at 32. C is 32 x 32 (four tiles), the 2 x 2
//! blocking that keeps all eight tile registers busy: per 32 values of k, two A tiles and two B
//! tiles are loaded for four products.
//!
//! Linux only lets a process use the tile registers after asking (`arch_prctl`); `runs_here`
//! asks once. Tiles are released at the end of every task, so a thread that is switched out
//! between calls saves no tile state.

use rayon::prelude::*;

pub use super::bf16_dot::Product;

/// Rows of a tile (A and C).
const TR: usize = 16;
/// bf16 values of k in an A tile row and a B tile (16 pairs).
const TK: usize = 32;
/// Rows of C a block covers: two A tiles.
const BLOCK_ROWS: usize = 2 * TR;
/// Steps of k (32 values each) per chunk: a pair of panels' chunk is 32 KiB of tiles, which stays
/// in L1 while every row block of the task goes past it (the whole depth of a 1,536-wide layer,
/// 96 KiB, did not: 0.65x the rate of the 576-wide layers); C goes out and back between chunks.
const CHUNK_STEPS: usize = 16;
/// Rows of x a task runs against its panels: 256 rows of 1,536 bf16 values are 768 KiB, inside
/// a 2 MiB L2.
const TASK_ROWS: usize = 256;

/// Whether this CPU and OS run AMX bf16 tiles (asked once, with the permission request).
pub fn runs_here() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};
    // CPUID.7.0:EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the glue around the tiles (rounding x to
    // bf16, the attention's pairs) is AVX-512 BF16 and BW, which every AMX CPU has.
    let (basic, leaf7) = (__cpuid(1), __cpuid_count(7, 0));
    let cpu = leaf7.edx >> 22 & 1 == 1 && leaf7.edx >> 24 & 1 == 1;
    if !cpu || !std::is_x86_feature_detected!("avx512bw") || !super::bf16_dot::runs_here() {
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

/// Panels stored together in tile order (so a decode tile of four panels on AVX-512 reads one
/// stream, as `gemm`'s groups do).
pub(super) const GROUP: usize = 4;
/// u16 values of one tile (16 rows of 32).
const TILE_VALUES: usize = TR * TK;

/// Where the values of a bf16 matrix of k columns sit in tile order:
/// `[panel groups][k / 32][GROUP panels][16 pair rows][16 columns][2]`, padded with zeros (the
/// last group's missing panels, and k up to a multiple of 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TileOrder {
    /// Tiles of k per panel.
    pub kt: usize,
}

impl TileOrder {
    pub fn new(k: usize) -> Self {
        Self { kt: k.div_ceil(TK) }
    }
    /// Values between tile t and tile t + 1 of one panel.
    pub const STEP: usize = GROUP * TILE_VALUES;
    /// Index of the pair row holding row `kk` of panel `p` (32 values: 16 columns, each its rows
    /// kk and kk + 1 for an even kk).
    pub fn row(self, p: usize, kk: usize) -> usize {
        (p / GROUP) * self.kt * Self::STEP + (kk / TK) * Self::STEP + (p % GROUP) * TILE_VALUES + (kk % TK) / 2 * 32
    }
    /// Values a matrix of `np` panels takes.
    pub fn len(self, np: usize) -> usize {
        np.div_ceil(GROUP) * self.kt * Self::STEP
    }
}

/// `out[m x n] = bf16(x[m x k]) W^T`, f32 sums, W's values in tile `order`. Panics unless
/// `runs_here()`.
pub(super) fn gemm_bf16(w: &[u16], order: TileOrder, n: usize, k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    assert!(runs_here(), "AMX bf16 tiles do not run on this CPU");
    let np = n.div_ceil(16);
    assert!(x.len() == m * k && out.len() == m * n && order == TileOrder::new(k) && w.len() >= order.len(np), "shapes");
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.next_multiple_of(TK);
    let mut a = ROWS.with_borrow_mut(std::mem::take);
    to_bf16_rows(x, m, k, kp, &mut a);
    let pairs = np.div_ceil(2);
    let out_ptr = OutPtr(out.as_mut_ptr());
    for_each_task(m, TASK_ROWS, pairs, |rows, pairs| {
        let job = Job { a: &a, kp, rows, pairs, m, n, out: &out_ptr };
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: runs_here (asserted above) checked the CPU features and the permission;
            // the job's blocks of `out` are its own (disjoint rows x pairs), in bounds, and its
            // pairs' tiles inside `w` (shapes asserted); `a` holds
            // `m.next_multiple_of(BLOCK_ROWS)` rows of `kp` values.
            unsafe { simd::job(w, order, &job, s) }
        });
    });
    ROWS.with_borrow_mut(|buf| *buf = a);
}

/// Run `task(rows, units)` over `m` rows in runs of `task_rows` times `units` (panels or pairs of
/// them) in groups, for the tile GEMMs: about four tasks a thread, so rayon can balance uneven
/// cores; each task owns its rows x units of the output. A single task runs inline.
pub(super) fn for_each_task(
    m: usize,
    task_rows: usize,
    units: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let row_tasks = m.div_ceil(task_rows);
    let groups = (rayon::current_num_threads() * 4).div_ceil(row_tasks).min(units);
    let per_task = units.div_ceil(groups);
    let groups = units.div_ceil(per_task);
    let run = |t: usize| {
        let (r0, u0) = ((t / groups) * task_rows, (t % groups) * per_task);
        task(r0..(r0 + task_rows).min(m), u0..(u0 + per_task).min(units))
    };
    let tasks = row_tasks * groups;
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// `bf16_dot::product` on AMX tiles, for the prefill attention's small products: the same
/// operands (`Product`), with A's pairs along its rows (`acs == 1`) and `rows`, `kp` and `n`
/// multiples of 16. Panics unless `runs_here()`.
/// Run `m` into `c`, adding to what `c` holds when `accumulate`.
pub fn product(m: &Product<'_>, c: &mut [f32], accumulate: bool) {
    checked_product(m, None, c, accumulate)
}

/// `product` of f32 operands each split in two bf16 parts, x = hi + lo: C (+)= Ahi Bhi +
/// Alo Bhi + Ahi Blo, where `m` names the hi parts and the lo parts lie `a_lo` pairs further
/// along A's rows and `b_lo` rows further down B. Each term keeps about 2^-17 of its value
/// (the lo lo term and lo's own rounding), against bf16's 2^-9.
pub fn product_split(m: &Product<'_>, a_lo: usize, b_lo: usize, c: &mut [f32], accumulate: bool) {
    checked_product(m, Some((a_lo, b_lo)), c, accumulate)
}

fn checked_product(m: &Product<'_>, lo: Option<(usize, usize)>, c: &mut [f32], accumulate: bool) {
    assert!(runs_here(), "AMX bf16 tiles do not run on this CPU");
    let whole = |v: usize| v > 0 && v.is_multiple_of(TR);
    assert!(whole(m.rows) && whole(m.kp) && whole(m.n), "whole tiles");
    let (a_lo, b_lo) = lo.unwrap_or((0, 0));
    assert!(m.acs == 1 && m.n <= m.ldb && m.n <= m.ldc && a_lo + m.kp <= m.ars, "strides");
    let a_end = (m.rows - 1) * m.ars + a_lo + m.kp;
    assert!(m.a.len() >= a_end && m.b.len() >= (b_lo + m.kp - 1) * m.ldb + m.n, "operands");
    assert!(c.len() >= (m.rows - 1) * m.ldc + m.n, "output");
    // SAFETY: the CPU runs the tiles (asserted); every tile, hi and lo, lies inside a, b and c
    // (asserted).
    unsafe { simd::product(m, lo, c.as_mut_ptr(), accumulate) }
}

thread_local! {
    /// x in bf16, kept between calls (a prefill's is MBs).
    static ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH: std::cell::RefCell<Scratch> = const { std::cell::RefCell::new(Scratch { edge: Vec::new() }) };
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
                row[i / 2] |= (super::bf16::round(v) as u32) << (16 * (i % 2));
            }
        }
    };
    if m * k >= 1 << 14 {
        a.par_chunks_mut(kp / 2).enumerate().for_each(convert);
    } else {
        a.chunks_mut(kp / 2).enumerate().for_each(convert);
    }
}

/// A task's buffers, kept per thread.
struct Scratch {
    /// The accumulators of blocks at the output's edge (rows x 32).
    edge: Vec<f32>,
}

/// A tile configuration (palette 1): each tile's bytes a row and rows, tiles past the eighth
/// unused. `ldtilecfg` reads it from 64-byte-aligned memory.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    pub(super) const fn new(colsb: [u16; 8], rows: [u8; 8]) -> Self {
        let mut c = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        let mut i = 0;
        while i < 8 {
            c.colsb[i] = colsb[i];
            c.rows[i] = rows[i];
            i += 1;
        }
        c
    }

    /// Configure this thread's tiles.
    ///
    /// # Safety
    /// The CPU runs AMX tiles with the permission granted (`runs_here`).
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn load(&self) {
        // SAFETY: a valid palette-1 configuration, aligned (`repr`); the caller's contract.
        unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) self, options(nostack, readonly)) };
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
    rows: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    m: usize,
    n: usize,
    out: &'a OutPtr,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Job, Product, Scratch, TileConfig, TileOrder, BLOCK_ROWS, CHUNK_STEPS, TK, TR};
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    /// Steps ahead (32 values of k each) the first row block prefetches a pair's tiles.
    const AHEAD: usize = 4;

    /// Eight tiles of 16 rows by 64 bytes.
    const CONFIG: TileConfig = TileConfig::new([64; 8], [16; 8]);

    /// Bytes of one tile.
    const TILE: usize = TR * 64;

    /// C tile `i` (0..4) to or from memory, `ld` bytes a row.
    macro_rules! c_tile {
        (load, $i:expr, $p:expr, $ld:expr) => {
            match $i {
                0 => asm!("tileloadd tmm0, [{p} + {ld}*1]", p = in(reg) $p, ld = in(reg) $ld, options(nostack, readonly)),
                1 => asm!("tileloadd tmm1, [{p} + {ld}*1]", p = in(reg) $p, ld = in(reg) $ld, options(nostack, readonly)),
                2 => asm!("tileloadd tmm2, [{p} + {ld}*1]", p = in(reg) $p, ld = in(reg) $ld, options(nostack, readonly)),
                _ => asm!("tileloadd tmm3, [{p} + {ld}*1]", p = in(reg) $p, ld = in(reg) $ld, options(nostack, readonly)),
            }
        };
        (store, $i:expr, $p:expr, $ld:expr) => {
            match $i {
                0 => asm!("tilestored [{p} + {ld}*1], tmm0", p = in(reg) $p, ld = in(reg) $ld, options(nostack)),
                1 => asm!("tilestored [{p} + {ld}*1], tmm1", p = in(reg) $p, ld = in(reg) $ld, options(nostack)),
                2 => asm!("tilestored [{p} + {ld}*1], tmm2", p = in(reg) $p, ld = in(reg) $ld, options(nostack)),
                _ => asm!("tilestored [{p} + {ld}*1], tmm3", p = in(reg) $p, ld = in(reg) $ld, options(nostack)),
            }
        };
    }

    /// A 2 x 2 block's products: C tiles tmm0-3 += A tiles tmm4-5 times B tiles tmm6-7.
    macro_rules! block_products {
        () => {
            "tdpbf16ps tmm0, tmm4, tmm6\n tdpbf16ps tmm1, tmm4, tmm7\n tdpbf16ps tmm2, tmm5, tmm6\n tdpbf16ps tmm3, tmm5, tmm7"
        };
    }

    /// Blocks of 2 x 2 C tiles (1 x 2, 2 x 1 or 1 x 1 at the edges): C tile (i, j) of a block
    /// is tmm(2i + j), A tiles tmm4-5, B tiles tmm6-7.
    ///
    /// # Safety
    /// `super::product`'s checks hold for `m` and the output at `c`; the CPU runs AMX tiles with
    /// the permission granted.
    pub unsafe fn product(m: &Product<'_>, lo: Option<(usize, usize)>, c: *mut f32, accumulate: bool) {
        let (lda, ldb, ldc) = (m.ars * 4, m.ldb * 4, m.ldc * 4);
        let (a, b) = (m.a.as_ptr() as *const u8, m.b.as_ptr() as *const u8);
        let c = c as *mut u8;
        // SAFETY (every asm block): the tiles read and written lie inside a, b and c (the
        // caller's checks: whole tiles, strides and lengths).
        unsafe {
            CONFIG.load();
            for r0 in (0..m.rows).step_by(2 * TR) {
                let two_rows = r0 + TR < m.rows;
                for j0 in (0..m.n).step_by(2 * TR) {
                    // B's next columns (the first of the row when these are the last: the next
                    // block row's), whose tiles each step of k prefetches for the next block.
                    let nj = if j0 + 2 * TR < m.n { j0 + 2 * TR } else { 0 };
                    let prefetch = nj != j0 && (nj > j0 || r0 + 2 * TR < m.rows);
                    let two_cols = j0 + TR < m.n;
                    let tiles = [(0, 0, true), (0, 1, two_cols), (1, 0, two_rows), (1, 1, two_rows && two_cols)];
                    let at = |i: usize, j: usize| c.add((r0 + i * TR) * ldc + (j0 + j * TR) * 4);
                    for &(i, j, on) in &tiles {
                        if on && accumulate {
                            c_tile!(load, 2 * i + j, at(i, j), ldc);
                        } else if on {
                            match 2 * i + j {
                                0 => asm!("tilezero tmm0", options(nostack, nomem)),
                                1 => asm!("tilezero tmm1", options(nostack, nomem)),
                                2 => asm!("tilezero tmm2", options(nostack, nomem)),
                                _ => asm!("tilezero tmm3", options(nostack, nomem)),
                            }
                        }
                    }
                    for k0 in (0..m.kp).step_by(TR) {
                        let a0 = a.add(r0 * lda + k0 * 4);
                        let a1 = a0.add(TR * lda);
                        let b0 = b.add(k0 * ldb + j0 * 4);
                        let b1 = b0.add(TR * 4);
                        if prefetch {
                            // B's rows come from L2 with a stride (P^T's rows are 1.5 KiB apart
                            // with SmolLM2's heads) and each tile load waited on them: one layer
                            // over 6,000 tokens took 8-10% less time with this prefetch. Going
                            // down the block columns instead, to keep a column of B in L1, was
                            // slower.
                            let both = nj + TR < m.n;
                            for p in [Some(0), lo.map(|(_, blo)| blo)].into_iter().flatten() {
                                let p = b.add((p + k0) * ldb + nj * 4);
                                for r in 0..TR {
                                    _mm_prefetch::<_MM_HINT_T0>(p.add(r * ldb) as *const i8);
                                    if both {
                                        _mm_prefetch::<_MM_HINT_T0>(p.add(r * ldb + 64) as *const i8);
                                    }
                                }
                            }
                        }
                        match lo {
                            None => step(two_rows, two_cols, [a0, a1, b0, b1], lda, ldb),
                            Some((alo, blo)) if two_rows && two_cols => {
                                // hi hi, lo hi, hi lo with the hi B tiles kept for the second
                                // product: 10 tile loads for 12 products, not 12.
                                let (a0l, a1l) = (a0.add(alo * 4), a1.add(alo * 4));
                                let (b0l, b1l) = (b0.add(blo * ldb), b1.add(blo * ldb));
                                asm!(
                                    "tileloadd tmm4, [{a0} + {lda}*1]",
                                    "tileloadd tmm5, [{a1} + {lda}*1]",
                                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                                    block_products!(),
                                    "tileloadd tmm4, [{a0l} + {lda}*1]",
                                    "tileloadd tmm5, [{a1l} + {lda}*1]",
                                    block_products!(),
                                    "tileloadd tmm4, [{a0} + {lda}*1]",
                                    "tileloadd tmm5, [{a1} + {lda}*1]",
                                    "tileloadd tmm6, [{b0l} + {ldb}*1]",
                                    "tileloadd tmm7, [{b1l} + {ldb}*1]",
                                    block_products!(),
                                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                                    a0l = in(reg) a0l, a1l = in(reg) a1l, b0l = in(reg) b0l, b1l = in(reg) b1l,
                                    lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                                );
                            }
                            Some((alo, blo)) => {
                                step(two_rows, two_cols, [a0, a1, b0, b1], lda, ldb);
                                step(two_rows, two_cols, [a0.add(alo * 4), a1.add(alo * 4), b0, b1], lda, ldb);
                                step(two_rows, two_cols, [a0, a1, b0.add(blo * ldb), b1.add(blo * ldb)], lda, ldb);
                            }
                        }
                    }
                    for &(i, j, on) in &tiles {
                        if on {
                            c_tile!(store, 2 * i + j, at(i, j), ldc);
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// One step of k (16 pairs) of a block of up to 2 x 2 C tiles: A tiles at `a0` and `a1`
    /// (rows), B tiles at `b0` and `b1` (columns), as far as the block reaches.
    ///
    /// # Safety
    /// As `product`, for tiles inside its operands, with the tiles configured.
    #[inline(always)]
    unsafe fn step(two_rows: bool, two_cols: bool, [a0, a1, b0, b1]: [*const u8; 4], lda: usize, ldb: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            match (two_rows, two_cols) {
                (true, true) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    block_products!(),
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                    lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                ),
                (true, false) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                    lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                ),
                (false, true) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                    lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                ),
                (false, false) => asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    a0 = in(reg) a0, b0 = in(reg) b0,
                    lda = in(reg) lda, ldb = in(reg) ldb, options(nostack, readonly),
                ),
            }
        }
    }

    /// # Safety
    /// The CPU has AMX-TILE, AMX-BF16 and AVX-512BW with the tile permission granted; `job`'s
    /// rows and pairs lie inside the output, which no other job writes, and its pairs' tiles
    /// inside `w`; `job.a` holds every block of `job.rows` in full.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn job(w: &[u16], order: TileOrder, job: &Job<'_>, s: &mut Scratch) {
        let steps_all = job.kp / TK;
        // Blocks at the matrix's edge accumulate here, 32 values a row, and are copied out after
        // the pair's last chunk.
        s.edge.resize(job.rows.len().next_multiple_of(BLOCK_ROWS) * 32, 0.0);
        let lda = job.kp * 2;
        let step = TileOrder::STEP * 2;
        // SAFETY: the caller's contract: the CPU runs AMX with the permission granted.
        unsafe { CONFIG.load() };
        // One row block (a decode batch): each tile is used once, straight from memory, so the
        // tiles ahead are prefetched. With more rows the first block's misses are shared by the
        // rest, and the prefetches measured no faster.
        let few = job.rows.len() <= BLOCK_ROWS;
        for pair in job.pairs.clone() {
            let col0 = pair * 32;
            let cols = (job.n - col0).min(32);
            // The pair's first tile; its partner panel's is the next tile (a pair sits in one group).
            let b = w[order.row(2 * pair, 0)..].as_ptr() as *const u8;
            for first in (0..steps_all).step_by(CHUNK_STEPS) {
                let steps = CHUNK_STEPS.min(steps_all - first);
                for r0 in job.rows.clone().step_by(BLOCK_ROWS) {
                    // C's home: the output where the block is whole, else the edge buffer.
                    let whole = r0 + BLOCK_ROWS <= job.m && cols == 32;
                    let (c, ldc) = if whole {
                        (job.out.0.wrapping_add(r0 * job.n + col0) as *mut u8, job.n * 4)
                    } else {
                        (s.edge.as_mut_ptr().wrapping_add((r0 - job.rows.start) * 32) as *mut u8, 128)
                    };
                    let a = job.a[r0 * job.kp / 2..].as_ptr() as *const u8;
                    let stream = few;
                    // SAFETY: C's home holds 32 rows of 32 f32, `ldc` bytes apart (the block is
                    // this job's, inside the output, or the edge buffer's rows for it); tiles 4
                    // and 5 read rows r0..r0+32 of `a` (whole blocks are there), 64 bytes at
                    // each step; tiles 6 and 7 the pair's tiles of that step, inside `w`.
                    unsafe {
                        if first == 0 {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem)
                            );
                        } else {
                            asm!(
                                "tileloadd tmm0, [{c00} + {ldc}*1]",
                                "tileloadd tmm1, [{c01} + {ldc}*1]",
                                "tileloadd tmm2, [{c10} + {ldc}*1]",
                                "tileloadd tmm3, [{c11} + {ldc}*1]",
                                c00 = in(reg) c,
                                c01 = in(reg) c.add(64),
                                c10 = in(reg) c.add(TR * ldc),
                                c11 = in(reg) c.add(TR * ldc + 64),
                                ldc = in(reg) ldc,
                                options(nostack, readonly),
                            );
                        }
                        for t in first..first + steps {
                            if stream {
                                // Ask for the tiles `AHEAD` steps on now (a prefetch never faults).
                                let next = b.wrapping_add((t + AHEAD) * step);
                                for line in (0..2 * TILE).step_by(64) {
                                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
                                }
                            }
                            asm!(
                                "tileloadd tmm4, [{a0} + {lda}*1]",
                                "tileloadd tmm5, [{a1} + {lda}*1]",
                                "tileloadd tmm6, [{b0} + {ldb}*1]",
                                "tileloadd tmm7, [{b1} + {ldb}*1]",
                                block_products!(),
                                a0 = in(reg) a.add(t * 64),
                                a1 = in(reg) a.add(TR * lda + t * 64),
                                b0 = in(reg) b.add(t * step),
                                b1 = in(reg) b.add(t * step + TILE),
                                lda = in(reg) lda,
                                ldb = in(reg) 64usize,
                                options(nostack, readonly),
                            );
                        }
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
                }
            }
            for r0 in job.rows.clone().step_by(BLOCK_ROWS) {
                if r0 + BLOCK_ROWS <= job.m && cols == 32 {
                    continue;
                }
                for r in r0..(r0 + BLOCK_ROWS).min(job.m) {
                    let row = &s.edge[(r - job.rows.start) * 32..][..cols];
                    // SAFETY: row r < m, columns col0..col0 + cols <= n: this job's block.
                    let dst = unsafe { std::slice::from_raw_parts_mut(job.out.0.add(r * job.n + col0), cols) };
                    dst.copy_from_slice(row);
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
    pub unsafe fn product(_: &super::Product<'_>, _: Option<(usize, usize)>, _: *mut f32, _: bool) {
        unreachable!("AMX is x86_64 only")
    }

    /// Never called: `runs_here` is false off x86_64.
    pub unsafe fn job(_: &[u16], _: super::TileOrder, _: &super::Job<'_>, _: &mut super::Scratch) {
        unreachable!("AMX is x86_64 only")
    }
}
