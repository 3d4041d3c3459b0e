//! The KV side of prefill attention's tiles: each (sequence, KV head) history gathered from the
//! paged cache and put in the operand form of the kernel that multiplies it (`Kernel`), in
//! tiles of `BK` positions, once per call where several query tiles read it.

use rayon::prelude::*;

use super::{bf16_dot, fresh, k_pairs, Kernel, Paged, Tile, BK, SCRATCH};

/// The KV history of each (sequence, KV head) that more than one of a call's tiles read,
/// gathered from the paged cache and put in its kernel's operand form once per call, in tiles of
/// `BK` positions (`gather`, `pack_pairs`). Gathering per query tile did it once for each of a sequence's
/// query tiles: with 6,000 tokens, 47 times, a third of the time on AMX (a Xeon, 2 threads). A
/// stream that one tile reads (a short chunk, or draft tokens to verify) is not packed: its tile
/// packs each KV tile as it goes, so the packed copies stay within the long prompts' histories.
pub(super) struct Streams<'a> {
    kernel: Kernel,
    /// Each stream's history.
    reads: Vec<Read<'a>>,
    /// Where each stream's packed tiles begin (in tiles), and one past its last; a stream not
    /// packed has none.
    first_tile: Vec<usize>,
    /// The packed tiles: `F32`'s, or the bf16 kernels'.
    f32: Vec<f32>,
    pairs: Vec<u32>,
    /// The stream of each tile of work.
    pub(super) of_tile: Vec<usize>,
}

/// One stream: KV head `kvh`'s history up to position `len`, through `block_table`.
#[derive(Clone, Copy)]
pub(super) struct Read<'a> {
    kvh: usize,
    len: usize,
    block_table: &'a [u32],
}

/// Where an attention tile reads its KV tiles.
#[derive(Clone, Copy)]
pub(super) enum Stream<'a> {
    /// Packed, `tile_len(kernel, d)` values a KV tile.
    F32(&'a [f32]),
    Pairs(&'a [u32]),
    /// Not packed: the tile packs each KV tile itself.
    Read(Read<'a>),
}

/// One KV tile in its kernel's operand form (`tile_len` values; `Kernel` says the layout).
#[derive(Clone, Copy)]
pub(super) enum KvTile<'a> {
    F32(&'a [f32]),
    Pairs(&'a [u32]),
}

/// Values (f32 or u32 pairs) in one packed KV tile of `kernel`.
pub(super) fn tile_len(kernel: Kernel, d: usize) -> usize {
    match kernel {
        Kernel::F32 => 2 * BK * d,
        Kernel::Bf16 | Kernel::Amx => BK * d,
        // Two bf16 values a value: K's rows (hi, lo) and V^T's.
        Kernel::AmxSplit => 2 * BK * d,
    }
}

impl<'a> Streams<'a> {
    pub(super) fn pack(tiles: &[Tile<'a>], kv: Paged<'_>, kernel: Kernel) -> Streams<'a> {
        // Streams in order of first appearance; each reads up to its tiles' last position.
        let mut keys: Vec<(usize, usize)> = Vec::new();
        let mut reads: Vec<Read<'a>> = Vec::new();
        let mut readers: Vec<usize> = Vec::new();
        let mut of_tile = Vec::with_capacity(tiles.len());
        for t in tiles {
            let key = (t.row, t.kvh);
            let i = keys.iter().position(|&k| k == key).unwrap_or_else(|| {
                keys.push(key);
                reads.push(Read { kvh: t.kvh, len: 0, block_table: t.block_table });
                readers.push(0);
                keys.len() - 1
            });
            reads[i].len = reads[i].len.max(t.start + t.t1);
            readers[i] += 1;
            of_tile.push(i);
        }
        let mut first_tile = vec![0];
        for (r, &n) in reads.iter().zip(&readers) {
            first_tile.push(first_tile.last().unwrap() + if n > 1 { r.len.div_ceil(BK) } else { 0 });
        }
        // (stream, first position) of every packed tile.
        let jobs: Vec<(usize, usize)> = (0..reads.len())
            .filter(|&i| readers[i] > 1)
            .flat_map(|i| (0..reads[i].len).step_by(BK).map(move |j0| (i, j0)))
            .collect();
        let len = tile_len(kernel, kv.head_dim);
        let mut streams = Streams { kernel, reads, first_tile, f32: Vec::new(), pairs: Vec::new(), of_tile };
        if kernel == Kernel::F32 {
            streams.f32 = vec![0.0; jobs.len() * len];
            let reads = &streams.reads;
            streams.f32.par_chunks_mut(len).zip(&jobs).for_each(|(tile, &(i, j0))| {
                let (k, v) = tile.split_at_mut(BK * kv.head_dim);
                gather(kv, reads[i], j0, k, v);
            });
        } else {
            streams.pairs = vec![0; jobs.len() * len];
            let reads = &streams.reads;
            streams.pairs.par_chunks_mut(len).zip(&jobs).for_each(|(tile, &(i, j0))| {
                SCRATCH.with_borrow_mut(|s| pack_pairs(kv, reads[i], j0, kernel, tile, &mut s.packing))
            });
        }
        streams
    }

    pub(super) fn stream(&self, i: usize, d: usize) -> Stream<'_> {
        let (a, b) = (self.first_tile[i], self.first_tile[i + 1]);
        let len = tile_len(self.kernel, d);
        match self.kernel {
            _ if a == b => Stream::Read(self.reads[i]),
            Kernel::F32 => Stream::F32(&self.f32[a * len..b * len]),
            Kernel::Bf16 | Kernel::Amx | Kernel::AmxSplit => Stream::Pairs(&self.pairs[a * len..b * len]),
        }
    }
}

/// K and V rows of positions `j0..j0 + BK` of `read` (those before its end) from the paged
/// cache into `k` and `v` (`[BK][d]` each, f32 whatever the cache holds); rows past the end are
/// left as they are.
pub(super) fn gather(kv: Paged<'_>, read: Read<'_>, j0: usize, k: &mut [f32], v: &mut [f32]) {
    let d = kv.head_dim;
    let kv_row = kv.num_kv_heads * d;
    for c in 0..BK.min(read.len - j0) {
        let p = j0 + c;
        let slot = read.block_table[p / kv.block_size] as usize * kv.block_size + p % kv.block_size;
        let off = slot * kv_row + read.kvh * d;
        kv.k.read(off, &mut k[c * d..(c + 1) * d]);
        kv.v.read(off, &mut v[c * d..(c + 1) * d]);
    }
}

/// Buffers for packing a KV tile in bf16 pairs.
#[derive(Default)]
pub(super) struct Packing {
    /// The tile's K and V rows, `[BK][d]` each.
    k: Vec<f32>,
    v: Vec<f32>,
    /// V's pairs `[BK / 2][d]`, for AMX on their way to V^T.
    v2: Vec<u32>,
    /// For `AmxSplit`, what bf16 leaves of a K row and of V (`bf16_dot::residual`), and V's pairs of it.
    k_lo: Vec<f32>,
    v_lo: Vec<f32>,
    v2_lo: Vec<u32>,
}

/// KV tile `j0..j0 + BK` of `read` as the bf16 kernels take it, into `tile` (`tile_len` pairs):
/// K's pairs along d, `[BK][d / 2]`, then V's pairs along the positions, `[BK / 2][d]`, or for
/// AMX V^T's, `[d][BK / 2]`. For `AmxSplit` each K row is (hi, lo), `[BK][d]`, and each V^T
/// row (hi, lo), `[d][BK]`. Positions past the stream's end are zero.
pub(super) fn pack_pairs(kv: Paged<'_>, read: Read<'_>, j0: usize, kernel: Kernel, tile: &mut [u32], p: &mut Packing) {
    let d = kv.head_dim;
    let split = kernel == Kernel::AmxSplit;
    fresh(&mut p.k, BK * d, 0.0);
    fresh(&mut p.v, BK * d, 0.0);
    gather(kv, read, j0, &mut p.k, &mut p.v);
    let kp = k_pairs(kernel, d);
    let (k2, v2) = tile.split_at_mut(BK * kp);
    p.k_lo.resize(d, 0.0);
    for (k, pairs) in p.k.chunks_exact(d).zip(k2.chunks_exact_mut(kp)) {
        bf16_dot::pair_along(k, &mut pairs[..d / 2]);
        if split {
            bf16_dot::residual(k, &mut p.k_lo);
            bf16_dot::pair_along(&p.k_lo, &mut pairs[d / 2..]);
        }
    }
    let pair_v = |v: &[f32], out: &mut [u32]| {
        for (c, pair) in out.chunks_exact_mut(d).enumerate() {
            bf16_dot::pair_rows(&v[2 * c * d..][..d], Some(&v[(2 * c + 1) * d..][..d]), pair);
        }
    };
    if kernel == Kernel::Bf16 {
        pair_v(&p.v, v2);
        return;
    }
    p.v2.resize(BK / 2 * d, 0);
    pair_v(&p.v, &mut p.v2);
    if !split {
        // Transposed to `[d][BK / 2]` (four times faster than pairing in place).
        for (dd, row) in v2.chunks_exact_mut(BK / 2).enumerate() {
            row.iter_mut().enumerate().for_each(|(c, x)| *x = p.v2[c * d + dd]);
        }
        return;
    }
    p.v_lo.resize(BK * d, 0.0);
    bf16_dot::residual(&p.v, &mut p.v_lo);
    p.v2_lo.resize(BK / 2 * d, 0);
    pair_v(&p.v_lo, &mut p.v2_lo);
    for (dd, row) in v2.chunks_exact_mut(BK).enumerate() {
        let (hi, lo) = row.split_at_mut(BK / 2);
        hi.iter_mut().enumerate().for_each(|(c, x)| *x = p.v2[c * d + dd]);
        lo.iter_mut().enumerate().for_each(|(c, x)| *x = p.v2_lo[c * d + dd]);
    }
}
