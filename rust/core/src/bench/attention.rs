//! Prefill attention: the tiled kernel (`backend::prefill_attention`) with every instruction set
//! the CPU runs, against the row kernel it replaced for prefill chunks, on one prompt in the same
//! run (`horae bench model` prints it).

use crate::backend::attention::{attention_by_rows, AttnSeq};
use crate::backend::gemm::Products;
use crate::backend::isa::Isa;
use crate::backend::kv_cache::KvRows;
use crate::backend::prefill_attention::{amx_products, bf16_runs, query_tile, run, run_with, tiles, Paged};

/// Seconds for one layer's attention over a `tokens`-token prompt with the given heads: the row
/// kernel first, then the tiled one for each kernel name the CPU runs (f32 products, and bf16
/// ones where the CPU has AVX-512 BF16, and on AMX tiles where they run); each the best of `iters`.
pub fn compare_prefill_attention(
    tokens: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    iters: usize,
) -> (f64, Vec<(&'static str, f64)>) {
    let bs = 16;
    let blocks = tokens.div_ceil(bs);
    let kv_len = blocks * bs * num_kv_heads * head_dim;
    let k: Vec<f32> = (0..kv_len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let v: Vec<f32> = (0..kv_len).map(|i| ((i * 6007) % 1000) as f32 / 1000.0 - 0.5).collect();
    let q: Vec<f32> = (0..tokens * num_heads * head_dim).map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut out = vec![0.0; q.len()];
    let best = |f: &mut dyn FnMut()| {
        (0..iters.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let seq = [AttnSeq { row: 0, num_tokens: tokens, start: 0, block_table: &table }];
    let paged = Paged { k: KvRows::F32(&k), v: KvRows::F32(&v), block_size: bs, num_heads, num_kv_heads, head_dim };
    let rows = best(&mut || attention_by_rows(&q, &seq, paged, &mut out));
    let ts: Vec<_> = tiles(0, 0, tokens, &table, num_kv_heads, query_tile(tokens, num_kv_heads)).collect();
    let mut tiled: Vec<_> = Isa::available()
        .into_iter()
        .map(|isa| (isa.name(), best(&mut || run_with(&q, &ts, paged, &mut out, isa, Products::F32, false))))
        .collect();
    if amx_products(head_dim) {
        // What an f32 or quantized model's prefill runs where AMX tiles run: f32 products as three
        // bf16 ones.
        tiled.push(("amx f32 (bf16x3)", best(&mut || run(&q, &ts, paged, &mut out, Isa::best(), Products::F32))));
    }
    #[cfg(target_arch = "x86_64")]
    if bf16_runs(Isa::Avx512) {
        // What a bf16 model's prefill runs: bf16 products through `vdpbf16ps`, or on AMX tiles
        // where they run.
        tiled.push((
            "avx512 bf16",
            best(&mut || run_with(&q, &ts, paged, &mut out, Isa::Avx512, Products::Bf16, false)),
        ));
        if amx_products(head_dim) {
            tiled.push((
                "amx bf16",
                best(&mut || run_with(&q, &ts, paged, &mut out, Isa::Avx512, Products::Bf16, true)),
            ));
        }
    }
    (rows, tiled)
}
