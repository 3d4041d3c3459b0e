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
mod simd {
    use super::PagedKv;
    use crate::backend::cpu::avx2::{exp8, hsum};
    use crate::backend::kv_cache::KvElem;
    use std::arch::x86_64::*;

    /// `super::attend_piece` with explicit FMA code, written once for a vector width: `$lanes`
    /// f32 lanes of type `$v`, through the intrinsics named after it, for `G` query heads
    /// sharing the KV head (GQA's group) and `head_dim` a multiple of `$dims` (four registers).
    ///
    /// Every head of the group is taken together, so each K and V row is read from memory once
    /// for all of them, not once a head: positions go in blocks of `$lanes`, whose K rows stay in
    /// L1 while each head's scores for the block are taken (one accumulator a position, reduced
    /// together by `$sums`, a transpose by shuffles), and each V row is loaded once into
    /// registers and added into every head's output (`G x $dims / $lanes` accumulators). The
    /// rows `AHEAD` positions on are prefetched, and on KV head 0's walk the rest of each row
    /// too, into L2, for the walks of the other KV heads over the same positions (batch-1
    /// decode of the default model after 2,000 tokens, Zen 4: 93-97 -> 98-105 tok/s in four
    /// alternations; after 4,000, 55-63 -> 60-66, faster in three pairs of four). Head by
    /// head, each row was read once a head and each score reduced on its own; batch-1 decode
    /// of the default model (Q4_1) on the 2-core Xeon after 2,000 / 4,000 tokens of context
    /// went from 75-85 / 51-56 tok/s to 90-95 / 62-65 (AVX-512), and from 58-62 / 41-42 to
    /// 60-66 / 44-47 with the AVX2 kernel.
    macro_rules! attend_piece {
        ($any:ident, $chunk:expr, $name:ident, $features:literal, $dims:expr, $lanes:expr, $v:ty, $zero:ident,
         $load:ident, $load_kv:ident, $fmadd:ident, $mul:ident, $splat:ident, $store:ident, $reduce:expr, $sums:ident) => {
            /// The kernel below for any number of query heads, in chunks of up to `$chunk` (so that
            /// their V accumulators stay in registers).
            ///
            /// # Safety
            /// As the kernel's.
            pub unsafe fn $any<E: KvElem>(
                q: &[f32],
                slots: &[usize],
                kvh: usize,
                kv: PagedKv<'_, E>,
                part: &mut [f32],
            ) {
                let d = kv.shape.head_dim;
                for (q, part) in q.chunks($chunk * d).zip(part.chunks_mut($chunk * (d + 2))) {
                    // SAFETY: passed on.
                    unsafe {
                        match q.len() / d {
                            1 => $name::<E, 1>(q, slots, kvh, kv, part),
                            2 => $name::<E, 2>(q, slots, kvh, kv, part),
                            3 => $name::<E, 3>(q, slots, kvh, kv, part),
                            _ => $name::<E, $chunk>(q, slots, kvh, kv, part),
                        }
                    }
                }
            }

            /// # Safety
            /// The CPU has the function's features; every offset in `slots`, plus `head_dim`
            /// values for each KV head, is inside both caches (`by_pieces` checks the largest).
            #[target_feature(enable = $features)]
            unsafe fn $name<E: KvElem, const G: usize>(
                q: &[f32],
                slots: &[usize],
                kvh: usize,
                kv: PagedKv<'_, E>,
                part: &mut [f32],
            ) {
                let d = kv.shape.head_dim;
                let scale = $splat(1.0 / (d as f32).sqrt());
                assert!(q.len() == G * d && part.len() == G * (d + 2) && d.is_multiple_of($dims));
                let (k_cache, v_cache) = (kv.k.as_ptr(), kv.v.as_ptr());
                let n = slots.len();
                // Bytes of one value of the cache, and of one KV head's share of a row.
                let (size, head_bytes) = (size_of::<E>(), d * size_of::<E>());
                // Head h's scores at [h * n..(h + 1) * n].
                let mut scores = vec![0.0f32; G * n];
                let blocks = n / $lanes * $lanes;
                for b0 in (0..blocks).step_by($lanes) {
                    // The next block's K rows, asked for now (a prefetch never faults).
                    for &ahead in slots.iter().skip(b0 + $lanes).take($lanes) {
                        let a = k_cache.wrapping_add(ahead + kvh * d) as *const i8;
                        for l in (0..head_bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(l));
                        }
                        if kvh == 0 {
                            // The first of a piece's walks (one per KV head) asks for the rest of
                            // each row too, into L2, where the piece is sized to stay: the later
                            // walks then read their thirds from there, not again from memory.
                            let row = k_cache.wrapping_add(ahead) as *const i8;
                            for l in (head_bytes..kv.shape.num_kv_heads * head_bytes).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(l));
                            }
                        }
                    }
                    for h in 0..G {
                        let qh = &q[h * d..(h + 1) * d];
                        let mut acc: [$v; $lanes] = [$zero(); $lanes];
                        for i in (0..d).step_by($lanes) {
                            // SAFETY: i + lanes <= d: inside the head's row of q.
                            let qv = unsafe { $load(qh.as_ptr().add(i)) };
                            for (j, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: slot + kvh * d + d is inside the cache (the caller's
                                // contract), and i + lanes <= d.
                                *acc = $fmadd(qv, unsafe { $load_kv(k_cache.add(slots[b0 + j] + kvh * d + i)) }, *acc);
                            }
                        }
                        // SAFETY: positions b0..b0 + lanes of head h's scores.
                        unsafe { $store(scores.as_mut_ptr().add(h * n + b0), $mul($sums(&acc), scale)) };
                    }
                }
                for p in blocks..n {
                    // SAFETY: as above.
                    let k = unsafe { k_cache.add(slots[p] + kvh * d) };
                    for h in 0..G {
                        let mut acc = $zero();
                        for i in (0..d).step_by($lanes) {
                            // SAFETY: i + lanes <= d: inside the head's row of q and K.
                            acc = unsafe { $fmadd($load(q.as_ptr().add(h * d + i)), $load_kv(k.add(i)), acc) };
                        }
                        scores[h * n + p] = $reduce($mul(acc, scale));
                    }
                }
                let mut stats = [(0.0f32, 0.0f32); G];
                for (h, st) in stats.iter_mut().enumerate() {
                    let sc = &mut scores[h * n..(h + 1) * n];
                    let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    *st = (max, exp_in_place(sc, max));
                }
                for i in (0..d).step_by($dims) {
                    let mut acc: [[$v; $dims / $lanes]; G] = [[$zero(); $dims / $lanes]; G];
                    for (p, &slot) in slots.iter().enumerate() {
                        // The V row `AHEAD` positions on, asked for now.
                        if let Some(&ahead) = slots.get(p + AHEAD) {
                            let a = v_cache.wrapping_add(ahead + kvh * d + i) as *const i8;
                            for l in (0..$dims * size).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(l));
                            }
                            if kvh == 0 && i == 0 {
                                // As for K above.
                                let row = v_cache.wrapping_add(ahead) as *const i8;
                                for l in (head_bytes..kv.shape.num_kv_heads * head_bytes).step_by(64) {
                                    _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(l));
                                }
                            }
                        }
                        // SAFETY: as for K above.
                        let v = unsafe { v_cache.add(slot + kvh * d + i) };
                        let row: [$v; $dims / $lanes] = std::array::from_fn(|j| unsafe { $load_kv(v.add($lanes * j)) });
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let w = $splat(scores[h * n + p]);
                            for (acc, &x) in acc.iter_mut().zip(&row) {
                                *acc = $fmadd(w, x, *acc);
                            }
                        }
                    }
                    for (h, acc) in acc.iter().enumerate() {
                        for (j, &acc) in acc.iter().enumerate() {
                            // SAFETY: i + lanes (j + 1) <= d, inside head h's output.
                            unsafe { $store(part.as_mut_ptr().add(h * (d + 2) + i + $lanes * j), acc) };
                        }
                    }
                }
                for (h, &(max, sum)) in stats.iter().enumerate() {
                    part[h * (d + 2) + d..][..2].copy_from_slice(&[max, sum]);
                }
            }
        };
    }

    /// Lane j of the result is the sum of `v[j]`'s eight lanes: the 8 x 8 transpose by shuffles
    /// that adds as it goes (21 instructions for eight sums).
    #[target_feature(enable = "avx2,fma")]
    fn sums8(v: &[__m256; 8]) -> __m256 {
        // Pairs: each 128-bit half of w[i] holds, interleaved, partial sums of v[2i] and v[2i + 1].
        let w: [__m256; 4] = std::array::from_fn(|i| {
            _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]))
        });
        // Quads: each 128-bit half of x holds partial sums of v[4i..4i + 4], in order.
        let quad = |a: __m256, b: __m256| {
            let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
            _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)))
        };
        let (x0, x1) = (quad(w[0], w[1]), quad(w[2], w[3]));
        // Halves: the low half of the result is x0's two halves added, the high half x1's.
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x0, x1), _mm256_permute2f128_ps::<0x31>(x0, x1))
    }

    /// Lane j of the result is the sum of `v[j]`'s sixteen lanes (`sums8` at AVX-512 width).
    #[target_feature(enable = "avx512f")]
    fn sums16(v: &[__m512; 16]) -> __m512 {
        let w: [__m512; 8] = std::array::from_fn(|i| {
            _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
        });
        let quad = |a: __m512, b: __m512| {
            let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
        };
        // Each 128-bit lane L of x[i] holds lane L's partial sums of v[4i..4i + 4], in order.
        let x: [__m512; 4] = std::array::from_fn(|i| quad(w[2 * i], w[2 * i + 1]));
        // Add the 128-bit lanes: lanes 0 + 2 and 1 + 3 of two x's at a time, then the two.
        let half = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
        };
        let (z0, z1) = (half(x[0], x[1]), half(x[2], x[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(z0, z1), _mm512_shuffle_f32x4::<0xDD>(z0, z1))
    }

    /// Positions ahead whose K or V rows a kernel asks for (`_mm_prefetch`) while it works on
    /// the present one. A head's share of a cache row is 256 of its 768 bytes (SmolLM2), a
    /// stride the hardware prefetchers followed too slowly: the V loop waited on its loads.
    const AHEAD: usize = 32;
    /// Head dimensions the AVX2 kernel takes at a time (4 registers of 8).
    pub const DIMS: usize = 32;
    /// Head dimensions the AVX-512 kernel takes at a time (4 registers of 16).
    pub const DIMS_512: usize = 64;

    // AVX2 + FMA.
    attend_piece!(
        attend_piece,
        2,
        attend_group,
        "avx2,fma",
        DIMS,
        8,
        __m256,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        load_kv8,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_set1_ps,
        _mm256_storeu_ps,
        hsum,
        sums8
    );
    // AVX-512.
    attend_piece!(
        attend_piece_512,
        4,
        attend_group_512,
        "avx512f,avx2,fma",
        DIMS_512,
        16,
        __m512,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load_kv16,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_set1_ps,
        _mm512_storeu_ps,
        _mm512_reduce_add_ps,
        sums16
    );

    /// Eight values of the cache from `p`, as f32: bf16 widened by a shift (it is f32's top half).
    ///
    /// # Safety
    /// Eight values from `p` are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_kv8<E: KvElem>(p: *const E) -> __m256 {
        // SAFETY: the caller's.
        unsafe {
            if E::BF16 {
                crate::backend::bf16::x86::load8(p.cast())
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    }

    /// `load_kv8` at AVX-512's width: sixteen values.
    ///
    /// # Safety
    /// Sixteen values from `p` are readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn load_kv16<E: KvElem>(p: *const E) -> __m512 {
        // SAFETY: the caller's.
        unsafe {
            if E::BF16 {
                crate::backend::bf16::x86::load16(p.cast())
            } else {
                _mm512_loadu_ps(p.cast())
            }
        }
    }

    /// `sc[i] = exp(sc[i] - max)`, eight lanes at a time; returns their sum.
    #[target_feature(enable = "avx2,fma")]
    fn exp_in_place(sc: &mut [f32], max: f32) -> f32 {
        let (body, tail) = sc.split_at_mut(sc.len() / 8 * 8);
        let mut sum = _mm256_setzero_ps();
        let maxv = _mm256_set1_ps(max);
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds exactly eight values.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), maxv));
                sum = _mm256_add_ps(sum, e);
                _mm256_storeu_ps(c.as_mut_ptr(), e);
            }
        }
        let mut total = hsum(sum);
        if !tail.is_empty() {
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..tail.len()].copy_from_slice(tail);
            // SAFETY: `buf` holds eight values; padding lanes come out about 1e-38 and are dropped.
            let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), maxv)) };
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), e) };
            tail.copy_from_slice(&buf[..tail.len()]);
            total += buf[..tail.len()].iter().sum::<f32>();
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::worst;

    #[test]
    fn attention_over_one_position_returns_its_value() {
        // One token at position 0: softmax over a single score is 1, so out = v.
        for hd in [4, 32] {
            let bs = 2;
            let q = vec![1.0; hd];
            let mut k = vec![0.0; 2 * bs * hd];
            let mut v = vec![0.0; 2 * bs * hd];
            // Block table [1]: position 0 lives in block 1, slot 0.
            k[bs * hd..bs * hd + hd].fill(0.3);
            let val: Vec<f32> = (1..=hd).map(|i| i as f32).collect();
            v[bs * hd..bs * hd + hd].copy_from_slice(&val);
            let table = [1u32];
            let seqs = [AttnSeq { row: 0, num_tokens: 1, start: 0, block_table: &table }];
            let mut out = vec![0.0; hd];
            paged_attention(&q, &seqs, KvRows::F32(&k), KvRows::F32(&v), bs, 1, 1, hd, Products::F32, &mut out);
            assert_eq!(out, val);
        }
    }

    fn noise(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// A block table whose last block is in the cache but an earlier one is not: the row path
    /// must refuse it (a panic) instead of reading past the cache. It used to check only the
    /// last slot.
    #[test]
    fn rows_check_the_largest_slot_not_the_last() {
        let (bs, blocks, nh, hd) = (4, 2, 1, 32);
        let (kv, vv) = (noise(blocks * bs * hd, 1), noise(blocks * bs * hd, 2));
        let table = [1_000u32, 0]; // block 1000 is far outside a 2-block cache
        let seqs = [AttnSeq { row: 0, num_tokens: 1, start: 5, block_table: &table }];
        let q = noise(nh * hd, 3);
        let mut o = vec![0.0; nh * hd];
        let paged = Paged {
            k: KvRows::F32(&kv),
            v: KvRows::F32(&vv),
            block_size: bs,
            num_heads: nh,
            num_kv_heads: 1,
            head_dim: hd,
        };
        let ran =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attention_by_rows(&q, &seqs, paged, &mut o)));
        assert!(ran.is_err(), "an out-of-bounds block must be refused");
    }

    /// The row path (`by_pieces`) with each kernel, with pieces for 1 and for 16 threads, against
    /// the portable reference: GQA, ragged block tables, a chunk that starts mid-sequence, decode
    /// rows over short and long histories (one of 700 positions, split into three to six runs),
    /// head_dim 16 to 128.
    #[test]
    fn pieces_match_the_reference() {
        // Groups of 1, 3, 4, 5 and 7 heads: the kernels take up to 2 (AVX2) or 4 (AVX-512) at a
        // time, so 5 and 7 run in chunks with a remainder.
        for (nh, nkv, hd) in [(9, 3, 64), (4, 1, 128), (2, 2, 32), (3, 3, 16), (10, 2, 64), (7, 1, 32)] {
            let (bs, blocks) = (16, 60);
            let shape = AttnShape { block_size: bs, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
            let kv = noise(blocks * bs * nkv * hd, 1);
            let vv = noise(blocks * bs * nkv * hd, 2);
            let (t0, t1, t2) = ([3u32, 0, 7], [5u32, 1, 9, 2, 11], [4u32]);
            let t3: Vec<u32> = (12..56).rev().collect(); // 704 positions, blocks in reverse
                                                         // rows: 5 prefill tokens at positions 30..35, decodes at 70, 0 and 699.
            let seqs = [
                AttnSeq { row: 0, num_tokens: 5, start: 30, block_table: &t0 },
                AttnSeq { row: 5, num_tokens: 1, start: 70, block_table: &t1 },
                AttnSeq { row: 6, num_tokens: 1, start: 0, block_table: &t2 },
                AttnSeq { row: 7, num_tokens: 1, start: 699, block_table: &t3 },
            ];
            let q: Vec<f32> = noise(8 * nh * hd, 3).iter().map(|x| 3.0 * x).collect();
            let want = row_reference(&q, &seqs, shape, &kv, &vv);
            check_pieces(&q, &seqs, PagedKv { k: &kv, v: &vv, shape }, &want);
            // A bf16 cache: the kernels widen what it holds, so they match the reference on
            // those values (rounded, then widened) as closely.
            let (kb, vb) = (to_bf16(&kv), to_bf16(&vv));
            let want = row_reference(&q, &seqs, shape, &widened(&kb), &widened(&vb));
            check_pieces(&q, &seqs, PagedKv { k: &kb, v: &vb, shape }, &want);
        }
    }

    fn to_bf16(x: &[f32]) -> Vec<half::bf16> {
        x.iter().map(|&x| half::bf16::from_f32(x)).collect()
    }

    fn widened(x: &[half::bf16]) -> Vec<f32> {
        x.iter().map(|x| x.to_f32()).collect()
    }

    /// Every decode kernel the CPU runs, over the cache's values `E`, against `want`.
    fn check_pieces<E: KvElem>(q: &[f32], seqs: &[AttnSeq<'_>], cache: PagedKv<'_, E>, want: &[f32]) {
        let AttnShape { num_heads: nh, num_kv_heads: nkv, head_dim: hd, .. } = cache.shape;
        let dtype = if E::BF16 { "bf16" } else { "f32" };
        let mut kernels: Vec<(&str, Box<PieceKernel>)> =
            vec![("portable", Box::new(move |q, s, kvh, p| attend_piece(q, s, kvh, cache, p)))];
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(simd::DIMS)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above); `by_pieces` checks the slots.
            kernels.push(("avx2", Box::new(move |q, s, kvh, p| unsafe { simd::attend_piece(q, s, kvh, cache, p) })));
        }
        #[cfg(target_arch = "x86_64")]
        if hd.is_multiple_of(simd::DIMS_512) && crate::backend::isa::Isa::Avx512.runs_here() {
            // SAFETY: the CPU has AVX-512F (checked just above); `by_pieces` checks the slots.
            let kernel = move |q: &[f32], s: &[usize], kvh, p: &mut [f32]| unsafe {
                simd::attend_piece_512(q, s, kvh, cache, p)
            };
            kernels.push(("avx512", Box::new(kernel)));
        }
        eprintln!(
            "decode attention kernels for head_dim {hd}, a {dtype} cache: {}",
            kernels.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
        );
        for (name, kernel) in &kernels {
            for threads in [1, 16] {
                let mut got = vec![f32::NAN; q.len()];
                by_pieces(q, seqs, cache, &mut got, threads, kernel);
                let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
                assert!(err < 1e-5, "{name}, {dtype} cache, {threads} threads, ({nh}, {nkv}, {hd}): max error {err}");
            }
        }
    }

    type PieceKernel<'a> = dyn Fn(&[f32], &[usize], usize, &mut [f32]) + Sync + 'a;

    /// The reference on every row `seqs` cover, one row at a time.
    fn for_each_row<F>(q: &[f32], seqs: &[AttnSeq<'_>], shape: AttnShape, out: &mut [f32], kernel: F)
    where
        F: Fn(&[f32], &AttnSeq<'_>, usize, &mut [f32]),
    {
        let row_len = shape.num_heads * shape.head_dim;
        for s in seqs {
            for t in 0..s.num_tokens {
                let row = s.row + t;
                kernel(
                    &q[row * row_len..(row + 1) * row_len],
                    s,
                    s.start + t,
                    &mut out[row * row_len..(row + 1) * row_len],
                );
            }
        }
    }

    /// The portable row kernel's output for every row `seqs` cover (0 elsewhere).
    fn row_reference(q: &[f32], seqs: &[AttnSeq<'_>], shape: AttnShape, k: &[f32], v: &[f32]) -> Vec<f32> {
        let mut want = vec![0.0; q.len()];
        for_each_row(q, seqs, shape, &mut want, |q, s, pos, o| attend_row(q, s, pos, PagedKv { k, v, shape }, o));
        want
    }

    /// The tiled prefill kernel, with every instruction set this CPU has, against the row
    /// reference: GQA and plain heads, chunks that start mid-sequence, ragged block tables and a
    /// chunk longer than a query tile, beside a decode row. Every position here is in a query
    /// tile's first KV tile (256 positions); `tiled_prefill_rescales_when_later_scores_jump`
    /// crosses several.
    #[test]
    fn tiled_prefill_matches_the_row_reference() {
        use crate::backend::isa::Isa;
        use crate::backend::prefill_attention::{self, Paged};
        // Groups of 1, 3, 4, 5 and 7 heads: the kernels take up to 2 (AVX2) or 4 (AVX-512) at a
        // time, so 5 and 7 run in chunks with a remainder.
        for (nh, nkv, hd) in [(9, 3, 64), (4, 1, 128), (2, 2, 32), (3, 3, 16), (10, 2, 64), (7, 1, 32)] {
            let (bs, blocks) = (16, 24);
            let shape = AttnShape { block_size: bs, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
            let kv = noise(blocks * bs * nkv * hd, 1);
            let vv = noise(blocks * bs * nkv * hd, 2);
            let t0: Vec<u32> = (0..12).rev().collect(); // 192 positions, blocks in reverse
            let t1 = [13u32, 20, 14, 21, 15];
            let t2 = [23u32];
            let t3 = [22u32, 12, 16];
            // rows: 70 tokens at 100..170 (mid-sequence), 40 tokens at 0..40, one decode at 9,
            // 5 tokens at 30..35. With 32-token tiles the first two span several tiles (their KV
            // is packed once for all of them), the last one tile (it packs its own KV tiles).
            let seqs = [
                AttnSeq { row: 0, num_tokens: 70, start: 100, block_table: &t0 },
                AttnSeq { row: 70, num_tokens: 40, start: 0, block_table: &t1 },
                AttnSeq { row: 110, num_tokens: 1, start: 9, block_table: &t2 },
                AttnSeq { row: 111, num_tokens: 5, start: 30, block_table: &t3 },
            ];
            let q: Vec<f32> = noise(116 * nh * hd, 3).iter().map(|x| 3.0 * x).collect();
            let want = row_reference(&q, &seqs, shape, &kv, &vv);
            let tiles: Vec<_> = seqs
                .iter()
                .filter(|s| s.num_tokens > 1)
                .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, nkv, 32))
                .collect();
            let paged = Paged {
                k: KvRows::F32(&kv),
                v: KvRows::F32(&vv),
                block_size: bs,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            // Every vector kernel, then f32 products as three bf16 ones on AMX tiles where they run
            // (hi hi + hi lo + lo hi: about 2^-17 of each term, against f32's 2^-24).
            let amx = prefill_attention::amx_products(hd).then_some(Isa::Avx512);
            for (isa, on_tiles) in Isa::available().into_iter().map(|i| (i, false)).chain(amx.map(|i| (i, true))) {
                let mut got = vec![f32::NAN; q.len()];
                prefill_attention::run_with(&q, &tiles, paged, &mut got, isa, Products::F32, on_tiles);
                let decode = 110 * nh * hd..111 * nh * hd; // the decode row is not a tile's
                let err =
                    (0..q.len()).filter(|i| !decode.contains(i)).map(|i| (got[i] - want[i]).abs()).fold(0.0f32, worst);
                let how = if on_tiles { "AMX tiles, f32 products in three bf16 ones" } else { isa.name() };
                eprintln!("tiled prefill attention, {how}, ({nh}, {nkv}, {hd}): max error {err:.2e}");
                assert!(err < 2e-5, "{how} ({nh}, {nkv}, {hd}): max error {err}");
                assert!(got[decode].iter().all(|v| v.is_nan()), "a tile wrote outside its rows");
            }
            // The whole layer through the public entry point (tiles and the decode row).
            let mut all = vec![0.0; q.len()];
            paged_attention(&q, &seqs, KvRows::F32(&kv), KvRows::F32(&vv), bs, nh, nkv, hd, Products::F32, &mut all);
            let err = all.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
            assert!(err < 2e-5, "paged_attention ({nh}, {nkv}, {hd}): max error {err}");
            // And over a bf16 cache, against the reference on the values it holds.
            let (kb, vb) = (to_bf16(&kv), to_bf16(&vv));
            let want = row_reference(&q, &seqs, shape, &widened(&kb), &widened(&vb));
            paged_attention(&q, &seqs, KvRows::Bf16(&kb), KvRows::Bf16(&vb), bs, nh, nkv, hd, Products::F32, &mut all);
            let err = all.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
            assert!(err < 2e-5, "paged_attention over a bf16 cache ({nh}, {nkv}, {hd}): max error {err}");
        }
    }

    /// The tiles with bf16 products (AVX-512 BF16), against the f32 row reference: close (Q, K,
    /// P and V rounded to bf16, sums in f32) but not equal, on KV tiles of odd length too.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tiled_prefill_in_bf16_is_close_to_the_row_reference() {
        use crate::backend::isa::Isa;
        use crate::backend::prefill_attention::{self, bf16_runs, Paged};
        if !bf16_runs(Isa::Avx512) {
            eprintln!("tiled prefill attention in bf16: not run, this CPU has no AVX-512 BF16");
            return;
        }
        for (nh, nkv, hd) in [(9, 3, 64), (4, 1, 128), (2, 2, 32)] {
            let (bs, blocks) = (16, 24);
            let shape = AttnShape { block_size: bs, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
            let kv = noise(blocks * bs * nkv * hd, 1);
            let vv = noise(blocks * bs * nkv * hd, 2);
            let t0: Vec<u32> = (0..12).rev().collect();
            let t1 = [13u32, 20, 14];
            let t2 = [22u32, 12, 16, 17];
            // 75 tokens at 100..175 (the last KV tile holds 47 positions: an odd count), 33 at 0
            // (packed for their several tiles), 7 at 50..57 (one tile, packing its own KV tiles).
            let seqs = [
                AttnSeq { row: 0, num_tokens: 75, start: 100, block_table: &t0 },
                AttnSeq { row: 75, num_tokens: 33, start: 0, block_table: &t1 },
                AttnSeq { row: 108, num_tokens: 7, start: 50, block_table: &t2 },
            ];
            let q: Vec<f32> = noise(115 * nh * hd, 3).iter().map(|x| 3.0 * x).collect();
            let want = row_reference(&q, &seqs, shape, &kv, &vv);
            let tiles: Vec<_> = seqs
                .iter()
                .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, nkv, 32))
                .collect();
            let paged = Paged {
                k: KvRows::F32(&kv),
                v: KvRows::F32(&vv),
                block_size: bs,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            // vdpbf16ps, then AMX tiles where they run: the same rounded operands, but scores
            // summed in another order can round a weight of P to the next bf16 value, so the
            // two agree to about one bf16 step (2^-8 of an output), not to f32's.
            let mut outs = Vec::new();
            for amx in [false, true].into_iter().filter(|&a| !a || prefill_attention::amx_products(hd)) {
                let mut got = vec![f32::NAN; q.len()];
                prefill_attention::run_with(&q, &tiles, paged, &mut got, Isa::Avx512, Products::Bf16, amx);
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let how = if amx { "AMX tiles" } else { "vdpbf16ps" };
                eprintln!(
                    "tiled prefill attention in bf16 ({how}), ({nh}, {nkv}, {hd}): max error {err:.2e} (largest output {scale:.2})"
                );
                assert!(err > 1e-5, "{how} ({nh}, {nkv}, {hd}): bf16 products should round, error {err}");
                assert!(err < 2e-2 * scale, "{how} ({nh}, {nkv}, {hd}): max error {err} against outputs up to {scale}");
                outs.push(got);
            }
            if let [vector, tiles] = &outs[..] {
                let apart = vector.iter().zip(tiles).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
                eprintln!("  vdpbf16ps and AMX tiles apart by up to {apart:.2e}");
                assert!(apart > 0.0 && apart < 4e-3, "({nh}, {nkv}, {hd}): the two bf16 kernels differ by {apart}");
            }
        }
    }

    /// Prompts that cross several KV tiles (256 positions each), with a few keys whose scores
    /// jump far past every earlier one: the softmax's running max settles, then must rise well
    /// past the lazy rescaling's bound (2^16) in a later KV tile. Every kernel against the row
    /// reference: f32 to f32's precision; bf16 (both kernels where they run) against the
    /// reference on bf16-rounded Q, K and V, so that what is left is P's rounding.
    #[test]
    fn tiled_prefill_rescales_when_later_scores_jump() {
        use crate::backend::isa::Isa;
        use crate::backend::prefill_attention::{self, bf16_runs, Paged};
        // head_dim 64: the kernels scale Q by 1/8 before rounding it, exactly as after.
        let (nh, nkv, hd, bs, blocks) = (4, 2, 64, 16, 44);
        let shape = AttnShape { block_size: bs, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
        let mut kv = noise(blocks * bs * nkv * hd, 1);
        let vv = noise(blocks * bs * nkv * hd, 2);
        let table: Vec<u32> = (0..blocks as u32).rev().collect();
        let slot = |pos: usize| table[pos / bs] as usize * bs + pos % bs;
        // Keys at these positions are 100 times louder: scores in the hundreds where the rest
        // stay within a few units.
        for pos in [300, 301, 302, 610, 611] {
            let at = slot(pos) * nkv * hd;
            kv[at..at + nkv * hd].iter_mut().for_each(|x| *x *= 100.0);
        }
        // A whole prompt of 700 tokens, and a chunk of 380 tokens starting at 300.
        let seqs = [
            AttnSeq { row: 0, num_tokens: 700, start: 0, block_table: &table },
            AttnSeq { row: 700, num_tokens: 380, start: 300, block_table: &table },
        ];
        let q: Vec<f32> = noise(1080 * nh * hd, 3).iter().map(|x| 3.0 * x).collect();
        // The test is only worth something if some query's max score after position 256 passes
        // its max before by more than the bound (16 in log2 units, 11.1 in the scores'), and by
        // more than f32's range (2^128, 88.7 in the scores'), so that weighing against the old
        // max without the bound would overflow.
        let score = |r: usize, h: usize, pos: usize| {
            let (qr, kr) = (&q[(r * nh + h) * hd..][..hd], &kv[(slot(pos) * nkv + h / (nh / nkv)) * hd..][..hd]);
            qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
        };
        let jumps = (600..700).any(|r| {
            (0..nh).any(|h| {
                let before = (0..256).map(|p| score(r, h, p)).fold(f32::MIN, f32::max);
                let after = (256..=r).map(|p| score(r, h, p)).fold(f32::MIN, f32::max);
                after - before > 100.0
            })
        });
        assert!(jumps, "no score jumps past the lazy bound: the test would not reach the rescale");
        let want = row_reference(&q, &seqs, shape, &kv, &vv);
        let paged = Paged {
            k: KvRows::F32(&kv),
            v: KvRows::F32(&vv),
            block_size: bs,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        for bq in [32, 128] {
            let tiles: Vec<_> = seqs
                .iter()
                .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, nkv, bq))
                .collect();
            let max_err = |got: &[f32]| got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; q.len()];
                prefill_attention::run_with(&q, &tiles, paged, &mut got, isa, Products::F32, false);
                let err = max_err(&got);
                eprintln!(
                    "tiled prefill with score jumps, {} kernel, {bq}-token tiles: max error {err:.2e}",
                    isa.name()
                );
                // A score of 300 holds f32's rounding times 300 (2e-5): the bound of the
                // test above, 2e-5, at 2.5 times.
                assert!(err < 5e-5, "{isa:?}, {bq}-token tiles: max error {err}");
            }
            if prefill_attention::amx_products(hd) {
                // f32 products as three bf16 ones: a score of 300 holds about 2^-16 of it
                // (5e-3), which moves its weight by as much; measured 5.7e-4 at the outputs.
                let mut got = vec![f32::NAN; q.len()];
                prefill_attention::run_with(&q, &tiles, paged, &mut got, Isa::Avx512, Products::F32, true);
                let err = max_err(&got);
                eprintln!("tiled prefill with score jumps, AMX tiles in three bf16 products, {bq}-token tiles: max error {err:.2e}");
                assert!(err < 2e-3, "AMX tiles in three bf16 products, {bq}-token tiles: max error {err}");
            }
            #[cfg(target_arch = "x86_64")]
            if bf16_runs(Isa::Avx512) {
                let round = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&x| f32::from_bits((x.to_bits() + 0x7fff + ((x.to_bits() >> 16) & 1)) & 0xffff_0000))
                        .collect()
                };
                let want = row_reference(&round(&q), &seqs, shape, &round(&kv), &round(&vv));
                for amx in [false, true].into_iter().filter(|&a| !a || prefill_attention::amx_products(hd)) {
                    let mut got = vec![f32::NAN; q.len()];
                    prefill_attention::run_with(&q, &tiles, paged, &mut got, Isa::Avx512, Products::Bf16, amx);
                    let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, worst);
                    let how = if amx { "AMX tiles" } else { "vdpbf16ps" };
                    eprintln!("tiled prefill with score jumps in bf16 ({how}), {bq}-token tiles: max error {err:.2e}");
                    assert!(err < 4e-3, "{how}, {bq}-token tiles: max error {err}");
                }
            }
        }
    }

    /// A tile whose block table points outside the cache is refused, not read.
    #[test]
    fn tiled_prefill_refuses_blocks_outside_the_cache() {
        use crate::backend::isa::Isa;
        use crate::backend::prefill_attention::{self, Paged};
        let (bs, nh, hd) = (4, 1, 16);
        let (kv, vv) = (noise(2 * bs * hd, 1), noise(2 * bs * hd, 2));
        let table = [1_000u32, 0];
        let tiles: Vec<_> = prefill_attention::tiles(0, 0, 6, &table, 1, 16).collect();
        let q = noise(6 * nh * hd, 3);
        let mut o = vec![0.0; q.len()];
        let paged = Paged {
            k: KvRows::F32(&kv),
            v: KvRows::F32(&vv),
            block_size: bs,
            num_heads: nh,
            num_kv_heads: 1,
            head_dim: hd,
        };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            prefill_attention::run(&q, &tiles, paged, &mut o, Isa::Portable, Products::F32)
        }));
        assert!(ran.is_err(), "an out-of-bounds block must be refused");
    }
}
