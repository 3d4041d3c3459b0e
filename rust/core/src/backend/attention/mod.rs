//! Paged attention on the CPU over a flattened batch of prefill chunks and decode tokens, as
//! vLLM v1 runs it. Prefill chunks (more than one token) go through `prefill_attention` in
//! tiles; decode rows go in pieces (`by_pieces`: runs of positions where the batch is small or
//! the history long), each piece by `attend_piece`, with explicit FMA code (`simd::attend_piece`,
//! or `simd::attend_piece_512` with AVX-512) where the CPU has it and `HORAE_CPU_KERNEL` allows. The portable `attend_row` is the reference both are tested against.

use rayon::prelude::*;

use super::gemm::Products;
use super::isa::Isa;
use super::kv_cache::{KvElem, KvRows};
use super::prefill_attention::{self, Paged};

/// Where one sequence's rows of a flattened batch read their KV.
#[derive(Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First row of this sequence in the batch.
    pub row: usize,
    pub num_tokens: usize,
    /// Position of the first of those tokens.
    pub start: usize,
    pub block_table: &'a [u32],
}

#[derive(Clone, Copy)]
struct AttnShape {
    block_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Paged attention (causal: the token at position `p` attends to positions `0..=p` of its own
/// sequence, read from the paged cache). Cache layout per layer:
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, f32 or bf16 (`kv_cache`). `products` is
/// the prefill tiles' arithmetic (decode rows are f32 either way).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &[f32],
    seqs: &[AttnSeq<'_>],
    k_cache: KvRows<'_>,
    v_cache: KvRows<'_>,
    block_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    products: Products,
    out: &mut [f32],
) {
    // Chunks of several tokens in tiles; decode rows (and shapes the tiles do not take) in pieces.
    let tiled = |s: &AttnSeq<'_>| s.num_tokens > 1 && prefill_attention::supports(head_dim);
    let tokens = seqs.iter().filter(|s| tiled(s)).map(|s| s.num_tokens).sum();
    let bq = prefill_attention::query_tile(tokens, num_kv_heads);
    let tiles: Vec<_> = seqs
        .iter()
        .filter(|s| tiled(s))
        .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, num_kv_heads, bq))
        .collect();
    let kv = Paged { k: k_cache, v: v_cache, block_size, num_heads, num_kv_heads, head_dim };
    if !tiles.is_empty() {
        prefill_attention::run(q, &tiles, kv, out, Isa::detect(), products);
    }
    let rows: Vec<AttnSeq<'_>> = seqs.iter().filter(|s| !tiled(s)).copied().collect();
    attention_by_rows(q, &rows, kv, out);
}

/// The rows of `seqs` (decode rows, and chunks the tiles do not take), each over its whole KV
/// history, in pieces for the threads (`by_pieces`): what decode rows take, and the baseline
/// `bench::attention` measures the tiles against. Rows outside `seqs` are left as they are.
pub fn attention_by_rows(q: &[f32], seqs: &[AttnSeq<'_>], kv: Paged<'_>, out: &mut [f32]) {
    let Paged { k, v, block_size, num_heads, num_kv_heads, head_dim } = kv;
    let shape = AttnShape { block_size, num_heads, num_kv_heads, head_dim };
    match (k, v) {
        (KvRows::F32(k), KvRows::F32(v)) => rows_in(q, seqs, PagedKv { k, v, shape }, out),
        (KvRows::Bf16(k), KvRows::Bf16(v)) => rows_in(q, seqs, PagedKv { k, v, shape }, out),
        _ => panic!("K and V caches in different dtypes"),
    }
}

/// `attention_by_rows` over a cache of `E`, with the kernel the CPU runs.
fn rows_in<E: KvElem>(q: &[f32], seqs: &[AttnSeq<'_>], cache: PagedKv<'_, E>, out: &mut [f32]) {
    let head_dim = cache.shape.head_dim;
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    {
        let isa = crate::backend::isa::Isa::detect();
        if isa == crate::backend::isa::Isa::Avx512 && head_dim.is_multiple_of(simd::DIMS_512) {
            // SAFETY: `Isa::Avx512` is detected only where the CPU has AVX-512F (AVX2 and FMA
            // with it); `by_pieces` checks the slots.
            let kernel = |q: &[f32], slots: &[usize], kvh, part: &mut [f32]| unsafe {
                simd::attend_piece_512(q, slots, kvh, cache, part)
            };
            return by_pieces(q, seqs, cache, out, threads, kernel);
        }
        if isa >= crate::backend::isa::Isa::Avx2Fma && head_dim.is_multiple_of(simd::DIMS) {
            // SAFETY: `Isa::Avx2Fma` and above are detected only where the CPU has AVX2 and
            // FMA; `by_pieces` checks the slots.
            let kernel = |q: &[f32], slots: &[usize], kvh, part: &mut [f32]| unsafe {
                simd::attend_piece(q, slots, kvh, cache, part)
            };
            return by_pieces(q, seqs, cache, out, threads, kernel);
        }
    }
    by_pieces(q, seqs, cache, out, threads, |q, slots, kvh, part| attend_piece(q, slots, kvh, cache, part))
}

/// One layer's paged K and V caches (values of `E`: f32 or bf16) and their shape.
struct PagedKv<'a, E> {
    k: &'a [E],
    v: &'a [E],
    shape: AttnShape,
}

// Derived, they would ask `E: Copy` of every use.
impl<E> Clone for PagedKv<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for PagedKv<'_, E> {}

/// KV positions a piece takes at least: fewer and the task costs more than it saves.
const MIN_PIECE: usize = 128;
/// Bytes of K a piece reads at most (for each KV head, a pass over the rows that holds in L2).
const PIECE_BYTES: usize = 256 << 10;
/// Below this many positions over all pieces, they run on the calling thread.
const SERIAL_POSITIONS: usize = 1024;

/// One row's attention over positions `p0..p1` of its history (sequence `seq` of the batch).
struct Piece {
    seq: usize,
    row: usize,
    p0: usize,
    p1: usize,
}

/// Flash decoding on the CPU: every row's attention in pieces, runs of its positions, so a lone
/// sequence's attention uses every core: where the batch has fewer rows than four per thread, a
/// row is cut into that many runs of at least `MIN_PIECE` positions, and a long one into runs of
/// at most `PIECE_BYTES` of K. With one task a row, one core walked a long history while the
/// others waited: a batch-1 decode step of SmolLM2 took 23.7 ms at 2,000 tokens of context
/// against 7.5 at 16 (2 threads, Zen 5). A piece takes every KV head in turn over its run:
/// pieces per KV head instead read a third of each cache row each, interleaved with the other
/// threads' thirds, and measured 1.1-1.2x slower. `kernel(q, slots, kvh, part)` leaves, for
/// each query head of `q` (those reading KV head `kvh`, in order), its unnormalised output over
/// the positions at cache offsets `slots`, then their max and sum of weights (`head_dim + 2`
/// values a head). Pieces are merged, each rescaled to the common max, as the tiles' online
/// softmax does.
fn by_pieces<E, F>(q: &[f32], seqs: &[AttnSeq<'_>], cache: PagedKv<'_, E>, out: &mut [f32], threads: usize, kernel: F)
where
    F: Fn(&[f32], &[usize], usize, &mut [f32]) + Sync,
{
    let AttnShape { num_heads, num_kv_heads, head_dim: d, .. } = cache.shape;
    let (group, row_len) = (num_heads / num_kv_heads, num_heads * d);
    assert!(q.len() == out.len() && q.len().is_multiple_of(row_len), "query and output rows");
    // Each sequence's cache offsets, once for all its rows and heads; every read below is at one
    // of them, so the largest is checked here (a block table is not sorted).
    let slots: Vec<Vec<usize>> = seqs.iter().map(|s| kv_offsets(s, s.start + s.num_tokens, &cache.shape)).collect();
    let top = slots.iter().flatten().max().copied();
    assert!(top.is_none_or(|t| t + num_kv_heads * d <= cache.k.len().min(cache.v.len())), "KV slot out of bounds");
    let rows: usize = seqs.iter().map(|s| s.num_tokens).sum();
    let per_row = (4 * threads).div_ceil(rows.max(1));
    // At most this many positions a piece, so its K and V rows stay in L2 while it walks them
    // once per KV head.
    let max_piece = (PIECE_BYTES / (size_of::<E>() * num_kv_heads * d)).max(MIN_PIECE);
    let mut pieces = Vec::new();
    for (seq, s) in seqs.iter().enumerate() {
        for t in 0..s.num_tokens {
            let len = s.start + t + 1;
            assert!((s.row + t + 1) * row_len <= out.len(), "row outside the batch");
            let chunks = per_row.min(len.div_ceil(MIN_PIECE)).max(len.div_ceil(max_piece)).max(1);
            let step = len.div_ceil(chunks);
            pieces.extend((0..len).step_by(step).map(|p0| Piece { seq, row: s.row + t, p0, p1: len.min(p0 + step) }));
        }
    }
    let part_len = num_heads * (d + 2);
    let mut parts = vec![0.0f32; pieces.len() * part_len];
    let run = |(part, p): (&mut [f32], &Piece)| {
        for (kvh, part) in part.chunks_exact_mut(group * (d + 2)).enumerate() {
            let q = &q[p.row * row_len + kvh * group * d..][..group * d];
            kernel(q, &slots[p.seq][p.p0..p.p1], kvh, part)
        }
    };
    // A few hundred positions in all (a short history at batch 1) take microseconds: less than
    // handing pieces to other threads and waiting for them.
    if pieces.iter().map(|p| p.p1 - p.p0).sum::<usize>() * num_kv_heads < SERIAL_POSITIONS {
        parts.chunks_mut(part_len).zip(&pieces).for_each(run);
    } else {
        parts.par_chunks_mut(part_len).zip(&pieces).for_each(run);
    }
    // The pieces of one row are consecutive.
    let mut i = 0;
    while i < pieces.len() {
        let row = pieces[i].row;
        let n = pieces[i..].iter().take_while(|p| p.row == row).count();
        let parts = &parts[i * part_len..(i + n) * part_len];
        for h in 0..num_heads {
            let head = |k: usize| &parts[k * part_len + h * (d + 2)..][..d + 2];
            let max = (0..n).map(|k| head(k)[d]).fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[row * row_len + h * d..][..d];
            o.fill(0.0);
            let mut sum = 0.0f32;
            for k in 0..n {
                let x = head(k);
                let w = (x[d] - max).exp();
                sum += w * x[d + 1];
                o.iter_mut().zip(&x[..d]).for_each(|(o, x)| *o += w * x);
            }
            o.iter_mut().for_each(|o| *o /= sum);
        }
        i += n;
    }
}

/// Cache offset of the KV row of each position `0..len` of a sequence, computed once for all
/// heads (a division per position per head was a tenth of a decode step).
fn kv_offsets(s: &AttnSeq<'_>, len: usize, shape: &AttnShape) -> Vec<usize> {
    let kv_row = shape.num_kv_heads * shape.head_dim;
    let mut slots = Vec::with_capacity(len);
    for (b, &block) in s.block_table.iter().enumerate().take(len.div_ceil(shape.block_size)) {
        let base = block as usize * shape.block_size;
        let n = shape.block_size.min(len - b * shape.block_size);
        slots.extend((base..base + n).map(|slot| slot * kv_row));
    }
    slots
}

/// One query row (all heads) at position `pos` over positions `0..=pos` of its sequence: the
/// reference the kernels are tested against, in the plainest arithmetic.
#[cfg(test)]
fn attend_row<E: KvElem>(q: &[f32], s: &AttnSeq<'_>, pos: usize, kv: PagedKv<'_, E>, o: &mut [f32]) {
    let PagedKv { k: k_cache, v: v_cache, shape } = kv;
    let AttnShape { num_heads, num_kv_heads, head_dim, .. } = shape;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let kv_row = num_kv_heads * head_dim;
    let len = pos + 1;
    let slots = kv_offsets(s, len, &shape);
    let mut scores = vec![0.0f32; num_heads * len];
    for (p, &slot) in slots.iter().enumerate() {
        let k = &k_cache[slot..slot + kv_row];
        for (h, qh) in q.chunks_exact(head_dim).enumerate() {
            let kh = &k[(h / group) * head_dim..][..head_dim];
            scores[h * len + p] = qh.iter().zip(kh).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        }
    }
    for sc in scores.chunks_exact_mut(len) {
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in sc.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        sc.iter_mut().for_each(|v| *v *= inv);
    }
    o.fill(0.0);
    for (p, &slot) in slots.iter().enumerate() {
        let v = &v_cache[slot..slot + kv_row];
        for (h, oh) in o.chunks_exact_mut(head_dim).enumerate() {
            let w = scores[h * len + p];
            let vh = &v[(h / group) * head_dim..][..head_dim];
            oh.iter_mut().zip(vh).for_each(|(o, v)| *o += w * v.to_f32());
        }
    }
}

/// `by_pieces`'s kernel in plain arithmetic: for each query head of `q` (`head_dim` values each,
/// all reading KV head `kvh`), its output over the positions at cache offsets `slots`, weighted
/// by exp(score - max) and not yet divided by their sum, then that max and sum.
fn attend_piece<E: KvElem>(q: &[f32], slots: &[usize], kvh: usize, kv: PagedKv<'_, E>, part: &mut [f32]) {
    let d = kv.shape.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = vec![0.0f32; slots.len()];
    for (qh, part) in q.chunks_exact(d).zip(part.chunks_exact_mut(d + 2)) {
        for (sc, &slot) in scores.iter_mut().zip(slots) {
            let k = &kv.k[slot + kvh * d..][..d];
            *sc = qh.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (o, stats) = part.split_at_mut(d);
        o.fill(0.0);
        let mut sum = 0.0f32;
        for (&sc, &slot) in scores.iter().zip(slots) {
            let w = (sc - max).exp();
            sum += w;
            let v = &kv.v[slot + kvh * d..][..d];
            o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v.to_f32());
        }
        stats.copy_from_slice(&[max, sum]);
    }
}

/// The AVX2 + FMA kernel, and its AVX-512 width. Profiled on SmolLM2 decode at 32 sequences, the auto-vectorised
/// reference spent a sixth of the step here: separate multiply and add (Rust does not contract
/// them to FMA), a store of the output after every position, and a scalar `exp` per score.
/// This one keeps each head's output in registers while it walks the positions, fuses the
/// multiply-adds and computes `exp` eight lanes at a time.
#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(test)]
mod tests;
