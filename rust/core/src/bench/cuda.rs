//! GPU benchmarks for `python -m horae.gpu_check`: paged decode attention against a
//! device-to-device copy of the same bytes measured in the same run, and a random-weight model's
//! decode and prefill throughput. Times come from CUDA events around repeated launches.

use cudarc::driver::{CudaSlice, CudaStream};

use crate::backend::attention::AttnSeq;
use crate::backend::cuda::device::Gpu;
use crate::backend::cuda::ops::{self, AttnDims, AttnIo, DecodeScratch, Dt, Ptr};
use crate::error::{HoraeError, Result};
use crate::model::cuda_llama::{CudaLlama, KvBudget};
use crate::model::llama::BatchInput;
use crate::model::ModelConfig;

fn err(e: impl std::fmt::Debug) -> HoraeError {
    HoraeError::Cuda(format!("{e:?}"))
}

/// Milliseconds per call of `f`, averaged over `iters` after `warmup` calls, by CUDA events.
pub fn time_ms(
    stream: &std::sync::Arc<CudaStream>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    // Timing events: cudarc's default flags disable timing.
    let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(timed).map_err(err)?;
    for _ in 0..iters {
        f()?;
    }
    let end = stream.record_event(timed).map_err(err)?;
    end.synchronize().map_err(err)?;
    Ok(start.elapsed_ms(&end).map_err(err)? as f64 / iters as f64)
}

/// Device-to-device copy bandwidth (GB/s, bytes read + written) over a buffer of `bytes`.
pub fn copy_gbps(gpu: &Gpu, bytes: usize) -> Result<f64> {
    let n = bytes / 2;
    let src: CudaSlice<u16> = gpu.stream.alloc_zeros(n).map_err(err)?;
    let mut dst: CudaSlice<u16> = gpu.stream.alloc_zeros(n).map_err(err)?;
    let ms = time_ms(&gpu.stream, 3, 20, || gpu.stream.memcpy_dtod(&src, &mut dst).map_err(err))?;
    Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
}

/// Figures of one decode-attention run.
#[derive(Debug, Clone)]
pub struct AttnBench {
    pub ms: f64,
    /// K and V bytes the kernel must read.
    pub kv_bytes: usize,
    pub gbps: f64,
    /// A device-to-device copy in the same run (read + write GB/s).
    pub copy_gbps: f64,
}

/// Paged decode attention over `batch` sequences of `ctx` tokens each, bf16, in a pool whose
/// blocks are handed out in shuffled order (as a long-running server's are).
pub fn decode_attention(
    gpu: &Gpu,
    batch: usize,
    ctx: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Result<AttnBench> {
    let dt = Dt::Bf16;
    let blocks_per = ctx.div_ceil(block_size);
    let total = batch * blocks_per;
    let kv_row = kv_heads * head_dim;
    let cache_len = total * block_size * kv_row;
    let k: CudaSlice<u16> = gpu.stream.alloc_zeros(cache_len).map_err(err)?;
    let v: CudaSlice<u16> = gpu.stream.alloc_zeros(cache_len).map_err(err)?;
    ops::fill_uniform(gpu, dt, Ptr::of(gpu, &k), cache_len, 1.0, 1)?;
    ops::fill_uniform(gpu, dt, Ptr::of(gpu, &v), cache_len, 1.0, 2)?;
    let q: CudaSlice<u16> = gpu.stream.alloc_zeros(batch * heads * head_dim).map_err(err)?;
    ops::fill_uniform(gpu, dt, Ptr::of(gpu, &q), batch * heads * head_dim, 1.0, 3)?;
    let out: CudaSlice<u16> = gpu.stream.alloc_zeros(batch * heads * head_dim).map_err(err)?;
    // A fixed permutation (multiplicative hash) of the block ids.
    let table: Vec<i32> = (0..total).map(|i| ((i * 7919) % total) as i32).collect();
    let (table, rows, ctxs) = (
        gpu.stream.clone_htod(&table).map_err(err)?,
        gpu.stream.clone_htod(&(0..batch as i32).collect::<Vec<_>>()).map_err(err)?,
        gpu.stream.clone_htod(&vec![ctx as i32; batch]).map_err(err)?,
    );
    let dims = AttnDims { num_heads: heads, num_kv_heads: kv_heads, head_dim, block_size, max_blocks: blocks_per };
    let mut scratch = DecodeScratch {
        out: gpu.stream.alloc_zeros(1).map_err(err)?,
        max: gpu.stream.alloc_zeros(1).map_err(err)?,
        sum: gpu.stream.alloc_zeros(1).map_err(err)?,
    };
    let p = |s: &CudaSlice<u16>| Ptr::of(gpu, s);
    let (qr, cl, bt) = (Ptr::of(gpu, &rows), Ptr::of(gpu, &ctxs), Ptr::of(gpu, &table));
    let ms = time_ms(&gpu.stream, 3, 20, || {
        let io = AttnIo::packed(p(&out), p(&q), heads * head_dim, p(&k), p(&v), bt);
        ops::paged_decode(gpu, dt, dims, io, qr, cl, batch, ctx, &mut scratch)
    })?;
    let kv_bytes = 2 * batch * ctx * kv_row * 2;
    let copy = copy_gbps(gpu, kv_bytes / 2)?;
    Ok(AttnBench { ms, kv_bytes, gbps: kv_bytes as f64 / (ms * 1e-3) / 1e9, copy_gbps: copy })
}

/// Figures of one model-throughput run.
#[derive(Debug, Clone)]
pub struct ModelBench {
    /// (batch, ms per decode step, tokens/s, weight + KV bytes read per step)
    pub decode: Vec<(usize, f64, f64, usize)>,
    /// (prompt tokens, ms, tokens/s)
    pub prefill: (usize, f64, f64),
    /// Weights in GEMMs per token (2 x params FLOPs per token).
    pub params: usize,
    pub weight_bytes: usize,
    pub copy_gbps: f64,
    pub gpu: String,
}

/// A random-weight model of `cfg`'s shapes: decode steps at each batch size with every sequence
/// at context `ctx`, and one prefill of `prefill_tokens` tokens.
pub fn model_throughput(
    gpu: Gpu,
    cfg: ModelConfig,
    batches: &[usize],
    ctx: usize,
    prefill_tokens: usize,
) -> Result<ModelBench> {
    let bs = 16;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let blocks_per = (ctx + 1).div_ceil(bs);
    let kv_tokens = (max_batch * blocks_per).max(prefill_tokens.div_ceil(bs)) * bs;
    let name = gpu.name.clone();
    let mut m = CudaLlama::random(
        gpu,
        cfg.clone(),
        Dt::Bf16,
        KvBudget::Tokens(kv_tokens),
        bs,
        prefill_tokens.max(max_batch),
        7,
    )?;
    let copy = copy_gbps(&m.gpu, 1 << 30)?;
    let kv_per_token = m.kv_bytes_per_token();
    let params = m.matmul_params;
    let stream = m.gpu.stream.clone();
    let mut decode = Vec::new();
    for &b in batches {
        let tables: Vec<Vec<u32>> =
            (0..b).map(|s| ((s * blocks_per) as u32..((s + 1) * blocks_per) as u32).collect()).collect();
        let input = BatchInput {
            tokens: (0..b).map(|i| (i * 31 % cfg.vocab_size) as u32).collect(),
            positions: vec![ctx; b],
            slots: tables.iter().map(|t| t[ctx / bs] as usize * bs + ctx % bs).collect(),
            seqs: tables
                .iter()
                .enumerate()
                .map(|(i, t)| AttnSeq { row: i, num_tokens: 1, start: ctx, block_table: t })
                .collect(),
            logit_rows: (0..b).collect(),
        };
        let ms = time_ms(&stream, 2, 10, || m.forward(&input))?;
        decode.push((b, ms, b as f64 / (ms * 1e-3), m.weight_bytes + b * (ctx + 1) * kv_per_token));
    }
    let table: Vec<u32> = (0..prefill_tokens.div_ceil(bs) as u32).collect();
    let input = BatchInput {
        tokens: (0..prefill_tokens).map(|i| (i * 17 % cfg.vocab_size) as u32).collect(),
        positions: (0..prefill_tokens).collect(),
        slots: (0..prefill_tokens).collect(),
        seqs: vec![AttnSeq { row: 0, num_tokens: prefill_tokens, start: 0, block_table: &table }],
        logit_rows: vec![prefill_tokens - 1],
    };
    let ms = time_ms(&stream, 1, 5, || m.forward(&input))?;
    Ok(ModelBench {
        decode,
        prefill: (prefill_tokens, ms, prefill_tokens as f64 / (ms * 1e-3)),
        params,
        weight_bytes: m.weight_bytes,
        copy_gbps: copy,
        gpu: name,
    })
}
