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

/// K and V of a paged cache of `blocks` blocks of noise, and the cache's shape.
fn noisy_cache(bs: usize, blocks: usize, nh: usize, nkv: usize, hd: usize) -> (AttnShape, Vec<f32>, Vec<f32>) {
    let shape = AttnShape { block_size: bs, num_heads: nh, num_kv_heads: nkv, head_dim: hd };
    (shape, noise(blocks * bs * nkv * hd, 1), noise(blocks * bs * nkv * hd, 2))
}

/// `rows` query rows of noise, three times the cache's, so that the softmaxes are not flat.
fn noisy_queries(rows: usize, shape: AttnShape) -> Vec<f32> {
    noise(rows * shape.num_heads * shape.head_dim, 3).iter().map(|x| 3.0 * x).collect()
}

/// An f32 cache as the prefill tiles and the row path read it.
fn f32_paged<'a>(k: &'a [f32], v: &'a [f32], shape: AttnShape) -> Paged<'a> {
    let AttnShape { block_size, num_heads, num_kv_heads, head_dim } = shape;
    Paged { k: KvRows::F32(k), v: KvRows::F32(v), block_size, num_heads, num_kv_heads, head_dim }
}

/// A block table whose last block is in the cache but an earlier one is not: the row path
/// must refuse it (a panic) instead of reading past the cache. It used to check only the
/// last slot.
#[test]
fn rows_check_the_largest_slot_not_the_last() {
    let (bs, blocks, nh, hd) = (4, 2, 1, 32);
    let (shape, kv, vv) = noisy_cache(bs, blocks, nh, 1, hd);
    let table = [1_000u32, 0]; // block 1000 is far outside a 2-block cache
    let seqs = [AttnSeq { row: 0, num_tokens: 1, start: 5, block_table: &table }];
    let q = noisy_queries(1, shape);
    let mut o = vec![0.0; nh * hd];
    let paged = f32_paged(&kv, &vv, shape);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attention_by_rows(&q, &seqs, paged, &mut o)));
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
        let (shape, kv, vv) = noisy_cache(bs, blocks, nh, nkv, hd);
        let (t0, t1, t2) = ([3u32, 0, 7], [5u32, 1, 9, 2, 11], [4u32]);
        let t3: Vec<u32> = (12..56).rev().collect(); // 704 positions, blocks in reverse
                                                     // rows: 5 prefill tokens at positions 30..35, decodes at 70, 0 and 699.
        let seqs = [
            AttnSeq { row: 0, num_tokens: 5, start: 30, block_table: &t0 },
            AttnSeq { row: 5, num_tokens: 1, start: 70, block_table: &t1 },
            AttnSeq { row: 6, num_tokens: 1, start: 0, block_table: &t2 },
            AttnSeq { row: 7, num_tokens: 1, start: 699, block_table: &t3 },
        ];
        let q = noisy_queries(8, shape);
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
        let kernel =
            move |q: &[f32], s: &[usize], kvh, p: &mut [f32]| unsafe { simd::attend_piece_512(q, s, kvh, cache, p) };
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
    use crate::backend::prefill_attention;
    // Groups of 1, 3, 4, 5 and 7 heads: the kernels take up to 2 (AVX2) or 4 (AVX-512) at a
    // time, so 5 and 7 run in chunks with a remainder.
    for (nh, nkv, hd) in [(9, 3, 64), (4, 1, 128), (2, 2, 32), (3, 3, 16), (10, 2, 64), (7, 1, 32)] {
        let (bs, blocks) = (16, 24);
        let (shape, kv, vv) = noisy_cache(bs, blocks, nh, nkv, hd);
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
        let q = noisy_queries(116, shape);
        let want = row_reference(&q, &seqs, shape, &kv, &vv);
        let tiles: Vec<_> = seqs
            .iter()
            .filter(|s| s.num_tokens > 1)
            .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, nkv, 32))
            .collect();
        let paged = f32_paged(&kv, &vv, shape);
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
    use crate::backend::prefill_attention::{self, bf16_runs};
    if !bf16_runs(Isa::Avx512) {
        eprintln!("tiled prefill attention in bf16: not run, this CPU has no AVX-512 BF16");
        return;
    }
    for (nh, nkv, hd) in [(9, 3, 64), (4, 1, 128), (2, 2, 32)] {
        let (bs, blocks) = (16, 24);
        let (shape, kv, vv) = noisy_cache(bs, blocks, nh, nkv, hd);
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
        let q = noisy_queries(115, shape);
        let want = row_reference(&q, &seqs, shape, &kv, &vv);
        let tiles: Vec<_> = seqs
            .iter()
            .flat_map(|s| prefill_attention::tiles(s.row, s.start, s.num_tokens, s.block_table, nkv, 32))
            .collect();
        let paged = f32_paged(&kv, &vv, shape);
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
    use crate::backend::prefill_attention::{self, bf16_runs};
    // head_dim 64: the kernels scale Q by 1/8 before rounding it, exactly as after.
    let (nh, nkv, hd, bs, blocks) = (4, 2, 64, 16, 44);
    let (shape, mut kv, vv) = noisy_cache(bs, blocks, nh, nkv, hd);
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
    let q = noisy_queries(1080, shape);
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
    let paged = f32_paged(&kv, &vv, shape);
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
            eprintln!("tiled prefill with score jumps, {} kernel, {bq}-token tiles: max error {err:.2e}", isa.name());
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
    use crate::backend::prefill_attention;
    let (bs, nh, hd) = (4, 1, 16);
    let (shape, kv, vv) = noisy_cache(bs, 2, nh, 1, hd);
    let table = [1_000u32, 0];
    let tiles: Vec<_> = prefill_attention::tiles(0, 0, 6, &table, 1, 16).collect();
    let q = noisy_queries(6, shape);
    let mut o = vec![0.0; q.len()];
    let paged = f32_paged(&kv, &vv, shape);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prefill_attention::run(&q, &tiles, paged, &mut o, Isa::Portable, Products::F32)
    }));
    assert!(ran.is_err(), "an out-of-bounds block must be refused");
}
