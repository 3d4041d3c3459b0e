//! One Rust function per kernel, with the kernel's exact argument list. Buffers are passed as raw
//! device addresses (`Ptr`), so a kernel can read a slice of a larger buffer (the q part of the
//! fused QKV rows, say) without a copy; the caller keeps the buffers alive until the stream has
//! run (the model holds them for the whole step).

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::device::Gpu;
use crate::error::{HoraeError, Result};

/// Activation and KV dtype of the GPU model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    Bf16,
    F16,
}

impl Dt {
    fn suffix(self) -> &'static str {
        match self {
            Dt::Bf16 => "bf16",
            Dt::F16 => "f16",
        }
    }
    /// f32 to the 16-bit storage value, rounding to nearest even (as the kernels' `cvt.rn`).
    pub fn encode(self, x: f32) -> u16 {
        match self {
            Dt::Bf16 => half::bf16::from_f32(x).to_bits(),
            Dt::F16 => half::f16::from_f32(x).to_bits(),
        }
    }
    pub fn decode(self, x: u16) -> f32 {
        match self {
            Dt::Bf16 => half::bf16::from_bits(x).to_f32(),
            Dt::F16 => half::f16::from_bits(x).to_f32(),
        }
    }
}

/// A raw device address (an element offset already applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ptr(pub u64);

impl Ptr {
    pub const NULL: Ptr = Ptr(0);
    pub fn of<T>(gpu: &Gpu, s: &CudaSlice<T>) -> Ptr {
        let (p, _sync) = s.device_ptr(&gpu.stream);
        Ptr(p)
    }
    /// `elems` elements of `T` further on.
    pub fn offset<T>(self, elems: usize) -> Ptr {
        Ptr(self.0 + (elems * std::mem::size_of::<T>()) as u64)
    }
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: smem }
}

/// Push every argument and launch; an empty grid launches nothing.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let c: LaunchConfig = $cfg;
        if c.grid_dim.0 == 0 || c.grid_dim.1 == 0 || c.grid_dim.2 == 0 {
            Ok(())
        } else {
            let name: &str = &$name;
            let f = $gpu.function(name)?;
            let mut b = $gpu.stream.launch_builder(&f);
            $( b.arg(&$arg); )+
            // SAFETY: the argument list matches the kernel's signature (one function per kernel,
            // kept next to it), and the caller keeps every buffer alive until the stream has run.
            unsafe { b.launch(c) }.map(|_| ()).map_err(|e| HoraeError::Cuda(format!("launching {name}: {e:?}")))
        }
    }};
}

fn i32_of(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| HoraeError::Cuda(format!("{what} = {n} does not fit the kernels' 32-bit index")))
}

/// `residual[rows[b]] += delta[rows[b]]` (delta may be NULL), then `out[b] = rmsnorm(residual)`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    gpu: &Gpu,
    dt: Dt,
    out: Ptr,
    residual: Ptr,
    delta: Ptr,
    weight: Ptr,
    rows: Ptr,
    n: usize,
    hidden: usize,
    eps: f32,
) -> Result<()> {
    let (out, residual, delta, weight, rows) = (out.0, residual.0, delta.0, weight.0, rows.0);
    let h = i32_of(hidden, "hidden")?;
    launch!(
        gpu,
        format!("add_rms_norm_{}", dt.suffix()),
        cfg((n as u32, 1, 1), 256, 0),
        out,
        residual,
        delta,
        weight,
        rows,
        h,
        eps
    )
}

#[allow(clippy::too_many_arguments)]
/// Rotary embedding in place on the first `rot_heads` heads of each fused QKV row.
pub fn rope(
    gpu: &Gpu,
    dt: Dt,
    qkv: Ptr,
    row_stride: usize,
    positions: Ptr,
    inv_freq: Ptr,
    tokens: usize,
    rot_heads: usize,
    head_dim: usize,
) -> Result<()> {
    let (qkv, positions, inv_freq) = (qkv.0, positions.0, inv_freq.0);
    let (stride, rh, hd) = (row_stride as i64, i32_of(rot_heads, "heads")?, i32_of(head_dim, "head_dim")?);
    let threads = (head_dim as u32 / 2).next_multiple_of(32);
    launch!(
        gpu,
        format!("rope_neox_{}", dt.suffix()),
        cfg((tokens as u32, 1, 1), threads, 0),
        qkv,
        stride,
        positions,
        inv_freq,
        rh,
        hd
    )
}

pub fn silu_and_mul(gpu: &Gpu, dt: Dt, out: Ptr, gate_up: Ptr, tokens: usize, inter: usize) -> Result<()> {
    let (out, gate_up, inter) = (out.0, gate_up.0, i32_of(inter, "intermediate_size")?);
    launch!(gpu, format!("silu_and_mul_{}", dt.suffix()), cfg((tokens as u32, 1, 1), 256, 0), out, gate_up, inter)
}

#[allow(clippy::too_many_arguments)]
/// Embedding rows of `tokens` (i32) into the f32 residual stream.
pub fn embedding(
    gpu: &Gpu,
    dt: Dt,
    out: Ptr,
    table: Ptr,
    tokens: Ptr,
    n: usize,
    hidden: usize,
    vocab: usize,
) -> Result<()> {
    let (out, table, tokens) = (out.0, table.0, tokens.0);
    let (h, v) = (i32_of(hidden, "hidden")?, i32_of(vocab, "vocab")?);
    launch!(gpu, format!("embedding_{}", dt.suffix()), cfg((n as u32, 1, 1), 256, 0), out, table, tokens, h, v)
}

/// New K/V rows (stride `src_stride` elements) into their cache slots (i64, -1 = skip).
#[allow(clippy::too_many_arguments)]
pub fn reshape_and_cache(
    gpu: &Gpu,
    k_cache: Ptr,
    v_cache: Ptr,
    k: Ptr,
    v: Ptr,
    src_stride: usize,
    slots: Ptr,
    tokens: usize,
    row: usize,
) -> Result<()> {
    if !row.is_multiple_of(8) {
        return Err(HoraeError::Cuda(format!("KV row of {row} values is not a multiple of 8")));
    }
    let (kc, vc, k, v, slots) = (k_cache.0, v_cache.0, k.0, v.0, slots.0);
    let (stride, row) = (src_stride as i64, i32_of(row, "kv row")?);
    launch!(gpu, "reshape_and_cache", cfg((tokens as u32, 1, 1), 128, 0), kc, vc, k, v, stride, slots, row)
}

/// Shapes shared by the attention kernels.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Width of the block-table matrix (entries per sequence).
    pub max_blocks: usize,
}

impl AttnDims {
    /// Whether these shapes have kernels (`decode`: the decode kernel's limits too).
    pub fn check(&self, decode: bool) -> Result<()> {
        let group = self.num_heads / self.num_kv_heads.max(1);
        if !matches!(self.head_dim, 64 | 128) {
            return Err(HoraeError::Cuda(format!(
                "head_dim {} has no CUDA attention kernel (64 or 128); use device='cpu'",
                self.head_dim
            )));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) || (decode && group > MAX_GROUP)
        {
            return Err(HoraeError::Cuda(format!(
                "{} query heads over {} KV heads: the CUDA decode kernel serves GQA groups of up to {MAX_GROUP}; use device='cpu'",
                self.num_heads, self.num_kv_heads
            )));
        }
        if decode && !matches!(self.block_size, 16 | 32) {
            return Err(HoraeError::Cuda(format!(
                "the CUDA backend runs block_size 16 or 32, got {}",
                self.block_size
            )));
        }
        Ok(())
    }
}

/// Query heads one decode CTA serves (kernels/paged_decode.cu MAX_GROUP).
pub const MAX_GROUP: usize = 8;
/// Context tokens per decode partition (kernels/paged_decode.cu PARTITION).
pub const PARTITION: usize = 512;

/// Scratch for split-K decode: per (sequence, head, partition) an output row, a max and a sum.
pub struct DecodeScratch {
    pub out: CudaSlice<f32>,
    pub max: CudaSlice<f32>,
    pub sum: CudaSlice<f32>,
}

/// Where an attention launch reads and writes: the query rows (q heads at the start of each
/// fused QKV row, `q_stride` values apart), the output rows, the layer's K and V caches and the
/// `[seqs, max_blocks]` i32 block tables.
#[derive(Clone, Copy, Debug)]
pub struct AttnIo {
    pub out: Ptr,
    pub out_stride: usize,
    pub q: Ptr,
    pub q_stride: usize,
    pub k_cache: Ptr,
    pub v_cache: Ptr,
    pub block_tables: Ptr,
}

impl AttnIo {
    /// Queries and outputs in their own packed `[rows, row_len]` buffers (benchmarks, tests);
    /// the model reads its queries out of the fused QKV rows instead.
    pub fn packed(out: Ptr, q: Ptr, row_len: usize, k_cache: Ptr, v_cache: Ptr, block_tables: Ptr) -> Self {
        Self { out, out_stride: row_len, q, q_stride: row_len, k_cache, v_cache, block_tables }
    }
}

/// Paged decode attention for `seqs` single-token queries: q row `q_rows[i]` (i32) at context
/// length `ctx_lens[i]`, output written to the same row of `io.out`. `max_ctx` bounds the
/// partitions.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    gpu: &Gpu,
    dt: Dt,
    d: AttnDims,
    io: AttnIo,
    q_rows: Ptr,
    ctx_lens: Ptr,
    seqs: usize,
    max_ctx: usize,
    scratch: &mut DecodeScratch,
) -> Result<()> {
    d.check(true)?;
    let parts = max_ctx.div_ceil(PARTITION).max(1);
    let need = seqs * d.num_heads * parts;
    if parts > 1 && scratch.max.len() < need {
        scratch.out = gpu
            .stream
            .alloc_zeros(need * d.head_dim)
            .map_err(|e| HoraeError::Cuda(format!("decode scratch: {e:?}")))?;
        scratch.max = gpu.stream.alloc_zeros(need).map_err(|e| HoraeError::Cuda(format!("decode scratch: {e:?}")))?;
        scratch.sum = gpu.stream.alloc_zeros(need).map_err(|e| HoraeError::Cuda(format!("decode scratch: {e:?}")))?;
    }
    let (po, pm, ps) = (Ptr::of(gpu, &scratch.out).0, Ptr::of(gpu, &scratch.max).0, Ptr::of(gpu, &scratch.sum).0);
    let (o, q, qr, kc, vc, bt, cl) =
        (io.out.0, io.q.0, q_rows.0, io.k_cache.0, io.v_cache.0, io.block_tables.0, ctx_lens.0);
    let (qs, os) = (io.q_stride as i64, io.out_stride as i64);
    let (mb, nh, nkv, mp) =
        (i32_of(d.max_blocks, "max_blocks")?, d.num_heads as i32, d.num_kv_heads as i32, parts as i32);
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let name = format!("paged_decode_{}_hd{}_bs{}", dt.suffix(), d.head_dim, d.block_size);
    let grid = (d.num_kv_heads as u32, seqs as u32, parts as u32);
    launch!(gpu, name, cfg(grid, 128, 0), o, po, pm, ps, q, qr, qs, os, kc, vc, bt, mb, cl, nh, nkv, scale, mp)?;
    if parts > 1 {
        let name = format!("paged_decode_reduce_{}_hd{}", dt.suffix(), d.head_dim);
        let smem = (parts * 4) as u32;
        launch!(gpu, name, cfg((d.num_heads as u32, seqs as u32, 1), 128, smem), o, po, pm, ps, qr, os, cl, nh, mp)?;
    }
    Ok(())
}

/// Per-sequence and per-tile metadata of a prefill-attention launch (all i32 device arrays).
pub struct PrefillMeta {
    pub tile_seq: Ptr,
    pub tile_q0: Ptr,
    pub seq_row: Ptr,
    pub seq_qlen: Ptr,
    pub seq_pos0: Ptr,
    pub tiles: usize,
}

/// Query rows per prefill tile (kernels/prefill_attention.cu BQ).
pub const PREFILL_TILE: usize = 32;

pub fn prefill_attention(gpu: &Gpu, dt: Dt, d: AttnDims, io: AttnIo, m: &PrefillMeta) -> Result<()> {
    d.check(false)?;
    let (o, q, kc, vc, bt) = (io.out.0, io.q.0, io.k_cache.0, io.v_cache.0, io.block_tables.0);
    let (os, qs) = (io.out_stride as i64, io.q_stride as i64);
    let (ts, tq, sr, sq, sp) = (m.tile_seq.0, m.tile_q0.0, m.seq_row.0, m.seq_qlen.0, m.seq_pos0.0);
    let (mb, bs, nh, nkv) =
        (i32_of(d.max_blocks, "max_blocks")?, d.block_size as i32, d.num_heads as i32, d.num_kv_heads as i32);
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let name = format!("prefill_attention_{}_hd{}", dt.suffix(), d.head_dim);
    launch!(
        gpu,
        name,
        cfg((m.tiles as u32, d.num_heads as u32, 1), 128, 0),
        o,
        os,
        q,
        qs,
        kc,
        vc,
        bt,
        mb,
        bs,
        ts,
        tq,
        sr,
        sq,
        sp,
        nh,
        nkv,
        scale
    )
}

/// Greedy tokens of logits rows `rows[0..n]` (i32) into `out[0..n]`.
pub fn argmax(gpu: &Gpu, out: Ptr, logits: Ptr, rows: Ptr, n: usize, vocab: usize) -> Result<()> {
    let (out, logits, r, v) = (out.0, logits.0, rows.0, i32_of(vocab, "vocab")?);
    launch!(gpu, "argmax_f32", cfg((n as u32, 1, 1), 1024, 0), out, logits, r, v)
}

/// Per-row parameters of `sample` (device arrays of `rows` values; uniforms `rows x rounds`).
pub struct SampleArgs {
    pub temperature: Ptr,
    pub top_k: Ptr,
    pub top_p: Ptr,
    pub min_p: Ptr,
    pub uniforms: Ptr,
    pub rounds: usize,
}

/// Temperature / top-k / min-p / top-p draws of logits rows `rows[0..n]` into `out[0..n]`.
pub fn sample(gpu: &Gpu, out: Ptr, logits: Ptr, rows: Ptr, n: usize, vocab: usize, a: &SampleArgs) -> Result<()> {
    let (out, logits, rr, v) = (out.0, logits.0, rows.0, i32_of(vocab, "vocab")?);
    let (t, k, p, mp, u, r) = (a.temperature.0, a.top_k.0, a.top_p.0, a.min_p.0, a.uniforms.0, a.rounds as i32);
    launch!(gpu, "sample_f32", cfg((n as u32, 1, 1), 512, 0), out, logits, rr, v, t, k, p, mp, u, r)
}

/// Fill `n` values with a uniform in [-scale, scale] derived from `seed` and the index (random
/// weights for benchmarks without a checkpoint).
pub fn fill_uniform(gpu: &Gpu, dt: Dt, out: Ptr, n: usize, scale: f32, seed: u64) -> Result<()> {
    let (out, n64) = (out.0, n as i64);
    let blocks = n.div_ceil(256).min(65535 * 16) as u32;
    launch!(gpu, format!("fill_uniform_{}", dt.suffix()), cfg((blocks, 1, 1), 256, 0), out, n64, scale, seed)
}

/// `x[t] += bias` for `tokens` rows of `n` values.
pub fn add_bias(gpu: &Gpu, dt: Dt, x: Ptr, bias: Ptr, tokens: usize, n: usize) -> Result<()> {
    let (x, bias, n) = (x.0, bias.0, i32_of(n, "bias length")?);
    launch!(gpu, format!("add_bias_{}", dt.suffix()), cfg((tokens as u32, 1, 1), 256, 0), x, bias, n)
}

/// `y[m x n] = x[m x k] · w[n x k]ᵀ` on the tensor cores through cuBLAS: x and w in `dt`, f32
/// accumulation, y in `dt` or (for logits) f32. Row-major Y = X Wᵀ is column-major Yᵀ = W Xᵀ,
/// hence `transa = T` with m and n swapped.
#[allow(clippy::too_many_arguments)]
pub fn linear(gpu: &Gpu, dt: Dt, x: Ptr, m: usize, k: usize, w: Ptr, n: usize, y: Ptr, y_f32: bool) -> Result<()> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
    if m == 0 {
        return Ok(());
    }
    let ty = match dt {
        Dt::Bf16 => cudaDataType::CUDA_R_16BF,
        Dt::F16 => cudaDataType::CUDA_R_16F,
    };
    let y_ty = if y_f32 { cudaDataType::CUDA_R_32F } else { ty };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (mi, ni, ki) = (i32_of(n, "gemm n")?, i32_of(m, "gemm m")?, i32_of(k, "gemm k")?);
    // SAFETY: w holds n*k, x m*k and y m*n values of the stated types (the model allocates them
    // so), and the handle is bound to the stream the buffers are used on.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *gpu.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            mi,
            ni,
            ki,
            (&alpha as *const f32).cast(),
            w.0 as *const _,
            ty,
            ki,
            x.0 as *const _,
            ty,
            ki,
            (&beta as *const f32).cast(),
            y.0 as *mut _,
            y_ty,
            mi,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| HoraeError::Cuda(format!("cuBLAS GEMM {m}x{k} by {n}x{k}: {e:?}")))
}
