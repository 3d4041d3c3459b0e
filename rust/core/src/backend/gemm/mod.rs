//! Linear layers with weights packed once at load time: `out[m x n] = x[m x k] * W[n x k]^T`.
//!
//! Why not call a GEMM crate per layer (faer did this until measured): a general GEMM re-packs the
//! weight matrix on every call, and in decode (M = batch, 1..64) that packing is a second full pass
//! over the weights, a quarter of the step time measured here. Weights never change, so we pack
//! them once into 16-column panels (`[n / 16][k][16]`, the layout the micro-kernel streams) and
//! each call reads every weight exactly once. The same layout stores bf16 weights at half the
//! bytes, widened in registers, which no CPU GEMM crate offers for f32 activations; where the
//! AVX-512 kernel runs, bf16 panels are interleaved four by four (`Layout`) so that a decode tile
//! reads one stream. GGML blocks (`quant`) are widened in registers for a few rows (decode); for
//! many, a tile's panels are widened once per row block of x into a small f32 scratch and run on
//! the f32 kernel (`WIDEN_MIN_ROWS`), since widening in registers costs about as many
//! instructions as the FMAs it feeds there.
//!
//! The AVX2 micro-kernel keeps a 6 x 16 block of C in twelve registers and runs one FMA per
//! weight vector per row; x is packed per call (small: M x K) so each row block's values sit
//! together. While a panel's first row block computes, the next panel's slice is prefetched.
//! The AVX-512 kernel reads four panels side by side and keeps a 6 x 64 block of C in 24 of its
//! 32 registers: per step of k, 24 FMAs for 4 weight loads and 6 broadcasts, where AVX2's 6 x 16
//! block has 12 FMAs for 8 loads (on a Zen 4 with AVX-512 the AVX2 kernel ran model-shaped
//! layers at half faer's rate, limited by those loads). The kernel is chosen at run time
//! (`is_x86_feature_detected!`), so the wheel needs no `-march=native`; other machines get the
//! portable kernel, which computes the same sums. `HORAE_CPU_KERNEL=portable|avx2|avx512` caps
//! the choice (for comparisons; a kernel the CPU lacks is never used).

use rayon::prelude::*;

use super::amx;
use super::amx_int8;
use super::bf16_dot;
use super::huge::{self, HugeBuf, Zeroed};
use super::isa::Isa;
use super::quant::{self, QPanels, QuantKind};
use super::team;

#[cfg(test)]
mod tests;
mod tile;

use tile::{PanelValue, Tile};

/// Bytes of a matrix the helper warms before a decode product at most (a part of its L2).
const WARM_MAX: usize = 1 << 20;

/// Columns per panel: two AVX2 vectors of f32, one AVX-512 vector.
const NR: usize = 16;
/// Panels one AVX-512 tile reads side by side (6 x 4 accumulators of 16 values: 24 of 32 registers).
const WIDE: usize = 4;
/// Rows of C per micro-kernel call (6 x 2 accumulators + 2 weight vectors + 1 broadcast = 15 of
/// the 16 AVX2 registers).
const MR: usize = 6;
/// Depth per pass: a 16-column panel of 256 rows is 16 KiB of f32, so it stays in L1 while every
/// row block of x goes past it.
const KC: usize = 256;
/// How far ahead of its reads a decode tile prefetches each panel stream, in bytes.
pub(super) const PREFETCH: usize = 1024;
/// Rows of x per pass over a task's panels: 192 x 256 f32 is 192 KiB, which stays in a 512 KiB L2
/// while the panels stream through L1 (192 measured faster than 96 at 512 rows here).
const MC: usize = 192;
/// Rows from which a product of GGML blocks widens them to f32 once per row block of x
/// (`quant::widen_panels`, then the f32 kernel) instead of in registers once per MR rows. The
/// default model's layers (Zen 4, `bench_linear`) at 512 rows: Q4_1 140-145 -> 205-208 GFLOP/s
/// on AVX-512, 83-86 -> 182-184 on AVX2; from 12 rows widening was as fast or faster with either
/// kernel, below it slower on AVX-512 (7-10 rows: 93-109 against 104-120).
const WIDEN_MIN_ROWS: usize = 2 * MR;

/// How packed weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    /// bf16 storage (half the memory and bandwidth); products and sums are still f32.
    Bf16,
    /// GGML blocks (`quant`): widened in registers (from `WIDEN_MIN_ROWS` rows, a tile at a time
    /// into a scratch of f32), products and sums in f32.
    Quant(QuantKind),
}

impl WeightDtype {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" | "f32" => Some(Self::F32),
            "bfloat16" | "bf16" => Some(Self::Bf16),
            _ => QuantKind::parse(s).map(Self::Quant),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::Quant(q) => q.name(),
        }
    }
}

/// The arithmetic of a bf16 model's products: its prefill attention tiles' (Q K^T and P V) and
/// its linear layers' (on AMX tiles from `AMX_MIN_ROWS` rows where they run, else through
/// `vdpbf16ps` at any row count: `bf16_dot_runs`). Sums are f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// f32 operands (exact for bf16 weights, as the goldens check).
    F32,
    /// Activations rounded to bf16 as well: what a bf16 model does in HF transformers and in
    /// flash attention, and what `vdpbf16ps` and AMX tiles multiply. Only where the CPU runs them.
    Bf16,
}

/// Rows from which a bf16 product goes through AMX tiles (`amx`), where they run. Below, a block
/// of 32 rows is mostly padding and both kernels are bound by reading the weights. Decode of the
/// default model in bf16 (one Xeon, 3 alternations) was 1.2-1.45x faster at 8-12 sequences with
/// AMX from 8 rows, and slower at 4-6 with AMX from 4; 8 is not taken yet because it moves the
/// bf16 model past its documented tolerance (docs/benchmarks.md, issue 17, sixth part).
/// GGML blocks go through AMX int8 tiles from the same row count: at 16 rows they were already
/// 1.33x (Q4_1) and 1.25x (Q8_0) the AVX-512 kernel on the default model's layers.
pub const AMX_MIN_ROWS: usize = 16;

/// Whether bf16 products of the linear layers run on AMX tiles here: the CPU and OS allow them,
/// and `HORAE_CPU_KERNEL` is unset or `amx` (any other cap keeps the vector kernels).
pub fn amx_runs() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let cap = std::env::var("HORAE_CPU_KERNEL").unwrap_or_default();
        let on = matches!(cap.trim(), "" | "amx") && Isa::detect() == Isa::best() && amx::runs_here();
        if cap.trim() == "amx" && !on {
            eprintln!(
                "horae: HORAE_CPU_KERNEL=amx, but this CPU or OS does not run AMX tiles; the {} kernel runs",
                Isa::detect().name()
            );
        }
        on
    })
}

/// Whether a bf16 model's linear layers run their products through `vdpbf16ps` (`avx512_dot`),
/// at any row count: the engine's kernel is AVX-512, the CPU has AVX-512 BF16, and AMX does not
/// run. Against the f32-operand AVX-512 kernel (AMD EPYC Zen 4, the default model in bf16,
/// alternating processes): prefill of 512 tokens 1.7-1.8x, decode at 32 sequences 1.6x, at 8-12
/// 1.2-1.4x; batch 1 (bound by the weights' stream) unchanged. At every row count, not from 16 as
/// AMX (whose tiles are 16 rows): the products round alike whatever the batch, and the bf16
/// model stays within its documented tolerance (`tests/test_model.py`).
pub fn bf16_dot_runs() -> bool {
    Isa::detect() == Isa::Avx512 && bf16_dot::runs_here() && !amx_runs()
}

/// Whether quantized weights' products run on AMX int8 tiles from `AMX_MIN_ROWS` rows here: the
/// CPU and OS allow them, and `HORAE_CPU_KERNEL` is unset or `amx`.
pub fn amx_int8_runs() -> bool {
    amx_runs() && amx_int8::runs_here()
}

/// Each on 2 MiB pages (`huge`): decode streams them every step.
enum Panels {
    F32(HugeBuf<f32>),
    /// For the AVX2 and portable kernels: within each panel the columns are stored in the order
    /// 0-3, 8-11, 4-7, 12-15, so that AVX2's in-lane unpack of one 32-byte load yields columns
    /// 0-7 and 8-15 as f32.
    Bf16(HugeBuf<u16>),
    /// For the AVX-512 kernels (and, in AMX's tile order, the AMX kernel): bf16 in pairs of rows
    /// (`PairOrder`).
    Bf16Pairs(HugeBuf<u16>, PairOrder),
    Quant(QPanels),
}

/// A weight matrix `[n, k]` (HF's `[out_features, in_features]`) packed for `linear`.
pub struct PackedLinear {
    n: usize,
    k: usize,
    panels: Panels,
    /// Where f32 and bf16 panel values sit (`Layout`).
    layout: Layout,
}

/// Where f32 and bf16 panel values sit: panel after panel, each its k rows of 16 values
/// (`[n / 16][k][16]`, the last panel zero-padded). f32 panels stream at the bandwidth at 64
/// bytes a row; bf16 for AVX-512 is packed in pairs of rows instead (`PairOrder`), whose groups of
/// four panels make a decode tile one sequential stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    k: usize,
}

impl Layout {
    /// Values between row `kk` and row `kk + 1` of a panel.
    fn ldb(self) -> usize {
        NR
    }
    /// Values between panel `p` and `p + 1`.
    fn stride(self) -> usize {
        self.k * NR
    }
    /// Index of row `kk` of panel `p`.
    fn offset(self, p: usize, kk: usize) -> usize {
        p * self.stride() + kk * self.ldb()
    }
    /// Values a matrix of `np` panels takes.
    fn len(self, np: usize) -> usize {
        np * self.k * NR
    }
}

/// bf16 panels stored as pairs of rows: each 32-bit lane holds rows kk and kk + 1 of one column
/// (kk even, the lower row in the low half), so one 64-byte load is two rows of 16 columns:
/// widened by a shift and a mask (no shuffle), or multiplied as they are by `vdpbf16ps`. Panels
/// come in groups of `amx::GROUP` (= WIDE, a decode tile), zero-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PairOrder {
    /// AMX's tile order (`amx::TileOrder`), where AMX runs: its tiles load it as it is, and the
    /// AVX-512 kernel reads the same copy below `AMX_MIN_ROWS` rows.
    Tiles(amx::TileOrder),
    /// Elsewhere: `[panel groups][k / 2][GROUP panels][16 columns][2]`, a group's pair rows side
    /// by side, so a decode tile reads one sequential stream (tile order interleaves four 1 KiB
    /// tiles, which one Zen 4 thread streamed at 11 GB/s against 25 in this order).
    /// (Four panels stored apart were four streams of 32 bytes a row, which one thread read at
    /// 0.65 of its bandwidth; side by side they read 1.1-1.2x faster: docs/benchmarks.md, issue
    /// 17.) Widening needs no shuffle here, where one row at a time took a cross-lane one.
    Rows { pairs: usize },
}

impl PairOrder {
    fn new(k: usize, tiles: bool) -> Self {
        if tiles {
            PairOrder::Tiles(amx::TileOrder::new(k))
        } else {
            PairOrder::Rows { pairs: k.div_ceil(2) }
        }
    }

    /// The order a kernel reads, for its addressing (`ahead`, `panel_step`), which does not
    /// depend on k.
    #[inline(always)]
    const fn of<const TILED: bool>() -> Self {
        if TILED {
            PairOrder::Tiles(amx::TileOrder { kt: 0 })
        } else {
            PairOrder::Rows { pairs: 0 }
        }
    }

    /// Index of the pair row holding row `kk` of panel `p` (32 values: 16 columns, two rows each).
    fn row(self, p: usize, kk: usize) -> usize {
        match self {
            PairOrder::Tiles(o) => o.row(p, kk),
            PairOrder::Rows { pairs } => {
                (p / amx::GROUP) * pairs * GROUP_PAIR_ROW + kk / 2 * GROUP_PAIR_ROW + (p % amx::GROUP) * 32
            }
        }
    }

    /// Index of weight (row `kk`, column `j`) of panel `p`.
    fn index(self, p: usize, kk: usize, j: usize) -> usize {
        self.row(p, kk) + 2 * j + kk % 2
    }

    /// Values a matrix of `np` panels takes.
    fn len(self, np: usize) -> usize {
        match self {
            PairOrder::Tiles(o) => o.len(np),
            PairOrder::Rows { pairs } => np.div_ceil(amx::GROUP) * pairs * GROUP_PAIR_ROW,
        }
    }

    /// Values from a panel's pair row at k0 (a multiple of 32) to its pair row at k0 + kk.
    #[inline(always)]
    fn ahead(self, kk: usize) -> usize {
        match self {
            PairOrder::Tiles(_) => kk / 32 * amx::TileOrder::STEP + kk % 32 / 2 * 32,
            PairOrder::Rows { .. } => kk / 2 * GROUP_PAIR_ROW,
        }
    }

    /// Values from one panel's pair row to the next panel's, inside a group.
    #[inline(always)]
    fn panel_step(self) -> usize {
        match self {
            PairOrder::Tiles(_) => amx::TileOrder::STEP / amx::GROUP,
            PairOrder::Rows { .. } => 32,
        }
    }
}

/// Values of one pair row of a whole group in row order.
const GROUP_PAIR_ROW: usize = amx::GROUP * 32;

/// How far ahead (in bf16 values) the pair kernels ask for lines: 8 KiB, two steps of tile order.
const PAIR_PREFETCH: usize = 2 * amx::TileOrder::STEP;

/// What the tile kernels multiply the weights by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operands {
    /// A's f32 values (`pack_rows`).
    F32,
    /// A rounded to bf16, in pairs along k (`pack_pair_rows`), for `avx512_dot`.
    Bf16Pairs,
}

/// Position of column `j` (0..16) inside a bf16 group.
#[inline]
fn bf16_slot(j: usize) -> usize {
    [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15][j]
}

fn to_bf16(v: f32) -> u16 {
    super::bf16::round(v)
}

impl PackedLinear {
    /// Pack row-major `w[n x k]`. With `Bf16`, values are rounded to nearest bf16 (exact for
    /// weights that were stored as bf16); a quantized dtype quantizes each row into its blocks
    /// (`k` must then be a multiple of 32).
    pub fn new(w: &[f32], n: usize, k: usize, dtype: WeightDtype) -> Self {
        Self::new_for(w, n, k, dtype, Isa::detect())
    }

    /// `new` for the `isa` kernel (benchmarks pack for the kernel they time): bf16 for AVX-512
    /// in pairs of rows (in tile order where AMX runs), which only the AVX-512 and AMX kernels
    /// read (`forward_with` asserts it); everything else in panels (`Layout`), which every
    /// kernel reads.
    pub fn new_for(w: &[f32], n: usize, k: usize, dtype: WeightDtype, isa: Isa) -> Self {
        #[cfg(target_arch = "x86_64")]
        if dtype == WeightDtype::Bf16 && isa == Isa::Avx512 {
            return Self::in_pairs(w, n, k, PairOrder::new(k, amx_runs()));
        }
        Self::in_panels(w, n, k, dtype)
    }

    /// bf16 in pairs of rows (`Panels::Bf16Pairs`).
    fn in_pairs(w: &[f32], n: usize, k: usize, order: PairOrder) -> Self {
        assert_eq!(w.len(), n * k, "weight has {} values, expected {n} x {k}", w.len());
        let np = n.div_ceil(NR);
        let mut v = huge::zeroed::<u16>(order.len(np));
        let group_len = (order.len(1)).max(1);
        v.par_chunks_mut(group_len).enumerate().for_each(|(g, group)| {
            let base = order.row(g * amx::GROUP, 0);
            for p in g * amx::GROUP..((g + 1) * amx::GROUP).min(np) {
                for j in (0..NR).filter(|j| p * NR + j < n) {
                    let col = &w[(p * NR + j) * k..][..k];
                    for (kk, &x) in col.iter().enumerate() {
                        group[order.index(p, kk, j) - base] = to_bf16(x);
                    }
                }
            }
        });
        Self { n, k, panels: Panels::Bf16Pairs(v, order), layout: Layout { k } }
    }

    /// `new` in panels (`Layout`), or GGML blocks for a quantized dtype.
    fn in_panels(w: &[f32], n: usize, k: usize, dtype: WeightDtype) -> Self {
        assert_eq!(w.len(), n * k, "weight has {} values, expected {n} x {k}", w.len());
        if let WeightDtype::Quant(kind) = dtype {
            assert!(k.is_multiple_of(quant::QK) && k > 0, "{} needs rows of whole blocks of 32", kind.name());
            let raw: Vec<u8> = w.par_chunks(k).flat_map_iter(|row| quant::quantize_row(kind, row)).collect();
            return Self::from_ggml(kind, &raw, n, k).expect("quantized rows have the right size");
        }
        let np = n.div_ceil(NR);
        let layout = Layout { k };
        let at = |p: usize, kk: usize, j: usize| {
            let col = p * NR + j;
            if col < n {
                w[col * k + kk]
            } else {
                0.0
            }
        };
        let panels = match dtype {
            WeightDtype::F32 => Panels::F32(pack_panels(layout, np, |p, kk, j| (j, at(p, kk, j)))),
            WeightDtype::Bf16 => {
                Panels::Bf16(pack_panels(layout, np, |p, kk, j| (bf16_slot(j), to_bf16(at(p, kk, j)))))
            }
            WeightDtype::Quant(_) => unreachable!("quantized above"),
        };
        Self { n, k, panels, layout }
    }

    /// `n` rows of GGML blocks (a GGUF tensor's bytes) as they are, no widening.
    pub fn from_ggml(kind: QuantKind, raw: &[u8], n: usize, k: usize) -> Result<Self, String> {
        Ok(Self { n, k, panels: Panels::Quant(QPanels::from_ggml(kind, raw, n, k)?), layout: Layout { k } })
    }

    /// Bytes the packed weights take (what a pass over the layer reads from memory).
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(v) => 4 * v.len(),
            Panels::Bf16(v) | Panels::Bf16Pairs(v, _) => 2 * v.len(),
            Panels::Quant(q) => q.bytes().len(),
        }
    }

    /// How the weights are stored.
    pub fn dtype(&self) -> WeightDtype {
        match &self.panels {
            Panels::F32(_) => WeightDtype::F32,
            Panels::Bf16(_) | Panels::Bf16Pairs(..) => WeightDtype::Bf16,
            Panels::Quant(q) => WeightDtype::Quant(q.kind()),
        }
    }

    /// Row `i` of the original `[n, k]` matrix (an embedding lookup when the LM head is tied).
    pub fn row(&self, i: usize, out: &mut [f32]) {
        assert!(i < self.n && out.len() == self.k);
        let (p, j) = (i / NR, i % NR);
        fn column<T: PanelValue>(v: &[T], layout: Layout, p: usize, j: usize, out: &mut [f32]) {
            for (kk, o) in out.iter_mut().enumerate() {
                let at = layout.offset(p, kk);
                *o = T::widen(&v[at..at + NR])[j];
            }
        }
        match &self.panels {
            Panels::F32(v) => column(v, self.layout, p, j, out),
            Panels::Bf16(v) => column(v, self.layout, p, j, out),
            Panels::Bf16Pairs(v, order) => {
                for (kk, o) in out.iter_mut().enumerate() {
                    *o = super::bf16::widen(v[order.index(p, kk, j)]);
                }
            }
            Panels::Quant(q) => q.row(i, out),
        }
    }

    /// `out[m x n] = x[m x k] * W^T`, multi-threaded over column panels.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_with(x, m, out, Isa::detect());
    }

    /// `forward` with a bf16 model's `products`: `Products::Bf16` runs bf16 weights on AMX
    /// tiles from `AMX_MIN_ROWS` rows (where AMX runs, `new` packs them in tile order). GGML
    /// blocks run on AMX int8 tiles from `AMX_MIN_ROWS` rows whatever the products (where
    /// `amx_int8_runs`): their activations at 22 bits keep the f32 path's goldens
    /// (`amx_int8`). Everything else is `forward`.
    pub fn forward_products(&self, x: &[f32], m: usize, out: &mut [f32], products: Products) {
        match &self.panels {
            Panels::Bf16Pairs(v, PairOrder::Tiles(order)) if products == Products::Bf16 && m >= AMX_MIN_ROWS => {
                amx::gemm_bf16(v, *order, self.n, self.k, x, m, out)
            }
            #[cfg(target_arch = "x86_64")]
            Panels::Bf16Pairs(_, PairOrder::Rows { .. }) if products == Products::Bf16 && bf16_dot::runs_here() => {
                self.tiled(x, m, out, Isa::Avx512, Operands::Bf16Pairs)
            }
            Panels::Quant(q) if m >= AMX_MIN_ROWS && amx_int8_runs() => amx_int8::gemm(q, x, m, out),
            _ => self.forward(x, m, out),
        }
    }

    /// Before a decode step's stretch on one thread (norms, RoPE, attention), ask the helper
    /// thread to pull up the end of this matrix, the next product, where its part starts
    /// (`team::warm`, `team::from_both_ends`): up to half the matrix, at most `WARM_MAX` bytes.
    /// Not for GGML blocks (their decode is bound by widening the blocks more than by the stream).
    pub fn warm(&self, m: usize) {
        if m <= MR && !matches!(self.panels, Panels::Quant(_)) {
            let len = (self.bytes() / 2).min(WARM_MAX);
            team::warm(self.base().wrapping_add(self.bytes() - len), len);
        }
    }

    fn base(&self) -> *const u8 {
        match &self.panels {
            Panels::F32(v) => v.as_ptr().cast(),
            Panels::Bf16(v) | Panels::Bf16Pairs(v, _) => v.as_ptr().cast(),
            Panels::Quant(q) => q.bytes().as_ptr(),
        }
    }

    /// `forward` with the kernel for `isa` (which the CPU must have: see `Isa::available`).
    pub fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], isa: Isa) {
        self.tiled(x, m, out, isa, Operands::F32)
    }

    /// The product through the tile kernels, with `operands` of A.
    fn tiled(&self, x: &[f32], m: usize, out: &mut [f32], isa: Isa, operands: Operands) {
        assert!(isa.runs_here(), "this CPU cannot run the {} kernel", isa.name());
        assert!(
            operands == Operands::F32
                || isa == Isa::Avx512
                    && bf16_dot::runs_here()
                    && matches!(self.panels, Panels::Bf16Pairs(_, PairOrder::Rows { .. })),
            "bf16 operands run on AVX-512 BF16, on bf16 weights in pairs of rows"
        );
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "input has {} values, expected {m} x {k}", x.len());
        assert_eq!(out.len(), m * n);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            out.fill(0.0);
            return;
        }
        let np = n.div_ceil(NR);
        let mut a = PACKED_ROWS.with_borrow_mut(std::mem::take);
        let mut pairs = PACKED_PAIRS.with_borrow_mut(std::mem::take);
        let k2 = k.div_ceil(2);
        // The tile contract for A: MR (zero-padded) rows of k values (or k / 2 pairs, rounded
        // up) for every row block.
        let packed = match operands {
            Operands::F32 => {
                pack_rows(x, m, k, &mut a);
                a.len() >= m.div_ceil(MR) * MR * k
            }
            Operands::Bf16Pairs => {
                pack_pair_rows(x, m, k, &mut pairs);
                pairs.len() >= m.div_ceil(MR) * MR * k2
            }
        };
        assert!(packed, "packed rows");
        // A's row block from row m0 (a multiple of MR), from its value k0 (even).
        let a_at = |m0: usize, k0: usize| -> *const f32 {
            match operands {
                Operands::F32 => a.as_ptr().wrapping_add(m0 * k + k0 * MR),
                Operands::Bf16Pairs => pairs.as_ptr().wrapping_add(m0 * k2 + k0 / 2 * MR).cast(),
            }
        };
        // Tasks are (row block of MC, group of panels): each owns a disjoint block of `out`.
        // Aim for four per thread so rayon can balance uneven cores; tiny products run inline.
        let m_blocks = m.div_ceil(MC);
        // GGML blocks for many rows are widened to f32 once per row block of x (`widen`) and run
        // on the f32 kernel, at its width.
        let widen = match &self.panels {
            Panels::Quant(q) if m >= WIDEN_MIN_ROWS => Some(q),
            _ => None,
        };
        let wide = match &self.panels {
            Panels::Quant(_) if widen.is_none() => quant::panels_per_tile(isa, m),
            #[cfg(target_arch = "x86_64")]
            Panels::Bf16Pairs(..) => {
                assert!(isa == Isa::Avx512, "bf16 in pairs of rows is read by the AVX-512 and AMX kernels only");
                WIDE
            }
            _ => panels_per_tile(isa),
        };
        let per_task = if m * n * k < 1 << 17 {
            np
        } else if m <= MR && !matches!(self.panels, Panels::Quant(_)) {
            // One row block (decode) of f32 or bf16 weights, a stream bound by the memory's
            // bandwidth: one equal share of the panels per thread, each a single sequential
            // stream. Four shares a thread made rayon hand them out in turn, so each thread's
            // reads jumped between pieces of every matrix and both waited at each region's end
            // for the slower one. Batch-1 decode on the 2-core Xeon, alternating builds: bf16
            // 79-82 -> 89-94 tok/s, f32 46-49 -> 49-53. Quantized weights keep four shares: their
            // decode is bound by widening the blocks more than by the stream (Q4_1 reads 19 GB/s
            // of 34), and one share each was 5% slower there. On two threads the shares are
            // taken from both ends (below), so where they meet follows the faster thread.
            np.div_ceil(rayon::current_num_threads())
        } else {
            let groups = (rayon::current_num_threads() * 4).div_ceil(m_blocks);
            // Whole tiles per task, so only the matrix's last tile is narrow.
            np.div_ceil(groups).max(1).next_multiple_of(wide)
        };
        let groups = np.div_ceil(per_task);
        // One row block (decode): the whole depth in one pass. x is a few KiB, so nothing is
        // gained by keeping panel slices in L1, and each panel is then read as one sequential
        // stream instead of k / KC pieces (the prefetchers ramp up again at every piece).
        let depth = if m <= MR { k } else { KC };
        let out_ptr = SendPtr(out.as_mut_ptr());
        let layout = self.layout;
        // Panels p0..p_end of the row block from mc0.
        let panels_of = |mc0: usize, p0: usize, p_end: usize| {
            let out_ptr = &out_ptr;
            for k0 in (0..k).step_by(depth) {
                let kc = depth.min(k - k0);
                let mut p = p0;
                while p < p_end {
                    // Tiles end at multiples of `wide`, so a tile's panels sit in one group of
                    // pairs of rows even where a decode share starts inside one.
                    let panels = (wide - p % wide).min(p_end - p);
                    assert!(!matches!(self.panels, Panels::Bf16Pairs(..)) || p % amx::GROUP + panels <= amx::GROUP);
                    let cols = (panels * NR).min(n - p * NR);
                    // The tile of row block m0 over these panels, whose B rows are `ldb` apart
                    // and panels `stride` apart.
                    let tile = |m0: usize, stride: usize, ldb: usize| Tile {
                        a: a_at(m0, k0),
                        c: out_ptr.0.wrapping_add(m0 * n + p * NR),
                        ldc: n,
                        kc,
                        rows: MR.min(m - m0),
                        cols,
                        panels,
                        stride,
                        ldb,
                        accumulate: k0 > 0,
                    };
                    let row_blocks = (mc0..(mc0 + MC).min(m)).step_by(MR);
                    // SAFETY (both branches): the block [m0..m0+rows, p*NR..p*NR+cols] of `out`
                    // is in bounds and written only by the task that owns this row block and
                    // these panels; `a` holds MR rows (zero-padded) for every row block.
                    match widen {
                        // GGML blocks for many rows: this tile's panels widened to f32 once, for
                        // every row block of the task (`Tile::run` checks the slice).
                        Some(q) => WIDENED.with_borrow_mut(|w| {
                            w.resize(panels * kc * NR, 0.0);
                            quant::widen_panels(isa, q, p, panels, k0, kc, w);
                            for m0 in row_blocks {
                                unsafe { tile(m0, kc * NR, NR).run(w.as_slice(), 0, None, isa) };
                            }
                        }),
                        None => {
                            let b = layout.offset(p, k0);
                            for m0 in row_blocks {
                                let next = (m0 == mc0 && p + panels < p_end).then(|| layout.offset(p + panels, k0));
                                let tile = tile(m0, layout.stride(), layout.ldb());
                                unsafe {
                                    match &self.panels {
                                        Panels::F32(v) => tile.run(v, b, next, isa),
                                        Panels::Bf16(v) => tile.run(v, b, next, isa),
                                        Panels::Bf16Pairs(v, order) => {
                                            tile.run_pairs(v, *order, order.row(p, k0), operands)
                                        }
                                        Panels::Quant(q) => tile.run_quant(q, p, k0, isa),
                                    }
                                }
                            }
                        }
                    }
                    p += panels;
                }
            }
        };
        if m <= MR && groups == 2 && !matches!(self.panels, Panels::Quant(_)) {
            // Decode on two threads: from both ends, in chunks of two tiles (the helper starts
            // at the end, which it may have pulled into its cache already: `warm`).
            team::end_warm();
            let chunk = 2 * wide;
            team::from_both_ends(np.div_ceil(chunk), |c| panels_of(0, c * chunk, ((c + 1) * chunk).min(np)));
        } else {
            let tasks = m_blocks * groups;
            let run = |task: usize| {
                let p0 = (task % groups) * per_task;
                panels_of((task / groups) * MC, p0, (p0 + per_task).min(np))
            };
            if m <= MR {
                team::for_each(tasks, run);
            } else if tasks == 1 {
                run(0);
            } else {
                (0..tasks).into_par_iter().for_each(run);
            }
        }
        PACKED_ROWS.with_borrow_mut(|buf| *buf = a);
        PACKED_PAIRS.with_borrow_mut(|buf| *buf = pairs);
    }
}

/// Panels in `layout` (`np` of them): `value(p, kk, j)` is (the slot of column j in a panel row,
/// its stored value).
fn pack_panels<T: Zeroed>(
    layout: Layout,
    np: usize,
    value: impl Fn(usize, usize, usize) -> (usize, T) + Sync,
) -> HugeBuf<T> {
    let mut out = huge::zeroed::<T>(layout.len(np));
    out.par_chunks_mut(layout.stride().max(1)).enumerate().for_each(|(p, panel)| {
        for (kk, row) in panel.chunks_exact_mut(layout.ldb()).enumerate() {
            for j in 0..NR {
                let (slot, v) = value(p, kk, j);
                row[slot] = v;
            }
        }
    });
    out
}

thread_local! {
    /// The packed rows of x, kept between calls so a decode step does not allocate per layer.
    static PACKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The same for x as bf16 pairs (`pack_pair_rows`).
    static PACKED_PAIRS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// GGML panels of one tile widened to f32 (`quant::widen_panels`), for products of many rows.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x[m x k]` rounded to bf16 (nearest even) as row blocks of MR interleaved rows of pairs along
/// k, `[m / MR][k / 2][MR]` (`u32`: value 2i in the low half, 2i + 1 in the high), zero-padded
/// (the last block's rows, and k to even), for `avx512_dot`. Needs AVX-512 BF16.
fn pack_pair_rows(x: &[f32], m: usize, k: usize, a: &mut Vec<u32>) {
    let (blocks, k2, kp) = (m.div_ceil(MR), k.div_ceil(2), k.next_multiple_of(16));
    a.clear();
    a.resize(blocks * k2 * MR, 0);
    let pack = |(b, dst): (usize, &mut [u32])| {
        // A row is converted as it is where k is a multiple of 16 (every model's), else from a
        // zero-padded copy.
        let mut row = if kp == k { Vec::new() } else { vec![0.0f32; kp] };
        let mut paired = vec![0u32; kp / 2];
        for r in 0..MR.min(m - b * MR) {
            let src = &x[(b * MR + r) * k..][..k];
            if kp == k {
                bf16_dot::pair_along(src, &mut paired);
            } else {
                row[..k].copy_from_slice(src);
                bf16_dot::pair_along(&row, &mut paired);
            }
            for (d, &v) in dst.chunks_exact_mut(MR).zip(&paired) {
                d[r] = v;
            }
        }
    };
    if m * k >= 1 << 14 {
        a.par_chunks_mut(k2 * MR).enumerate().for_each(pack);
    } else {
        a.chunks_mut(k2 * MR).enumerate().for_each(pack);
    }
}

/// `x[m x k]` as row blocks of MR interleaved rows, `[m / MR][k][MR]` (the last block
/// zero-padded), so the micro-kernel reads its MR values for each k from one place.
fn pack_rows(x: &[f32], m: usize, k: usize, a: &mut Vec<f32>) {
    let blocks = m.div_ceil(MR);
    a.clear();
    a.resize(blocks * k * MR, 0.0); // small (M x K); the padding rows must be zero
    let pack = |(b, dst): (usize, &mut [f32])| {
        let rows = MR.min(m - b * MR);
        let src = &x[b * MR * k..(b * MR + rows) * k];
        for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
            for r in 0..rows {
                d[r] = src[r * k + kk];
            }
        }
    };
    // Split over the cores when big enough: the caller's thread would otherwise do it alone.
    if m * k >= 1 << 14 {
        a.par_chunks_mut(k * MR).enumerate().for_each(pack);
    } else {
        a.chunks_mut(k * MR).enumerate().for_each(pack);
    }
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column blocks (see `forward_with`).
unsafe impl Sync for SendPtr {}

/// Panels one micro-kernel call reads side by side: `WIDE` for the AVX-512 kernel, else one.
fn panels_per_tile(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => WIDE,
        _ => 1,
    }
}
