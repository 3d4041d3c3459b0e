//! Prefill attention in tiles: flash attention's scheme on the CPU.
//!
//! The row path (`attention::attention_by_rows`, what decode rows take) reads a sequence's whole
//! KV history for every query row and head, so a prompt of n tokens reads n^2 / 2 KV rows per
//! head from memory: 2,000 tokens took 5.5 s and 6,000 took 45 s (issue 17), far from the FLOPs.
//! Here a tile of query tokens, with every query head that shares one KV head (GQA), walks the KV
//! history in tiles of `BK` positions. The KV history is gathered from the paged cache once per
//! call, already in the products' operand form (`Streams`); both products are small GEMMs whose
//! operands stay in L1 and L2, and the softmax is online (running max and sum, the output
//! rescaled as the max grows), so no row ever holds all its scores. The AVX-512 kernels rescale
//! lazily, as FlashAttention-4 does: once a column has a running max, a KV tile's weights are
//! taken against it as it stands unless a score passes it by more than 2^16, which skips the
//! pass for the tile's max and, mostly, the rescale of O.
//!
//! The f32 GEMM micro-kernel is written once, generically, and compiled three times: for
//! AVX-512, for AVX2 + FMA and portably, picked at run time as `isa::Isa` says. Its accumulator
//! block (rows x `W` columns) is sized per instruction set so that it stays in registers. A bf16
//! model's products are bf16 (`Products::Bf16`) where the CPU has AVX-512 BF16: on AMX tiles
//! where they run, else through `vdpbf16ps`. An f32 or quantized model's (`Products::F32`) run
//! on the AMX tiles too where they run, each as three bf16 products of split operands
//! (`Kernel::AmxSplit`, near f32's precision), else on the f32 micro-kernel.
//!
//! One layer over 6,000 tokens with SmolLM2's heads (`horae bench model` measures every kernel
//! in one run): on a Zen 5 with AVX-512, 2 threads, about 125 ms in f32 against 1.04 s for the
//! row kernel; on a Xeon with AMX, 2 threads, 63-67 ms on AMX tiles, 160-167 ms in f32 (with
//! lazy rescaling; 69-72 and 178-187 before it), 86-121 ms in f32 as three bf16 products on the
//! tiles.

mod kv;

use rayon::prelude::*;

use kv::{gather, pack_pairs, tile_len, KvTile, Packing, Stream, Streams};

use super::amx;
use super::bf16_dot;
use super::gemm::Products;
use super::isa::Isa;
use super::kv_cache::KvRows;
#[cfg(target_arch = "x86_64")]
use super::muladd::Fused;
use super::muladd::{MulAdd, Plain};

/// KV positions per tile. On a Xeon with AMX, the engine's 6,000-token bf16 prefill ran at
/// 1,407-1,490 tok/s with 256 against 1,255-1,312 with 128 (O^T's tiles are loaded and stored
/// once per KV tile, so fewer, longer KV tiles move less; 64 was slower in the kernel alone). The f32
/// kernels ran the same at 64, 128 and 256 (AVX-512 183-193 ms a layer, AVX2 273-304).
const BK: usize = 256;

/// Whether `Products::Bf16` runs with the `isa` kernels on this CPU (AVX-512 with BF16).
pub fn bf16_runs(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return super::bf16_dot::runs_here();
    }
    let _ = isa;
    false
}

/// One layer's paged KV (f32 or bf16, read widened to f32 as the tiles gather it) and its
/// shape, as `attention::paged_attention` takes them.
#[derive(Clone, Copy)]
pub struct Paged<'a> {
    pub k: KvRows<'a>,
    pub v: KvRows<'a>,
    pub block_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Whether the tiled kernel takes this shape (the micro-kernel works in 16-column vectors).
pub fn supports(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(16)
}

/// A tile of work: query tokens `t0..t1` of a sequence (`row` is its first row in the batch,
/// `start` the position of its first token) against KV head `kvh`.
#[derive(Clone, Copy)]
pub struct Tile<'a> {
    pub row: usize,
    pub start: usize,
    pub block_table: &'a [u32],
    pub kvh: usize,
    pub t0: usize,
    pub t1: usize,
}

/// Query tokens per tile for a step whose prefill chunks hold `tokens` tokens in all: the
/// largest of 128, 64 and 32 (else 16) that still gives every thread four tiles or more. A
/// tile's rows are its tokens times the heads sharing a KV head (384 for SmolLM2 at 128). Larger
/// tiles share each KV tile among more query rows (6,000 tokens on a Zen 5: 356 GFLOP/s at 128,
/// 316 at 32); smaller ones keep every core busy on short prompts. On the Xeon's AMX tiles, one
/// layer alone over 6,000 tokens ran faster at 32 (53-56 ms against 60-67), but the engine's
/// 6,000-token prefill was 5% slower with it (ten alternating runs each), so 128 holds there too.
pub fn query_tile(tokens: usize, num_kv_heads: usize) -> usize {
    let want = 4 * rayon::current_num_threads();
    [128, 64, 32].into_iter().find(|&bq| tokens.div_ceil(bq) * num_kv_heads >= want).unwrap_or(16)
}

/// The tiles of a prefill chunk of `num_tokens` tokens, `bq` query tokens each.
pub fn tiles<'a>(
    row: usize,
    start: usize,
    num_tokens: usize,
    block_table: &'a [u32],
    num_kv_heads: usize,
    bq: usize,
) -> impl Iterator<Item = Tile<'a>> {
    (0..num_kv_heads).flat_map(move |kvh| {
        (0..num_tokens).step_by(bq).map(move |t0| Tile {
            row,
            start,
            block_table,
            kvh,
            t0,
            t1: (t0 + bq).min(num_tokens),
        })
    })
}

struct OutPtr(*mut f32);
// SAFETY: each tile writes only its own rows' heads of its KV group (disjoint, see `run`).
unsafe impl Sync for OutPtr {}

/// Attention for every tile, in parallel: `q` and `out` are the batch's `[rows, num_heads *
/// head_dim]` query and output. Tiles must not overlap (each (row, KV head) in at most one).
pub fn run(q: &[f32], tiles: &[Tile<'_>], kv: Paged<'_>, out: &mut [f32], isa: Isa, products: Products) {
    let amx = isa == Isa::best() && amx_products(kv.head_dim);
    run_with(q, tiles, kv, out, isa, products, amx)
}

/// `run`, on AMX tiles or not (`amx`, which needs `amx_products`): bf16 products as they are,
/// f32 products split in three bf16 ones (`Kernel::AmxSplit`). Tests and benchmarks run every
/// kernel that runs.
pub fn run_with(
    q: &[f32],
    tiles: &[Tile<'_>],
    kv: Paged<'_>,
    out: &mut [f32],
    isa: Isa,
    products: Products,
    amx: bool,
) {
    assert!(!amx || amx_products(kv.head_dim), "AMX tiles do not run here, or not for this head size");
    let row_len = kv.num_heads * kv.head_dim;
    assert!(supports(kv.head_dim) && kv.num_heads.is_multiple_of(kv.num_kv_heads));
    assert!(isa.runs_here(), "this CPU cannot run the {} kernel", isa.name());
    assert!(products == Products::F32 && !amx || bf16_runs(isa), "bf16 products need AVX-512 BF16");
    assert_eq!(q.len(), out.len());
    for t in tiles {
        assert!(t.t0 < t.t1 && (t.row + t.t1) * row_len <= out.len() && t.kvh < kv.num_kv_heads, "tile out of range");
        // Every slot it reads is in the cache (checked once per tile, not per position).
        let len = t.start + t.t1;
        let blocks = &t.block_table[..len.div_ceil(kv.block_size)];
        let top = blocks.iter().map(|&b| b as usize + 1).max().unwrap_or(0) * kv.block_size;
        assert!(top * kv.num_kv_heads * kv.head_dim <= kv.k.len().min(kv.v.len()), "KV block out of the cache");
    }
    let kernel = match (products, amx) {
        (Products::F32, false) => Kernel::F32,
        (Products::F32, true) => Kernel::AmxSplit,
        (Products::Bf16, false) => Kernel::Bf16,
        (Products::Bf16, true) => Kernel::Amx,
    };
    let streams = Streams::pack(tiles, kv, kernel);
    let out_ptr = OutPtr(out.as_mut_ptr());
    tiles.par_iter().zip(&streams.of_tile).for_each(|(t, &i)| {
        let out_ptr = &out_ptr;
        let stream = streams.stream(i, kv.head_dim);
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: the tile's rows and heads are in bounds (asserted above) and no other tile
            // writes them (the caller's contract).
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.0, q.len()) };
            attend_tile(q, t, kv, stream, out, s, isa, kernel)
        })
    });
}

/// The arithmetic of a tile's two products, which also fixes how its KV tiles are packed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// f32 FMAs (`matmul`); a KV tile is K `[BK][d]` then V `[BK][d]`, f32.
    F32,
    /// bf16 pairs through `vdpbf16ps` (`bf16_dot::product`); a KV tile is K `[BK][d / 2]` (pairs
    /// along d) then V `[BK / 2][d]` (pairs along the positions).
    Bf16,
    /// bf16 pairs on AMX tiles (`amx::product`); a KV tile is K as for `Bf16`, then V^T
    /// `[d][BK / 2]` (pairs along the positions), the left operand of O^T = V^T P^T.
    Amx,
    /// f32 products on AMX's bf16 tiles (a model whose attention keeps f32's precision): each
    /// operand split as hi + lo, both bf16 (`bf16_dot::residual`), and a product taken as
    /// hi hi + lo hi + hi lo (`amx::product_split`), which leaves about 2^-17 of each term
    /// against bf16's 2^-9 (the "bf16x3" of oneDNN, and cuBLAS's 3xTF32). Each operand holds its
    /// lo part after its hi one: a KV tile is K `[BK][d]`, rows (hi, lo), then V^T `[d][BK]`,
    /// rows (hi, lo); Q^T's and P^T's lo rows follow their hi ones.
    AmxSplit,
}

/// Pairs in a K row of a packed KV tile, and rows of Q^T's pairs: d / 2, or hi and lo for
/// `AmxSplit`.
fn k_pairs(kernel: Kernel, d: usize) -> usize {
    if kernel == Kernel::AmxSplit {
        d
    } else {
        d / 2
    }
}

/// `v` emptied and refilled with `len` copies of `x`.
fn fresh<T: Copy>(v: &mut Vec<T>, len: usize, x: T) {
    v.clear();
    v.resize(len, x);
}

#[derive(Default)]
struct Scratch {
    /// For `F32`, Q^T: `[d][cols]`, pre-scaled; columns are (token, head of the group),
    /// zero-padded. For the bf16 kernels, 16 rows of Q, scaled, on their way to `qt2`.
    qt: Vec<f32>,
    /// O: `[rows][d]`; on AMX, O^T: `[d][cols]`.
    o: Vec<f32>,
    /// S^T: `[BK][cols]`; for `F32`, then P^T in place.
    st: Vec<f32>,
    /// For the bf16 kernels, bf16 pairs along each product's sum: Q^T `[d / 2][cols]` and P^T
    /// `[BK / 2][cols]`; `q2` holds 16 rows of Q's pairs on their way to `qt2`.
    qt2: Vec<u32>,
    pt2: Vec<u32>,
    q2: Vec<u32>,
    /// For `AmxSplit`, what bf16 leaves of those 16 rows of Q, and its pairs.
    q_lo: Vec<f32>,
    q2_lo: Vec<u32>,
    /// A KV tile packed by the tile itself (`Stream::Read`), and what packing takes.
    tile_f32: Vec<f32>,
    tile_pairs: Vec<u32>,
    packing: Packing,
    online: Online,
}

/// The online softmax's state, one value per column (query row): running max, running sum,
/// this KV tile's max, and the factor that rescales what the column had. With lazy rescaling
/// (the AVX-512 kernels) the "max" is the value the weights are taken against: the true
/// running max or up to 16 powers of two below it (the sum and O hold the same scale).
#[derive(Default)]
struct Online {
    max: Vec<f32>,
    sum: Vec<f32>,
    tile_max: Vec<f32>,
    alpha: Vec<f32>,
}

thread_local! {
    /// A tile's buffers (about 200 KiB), kept per thread between tiles and layers.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// One tile, with the scores transposed: S^T = K Q^T is `[KV positions][query rows]`, so the
/// softmax's running max, rescale and sums run across query rows, 16 lanes at a time, with no
/// transpose of K (the tile's queries are transposed once and reused for every KV tile). Its KV
/// tiles come packed (`Streams`).
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    q: &[f32],
    t: &Tile<'_>,
    kv: Paged<'_>,
    stream: Stream<'_>,
    out: &mut [f32],
    s: &mut Scratch,
    isa: Isa,
    kernel: Kernel,
) {
    let Paged { num_heads, num_kv_heads, head_dim: d, .. } = kv;
    let group = num_heads / num_kv_heads;
    let row_len = num_heads * d;
    let rows = (t.t1 - t.t0) * group;
    let tiles = matches!(kernel, Kernel::Amx | Kernel::AmxSplit);
    let split = kernel == Kernel::AmxSplit;
    let cols = rows.next_multiple_of(16);
    let scale = 1.0 / (d as f32).sqrt();
    // Where row r of the tile (token t0 + r / group, head r % group of the KV group) is in `q`
    // and `out`.
    let at = |r: usize| {
        let (i, g) = (t.t0 + r / group, r % group);
        (t.row + i) * row_len + (t.kvh * group + g) * d
    };
    // Q^T, scaled: `[d][cols]`, or for the bf16 kernels its pairs along d, `[d / 2][cols]`, made
    // a row of Q at a time (pairing Q^T's rows after was a second pass); padding columns zero.
    if kernel == Kernel::F32 {
        fresh(&mut s.qt, d * cols, 0.0);
        for r in 0..rows {
            for (dd, &x) in q[at(r)..][..d].iter().enumerate() {
                s.qt[dd * cols + r] = x * scale;
            }
        }
    } else {
        // Sixteen rows at a time, so that each write to Q^T's pairs fills a cache line.
        s.qt2.resize(k_pairs(kernel, d) * cols, 0);
        fresh(&mut s.qt, 16 * d, 0.0);
        s.q2.resize(16 * d / 2, 0);
        if split {
            s.q_lo.resize(16 * d, 0.0);
            s.q2_lo.resize(16 * d / 2, 0);
        }
        for r0 in (0..cols).step_by(16) {
            for (r, row) in (r0..r0 + 16).zip(s.qt.chunks_exact_mut(d)) {
                if r < rows {
                    row.iter_mut().zip(&q[at(r)..][..d]).for_each(|(y, &x)| *y = x * scale);
                } else {
                    row.fill(0.0);
                }
            }
            bf16_dot::pair_along(&s.qt, &mut s.q2);
            if split {
                bf16_dot::residual(&s.qt, &mut s.q_lo);
                bf16_dot::pair_along(&s.q_lo, &mut s.q2_lo);
            }
            for (i, line) in s.qt2.chunks_exact_mut(cols).enumerate() {
                // Split: the hi rows, then the lo rows.
                let pairs = if i >= d / 2 { &s.q2_lo } else { &s.q2 };
                let i = i % (d / 2);
                line[r0..r0 + 16].iter_mut().zip(pairs[i..].iter().step_by(d / 2)).for_each(|(y, &p)| *y = p);
            }
        }
    }
    // O, or O^T on tiles (`[d][cols]`, its padding columns too).
    fresh(&mut s.o, if tiles { d * cols } else { rows * d }, 0.0);
    fresh(&mut s.online.max, cols, f32::NEG_INFINITY);
    fresh(&mut s.online.sum, cols, 0.0);
    fresh(&mut s.online.tile_max, cols, f32::NEG_INFINITY);
    fresh(&mut s.online.alpha, cols, 0.0);
    s.st.resize(BK * cols, 0.0);
    if kernel != Kernel::F32 {
        s.pt2.resize(if split { 2 } else { 1 } * BK / 2 * cols, 0);
    }
    // Positions of the tile's first and last query tokens: KV up to the last is read; KV tiles
    // past the first token's position need the causal mask.
    let (first, last) = (t.start + t.t0, t.start + t.t1 - 1);
    for j0 in (0..=last).step_by(BK) {
        let n = BK.min(last + 1 - j0);
        // This KV tile in the kernel's operand form: packed for the call, or packed here.
        let len = tile_len(kernel, d);
        let kv_tile = match stream {
            Stream::F32(packed) => KvTile::F32(&packed[j0 / BK * len..][..len]),
            Stream::Pairs(packed) => KvTile::Pairs(&packed[j0 / BK * len..][..len]),
            Stream::Read(read) if kernel == Kernel::F32 => {
                // Rows past the stream's end are never read (the products take n rows).
                s.tile_f32.resize(len, 0.0);
                let (k, v) = s.tile_f32.split_at_mut(BK * d);
                gather(kv, read, j0, k, v);
                KvTile::F32(&s.tile_f32)
            }
            Stream::Read(read) => {
                s.tile_pairs.resize(len, 0);
                pack_pairs(kv, read, j0, kernel, &mut s.tile_pairs, &mut s.packing);
                KvTile::Pairs(&s.tile_pairs)
            }
        };
        // S^T[n x cols] = K[n x d] Q^T[d x cols].
        match kv_tile {
            KvTile::F32(kv_tile) => {
                let k = &kv_tile[..BK * d];
                let a = Operand { data: k, row_stride: d, col_stride: 1 };
                matmul(isa, a, &s.qt, cols, d, &mut s.st, cols, n, cols, false);
            }
            KvTile::Pairs(kv_tile) => {
                // On AMX, whole tiles of rows: K's rows past n are later positions or zeros,
                // and S^T's rows past n are never read.
                let row = k_pairs(kernel, d);
                let k2 = &kv_tile[..BK * row];
                let kv_rows = if tiles { n.next_multiple_of(16) } else { n };
                let qk = bf16_dot::Product {
                    a: k2,
                    ars: row,
                    acs: 1,
                    b: &s.qt2,
                    ldb: cols,
                    kp: d / 2,
                    rows: kv_rows,
                    n: cols,
                    ldc: cols,
                };
                if split {
                    amx::product_split(&qk, d / 2, d / 2, &mut s.st, false);
                } else if tiles {
                    amx::product(&qk, &mut s.st, false);
                } else {
                    bf16_dot::product(&qk, &mut s.st, false);
                }
            }
        }
        // Causal mask: KV position j0 + c is visible to the query at first + col / group when
        // j0 + c <= that position, so row c hides a leading run of columns.
        for c in 0..n {
            let hidden = ((j0 + c).saturating_sub(first) * group).min(cols);
            s.st[c * cols..c * cols + hidden].fill(f32::NEG_INFINITY);
        }
        let pairs = n.div_ceil(2);
        if kernel == Kernel::F32 {
            softmax_step(isa, &mut s.st[..n * cols], cols, &mut s.online);
        } else {
            // P^T's pairs along the KV positions, an odd last one paired with zeros; on AMX,
            // zero pairs up to a whole tile of 16.
            let lo_at = split.then_some(BK / 2);
            softmax_pairs(&s.st, n, cols, &mut s.online, &mut s.pt2, lo_at);
            if tiles {
                for at in [Some(0), lo_at].into_iter().flatten() {
                    s.pt2[(at + pairs) * cols..(at + pairs.next_multiple_of(16)) * cols].fill(0);
                }
            }
        }
        if tiles {
            // Once the running maxima settle, a whole KV tile rescales nothing.
            if s.online.alpha.iter().any(|&a| a != 1.0) {
                for o in s.o.chunks_exact_mut(cols) {
                    o.iter_mut().zip(&s.online.alpha).for_each(|(o, a)| *o *= a);
                }
            }
        } else {
            for (o, &a) in s.o.chunks_exact_mut(d).zip(&s.online.alpha) {
                if a != 1.0 {
                    o.iter_mut().for_each(|o| *o *= a);
                }
            }
        }
        // O[rows x d] += P[rows x n] V[n x d], P read from P^T.
        match kv_tile {
            KvTile::F32(kv_tile) => {
                let v = &kv_tile[BK * d..];
                let p = Operand { data: &s.st, row_stride: 1, col_stride: cols };
                matmul(isa, p, v, d, n, &mut s.o, d, rows, d, true);
            }
            KvTile::Pairs(kv_tile) => {
                let v2 = &kv_tile[BK * k_pairs(kernel, d)..];
                let kp = if tiles { pairs.next_multiple_of(16) } else { pairs };
                if tiles {
                    // O^T[d x cols] += V^T[d x kp] P^T[kp x cols].
                    let ars = if split { BK } else { BK / 2 };
                    let pv =
                        bf16_dot::Product { a: v2, ars, acs: 1, b: &s.pt2, ldb: cols, kp, rows: d, n: cols, ldc: cols };
                    if split {
                        amx::product_split(&pv, BK / 2, BK / 2, &mut s.o, true);
                    } else {
                        amx::product(&pv, &mut s.o, true);
                    }
                } else {
                    let pv = bf16_dot::Product { a: &s.pt2, ars: 1, acs: cols, b: v2, ldb: d, kp, rows, n: d, ldc: d };
                    bf16_dot::product(&pv, &mut s.o, true);
                }
            }
        }
    }
    if tiles {
        // O^T's columns are read strided from L2; the output's rows are written whole (a
        // row of O^T at a time wrote a value to each of `rows` rows of the output).
        for r in 0..rows {
            let inv = 1.0 / s.online.sum[r];
            out[at(r)..][..d].iter_mut().enumerate().for_each(|(dd, y)| *y = s.o[dd * cols + r] * inv);
        }
    } else {
        for (r, o) in s.o.chunks_exact(d).enumerate() {
            let inv = 1.0 / s.online.sum[r];
            out[at(r)..][..d].iter_mut().zip(o).for_each(|(y, x)| *y = x * inv);
        }
    }
}

/// Whether a bf16 model's attention products run on AMX tiles here: heads of whole tiles of
/// pairs (a multiple of 32 values) and AMX allowed for its linear layers (`gemm::amx_runs`).
pub fn amx_products(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && super::gemm::amx_runs()
}

/// The left operand of `matmul`: element (r, k) at `data[r * row_stride + k * col_stride]`.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

/// `c[rows x n] (+)= a[rows x k] b[k x n]`, `b` and `c` row-major with strides `ldb` and `ldc`;
/// `n` a multiple of 16.
#[allow(clippy::too_many_arguments)]
fn matmul(
    isa: Isa,
    a: Operand<'_>,
    b: &[f32],
    ldb: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(n.is_multiple_of(16) && n <= ldb && n <= ldc && rows > 0 && k > 0);
    assert!((rows - 1) * a.row_stride + (k - 1) * a.col_stride < a.data.len(), "left operand");
    assert!(b.len() >= (k - 1) * ldb + n && c.len() >= (rows - 1) * ldc + n, "right operand or output");
    let args = Mm {
        a: a.data.as_ptr(),
        ars: a.row_stride,
        acs: a.col_stride,
        b: b.as_ptr(),
        ldb,
        k,
        c: c.as_mut_ptr(),
        ldc,
        n,
        rows,
        accumulate,
    };
    match isa {
        // SAFETY: bounds asserted above; each kernel runs only where its features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::mm_avx512(&args) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { simd::mm_avx2(&args) },
        Isa::Portable => unsafe { mm::<6, 16, Plain>(&args) },
    }
}

/// One KV tile's step of the online softmax over `st` (`[n][cols]` scores, columns the query
/// rows): per column, the new running max, the factor `alpha` that rescales what the column had
/// (exp of old max minus new), the scores replaced by their weights and the sum updated.
fn softmax_step(isa: Isa, st: &mut [f32], cols: usize, online: &mut Online) {
    match isa {
        // SAFETY: each variant runs only where its features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { simd::softmax_avx512(st, cols, online) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { simd::softmax_avx2(st, cols, online) },
        Isa::Portable => softmax::<Plain>(st, cols, online),
    }
}

/// For the bf16 kernels, `softmax_step` with P^T's bf16 pairs as its output: `pt2[c]` pairs the
/// weights of KV rows 2c and 2c + 1 of `st` (`[n][cols]` scores; an odd last row is paired with
/// zeros). It runs in strips of 64 columns, whose rows stay in L1 from the max to the weights
/// (S^T is 192 KiB with SmolLM2's 384 columns, past L1). As a pass over whole rows, then a
/// pass pairing them, it took 38% of the AMX kernel's time; now 28%. With `lo_at`
/// (`Kernel::AmxSplit`) the weights are f32-exact and each pair's lo part goes `lo_at` rows
/// after its hi one.
fn softmax_pairs(st: &[f32], n: usize, cols: usize, online: &mut Online, pt2: &mut [u32], lo_at: Option<usize>) {
    let o = &*online;
    assert!(cols.is_multiple_of(16) && o.max.len() == cols && o.sum.len() == cols && o.alpha.len() == cols);
    let rows = lo_at.unwrap_or(0) + n.div_ceil(2);
    assert!(n > 0 && st.len() >= n * cols && pt2.len() >= rows * cols);
    assert!(bf16_dot::runs_here(), "bf16 pairs need AVX-512 BF16");
    // SAFETY: the CPU has the features and every strip's rows are inside `st` and `pt2` (asserted).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        simd::softmax_pairs(st, n, cols, online, pt2, lo_at)
    }
}

/// `softmax_step` in plain arithmetic over whole rows of columns, which the compiler vectorises.
#[inline(always)]
fn softmax<M: MulAdd>(st: &mut [f32], cols: usize, online: &mut Online) {
    let Online { max, sum, tile_max, alpha } = online;
    tile_max.fill(f32::NEG_INFINITY);
    for row in st.chunks_exact(cols) {
        tile_max.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
    }
    for ((m, a), &t) in max.iter_mut().zip(alpha.iter_mut()).zip(tile_max.iter()) {
        let new = m.max(t);
        // A column with nothing visible yet keeps max -inf and rescales nothing.
        *a = if new == f32::NEG_INFINITY { 1.0 } else { exp_one::<M>(*m - new) };
        *m = new;
    }
    for s in sum.iter_mut().zip(alpha.iter()) {
        *s.0 *= s.1;
    }
    for row in st.chunks_exact_mut(cols) {
        for ((x, &m), s) in row.iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
            *x = exp_one::<M>(*x - m);
            *s += *x;
        }
    }
}

#[derive(Clone, Copy)]
struct Mm {
    a: *const f32,
    /// A's element (r, k) is at `a[r * ars + k * acs]`.
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    n: usize,
    rows: usize,
    accumulate: bool,
}

/// The micro-kernel loop: blocks of `R` rows by `W` columns (then 16 for what is left) whose
/// accumulators stay in registers while `k` runs. The compiler vectorises the fixed-size inner
/// loops for the instruction set of the function this is inlined into.
///
/// # Safety
/// `matmul`'s bounds: A's `rows x k` elements, `b`'s `k` rows of `n` values `ldb` apart and `c`'s
/// `rows` rows of `n` values `ldc` apart are in their buffers; `n` is a multiple of 16.
#[inline(always)]
unsafe fn mm<const R: usize, const W: usize, M: MulAdd>(m: &Mm) {
    // The sum in runs of KC: P V's right operand, a KV tile's V (256 x 64 f32, 64 KiB), came
    // from L2 for every row block; a run of 128 rows (32 KiB) stays in L1. One layer over
    // 6,000 tokens on the Xeon: 3% faster (64 was no better).
    const KC: usize = 128;
    for k0 in (0..m.k).step_by(KC) {
        let part = Mm {
            // SAFETY: column k0 of A and row k0 of b are inside them (k0 < k).
            a: unsafe { m.a.add(k0 * m.acs) },
            b: unsafe { m.b.add(k0 * m.ldb) },
            k: KC.min(m.k - k0),
            accumulate: m.accumulate || k0 > 0,
            ..*m
        };
        // SAFETY: `part` is a slice of the sum inside `m`'s bounds.
        unsafe { mm_part::<R, W, M>(&part) };
    }
}

/// `mm` over one run of the sum.
///
/// # Safety
/// As `mm`.
#[inline(always)]
unsafe fn mm_part<const R: usize, const W: usize, M: MulAdd>(m: &Mm) {
    let (wide, whole) = (m.n / W * W, m.rows / R * R);
    // SAFETY: passed on: every block is inside A, b and c.
    unsafe {
        // Columns outside, rows inside: a strip of b (k x W) stays in L1 while every row block
        // goes past it.
        for j0 in (0..wide).step_by(W) {
            (0..whole).step_by(R).for_each(|r0| block::<R, W, M>(m, r0, j0));
        }
        for j0 in (wide..m.n).step_by(16) {
            (0..whole).step_by(R).for_each(|r0| block::<R, 16, M>(m, r0, j0));
        }
        for r in whole..m.rows {
            (0..wide).step_by(W).for_each(|j0| block::<1, W, M>(m, r, j0));
            (wide..m.n).step_by(16).for_each(|j0| block::<1, 16, M>(m, r, j0));
        }
    }
}

/// # Safety
/// As `mm`, for rows `r0..r0 + R` and columns `j0..j0 + W`.
#[inline(always)]
unsafe fn block<const R: usize, const W: usize, M: MulAdd>(m: &Mm, r0: usize, j0: usize) {
    let mut acc = [[0.0f32; W]; R];
    if m.accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r0 + r, columns j0..j0 + W of c.
            acc.copy_from_slice(unsafe { std::slice::from_raw_parts(m.c.add((r0 + r) * m.ldc + j0), W) });
        }
    }
    for kk in 0..m.k {
        // SAFETY: row kk, columns j0..j0 + W of b.
        let b: &[f32; W] = unsafe { &*(m.b.add(kk * m.ldb + j0) as *const [f32; W]) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: element (r0 + r, kk) of A.
            let a = unsafe { *m.a.add((r0 + r) * m.ars + kk * m.acs) };
            for (c, &b) in acc.iter_mut().zip(b) {
                *c = M::madd(a, b, *c);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), m.c.add((r0 + r) * m.ldc + j0), W) };
    }
}

/// `exp(y)` in plain arithmetic the compiler vectorises: Cephes' `expf`, as `cpu::avx2::exp8`
/// (2^n times a degree-6 polynomial, about 2 ulp). Inputs are clamped at -87.3, where the
/// result, about 1e-38, is nothing next to a softmax's largest weight, 1.
#[inline(always)]
fn exp_one<M: MulAdd>(y: f32) -> f32 {
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let y = y.max(-87.3);
    let t = M::madd(y, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    // y - n ln2, with ln2 split in two so the subtraction stays exact.
    let r = M::madd(n, -0.693_359_4, y);
    let r = M::madd(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1] {
        p = M::madd(p, r, c);
    }
    let p = M::madd(p, r * r, r + 1.0);
    // 2^n from the rounded value's low bits (n is small: y is in [-87.3, 0]).
    let pow2n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    p * pow2n
}

/// The three instantiations for x86-64 (`Isa::Portable` uses the generic code as it is).
#[cfg(target_arch = "x86_64")]
mod simd;
