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
use super::quant::{self, QPanels, QuantKind};
use super::team;

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
            _ => isa.panels_per_tile(),
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

/// The instruction sets the kernels are written for, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU has the features the kernel needs (std caches the detection).
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
        }
    }

    /// Every kernel this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.iter().copied().filter(|i| i.runs_here()).collect()
    }

    /// The best kernel this CPU runs, whatever `HORAE_CPU_KERNEL` says.
    pub fn best() -> Isa {
        *Isa::available().last().expect("portable is always available")
    }

    /// The best kernel this CPU runs, capped by `HORAE_CPU_KERNEL` where set. Decided once.
    pub fn detect() -> Self {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let all = Isa::available();
            let best = Isa::best();
            let cap = match std::env::var("HORAE_CPU_KERNEL").ok().as_deref().map(str::trim) {
                // `amx` is the default's name where AMX runs (`amx_runs`).
                None | Some("") | Some("amx") => best,
                Some(name) => match Isa::ALL.iter().find(|i| i.name() == name) {
                    Some(&cap) => cap,
                    None => {
                        let names: Vec<_> = Isa::ALL.iter().map(|i| i.name()).collect();
                        eprintln!("horae: HORAE_CPU_KERNEL={name:?} is not one of {}, amx; ignored", names.join(", "));
                        best
                    }
                },
            };
            let isa = *all.iter().rev().find(|&&i| i <= cap).expect("portable is always available");
            if best == Isa::Portable {
                eprintln!(
                    "horae: this CPU has neither AVX2 with FMA nor AVX-512; the portable CPU kernels run (several times slower)"
                );
            }
            isa
        })
    }

    const ALL: &'static [Isa] = &[
        Isa::Portable,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512,
    ];

    /// Panels one micro-kernel call reads side by side.
    fn panels_per_tile(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => WIDE,
            _ => 1,
        }
    }
}

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
struct Tile {
    a: *const f32,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    rows: usize,
    cols: usize,
    panels: usize,
    stride: usize,
    ldb: usize,
    accumulate: bool,
}

/// Row length of a tile's scratch block: the widest tile's columns.
const SCRATCH: usize = WIDE * NR;

/// How one stored panel value becomes f32: `f32` as is, `u16` as bf16 bits (in the bf16 group
/// order). Each type names its AVX2 kernel; the portable kernel is shared.
trait PanelValue: Copy {
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
        std::array::from_fn(|j| super::bf16::widen(raw[bf16_slot(j)]))
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
        unsafe { super::bf16::x86::load16(p) }
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
    unsafe fn run<T: PanelValue>(&self, panels: &[T], b: usize, next: Option<usize>, isa: Isa) {
        // The parts of the contract a tile can check: once per tile, nothing next to its flops.
        let last = b + (self.panels - 1) * self.stride + (self.kc - 1) * self.ldb + NR;
        assert!(self.panels >= 1 && self.kc >= 1 && last <= panels.len(), "panel slice out of bounds");
        assert!(self.panels == 1 || isa.panels_per_tile() >= self.panels, "a wide tile needs the wide kernel");
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
    unsafe fn run_pairs(&self, v: &[u16], order: PairOrder, b: usize, operands: Operands) {
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
    unsafe fn run_quant(&self, q: &QPanels, p: usize, k0: usize, isa: Isa) {
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
    // Panel rows to a cache line: 2 when the panels are not grouped.
    let per_line = (32 / t.ldb).max(1);
    for kk in 0..t.kc {
        if pf && kk % per_line == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every kernel this CPU runs, each checked against the reference (the names are printed:
    /// `cargo test -- --nocapture` shows which ran).
    fn isas() -> Vec<Isa> {
        let v = Isa::available();
        eprintln!("gemm kernels on this CPU: {}", v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
        v
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        // m covers every row remainder, n a partial panel, k more than one depth pass.
        for &(m, n, k) in &[
            (1, 16, 8),
            (5, 37, 300),
            (7, 64, 513),
            (13, 3, 1),
            (32, 200, 576),
            (2, 1, 0),
            (19, 100, 40),
            (12, 129, 257),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&x, m, k, &w, n);
            for isa in isas() {
                for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
                    // Every kernel reads panels (`Layout`); each reads its own packing too (bf16 in
                    // pairs of rows for AVX-512).
                    let packings = [
                        ("panels", PackedLinear::in_panels(&w, n, k, dtype)),
                        ("own", PackedLinear::new_for(&w, n, k, dtype, isa)),
                    ];
                    for (layout, packed) in packings {
                        let mut got = vec![f32::NAN; m * n];
                        packed.forward_with(&x, m, &mut got, isa);
                        // bf16 weights differ from the f32 ones by up to 2^-9 relative.
                        let tol = if dtype == WeightDtype::F32 { 1e-4 } else { 4e-3 } * (k as f32).sqrt().max(1.0);
                        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - e).abs() <= tol,
                                "{isa:?} {dtype:?} {layout} m={m} n={n} k={k} [{i}]: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Quantized panels against the f32 reference on the dequantized weights (what the kernel
    /// must equal up to summation order), every kernel, ragged shapes, depth past one pass.
    #[test]
    fn quantized_matches_the_dequantized_reference() {
        for &(m, n, k) in &[
            (1, 16, 32),
            (5, 37, 320),
            (7, 64, 544),
            (13, 3, 32),
            (32, 200, 576),
            (12, 129, 256),
            (19, 100, 64),
            (1, 200, 96),
            (2, 100, 288),
            (1, 48, 64),
            // From WIDEN_MIN_ROWS rows the panels are widened once per row block: past one row
            // block (MC) and one pass of depth (KC), with a ragged last panel.
            (16, 33, 288),
            (200, 70, 544),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            for kind in QuantKind::ALL {
                let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quant::quantize_row(kind, r)).collect();
                let mut deq = vec![0.0; n * k];
                for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
                    quant::dequantize_row(kind, r, o);
                }
                let want = reference(&x, m, k, &deq, n);
                let packed = PackedLinear::from_ggml(kind, &raw, n, k).unwrap();
                assert_eq!(packed.dtype(), WeightDtype::Quant(kind));
                for isa in isas() {
                    let mut got = vec![f32::NAN; m * n];
                    packed.forward_with(&x, m, &mut got, isa);
                    let tol = 1e-4 * (k as f32).sqrt();
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() <= tol, "{isa:?} {kind:?} m={m} n={n} k={k} [{i}]: {g} vs {e}");
                    }
                }
                // Quantizing at load gives the same blocks as quantizing first.
                let mut a = vec![0.0; m * n];
                let mut b = vec![0.0; m * n];
                packed.forward_with(&x, m, &mut a, Isa::Portable);
                PackedLinear::new(&w, n, k, WeightDtype::Quant(kind)).forward_with(&x, m, &mut b, Isa::Portable);
                assert_eq!(a, b, "{kind:?}");
            }
        }
    }

    /// Shapes for bf16 in tile order: partial row blocks, panel pairs and groups, k not a
    /// multiple of 32 (and odd), more than one task of rows and one chunk of k.
    const TILE_SHAPES: [(usize, usize, usize); 9] = [
        (1, 16, 32),
        (5, 37, 100),
        (9, 40, 64),
        (16, 16, 32),
        (17, 37, 100),
        (33, 64, 576),
        (300, 200, 48),
        (64, 1, 7),
        (600, 96, 1536),
    ];

    /// The AVX-512 kernel on bf16 in pairs of rows, in both orders (tile order is what it reads
    /// where AMX runs), with f32 products: within the f32 tolerance of the reference on the
    /// bf16-rounded weights.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn pair_orders_match_the_reference() {
        if !Isa::Avx512.runs_here() {
            eprintln!("bf16 in pairs of rows: not run, this CPU has no AVX-512");
            return;
        }
        let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        for tiles in [true, false] {
            for &(m, n, k) in &TILE_SHAPES {
                let (x, w) = (data(m * k, 1), data(n * k, 2));
                let want = reference(&x, m, k, &round(&w), n);
                let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles));
                let mut got = vec![f32::NAN; m * n];
                packed.forward_with(&x, m, &mut got, Isa::Avx512);
                let tol = 1e-4 * (k as f32).sqrt().max(1.0);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() <= tol, "tiles {tiles} m={m} n={n} k={k} [{i}]: {g} vs {e}");
                }
                let mut row = vec![0.0; k];
                for i in [0, n / 2, n - 1] {
                    packed.row(i, &mut row);
                    assert_eq!(row, round(&w[i * k..(i + 1) * k]), "row {i}");
                }
            }
        }
    }

    /// `vdpbf16ps` on bf16 pairs (a bf16 model's products where AVX-512 BF16 runs and AMX does
    /// not) against the reference on bf16-rounded activations and weights:
    /// only the summation order differs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn bf16_pairs_match_the_bf16_reference() {
        if !(Isa::Avx512.runs_here() && bf16_dot::runs_here()) {
            eprintln!("AVX-512 BF16 products: not run, this CPU has no AVX-512 BF16");
            return;
        }
        eprintln!("AVX-512 BF16 products: run");
        let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        for &(m, n, k) in &TILE_SHAPES {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&round(&x), m, k, &round(&w), n);
            let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, false));
            let mut got = vec![f32::NAN; m * n];
            packed.tiled(&x, m, &mut got, Isa::Avx512, Operands::Bf16Pairs);
            let tol = 1e-5 * (k as f32).sqrt().max(1.0);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= tol, "bf16 pairs m={m} n={n} k={k} [{i}]: {g} vs {e}");
            }
        }
        // A bf16 model's products go there at any row count, where AMX does not run.
        if !amx_runs() {
            for m in [1, 2, 16] {
                let (n, k) = (40, 64);
                let (x, w) = (data(m * k, 3), data(n * k, 4));
                let packed = PackedLinear::new_for(&w, n, k, WeightDtype::Bf16, Isa::Avx512);
                let (mut via, mut direct) = (vec![0.0; m * n], vec![0.0; m * n]);
                packed.forward_products(&x, m, &mut via, Products::Bf16);
                packed.tiled(&x, m, &mut direct, Isa::Avx512, Operands::Bf16Pairs);
                assert_eq!(via, direct, "{m} rows");
                let mut f32_products = vec![0.0; m * n];
                packed.forward_with(&x, m, &mut f32_products, Isa::Avx512);
                assert_ne!(via, f32_products, "{m} rows: the activations are rounded to bf16");
            }
        }
    }

    /// AMX tiles against the reference on bf16-rounded activations and weights (what the tiles
    /// multiply: only the summation order differs).
    #[test]
    fn amx_matches_the_bf16_reference() {
        if !amx_runs() {
            eprintln!("AMX bf16 tiles: not run, this CPU or OS does not allow them (or HORAE_CPU_KERNEL caps them)");
            return;
        }
        eprintln!("AMX bf16 tiles: run");
        let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        for &(m, n, k) in TILE_SHAPES.iter().filter(|s| s.0 >= AMX_MIN_ROWS) {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&round(&x), m, k, &round(&w), n);
            let packed = PackedLinear::new(&w, n, k, WeightDtype::Bf16);
            assert!(
                matches!(packed.panels, Panels::Bf16Pairs(_, PairOrder::Tiles(_))),
                "where AMX runs, bf16 is packed in tile order"
            );
            let mut got = vec![f32::NAN; m * n];
            packed.forward_products(&x, m, &mut got, Products::Bf16);
            let tol = 1e-5 * (k as f32).sqrt().max(1.0);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= tol, "AMX m={m} n={n} k={k} [{i}]: {g} vs {e}");
            }
        }
    }

    /// Decode shapes (one row block, big enough to split) in pools of 2 and 3 threads: each
    /// thread's share of the panels starts inside a group of `WIDE` for some (37 or 19 panels),
    /// so the tiles at a share's edges are narrow. Every layout and kernel against the reference.
    #[test]
    fn decode_shares_match_the_reference() {
        let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &(m, n, k) in &[(1, 580, 576), (3, 300, 448), (6, 37 * 16, 256)] {
                let (x, w) = (data(m * k, 1), data(n * k, 2));
                let check = |what: &str, packed: &PackedLinear, isa: Isa, want: &[f32], tol: f32| {
                    let mut got = vec![f32::NAN; m * n];
                    pool.install(|| packed.forward_with(&x, m, &mut got, isa));
                    for (i, (g, e)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (g - e).abs() <= tol,
                            "{what} {isa:?} {threads} threads m={m} n={n} k={k} [{i}]: {g} vs {e}"
                        );
                    }
                };
                let tol = 1e-4 * (k as f32).sqrt();
                let (want, want_bf16) = (reference(&x, m, k, &w, n), reference(&x, m, k, &round(&w), n));
                for isa in Isa::available() {
                    check("f32", &PackedLinear::in_panels(&w, n, k, WeightDtype::F32), isa, &want, tol);
                    check("bf16", &PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16), isa, &want_bf16, tol);
                    for kind in QuantKind::ALL {
                        let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quant::quantize_row(kind, r)).collect();
                        let mut deq = vec![0.0; n * k];
                        for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
                            quant::dequantize_row(kind, r, o);
                        }
                        let packed = PackedLinear::from_ggml(kind, &raw, n, k).unwrap();
                        check(kind.name(), &packed, isa, &reference(&x, m, k, &deq, n), tol);
                    }
                }
                if Isa::Avx512.runs_here() {
                    for (what, tiles) in [("tile order", true), ("pairs in row order", false)] {
                        let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles));
                        check(what, &packed, Isa::Avx512, &want_bf16, tol);
                    }
                }
            }
        }
    }

    /// A decode product on two threads runs from both ends, the helper's from a warmed end
    /// (`warm`): every column is still written once and right (`out` starts as NaN), for each
    /// panel layout, whether the helper warmed the whole region or none of it.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn decode_from_both_ends_covers_every_column() {
        let (n, k) = (37 * 16 + 4, 576);
        let (x, w) = (data(k, 3), data(n * k, 4));
        let round: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let (want, want_bf16) = (reference(&x, 1, k, &w, n), reference(&x, 1, k, &round, n));
        let mut cases = vec![];
        for isa in isas() {
            cases.push(("f32", PackedLinear::in_panels(&w, n, k, WeightDtype::F32), isa, &want));
            cases.push(("bf16", PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16), isa, &want_bf16));
        }
        if Isa::Avx512.runs_here() {
            for (what, tiles) in [("tile order", true), ("pairs in row order", false)] {
                cases.push((what, PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles)), Isa::Avx512, &want_bf16));
            }
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (what, packed, isa, want) in &cases {
            for warmed in [true, false] {
                let got = pool.install(|| {
                    team::step(|| {
                        if warmed {
                            packed.warm(1);
                            assert!(team::wait_warmed(std::time::Duration::from_secs(10)), "{what}: nothing warmed");
                        }
                        let mut got = vec![f32::NAN; n];
                        packed.forward_with(&x, 1, &mut got, *isa);
                        got
                    })
                });
                let tol = 1e-4 * (k as f32).sqrt();
                for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((g - e).abs() <= tol, "{what} {isa:?} warmed {warmed} [{i}]: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn bf16_is_exact_for_bf16_weights() {
        // Weights already representable in bf16 give the same result as the f32 packing.
        let (m, n, k) = (9, 48, 300);
        let x = data(m * k, 3);
        let w: Vec<f32> = data(n * k, 4).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        for isa in isas() {
            let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
            PackedLinear::in_panels(&w, n, k, WeightDtype::F32).forward_with(&x, m, &mut a, isa);
            for bf16 in [
                PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16),
                PackedLinear::new_for(&w, n, k, WeightDtype::Bf16, isa),
            ] {
                bf16.forward_with(&x, m, &mut b, isa);
                assert_eq!(a, b, "{isa:?}");
            }
        }
    }

    #[test]
    fn row_recovers_the_original_matrix() {
        let (n, k) = (37, 21);
        let w: Vec<f32> = data(n * k, 5).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            for isa in isas() {
                let p = PackedLinear::new_for(&w, n, k, dtype, isa);
                let mut row = vec![0.0; k];
                for i in 0..n {
                    p.row(i, &mut row);
                    assert_eq!(row, &w[i * k..(i + 1) * k], "{dtype:?} {isa:?} row {i}");
                }
            }
        }
    }
}
