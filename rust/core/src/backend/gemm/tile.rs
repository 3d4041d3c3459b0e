//! The micro-kernels: one call computes a tile of C (up to `MR` rows by `WIDE` panels of `NR`
//! columns) from a packed slice of A and the weights' panels, for each `Isa` and each way the
//! panels store their values (`PanelValue`: f32, bf16; `run_pairs`: bf16 in pairs of rows;
//! `run_quant`: GGML blocks, through `quant`).

use super::quant::{self, QPanels};
use super::{bf16_slot, panels_per_tile, Operands, PairOrder, MR, NR, PAIR_PREFETCH, PREFETCH, WIDE};
use crate::backend::isa::Isa;

/// One micro-kernel call: `rows x cols` of C (row stride `ldc`) from a packed `kc x MR` slice of
/// A and `panels` side-by-side `kc x 16` panel slices, `stride` values apart, each row of a slice
/// `ldb` values after the one before (`Layout`).
///
/// The contract every `unsafe` kernel below relies on (`forward_with` builds tiles that keep it,
/// and `run` asserts the parts it can see): `a` points at `kc x MR` readable values (for
/// `avx512_dot`, `kc / 2` rounded up x MR bf16 pairs, `u32`, behind the same pointer); `c` at
/// `rows` rows of `cols` writable values, `ldc` apart, that no other tile writes; `rows <= MR`,
/// `cols <= panels x NR`, `panels <= WIDE` (1 but for the AVX-512 kernel); each panel slice
/// holds `kc` rows of NR values, `ldb` apart; `out` is `MR x SCRATCH` scratch.
pub(super) struct Tile {
    pub(super) a: *const f32,
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) kc: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) panels: usize,
    pub(super) stride: usize,
    pub(super) ldb: usize,
    pub(super) accumulate: bool,
}

/// Row length of a tile's scratch block: the widest tile's columns.
const SCRATCH: usize = WIDE * NR;

/// How one stored panel value becomes f32: `f32` as is, `u16` as bf16 bits (in the bf16 group
/// order). Each type names its AVX2 kernel; the portable kernel is shared.
pub(super) trait PanelValue: Copy {
    fn widen(raw: &[Self]) -> [f32; NR];
    /// The portable kernel for `R` rows.
    ///
    /// # Safety
    /// The `Tile` contract, with `R == t.rows`.
    unsafe fn portable<const R: usize>(t: &Tile, b: *const Self, out: *mut f32) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { portable::<R, Self>(t, b, out) }
    }
    /// The AVX2 kernel for `R` rows (see `avx2_f32`); returns whether `out` still needs storing.
    ///
    /// # Safety
    /// The `Tile` contract, with `R == t.rows`, on a CPU with AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const R: usize>(t: &Tile, b: *const Self, prefetch: *const u8, out: *mut f32) -> bool;
    /// The AVX-512 kernel for `R` rows and `P` panels (see `avx512`).
    ///
    /// # Safety
    /// The `Tile` contract, with `R == t.rows` and `P == t.panels`, on a CPU with AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512<const R: usize, const P: usize>(t: &Tile, b: *const Self, out: *mut f32) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { avx512::<R, P, Self>(t, b, out) }
    }
    /// One panel row (16 values) as f32, in storage order: `in_column_order` puts a sum of such
    /// rows in column order, once per tile instead of once per row.
    ///
    /// # Safety
    /// `p` points at NR values; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Lanes in storage order to column order (f32 is stored in column order).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn in_column_order(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        v
    }
}

impl PanelValue for f32 {
    fn widen(raw: &[f32]) -> [f32; NR] {
        raw.try_into().expect("a panel row holds NR values")
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const R: usize>(t: &Tile, b: *const f32, prefetch: *const u8, out: *mut f32) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { avx2_f32::<R>(t, b, prefetch, out) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: passed on from the caller.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl PanelValue for u16 {
    fn widen(raw: &[u16]) -> [f32; NR] {
        std::array::from_fn(|j| crate::backend::bf16::widen(raw[bf16_slot(j)]))
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2<const R: usize>(t: &Tile, b: *const u16, prefetch: *const u8, out: *mut f32) -> bool {
        // SAFETY: passed on from the caller.
        unsafe { avx2_bf16::<R>(t, b, prefetch, out) }
    }
    /// Widened in storage order (columns 0-3, 8-11, 4-7, 12-15: the group order serves AVX2's
    /// in-lane unpack). The kernel sums rows in that order and permutes its accumulators once at
    /// the end: a shuffle per 16 weights was a fifth of the batch-1 decode loop.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        // SAFETY: passed on from the caller (16 values of 2 bytes).
        unsafe { crate::backend::bf16::x86::load16(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn in_column_order(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: a register permute; the kernels calling this run with AVX-512F.
        unsafe {
            let order = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
            _mm512_permutexvar_ps(order, v)
        }
    }
}

macro_rules! dispatch_rows {
    ($rows:expr, $($f:ident)::+, $($arg:expr),*) => {
        match $rows {
            1 => $($f)::+::<1>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            4 => $($f)::+::<4>($($arg),*),
            5 => $($f)::+::<5>($($arg),*),
            _ => $($f)::+::<6>($($arg),*),
        }
    };
}

/// `dispatch_rows` over a kernel that also takes the number of panels (1..=WIDE).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($rows:expr, $panels:expr, $($f:ident)::+, $($arg:expr),*) => {
        match $panels {
            1 => dispatch_tile!(@rows $rows, 1, $($f)::+, $($arg),*),
            2 => dispatch_tile!(@rows $rows, 2, $($f)::+, $($arg),*),
            3 => dispatch_tile!(@rows $rows, 3, $($f)::+, $($arg),*),
            _ => dispatch_tile!(@rows $rows, 4, $($f)::+, $($arg),*),
        }
    };
    (@rows $rows:expr, $p:literal, $($f:ident)::+, $($arg:expr),*) => {
        match $rows {
            1 => $($f)::+::<1, $p>($($arg),*),
            2 => $($f)::+::<2, $p>($($arg),*),
            3 => $($f)::+::<3, $p>($($arg),*),
            4 => $($f)::+::<4, $p>($($arg),*),
            5 => $($f)::+::<5, $p>($($arg),*),
            _ => $($f)::+::<6, $p>($($arg),*),
        }
    };
}

impl Tile {
    /// Run the kernel on the panel slice at `panels[b..]`, fetching `panels[next..]` (the next
    /// panel's slice) meanwhile when given.
    ///
    /// # Safety
    /// `a` and `c` are valid as `Tile` documents.
    pub(super) unsafe fn run<T: PanelValue>(&self, panels: &[T], b: usize, next: Option<usize>, isa: Isa) {
        // The parts of the contract a tile can check: once per tile, nothing next to its flops.
        let last = b + (self.panels - 1) * self.stride + (self.kc - 1) * self.ldb + NR;
        assert!(self.panels >= 1 && self.kc >= 1 && last <= panels.len(), "panel slice out of bounds");
        assert!(self.panels == 1 || panels_per_tile(isa) >= self.panels, "a wide tile needs the wide kernel");
        assert!(self.rows >= 1 && self.rows <= MR && self.cols >= 1 && self.cols <= self.panels * NR, "tile shape");
        // SAFETY: in bounds (asserted above).
        let b = unsafe { panels.as_ptr().add(b) };
        // Scratch for a partial panel (or the portable kernel), left uninitialised: zeroing it on
        // every tile was a memset the size of the LM head's output per call.
        let mut scratch = std::mem::MaybeUninit::<[[f32; SCRATCH]; MR]>::uninit();
        let acc = scratch.as_mut_ptr() as *mut f32;
        let pending = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // The kernel prefetches its own streams (`PREFETCH` bytes ahead in each);
                // `next` is for the AVX2 kernel.
                let _ = next;
                // SAFETY: the Tile contract; `Isa::Avx512` is chosen only where the CPU has
                // AVX-512F; `rows` and `panels` pick the kernel of that shape.
                unsafe { dispatch_tile!(self.rows, self.panels, T::avx512, self, b, acc) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                // (Only ever an address to prefetch: never read through, so it may lie anywhere.)
                let prefetch = next.map_or(std::ptr::null(), |i| panels.as_ptr().wrapping_add(i) as *const u8);
                // SAFETY: the Tile contract (ours, from the caller); `Isa::Avx2Fma` is chosen only
                // where the CPU has AVX2 and FMA; `rows` picks the kernel of that many rows.
                unsafe { dispatch_rows!(self.rows, T::avx2, self, b, prefetch, acc) }
            }
            Isa::Portable => {
                // The portable kernel leaves prefetching to the hardware.
                let _ = next;
                // SAFETY: as above, without the CPU features.
                unsafe { dispatch_rows!(self.rows, T::portable, self, b, acc) }
            }
        };
        if pending {
            // SAFETY: the kernel wrote `rows` rows of `acc`; `c` as the contract says.
            unsafe { self.store(acc) }
        }
    }

    /// Run an AVX-512 kernel on panels in pairs of rows (`order`), the tile's first panel's first
    /// pair row at `v[b..]` (its first row a multiple of 32): with f32 operands, or with bf16
    /// pairs of A through `vdpbf16ps` (`Operands::Bf16Pairs`, row order).
    ///
    /// # Safety
    /// `a` and `c` are valid as `Tile` documents for `operands`; the CPU has AVX-512F
    /// (`forward_with` asserts that the kernel is the AVX-512 one), and AVX-512 BF16 with
    /// `Operands::Bf16Pairs` (`tiled` asserts it).
    pub(super) unsafe fn run_pairs(&self, v: &[u16], order: PairOrder, b: usize, operands: Operands) {
        let last = b + order.ahead(self.kc - 1) + (self.panels - 1) * order.panel_step() + 32;
        assert!(
            self.panels >= 1 && self.panels <= WIDE && self.kc >= 1 && last <= v.len(),
            "panel tiles out of bounds"
        );
        assert!(self.rows >= 1 && self.rows <= MR && self.cols >= 1 && self.cols <= self.panels * NR, "tile shape");
        let mut scratch = std::mem::MaybeUninit::<[[f32; SCRATCH]; MR]>::uninit();
        let acc = scratch.as_mut_ptr() as *mut f32;
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: in bounds (asserted); the Tile contract; AVX-512F (the caller's).
            let b = unsafe { v.as_ptr().add(b) };
            let pending = match (operands, order) {
                (Operands::F32, PairOrder::Tiles(_)) => unsafe {
                    dispatch_tile!(self.rows, self.panels, avx512_tiles, self, b, acc)
                },
                (Operands::F32, PairOrder::Rows { .. }) => unsafe {
                    dispatch_tile!(self.rows, self.panels, avx512_rows, self, b, acc)
                },
                (Operands::Bf16Pairs, PairOrder::Rows { .. }) => unsafe {
                    dispatch_tile!(self.rows, self.panels, avx512_dot, self, b, acc)
                },
                (Operands::Bf16Pairs, PairOrder::Tiles(_)) => unreachable!("tile order's bf16 products run on AMX"),
            };
            if pending {
                // SAFETY: the kernel wrote `rows` rows of `acc`; `c` as the contract says.
                unsafe { self.store(acc) }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 is packed in pairs of rows for AVX-512 only ({acc:?})");
    }

    /// Run the quantized kernel on panels `p..p + panels` of `q` from weight `k0` (a multiple of
    /// 32, as `kc` is: KC is one, and quantized matrices have `k` a multiple of 32).
    ///
    /// # Safety
    /// `a` and `c` are valid as `Tile` documents.
    pub(super) unsafe fn run_quant(&self, q: &QPanels, p: usize, k0: usize, isa: Isa) {
        let last = q.offset(p + self.panels - 1, k0 + self.kc);
        assert!(last <= q.bytes().len() && self.kc.is_multiple_of(quant::QK), "quantized panel slice out of bounds");
        assert!(self.panels <= quant::max_panels(isa), "a wide tile needs the wide kernel");
        assert!(self.rows >= 1 && self.rows <= MR && self.cols >= 1 && self.cols <= self.panels * NR, "tile shape");
        let mut scratch = std::mem::MaybeUninit::<[[f32; SCRATCH]; MR]>::uninit();
        let acc = scratch.as_mut_ptr() as *mut f32;
        let t = quant::QTile {
            a: self.a,
            kc: self.kc,
            rows: self.rows,
            panels: self.panels,
            // SAFETY: in bounds (asserted above).
            b: unsafe { q.bytes().as_ptr().add(q.offset(p, k0)) },
            stride: q.stride(),
            out: acc,
            out_stride: SCRATCH,
        };
        // SAFETY: the panels' blocks are in bounds (asserted), `a` as the Tile contract says,
        // `acc` is MR x SCRATCH scratch, and `isa` runs on this CPU (forward_with checks).
        unsafe {
            quant::run(isa, q.kind(), &t);
            self.store(acc);
        }
    }

    /// Write (or add) the accumulated block into C, only its valid columns.
    ///
    /// # Safety
    /// `acc` holds `rows` written rows of `cols` values, SCRATCH apart; `c` as the `Tile`
    /// contract says.
    unsafe fn store(&self, acc: *const f32) {
        for r in 0..self.rows {
            // SAFETY: the kernel wrote rows 0..rows of `acc`; the caller guarantees rows x cols
            // of C at `c` with stride `ldc`.
            let row = unsafe { std::slice::from_raw_parts(acc.add(r * SCRATCH), self.cols) };
            let c = unsafe { std::slice::from_raw_parts_mut(self.c.add(r * self.ldc), self.cols) };
            if self.accumulate {
                c.iter_mut().zip(row).for_each(|(c, v)| *c += v);
            } else {
                c.copy_from_slice(row);
            }
        }
    }
}

/// # Safety
/// The `Tile` contract, with `R == t.rows`.
unsafe fn portable<const R: usize, T: PanelValue>(t: &Tile, b: *const T, out: *mut f32) -> bool {
    let mut acc = [[0.0f32; NR]; R];
    for kk in 0..t.kc {
        // SAFETY: kk < kc: inside the panel slice's kc x NR values.
        let bv = T::widen(unsafe { std::slice::from_raw_parts(b.add(kk * t.ldb), NR) });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: kk < kc and r < R <= MR: inside A's kc x MR values.
            let a = unsafe { *t.a.add(kk * MR + r) };
            acc.iter_mut().zip(&bv).for_each(|(c, w)| *c += a * w);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` is MR x SCRATCH scratch and r < R <= MR.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(r * SCRATCH), NR) };
    }
    true
}

/// Full tiles go from registers straight into C; a partial panel goes through `out` (returns
/// whether it still needs storing).
///
/// # Safety
/// The `Tile` contract, with `R == t.rows`, on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn avx2_store<const R: usize>(t: &Tile, acc: &[[std::arch::x86_64::__m256; 2]; R], out: *mut f32) -> bool {
    use std::arch::x86_64::*;
    if t.cols == NR {
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: a full tile: row r < rows of C has NR = 16 writable values at c + r * ldc.
            unsafe {
                let c = t.c.add(r * t.ldc);
                let (mut lo, mut hi) = (acc[0], acc[1]);
                if t.accumulate {
                    lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
                    hi = _mm256_add_ps(hi, _mm256_loadu_ps(c.add(8)));
                }
                _mm256_storeu_ps(c, lo);
                _mm256_storeu_ps(c.add(8), hi);
            }
        }
        return false;
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: `out` is MR x SCRATCH scratch and r < R <= MR.
        unsafe {
            _mm256_storeu_ps(out.add(r * SCRATCH), acc[0]);
            _mm256_storeu_ps(out.add(r * SCRATCH + 8), acc[1]);
        }
    }
    true
}

/// An AVX-512 tile's accumulators (`[[__m512; P]; R]`, put in column order by
/// `$in_column_order`) into C, straight where the tile is full, else into `out`; evaluates to
/// whether `out` still needs storing. A macro: as a function taking the accumulators, with
/// their reordering as a pass of its own before it, the f32 GEMM ran at half speed (128-136
/// GFLOP/s at 512 rows on a Xeon, against 245-266), and 0.9x with the reordering inside.
///
/// Used inside the AVX-512 kernels, under the `Tile` contract with `R == t.rows` and
/// `P == t.panels`.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_store {
    ($t:expr, $acc:expr, $out:expr, $P:expr, $in_column_order:expr) => {{
        let (t, out) = ($t, $out);
        let full = t.cols == $P * NR;
        for (r, acc) in $acc.iter().enumerate() {
            for (p, &v) in acc.iter().enumerate() {
                let v = $in_column_order(v);
                // SAFETY: a full tile: row r < rows of C has P x NR writable values at
                // c + r * ldc; otherwise `out` is MR x SCRATCH scratch, P x NR <= SCRATCH.
                unsafe {
                    if full {
                        let c = t.c.add(r * t.ldc + p * NR);
                        let v = if t.accumulate { _mm512_add_ps(v, _mm512_loadu_ps(c)) } else { v };
                        _mm512_storeu_ps(c, v);
                    } else {
                        _mm512_storeu_ps(out.add(r * SCRATCH + p * NR), v);
                    }
                }
            }
        }
        !full
    }};
}

/// The AVX-512 kernel: `R` rows by `P` panels of 16 columns, accumulators in registers for the
/// whole depth; full tiles go straight into C, a partial last panel through `out`.
///
/// # Safety
/// The `Tile` contract, with `R == t.rows` and `P == t.panels`, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<const R: usize, const P: usize, T: PanelValue>(t: &Tile, b: *const T, out: *mut f32) -> bool {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    // Each panel is a stream of its own, with `per_line` of its rows to a cache line.
    let per_line = (64 / (t.ldb * std::mem::size_of::<T>())).max(1);
    for kk in 0..t.kc {
        // Decode: a few FMAs per weight, so the streams are latency-bound and the hardware
        // prefetchers alone keep too few lines in flight (single-threaded, bf16 weights read
        // 15 GB/s from memory against 33-52 from cache). Lines PREFETCH bytes ahead in each
        // stream are asked for now (a prefetch never faults, so one past the panel is harmless).
        if R <= 2 && kk % per_line == 0 {
            for p in 0..P {
                let ahead = b.wrapping_add(p * t.stride + kk * t.ldb) as *const u8;
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(PREFETCH) as *const i8);
            }
        }
        // SAFETY: kk < kc and p < P = panels: inside panel p's slice.
        let w: [__m512; P] = std::array::from_fn(|p| unsafe { T::load16(b.add(p * t.stride + kk * t.ldb)) });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: kk < kc, r < R <= MR: one value of A.
            let a = _mm512_set1_ps(unsafe { *t.a.add(kk * MR + r) });
            for (acc, w) in acc.iter_mut().zip(&w) {
                *acc = _mm512_fmadd_ps(a, *w, *acc);
            }
        }
    }
    avx512_store!(t, acc, out, P, T::in_column_order)
}

/// The AVX-512 kernel on bf16 in pairs of rows (`PairOrder`) with f32 operands: each 64-byte load
/// is rows kk and kk + 1 of 16 columns, interleaved; shifting each 32-bit lane left by 16 gives
/// row kk as f32, masking its low half gives row kk + 1, both in column order. `b` is the tile's
/// first panel's pair row at its first k (a multiple of 32); `TILED` picks the order.
///
/// # Safety
/// The `Tile` contract with `R == t.rows` and `P == t.panels`, `b` as `Tile::run_pairs` checks,
/// on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn avx512_pairs<const R: usize, const P: usize, const TILED: bool>(
    t: &Tile,
    b: *const u16,
    out: *mut f32,
) -> bool {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let order = PairOrder::of::<TILED>();
    let step = order.panel_step();
    for kk in (0..t.kc).step_by(2) {
        let row = b.wrapping_add(order.ahead(kk));
        for p in 0..P {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PAIR_PREFETCH + p * step) as *const i8);
        }
        // SAFETY: kk < kc: pair row kk / 2 of each of the P panels is inside (the caller's).
        let w: [__m512i; P] =
            std::array::from_fn(|p| unsafe { _mm512_loadu_si512(row.add(p * step) as *const __m512i) });
        let both = kk + 1 < t.kc;
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: kk (and kk + 1 when `both`) < kc, r < R <= MR: values of A.
            let a0 = _mm512_set1_ps(unsafe { *t.a.add(kk * MR + r) });
            for (acc, w) in acc.iter_mut().zip(&w) {
                *acc = _mm512_fmadd_ps(a0, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(*w)), *acc);
            }
            if both {
                let a1 = _mm512_set1_ps(unsafe { *t.a.add((kk + 1) * MR + r) });
                for (acc, w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_fmadd_ps(a1, _mm512_castsi512_ps(_mm512_and_si512(*w, high)), *acc);
                }
            }
        }
    }
    avx512_store!(t, acc, out, P, |v| v)
}

/// `avx512_pairs` in AMX's tile order.
///
/// # Safety
/// As `avx512_pairs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_tiles<const R: usize, const P: usize>(t: &Tile, b: *const u16, out: *mut f32) -> bool {
    // SAFETY: passed on from the caller.
    unsafe { avx512_pairs::<R, P, true>(t, b, out) }
}

/// `avx512_pairs` in row order.
///
/// # Safety
/// As `avx512_pairs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_rows<const R: usize, const P: usize>(t: &Tile, b: *const u16, out: *mut f32) -> bool {
    // SAFETY: passed on from the caller.
    unsafe { avx512_pairs::<R, P, false>(t, b, out) }
}

/// The AVX-512 BF16 kernel: bf16 weights in pairs of rows (row order) times A as bf16 pairs,
/// through `vdpbf16ps`, which multiplies both values of each 32-bit lane and adds the two
/// products into an f32 sum: per pair of rows one load and one instruction a panel and row of
/// A, where `avx512_rows` widens and issues two FMAs. `t.a` holds `kc / 2` (rounded up) x MR
/// pairs (`pack_pair_rows`), not f32 values.
///
/// # Safety
/// The `Tile` contract for bf16 pairs of A, with `R == t.rows` and `P == t.panels`, `b` as
/// `Tile::run_pairs` checks, on a CPU with AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512_dot<const R: usize, const P: usize>(t: &Tile, b: *const u16, out: *mut f32) -> bool {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let order = PairOrder::of::<false>();
    let step = order.panel_step();
    let a = t.a as *const u32;
    for i in 0..t.kc.div_ceil(2) {
        let row = b.wrapping_add(order.ahead(2 * i));
        for p in 0..P {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(PAIR_PREFETCH + p * step) as *const i8);
        }
        // SAFETY: 2 i < kc: pair row i of each of the P panels is inside (the caller's); the
        // casts reinterpret registers of the same size.
        let w: [__m512bh; P] = std::array::from_fn(|p| unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(row.add(p * step) as *const __m512i))
        });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: pair i of row r < R <= MR of A (the caller's).
            let pair = unsafe { *a.add(i * MR + r) };
            let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32)) };
            for (acc, &w) in acc.iter_mut().zip(&w) {
                *acc = _mm512_dpbf16_ps(*acc, w, a);
            }
        }
    }
    avx512_store!(t, acc, out, P, |v| v)
}

/// # Safety
/// The `Tile` contract, with `R == t.rows`, on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_f32<const R: usize>(t: &Tile, b: *const f32, prefetch: *const u8, out: *mut f32) -> bool {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let pf = !prefetch.is_null();
    for kk in 0..t.kc {
        if pf {
            _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(kk * t.ldb * 4) as *const i8);
        }
        // SAFETY: kk < kc: the panel row's 16 values; kk < kc, r < MR: one value of A.
        let b0 = unsafe { _mm256_loadu_ps(b.add(kk * t.ldb)) };
        let b1 = unsafe { _mm256_loadu_ps(b.add(kk * t.ldb + 8)) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = unsafe { _mm256_broadcast_ss(&*t.a.add(kk * MR + r)) };
            acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
        }
    }
    // SAFETY: passed on from the caller.
    unsafe { avx2_store(t, &acc, out) }
}

/// # Safety
/// The `Tile` contract, with `R == t.rows`, on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_bf16<const R: usize>(t: &Tile, b: *const u16, prefetch: *const u8, out: *mut f32) -> bool {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let pf = !prefetch.is_null();
    // Panel rows to a cache line (2: panels are 16 values a row), as a mask: `kk % per_line` was
    // an integer division a step, the kernel's bound at few rows with the panels in cache (one
    // Zen 3 thread, 1-4 rows: 1.2-1.4x faster without it; from memory, no change).
    let line_mask = (32 / t.ldb).max(1).next_power_of_two() - 1;
    for kk in 0..t.kc {
        if pf && kk & line_mask == 0 {
            _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(kk * t.ldb * 2) as *const i8);
        }
        // 16 bf16 in one load; interleaving zeros below each value widens it to f32 exactly.
        // SAFETY: kk < kc: the panel row's 16 values.
        let raw = unsafe { _mm256_loadu_si256(b.add(kk * t.ldb) as *const __m256i) };
        let b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
        let b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: kk < kc, r < R <= MR: one value of A.
            let a = unsafe { _mm256_broadcast_ss(&*t.a.add(kk * MR + r)) };
            acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
        }
    }
    // SAFETY: passed on from the caller.
    unsafe { avx2_store(t, &acc, out) }
}
