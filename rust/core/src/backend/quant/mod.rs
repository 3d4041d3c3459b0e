//! Quantized weights in GGML's block formats, Q8_0 and Q4_1 (the default model's GGUF holds its
//! layers in Q4_1 and its embedding in Q8_0), run as they are: no widening at load.
//!
//! A GGML block holds 32 consecutive weights of one output row with an f16 scale `d`: Q8_0 is
//! `d * q` with `q` an i8 (34 bytes a block, 8.5 bits a weight); Q4_1 is `d * q + m` with `q` a
//! nibble and an f16 offset `m` (20 bytes, 5 bits). `QPanels` rearranges the blocks the way
//! `gemm`'s panels are laid out, 16 output columns side by side, so the micro-kernel reads one
//! 16-wide row of quantized weights per step of k, widens it in registers (`d * q + m`, one
//! multiply-add per weight, shared by every row of x) and accumulates in f32. Activations stay
//! f32: results are those of the dequantized weights up to summation order, which is what the
//! goldens check (HF transformers on the dequantized GGUF). For products of many rows (prefill,
//! batched decode) widening in registers once per six rows of x cost about as many instructions
//! as the FMAs it fed; there `widen_panels` widens a tile's panels (up to 64 KiB of f32, in
//! cache) once per row block of gemm and the f32 kernel multiplies them: the same weights, the
//! quantized bytes still all that is held.
//!
//! The portable kernel is plain arithmetic (and the reference the others are tested against);
//! the AVX2 and AVX-512 kernels widen 16 weights with `vpmovzxbd`/`vpmovsxbd` and
//! `vcvtdq2ps`, and the f16 scales with `vcvtph2ps`. For one or two rows (decode) the AVX-512
//! kernel reads four panels at a time and takes the scales out of each block's sums
//! (`d * sum x q + m * sum x`), which took batch-1 decode of the default model from about 115-140
//! to 157-177 tok/s on a Zen 5 (llama.cpp on the same GGUF: 159-185).

use half::f16;

use super::isa::Isa;
use super::muladd::{MulAdd, Plain};

/// Weights per block.
pub const QK: usize = 32;
/// Columns per panel (`gemm`'s panel width).
const NR: usize = 16;

/// The block formats the kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    Q8_0,
    Q4_1,
}

impl QuantKind {
    pub const ALL: [QuantKind; 2] = [QuantKind::Q8_0, QuantKind::Q4_1];

    pub fn name(self) -> &'static str {
        match self {
            QuantKind::Q8_0 => "q8_0",
            QuantKind::Q4_1 => "q4_1",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        QuantKind::ALL.into_iter().find(|k| k.name() == s.to_ascii_lowercase())
    }

    /// Bytes of one GGML block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 2 + QK,
            QuantKind::Q4_1 => 2 + 2 + QK / 2,
        }
    }

    /// Bytes of 16 columns' blocks in a panel: 16 f16 scales (and 16 offsets), then the weights.
    fn panel_block_bytes(self) -> usize {
        NR * self.block_bytes()
    }

    /// Where a panel block's weight rows (`NR` bytes each) start: after the scales, and for Q4_1
    /// the offsets (`OFFSETS`). With those two, the whole of `QPanels`' layout.
    const fn weights_at(self) -> usize {
        match self {
            QuantKind::Q8_0 => 2 * NR,
            QuantKind::Q4_1 => 4 * NR,
        }
    }
}

/// Where a Q4_1 panel block's 16 f16 offsets start, after its 16 f16 scales.
const OFFSETS: usize = 2 * NR;

/// One row (`x.len()` a multiple of 32) as GGML blocks, the way ggml's reference quantizers do it
/// (Q8_0: `d = max |x| / 127`, `q = round(x / d)`; Q4_1: `m = min`, `d = (max - min) / 15`,
/// `q = round((x - m) / d)`).
pub fn quantize_row(kind: QuantKind, x: &[f32]) -> Vec<u8> {
    assert!(x.len().is_multiple_of(QK), "a quantized row holds whole blocks of {QK}");
    let mut out = Vec::with_capacity(x.len() / QK * kind.block_bytes());
    for b in x.chunks_exact(QK) {
        match kind {
            QuantKind::Q8_0 => {
                let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QuantKind::Q4_1 => {
                let (min, max) =
                    b.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
                out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
            }
        }
    }
    out
}

/// GGML blocks of one row back to f32 (`out.len()` weights).
pub fn dequantize_row(kind: QuantKind, raw: &[u8], out: &mut [f32]) {
    assert_eq!(raw.len(), out.len() / QK * kind.block_bytes());
    for (blk, o) in raw.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match kind {
            QuantKind::Q8_0 => o.iter_mut().zip(&blk[2..]).for_each(|(o, &q)| *o = d * (q as i8) as f32),
            QuantKind::Q4_1 => {
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                for (j, &q) in blk[4..].iter().enumerate() {
                    o[j] = d * (q & 15) as f32 + m;
                    o[j + QK / 2] = d * (q >> 4) as f32 + m;
                }
            }
        }
    }
}

/// A weight matrix `[n, k]` of GGML blocks in panels: for each panel of 16 output columns, for
/// each block of 32 along k, the 16 columns' scales `d` (f16), for Q4_1 their offsets `m` (f16),
/// then the weights with the 16 columns side by side: Q8_0 as `[32][16]` i8; Q4_1 as `[16][16]`
/// bytes, GGML's own nibble order (byte i holds weight i low and weight i + 16 high). Columns past
/// `n` are zero (scale and offset 0: they come out 0).
pub struct QPanels {
    kind: QuantKind,
    n: usize,
    k: usize,
    data: super::huge::HugeBuf<u8>,
}

impl QPanels {
    /// From `n` rows of GGML blocks (`raw`, row after row, as a GGUF stores a tensor).
    pub fn from_ggml(kind: QuantKind, raw: &[u8], n: usize, k: usize) -> Result<Self, String> {
        if !k.is_multiple_of(QK) || k == 0 {
            return Err(format!(
                "{} needs rows of whole blocks of {QK} weights; this matrix has rows of {k}",
                kind.name()
            ));
        }
        let (blocks, bb) = (k / QK, kind.block_bytes());
        if raw.len() != n * blocks * bb {
            return Err(format!(
                "{} data for {n} x {k} weights is {} bytes, expected {}",
                kind.name(),
                raw.len(),
                n * blocks * bb
            ));
        }
        let (pb, w0) = (kind.panel_block_bytes(), kind.weights_at());
        // Decode streams these every step: on 2 MiB pages, as the f32 and bf16 panels are.
        let mut data = super::huge::zeroed::<u8>(n.div_ceil(NR) * blocks * pb);
        for (col, row) in raw.chunks_exact(blocks * bb).enumerate() {
            let (p, j) = (col / NR, col % NR);
            for (kb, blk) in row.chunks_exact(bb).enumerate() {
                let dst = &mut data[(p * blocks + kb) * pb..][..pb];
                dst[2 * j..2 * j + 2].copy_from_slice(&blk[..2]);
                match kind {
                    QuantKind::Q8_0 => {
                        for (i, &q) in blk[2..].iter().enumerate() {
                            dst[w0 + i * NR + j] = q;
                        }
                    }
                    QuantKind::Q4_1 => {
                        dst[OFFSETS + 2 * j..OFFSETS + 2 * j + 2].copy_from_slice(&blk[2..4]);
                        for (i, &q) in blk[4..].iter().enumerate() {
                            dst[w0 + i * NR + j] = q;
                        }
                    }
                }
            }
        }
        Ok(QPanels { kind, n, k, data })
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// Output columns (rows of the `[n, k]` matrix).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Depth (a multiple of 32).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes between one panel and the next.
    pub(super) fn stride(&self) -> usize {
        self.k / QK * self.kind.panel_block_bytes()
    }

    /// Byte offset of panel `p`'s block holding weight `k0` (a multiple of 32).
    pub(super) fn offset(&self, p: usize, k0: usize) -> usize {
        p * self.stride() + k0 / QK * self.kind.panel_block_bytes()
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Row `i` of the `[n, k]` matrix, dequantized (an embedding lookup).
    pub fn row(&self, i: usize, out: &mut [f32]) {
        assert!(i < self.n && out.len() == self.k);
        let (p, j, pb, w0) = (i / NR, i % NR, self.kind.panel_block_bytes(), self.kind.weights_at());
        for (kb, o) in out.chunks_exact_mut(QK).enumerate() {
            let blk = &self.data[self.offset(p, kb * QK)..][..pb];
            let d = f16::from_le_bytes([blk[2 * j], blk[2 * j + 1]]).to_f32();
            match self.kind {
                QuantKind::Q8_0 => {
                    o.iter_mut().enumerate().for_each(|(kk, o)| *o = d * (blk[w0 + kk * NR + j] as i8) as f32)
                }
                QuantKind::Q4_1 => {
                    let m = f16::from_le_bytes([blk[OFFSETS + 2 * j], blk[OFFSETS + 2 * j + 1]]).to_f32();
                    for kk in 0..QK / 2 {
                        let q = blk[w0 + kk * NR + j];
                        o[kk] = d * (q & 15) as f32 + m;
                        o[kk + QK / 2] = d * (q >> 4) as f32 + m;
                    }
                }
            }
        }
    }
}

/// One micro-kernel call on quantized panels: `rows` (<= 6) rows of x, packed `[kc][6]` at `a`
/// (gemm's row-block layout), times `panels` side-by-side panels from byte `b` (`stride` bytes
/// apart), `kc` a multiple of 32; the `rows x (panels x 16)` products go to `out`, rows
/// `out_stride` apart.
pub(super) struct QTile {
    pub a: *const f32,
    pub kc: usize,
    pub rows: usize,
    pub panels: usize,
    pub b: *const u8,
    pub stride: usize,
    pub out: *mut f32,
    pub out_stride: usize,
}

/// Rows of x per packed block (gemm's MR).
const MR: usize = 6;

/// Panels one call reads side by side for a product of `m` rows: on AVX-512 four for one or two
/// rows (decode: more independent accumulator chains and weight streams in flight; the kernel
/// was bound by FMA latency with two), else two (2 x 2 x 6 accumulators of 16 lanes fit its 32
/// registers); one elsewhere.
pub(super) fn panels_per_tile(isa: Isa, m: usize) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if m <= 2 => 4,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 2,
        _ => 1,
    }
}

/// The most panels any tile of `isa` reads.
pub(super) fn max_panels(isa: Isa) -> usize {
    panels_per_tile(isa, 1)
}

/// Run `t` on `kind` panels with the `isa` kernel.
///
/// # Safety
/// `t.a` holds `kc x 6` values; each of `t.panels` panels holds `kc / 32` blocks from `t.b`;
/// `t.out` has `rows` rows of `panels x 16` writable values; `rows` in 1..=6, `panels` in
/// 1..=`max_panels(isa)`; the CPU runs `isa`.
pub(super) unsafe fn run(isa: Isa, kind: QuantKind, t: &QTile) {
    debug_assert!(t.rows >= 1 && t.rows <= MR && t.panels >= 1 && t.panels <= max_panels(isa));
    macro_rules! rows {
        ($($f:ident)::+, $p:literal, $q:ty) => {
            match t.rows {
                1 => $($f)::+::<1, $p, $q>(t),
                2 => $($f)::+::<2, $p, $q>(t),
                3 => $($f)::+::<3, $p, $q>(t),
                4 => $($f)::+::<4, $p, $q>(t),
                5 => $($f)::+::<5, $p, $q>(t),
                _ => $($f)::+::<6, $p, $q>(t),
            }
        };
    }
    macro_rules! shapes {
        ($($f:ident)::+) => {
            match (kind, t.panels) {
                (QuantKind::Q8_0, 1) => rows!($($f)::+, 1, Q8),
                (QuantKind::Q8_0, 2) => rows!($($f)::+, 2, Q8),
                (QuantKind::Q8_0, 3) => rows!($($f)::+, 3, Q8),
                (QuantKind::Q8_0, _) => rows!($($f)::+, 4, Q8),
                (QuantKind::Q4_1, 1) => rows!($($f)::+, 1, Q4),
                (QuantKind::Q4_1, 2) => rows!($($f)::+, 2, Q4),
                (QuantKind::Q4_1, 3) => rows!($($f)::+, 3, Q4),
                (QuantKind::Q4_1, _) => rows!($($f)::+, 4, Q4),
            }
        };
    }
    // SAFETY: passed on from the caller; each kernel runs only where `isa` runs.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => shapes!(simd::avx512),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => shapes!(simd::avx2),
            Isa::Portable => shapes!(kernel_portable),
        }
    }
}

/// Panels `p..p + panels` of `q`, weights `k0..k0 + kc` (multiples of 32), widened to f32 into
/// `out` in gemm's f32 panel layout (`[panel][kk][16]`): each weight as the `isa` kernel widens
/// it in registers for many rows (`d q + m` in one FMA for Q4_1, `d q` for Q8_0; unfused on the
/// portable kernel). A product of many rows then widens each weight once per row block of x
/// (gemm's MC rows) instead of once per six rows, and multiplies on the f32 kernel.
pub(super) fn widen_panels(isa: Isa, q: &QPanels, p: usize, panels: usize, k0: usize, kc: usize, out: &mut [f32]) {
    assert!(
        k0.is_multiple_of(QK)
            && kc.is_multiple_of(QK)
            && k0 + kc <= q.k
            && (p + panels) * NR <= q.n.next_multiple_of(NR)
    );
    assert!(out.len() >= panels * kc * NR, "widened panels need {} values", panels * kc * NR);
    let pb = q.kind.panel_block_bytes();
    for j in 0..panels {
        for kb in 0..kc / QK {
            let blk = &q.data[q.offset(p + j, k0) + kb * pb..][..pb];
            let dst = &mut out[(j * kc + kb * QK) * NR..][..QK * NR];
            // SAFETY: `blk` is one whole panel block; `dst` holds 32 x 16 values; each kernel runs
            // only where `isa` does.
            unsafe {
                match (isa, q.kind) {
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx512, QuantKind::Q4_1) => simd::widen_avx512::<Q4>(blk.as_ptr(), dst),
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx512, QuantKind::Q8_0) => simd::widen_avx512::<Q8>(blk.as_ptr(), dst),
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx2Fma, QuantKind::Q4_1) => widen_fused::<Q4>(blk.as_ptr(), dst),
                    #[cfg(target_arch = "x86_64")]
                    (Isa::Avx2Fma, QuantKind::Q8_0) => widen_fused::<Q8>(blk.as_ptr(), dst),
                    (_, QuantKind::Q4_1) => widen_block::<Q4, Plain>(blk.as_ptr(), dst),
                    (_, QuantKind::Q8_0) => widen_block::<Q8, Plain>(blk.as_ptr(), dst),
                }
            }
        }
    }
}

/// One panel block's 32 x 16 weights widened by `Format::weights`.
///
/// # Safety
/// `blk` points at a whole panel block; `dst` holds 32 x 16 values.
#[inline(always)]
unsafe fn widen_block<Q: Format, M: MulAdd>(blk: *const u8, dst: &mut [f32]) {
    // SAFETY: passed on.
    let (d, m) = unsafe { Q::scales(blk) };
    for (kk, row) in dst.chunks_exact_mut(NR).enumerate() {
        row.copy_from_slice(&unsafe { Q::weights::<M>(blk, kk, &d, &m) });
    }
}

/// `widen_block` with one FMA a weight, as the AVX2 kernel widens. Written generically, not in
/// intrinsics: once per row block of x it is a small part of the product (the default model's
/// Q4_1 layers at 512 rows ran at 182-184 GFLOP/s on AVX2 with it, the f32 weights' rate).
///
/// # Safety
/// As `widen_block`, on a CPU with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_fused<Q: Format>(blk: *const u8, dst: &mut [f32]) {
    // SAFETY: passed on.
    unsafe { widen_block::<Q, super::muladd::Fused>(blk, dst) }
}

/// # Safety
/// `run`'s contract.
unsafe fn kernel_portable<const R: usize, const P: usize, Q: Format>(t: &QTile) {
    // SAFETY: passed on.
    unsafe { kernel::<R, P, Q, Plain>(t) }
}

/// A block format as the kernels read it from a panel block.
trait Format {
    const KIND: QuantKind;
    /// Q4_1 (nibbles and offsets) rather than Q8_0 (bytes): how the x86 kernels widen a row.
    #[cfg(target_arch = "x86_64")]
    const Q4: bool;
    /// The 16 columns' scales and offsets (offsets 0 for Q8_0).
    ///
    /// # Safety
    /// `blk` points at a whole panel block.
    unsafe fn scales(blk: *const u8) -> ([f32; NR], [f32; NR]);
    /// Weight `kk` (0..32) of the 16 columns, widened: `d * q + m`.
    ///
    /// # Safety
    /// As `scales`.
    unsafe fn weights<M: MulAdd>(blk: *const u8, kk: usize, d: &[f32; NR], m: &[f32; NR]) -> [f32; NR];
}

/// f16 bits to f32 without branches (so it vectorises): the exponent is rebased by a multiply by
/// 2^112, exact for normal and subnormal values and zero; scales are never infinite or NaN.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let mag = f32::from_bits(((h as u32) & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(mag.to_bits() | (((h as u32) & 0x8000) << 16))
}

/// # Safety
/// `p` points at 16 f16 values.
#[inline(always)]
unsafe fn load_f16x16(p: *const u8) -> [f32; NR] {
    // SAFETY: passed on (unaligned reads of 2 bytes each).
    std::array::from_fn(|j| f16_to_f32(unsafe { (p.add(2 * j) as *const u16).read_unaligned() }.to_le()))
}

struct Q8;
impl Format for Q8 {
    const KIND: QuantKind = QuantKind::Q8_0;
    #[cfg(target_arch = "x86_64")]
    const Q4: bool = false;
    #[inline(always)]
    unsafe fn scales(blk: *const u8) -> ([f32; NR], [f32; NR]) {
        // SAFETY: passed on.
        (unsafe { load_f16x16(blk) }, [0.0; NR])
    }
    #[inline(always)]
    unsafe fn weights<M: MulAdd>(blk: *const u8, kk: usize, d: &[f32; NR], _m: &[f32; NR]) -> [f32; NR] {
        // SAFETY: row kk of the [32][16] i8 weights after the scales.
        let q = unsafe { &*(blk.add(Self::KIND.weights_at() + kk * NR) as *const [i8; NR]) };
        std::array::from_fn(|j| d[j] * q[j] as f32)
    }
}

struct Q4;
impl Format for Q4 {
    const KIND: QuantKind = QuantKind::Q4_1;
    #[cfg(target_arch = "x86_64")]
    const Q4: bool = true;
    #[inline(always)]
    unsafe fn scales(blk: *const u8) -> ([f32; NR], [f32; NR]) {
        // SAFETY: passed on.
        unsafe { (load_f16x16(blk), load_f16x16(blk.add(OFFSETS))) }
    }
    #[inline(always)]
    unsafe fn weights<M: MulAdd>(blk: *const u8, kk: usize, d: &[f32; NR], m: &[f32; NR]) -> [f32; NR] {
        // SAFETY: byte row kk % 16 of the [16][16] nibble pairs after the scales and offsets.
        let q = unsafe { &*(blk.add(Self::KIND.weights_at() + (kk % (QK / 2)) * NR) as *const [u8; NR]) };
        let shift = if kk < QK / 2 { 0 } else { 4 };
        std::array::from_fn(|j| M::madd(d[j], ((q[j] >> shift) & 15) as f32, m[j]))
    }
}

/// The micro-kernel: `R` rows by `P` panels of accumulators, each 32-weight block's scales read
/// once, each widened weight row shared by the `R` rows.
///
/// # Safety
/// `run`'s contract, with `R == t.rows` and `P == t.panels`.
#[inline(always)]
unsafe fn kernel<const R: usize, const P: usize, Q: Format, M: MulAdd>(t: &QTile) {
    let pb = Q::KIND.panel_block_bytes();
    let mut acc = [[[0.0f32; NR]; P]; R];
    for kb in 0..t.kc / QK {
        // SAFETY: block kb of panel p is inside the panel (kb < kc / 32).
        let blk: [*const u8; P] = std::array::from_fn(|p| unsafe { t.b.add(p * t.stride + kb * pb) });
        let scales: [([f32; NR], [f32; NR]); P] = std::array::from_fn(|p| unsafe { Q::scales(blk[p]) });
        for kk in 0..QK {
            let w: [[f32; NR]; P] =
                std::array::from_fn(|p| unsafe { Q::weights::<M>(blk[p], kk, &scales[p].0, &scales[p].1) });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: kb * 32 + kk < kc and r < R <= 6: one value of the packed rows.
                let a = unsafe { *t.a.add((kb * QK + kk) * MR + r) };
                for (acc, w) in acc.iter_mut().zip(&w) {
                    for (c, &w) in acc.iter_mut().zip(w) {
                        *c = M::madd(a, w, *c);
                    }
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (p, acc) in acc.iter().enumerate() {
            // SAFETY: row r < rows of `out`, panel p's 16 values.
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), t.out.add(r * t.out_stride + p * NR), NR) };
        }
    }
}

/// The x86 kernels: the portable kernel's loop with the widening written in intrinsics (the
/// compiler did not vectorise the generic byte-to-float code: 1-7 GFLOP/s).
#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(test)]
mod tests;
