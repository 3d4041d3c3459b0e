//! Prefill attention in tiles: flash attention's scheme on the CPU.
//!
//! The row path (`attention::attention_by_rows`, what decode rows take) reads a sequence's whole
//! KV history for every query row and head, so a prompt of n tokens reads n^2 / 2 KV rows per head from memory: 2,000
//! tokens took 5.5 s and 6,000 took 45 s (issue 17), far from the FLOPs. Here a tile of query
//! tokens, with every query head that shares one KV head (GQA), walks the KV history in tiles of
//! `BK` positions. Each KV tile is gathered from the paged cache once, both products are small
//! GEMMs whose operands stay in L1 and L2, and the softmax is online (running max and sum, the
//! output rescaled as the max grows), so no row ever holds all its scores.
//!
//! The GEMM micro-kernel is written once, generically, and compiled three times: for AVX-512,
//! for AVX2 + FMA and portably, picked at run time as `gemm::Isa` says. Its accumulator block
//! (rows x `W` columns) is sized per instruction set so that it stays in registers.
//!
//! On 6,000 tokens with SmolLM2's heads (a Zen 5 with AVX-512, 2 threads) one layer's attention
//! takes about 125 ms, over 320 GFLOP/s; the row kernel took 1.04 s (`horae bench model` measures
//! both in one run).

use rayon::prelude::*;

use super::amx;
use super::bf16_dot as bf16;
use super::gemm::{Isa, Products};
#[cfg(target_arch = "x86_64")]
use super::muladd::Fused;
use super::muladd::{MulAdd, Plain};

/// KV positions per tile.
const BK: usize = 64;

/// Whether `Products::Bf16` runs with the `isa` kernels on this CPU (AVX-512 with BF16).
pub fn bf16_runs(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return super::bf16_dot::runs_here();
    }
    let _ = isa;
    false
}

/// One layer's paged KV and its shape, as `attention::paged_attention` takes them.
#[derive(Clone, Copy)]
pub struct Paged<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
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
/// 316 at 32); smaller ones keep every core busy on short prompts.
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
    let amx = products == Products::Bf16 && isa == Isa::best() && amx_products(kv.head_dim);
    run_with(q, tiles, kv, out, isa, products, amx)
}

/// `run`, with bf16 products on AMX tiles or not (`amx`, which needs `amx_products`): tests and
/// benchmarks run both kernels where both run.
pub fn run_with(
    q: &[f32],
    tiles: &[Tile<'_>],
    kv: Paged<'_>,
    out: &mut [f32],
    isa: Isa,
    products: Products,
    amx: bool,
) {
    assert!(
        !amx || (products == Products::Bf16 && amx_products(kv.head_dim)),
        "AMX tiles run bf16 products only, where they run"
    );
    let row_len = kv.num_heads * kv.head_dim;
    assert!(supports(kv.head_dim) && kv.num_heads.is_multiple_of(kv.num_kv_heads));
    assert!(isa.runs_here(), "this CPU cannot run the {} kernel", isa.name());
    assert!(products == Products::F32 || bf16_runs(isa), "bf16 products need AVX-512 BF16");
    assert_eq!(q.len(), out.len());
    for t in tiles {
        assert!(t.t0 < t.t1 && (t.row + t.t1) * row_len <= out.len() && t.kvh < kv.num_kv_heads, "tile out of range");
        // Every slot it reads is in the cache (checked once per tile, not per position).
        let len = t.start + t.t1;
        let blocks = &t.block_table[..len.div_ceil(kv.block_size)];
        let top = blocks.iter().map(|&b| b as usize + 1).max().unwrap_or(0) * kv.block_size;
        assert!(top * kv.num_kv_heads * kv.head_dim <= kv.k.len().min(kv.v.len()), "KV block out of the cache");
    }
    let out_ptr = OutPtr(out.as_mut_ptr());
    tiles.par_iter().for_each(|t| {
        let out_ptr = &out_ptr;
        SCRATCH.with_borrow_mut(|s| {
            // SAFETY: the tile's rows and heads are in bounds (asserted above) and no other tile
            // writes them (the caller's contract).
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.0, q.len()) };
            attend_tile(q, t, kv, out, s, isa, products, amx)
        })
    });
}

#[derive(Default)]
struct Scratch {
    /// Q^T: `[d][cols]`, pre-scaled; columns are (token, head of the group), zero-padded.
    qt: Vec<f32>,
    /// O: `[rows][d]`.
    o: Vec<f32>,
    /// S^T then P^T: `[BK][cols]`.
    st: Vec<f32>,
    /// The KV tile's K and V rows, `[BK][d]` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// For `Products::Bf16`, bf16 pairs along each product's sum: Q^T `[d / 2][cols]`, K
    /// `[BK][d / 2]`, V `[BK / 2][d]` and P^T `[BK / 2][cols]`; on AMX tiles V^T `[d][BK / 2]`.
    qt2: Vec<u32>,
    k2: Vec<u32>,
    v2: Vec<u32>,
    pt2: Vec<u32>,
    vt2: Vec<u32>,
    online: Online,
}

/// The online softmax's state, one value per column (query row): running max, running sum,
/// this KV tile's max, and the factor that rescales what the column had.
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
/// transpose of K (the tile's queries are transposed once and reused for every KV tile).
/// With `tiles`, both bf16 products run on AMX tiles.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    q: &[f32],
    t: &Tile<'_>,
    kv: Paged<'_>,
    out: &mut [f32],
    s: &mut Scratch,
    isa: Isa,
    products: Products,
    tiles: bool,
) {
    let Paged { block_size, num_heads, num_kv_heads, head_dim: d, .. } = kv;
    let group = num_heads / num_kv_heads;
    let row_len = num_heads * d;
    let kv_row = num_kv_heads * d;
    let rows = (t.t1 - t.t0) * group;
    let cols = rows.next_multiple_of(16);
    let scale = 1.0 / (d as f32).sqrt();
    let fresh = |v: &mut Vec<f32>, len: usize, x: f32| {
        v.clear();
        v.resize(len, x);
    };
    fresh(&mut s.qt, d * cols, 0.0);
    for i in t.t0..t.t1 {
        for g in 0..group {
            let col = (i - t.t0) * group + g;
            let h = t.kvh * group + g;
            for (dd, &x) in q[(t.row + i) * row_len + h * d..][..d].iter().enumerate() {
                s.qt[dd * cols + col] = x * scale;
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
    s.k.resize(BK * d, 0.0);
    s.v.resize(BK * d, 0.0);
    let bf16 = products == Products::Bf16;
    // Where AMX runs, both products go through tiles (`amx::product`); P V is then computed as
    // O^T = V^T P^T, so that P^T's pairs (the rows of S^T, as the softmax leaves them) are the
    // right operand as they stand, and O is kept transposed, `[d][cols]`.
    if tiles {
        s.vt2.resize(d * BK / 2, 0);
    }
    if bf16 {
        s.qt2.resize(d / 2 * cols, 0);
        s.k2.resize(BK * d / 2, 0);
        s.v2.resize(BK / 2 * d, 0);
        s.pt2.resize(BK / 2 * cols, 0);
        for (i, pair) in s.qt2.chunks_exact_mut(cols).enumerate() {
            let (lo, hi) = (&s.qt[2 * i * cols..][..cols], &s.qt[(2 * i + 1) * cols..][..cols]);
            bf16::pair_rows(lo, Some(hi), pair);
        }
    }
    // Positions of the tile's first and last query tokens: KV up to the last is read; KV tiles
    // past the first token's position need the causal mask.
    let (first, last) = (t.start + t.t0, t.start + t.t1 - 1);
    for j0 in (0..=last).step_by(BK) {
        let n = BK.min(last + 1 - j0);
        for c in 0..n {
            let p = j0 + c;
            let slot = t.block_table[p / block_size] as usize * block_size + p % block_size;
            let off = slot * kv_row + t.kvh * d;
            s.k[c * d..(c + 1) * d].copy_from_slice(&kv.k[off..off + d]);
            s.v[c * d..(c + 1) * d].copy_from_slice(&kv.v[off..off + d]);
        }
        // S^T[n x cols] = K[n x d] Q^T[d x cols].
        if bf16 {
            for (k, pair) in s.k[..n * d].chunks_exact(d).zip(s.k2.chunks_exact_mut(d / 2)) {
                bf16::pair_along(k, pair);
            }
            // On tiles, whole tiles of rows: K's rows past n hold an earlier tile's (finite)
            // values, and S^T's rows past n are never read.
            let kv_rows = if tiles { n.next_multiple_of(16) } else { n };
            let qk = bf16::Product {
                a: &s.k2,
                ars: d / 2,
                acs: 1,
                b: &s.qt2,
                ldb: cols,
                kp: d / 2,
                rows: kv_rows,
                n: cols,
                ldc: cols,
            };
            if tiles {
                amx::product(&qk, &mut s.st, false);
            } else {
                bf16::product(&qk, &mut s.st, false);
            }
        } else {
            let a = Operand { data: &s.k, row_stride: d, col_stride: 1 };
            matmul(isa, a, &s.qt, cols, d, &mut s.st, cols, n, cols, false);
        }
        // Causal mask: KV position j0 + c is visible to the query at first + col / group when
        // j0 + c <= that position, so row c hides a leading run of columns.
        for c in 0..n {
            let hidden = ((j0 + c).saturating_sub(first) * group).min(cols);
            s.st[c * cols..c * cols + hidden].fill(f32::NEG_INFINITY);
        }
        softmax_step(isa, &mut s.st[..n * cols], cols, &mut s.online);
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
        if tiles {
            // O^T[d x cols] += V^T[d x n] P^T[n x cols] over pairs of KV positions, zero-padded
            // to a whole tile of 16 pairs (an odd last position is paired with zero).
            let pairs = n.div_ceil(2);
            let kp = pairs.next_multiple_of(16);
            for c in 0..kp {
                let dst = &mut s.pt2[c * cols..][..cols];
                if c < pairs {
                    let p_hi = (2 * c + 1 < n).then(|| &s.st[(2 * c + 1) * cols..][..cols]);
                    bf16::pair_rows(&s.st[2 * c * cols..][..cols], p_hi, dst);
                } else {
                    dst.fill(0);
                }
            }
            // V^T's pairs: row dd holds (V[2c][dd], V[2c + 1][dd]) for each pair c; made as V's
            // pairs `[pairs][d]`, then transposed (four times faster than pairing in place).
            let lda = BK / 2;
            for c in 0..pairs {
                let v_hi = (2 * c + 1 < n).then(|| &s.v[(2 * c + 1) * d..][..d]);
                bf16::pair_rows(&s.v[2 * c * d..][..d], v_hi, &mut s.v2[c * d..][..d]);
            }
            for (dd, row) in s.vt2.chunks_exact_mut(lda).enumerate() {
                for (c, x) in row[..kp].iter_mut().enumerate() {
                    *x = if c < pairs { s.v2[c * d + dd] } else { 0 };
                }
            }
            let pv =
                bf16::Product { a: &s.vt2, ars: lda, acs: 1, b: &s.pt2, ldb: cols, kp, rows: d, n: cols, ldc: cols };
            amx::product(&pv, &mut s.o, true);
        } else if bf16 {
            // Pairs along the KV positions; an odd last one is paired with zeros.
            let pairs = n.div_ceil(2);
            for c in 0..pairs {
                let odd = 2 * c + 1 < n;
                let p_hi = odd.then(|| &s.st[(2 * c + 1) * cols..][..cols]);
                bf16::pair_rows(&s.st[2 * c * cols..][..cols], p_hi, &mut s.pt2[c * cols..][..cols]);
                let v_hi = odd.then(|| &s.v[(2 * c + 1) * d..][..d]);
                bf16::pair_rows(&s.v[2 * c * d..][..d], v_hi, &mut s.v2[c * d..][..d]);
            }
            let pv = bf16::Product { a: &s.pt2, ars: 1, acs: cols, b: &s.v2, ldb: d, kp: pairs, rows, n: d, ldc: d };
            bf16::product(&pv, &mut s.o, true);
        } else {
            let p = Operand { data: &s.st, row_stride: 1, col_stride: cols };
            matmul(isa, p, &s.v, d, n, &mut s.o, d, rows, d, true);
        }
    }
    let at = |r: usize| {
        let (i, g) = (t.t0 + r / group, r % group);
        (t.row + i) * row_len + (t.kvh * group + g) * d
    };
    if tiles {
        // O^T's rows are read whole (a column at a time was a strided read per value).
        s.online.alpha.iter_mut().zip(&s.online.sum).for_each(|(inv, sum)| *inv = 1.0 / sum);
        for (dd, o) in s.o.chunks_exact(cols).enumerate() {
            for (r, (x, inv)) in o[..rows].iter().zip(&s.online.alpha).enumerate() {
                out[at(r) + dd] = x * inv;
            }
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
    let wide = m.n / W * W;
    let mut r0 = 0;
    while r0 < m.rows {
        let rows = R.min(m.rows - r0);
        // SAFETY: passed on: every block is inside A, b and c.
        unsafe {
            if rows == R {
                (0..wide).step_by(W).for_each(|j0| block::<R, W, M>(m, r0, j0));
                (wide..m.n).step_by(16).for_each(|j0| block::<R, 16, M>(m, r0, j0));
            } else {
                for r in r0..r0 + rows {
                    (0..wide).step_by(W).for_each(|j0| block::<1, W, M>(m, r, j0));
                    (wide..m.n).step_by(16).for_each(|j0| block::<1, 16, M>(m, r, j0));
                }
            }
        }
        r0 += rows;
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
mod simd {
    use super::{mm, softmax, Fused, Mm, Online};

    /// # Safety
    /// `mm`'s contract; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn mm_avx512(m: &Mm) {
        // 6 rows x 64 columns: 24 of the 32 vector registers.
        // SAFETY: passed on.
        unsafe { mm::<6, 64, Fused>(m) }
    }

    /// # Safety
    /// `mm`'s contract; the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mm_avx2(m: &Mm) {
        // 6 rows x 16 columns: 12 of the 16 vector registers (the GEMM's AVX2 block).
        // SAFETY: passed on.
        unsafe { mm::<6, 16, Fused>(m) }
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_avx512(st: &mut [f32], cols: usize, online: &mut Online) {
        softmax::<Fused>(st, cols, online)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_avx2(st: &mut [f32], cols: usize, online: &mut Online) {
        softmax::<Fused>(st, cols, online)
    }
}
