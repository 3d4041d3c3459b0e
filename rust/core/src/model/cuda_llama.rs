//! The Llama-family forward pass on the GPU: the same computation as model/llama.rs, with the
//! same paged-KV layout, so one engine, scheduler and block manager drive either. Weights and
//! activations are bf16 or f16 (GEMMs on the tensor cores through cuBLAS, f32 accumulation), the
//! residual stream and norms are f32, attention accumulates in f32.

use std::path::Path;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::backend::attention::AttnSeq;
use crate::backend::cuda::device::Gpu;
use crate::backend::cuda::ops::{self, AttnDims, AttnIo, DecodeScratch, Dt, PrefillMeta, Ptr, PREFILL_TILE};
use crate::error::{HoraeError, Result};
use crate::model::llama::BatchInput;
use crate::model::weights::{names, Weights};
use crate::model::ModelConfig;

struct Layer {
    input_norm: CudaSlice<f32>,
    /// q, k, v stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv: CudaSlice<u16>,
    qkv_bias: Option<CudaSlice<f32>>,
    o: CudaSlice<u16>,
    post_norm: CudaSlice<f32>,
    /// gate and up stacked: `[2 * intermediate, hidden]`.
    gate_up: CudaSlice<u16>,
    down: CudaSlice<u16>,
}

/// Per-step activations, grown to the largest batch seen (never shrunk: the engine's batches
/// are bounded by max_batched_tokens).
struct Activations {
    tokens: usize,
    residual: CudaSlice<f32>,
    normed: CudaSlice<u16>,
    qkv: CudaSlice<u16>,
    attn: CudaSlice<u16>,
    proj: CudaSlice<u16>,
    gate_up: CudaSlice<u16>,
    act: CudaSlice<u16>,
}

/// How big the KV pool is: a fixed number of tokens, or what fits in a fraction of the GPU's
/// memory after weights and activations (vLLM's gpu_memory_utilization).
#[derive(Clone, Copy, Debug)]
pub enum KvBudget {
    Tokens(usize),
    MemoryFraction(f64),
}

pub struct CudaLlama {
    pub cfg: ModelConfig,
    pub dt: Dt,
    pub gpu: Gpu,
    embed: CudaSlice<u16>,
    layers: Vec<Layer>,
    norm: CudaSlice<f32>,
    lm_head: Option<CudaSlice<u16>>,
    inv_freq: CudaSlice<f64>,
    k_cache: Vec<CudaSlice<u16>>,
    v_cache: Vec<CudaSlice<u16>>,
    pub num_blocks: usize,
    pub block_size: usize,
    acts: Option<Activations>,
    decode_scratch: DecodeScratch,
    /// `[rows, vocab]` f32 logits of the last forward, rows in `logit_rows` order.
    pub logits: CudaSlice<f32>,
    /// Bytes of weights on the GPU.
    pub weight_bytes: usize,
    /// Weights that take part in a GEMM per token (all but an untied embedding table): the
    /// 2 x params FLOPs per token of MFU.
    pub matmul_params: usize,
}

fn oom(what: &str, bytes: usize, gpu: &Gpu, flag: &str) -> HoraeError {
    let free = gpu.memory().map(|(f, _)| f).unwrap_or(0);
    HoraeError::Cuda(format!(
        "out of GPU memory allocating {what} ({:.2} GiB, {:.2} GiB free on {}): {flag}",
        bytes as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64,
        gpu.name
    ))
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, n: usize, what: &str, flag: &str) -> Result<CudaSlice<T>> {
    gpu.stream.alloc_zeros::<T>(n.max(1)).map_err(|_| oom(what, n * std::mem::size_of::<T>(), gpu, flag))
}

fn upload<T: DeviceRepr>(gpu: &Gpu, host: &[T], what: &str) -> Result<CudaSlice<T>> {
    gpu.stream.clone_htod(host).map_err(|_| {
        oom(what, std::mem::size_of_val(host), gpu, "use a smaller model or free the GPU (weights cannot shrink)")
    })
}

/// Where weights come from: a checkpoint, or random values generated on the GPU (benchmarks).
enum Source {
    Folder(Weights),
    Random { seed: u64 },
}

impl Source {
    /// A matrix `[rows, cols]` (possibly several stacked tensors) in the model's dtype.
    fn matrix(&mut self, gpu: &Gpu, dt: Dt, names: &[(String, usize)], cols: usize) -> Result<CudaSlice<u16>> {
        let rows: usize = names.iter().map(|(_, r)| r).sum();
        match self {
            Source::Folder(w) => {
                let mut host = Vec::with_capacity(rows * cols);
                for (name, r) in names {
                    host.extend(w.take(name, &[*r, cols])?.into_iter().map(|x| dt.encode(x)));
                }
                upload(gpu, &host, &names[0].0)
            }
            Source::Random { seed } => {
                let out = alloc::<u16>(gpu, rows * cols, &names[0].0, "use a smaller model or free the GPU")?;
                *seed += 1;
                // Kaiming-like scale keeps activations finite through many layers.
                ops::fill_uniform(gpu, dt, Ptr::of(gpu, &out), rows * cols, (1.0 / cols as f32).sqrt(), *seed)?;
                Ok(out)
            }
        }
    }

    fn vector(&mut self, gpu: &Gpu, names: &[(String, usize)]) -> Result<CudaSlice<f32>> {
        let host: Vec<f32> = match self {
            Source::Folder(w) => {
                let mut v = Vec::new();
                for (name, n) in names {
                    v.extend(w.take(name, &[*n])?);
                }
                v
            }
            Source::Random { .. } => vec![1.0; names.iter().map(|(_, n)| n).sum()],
        };
        upload(gpu, &host, &names[0].0)
    }
}

impl CudaLlama {
    /// Load a model folder onto `gpu`, weights in `dt`, and allocate the KV pool.
    pub fn load(gpu: Gpu, dir: &Path, dt: Dt, budget: KvBudget, block_size: usize, max_tokens: usize) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        Self::build(gpu, cfg, Source::Folder(Weights::load(dir)?), dt, budget, block_size, max_tokens)
    }

    /// A model of `cfg`'s shapes with random weights made on the GPU (benchmarks, tests).
    pub fn random(
        gpu: Gpu,
        cfg: ModelConfig,
        dt: Dt,
        budget: KvBudget,
        block_size: usize,
        max_tokens: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::build(gpu, cfg, Source::Random { seed }, dt, budget, block_size, max_tokens)
    }

    fn build(
        gpu: Gpu,
        cfg: ModelConfig,
        mut src: Source,
        dt: Dt,
        budget: KvBudget,
        block_size: usize,
        max_tokens: usize,
    ) -> Result<Self> {
        let (h, hd, nh, nkv, inter) =
            (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        // Fail before any weight is uploaded if the shapes have no kernels.
        AttnDims { num_heads: nh, num_kv_heads: nkv, head_dim: hd, block_size, max_blocks: 1 }.check(true)?;
        let n = |s: &str, r: usize| (s.to_string(), r);
        let embed = src.matrix(&gpu, dt, &[n(names::EMBED, cfg.vocab_size)], h)?;
        // Grown as loaded: a config.json that claims more layers than the file holds stops at the
        // first missing tensor, not on a reservation for them.
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let p = |s: &str| names::layer(i, s);
            let qkv_names = [(p(names::Q), nh * hd), (p(names::K), nkv * hd), (p(names::V), nkv * hd)];
            let qkv_bias = if cfg.qkv_bias {
                Some(src.vector(
                    &gpu,
                    &[(p(names::Q_BIAS), nh * hd), (p(names::K_BIAS), nkv * hd), (p(names::V_BIAS), nkv * hd)],
                )?)
            } else {
                None
            };
            layers.push(Layer {
                input_norm: src.vector(&gpu, &[(p(names::INPUT_NORM), h)])?,
                qkv: src.matrix(&gpu, dt, &qkv_names, h)?,
                qkv_bias,
                o: src.matrix(&gpu, dt, &[(p(names::O), h)], nh * hd)?,
                post_norm: src.vector(&gpu, &[(p(names::POST_NORM), h)])?,
                gate_up: src.matrix(&gpu, dt, &[(p(names::GATE), inter), (p(names::UP), inter)], h)?,
                down: src.matrix(&gpu, dt, &[(p(names::DOWN), h)], inter)?,
            });
        }
        let norm = src.vector(&gpu, &[n(names::NORM, h)])?;
        let tied = match &src {
            Source::Folder(w) => cfg.tie_word_embeddings && !w.contains(names::LM_HEAD),
            Source::Random { .. } => cfg.tie_word_embeddings,
        };
        let lm_head = if tied { None } else { Some(src.matrix(&gpu, dt, &[n(names::LM_HEAD, cfg.vocab_size)], h)?) };
        let inv_freq = upload(&gpu, &cfg.rope_inv_freq(), "rope frequencies")?;
        let layer_params: usize = layers.iter().map(|l| l.qkv.len() + l.o.len() + l.gate_up.len() + l.down.len()).sum();
        let head_params = lm_head.as_ref().map_or(embed.len(), |l| l.len());
        let weight_bytes = 2 * (layer_params + embed.len() + lm_head.as_ref().map_or(0, |l| l.len()));
        let matmul_params = layer_params + head_params;
        let mut model = Self {
            decode_scratch: DecodeScratch {
                out: alloc(&gpu, 1, "scratch", "")?,
                max: alloc(&gpu, 1, "scratch", "")?,
                sum: alloc(&gpu, 1, "scratch", "")?,
            },
            logits: alloc(&gpu, 1, "logits", "")?,
            cfg,
            dt,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            k_cache: Vec::new(),
            v_cache: Vec::new(),
            num_blocks: 0,
            block_size,
            acts: None,
            weight_bytes,
            matmul_params,
            gpu,
        };
        // Activations for the largest step before the KV pool takes what is left.
        model.ensure_activations(max_tokens)?;
        // Grown on demand; most steps sample one row per running sequence.
        let logits_rows = max_tokens.min(256);
        model.logits =
            alloc(&model.gpu, logits_rows * model.cfg.vocab_size, "the logits buffer", "lower max_batched_tokens")?;
        model.allocate_kv(budget)?;
        Ok(model)
    }

    /// Bytes of one token's K and V over all layers, as stored here (16-bit).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * 2 * self.cfg.num_layers * self.cfg.num_kv_heads * self.cfg.head_dim
    }

    fn allocate_kv(&mut self, budget: KvBudget) -> Result<()> {
        let per_block = self.block_size * self.kv_bytes_per_token();
        let blocks = match budget {
            KvBudget::Tokens(t) => t / self.block_size,
            KvBudget::MemoryFraction(f) => {
                self.gpu.sync()?;
                let (free, total) = self.gpu.memory()?;
                let used = total - free;
                let allowed = (total as f64 * f) as usize;
                // Leave room for cuBLAS workspaces and the allocator's slack.
                let headroom = 512 << 20;
                if allowed < used + headroom + per_block {
                    return Err(HoraeError::Cuda(format!(
                        "gpu_memory_utilization={f} allows {:.2} GiB but weights and activations already use {:.2} GiB of {:.2} GiB \
                         on {}: no room for the KV cache. Raise gpu_memory_utilization, lower max_batched_tokens, or free the GPU",
                        allowed as f64 / (1u64 << 30) as f64,
                        used as f64 / (1u64 << 30) as f64,
                        total as f64 / (1u64 << 30) as f64,
                        self.gpu.name
                    )));
                }
                (allowed - used - headroom) / per_block
            }
        };
        if blocks == 0 {
            return Err(HoraeError::InvalidConfig("the KV cache holds less than one block".into()));
        }
        let per_layer = blocks * self.block_size * self.cfg.num_kv_heads * self.cfg.head_dim;
        let flag = "lower gpu_memory_utilization or kv_cache_tokens";
        for _ in 0..self.cfg.num_layers {
            self.k_cache.push(alloc(&self.gpu, per_layer, "the KV cache", flag)?);
            self.v_cache.push(alloc(&self.gpu, per_layer, "the KV cache", flag)?);
        }
        self.num_blocks = blocks;
        Ok(())
    }

    fn ensure_activations(&mut self, tokens: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.tokens >= tokens) {
            return Ok(());
        }
        self.acts = None; // free the old buffers first
        let c = &self.cfg;
        let (h, qkv_n, inter) = (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.intermediate_size);
        let g = &self.gpu;
        let flag = "lower max_batched_tokens";
        self.acts = Some(Activations {
            tokens,
            residual: alloc(g, tokens * h, "activations", flag)?,
            normed: alloc(g, tokens * h, "activations", flag)?,
            qkv: alloc(g, tokens * qkv_n, "activations", flag)?,
            attn: alloc(g, tokens * c.num_heads * c.head_dim, "activations", flag)?,
            proj: alloc(g, tokens * h, "activations", flag)?,
            gate_up: alloc(g, tokens * 2 * inter, "activations", flag)?,
            act: alloc(g, tokens * inter, "activations", flag)?,
        });
        Ok(())
    }

    /// Copy-on-write: block `src` into block `dst`, every layer.
    pub fn copy_block(&mut self, src: usize, dst: usize) -> Result<()> {
        self.gpu.bind()?;
        let len = self.block_size * self.cfg.num_kv_heads * self.cfg.head_dim;
        for buf in self.k_cache.iter().chain(self.v_cache.iter()) {
            let base = Ptr::of(&self.gpu, buf);
            // SAFETY: both blocks lie inside the layer's buffer (ids come from the block pool).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base.offset::<u16>(dst * len).0,
                    base.offset::<u16>(src * len).0,
                    len * 2,
                    self.gpu.stream.cu_stream(),
                )
            }
            .map_err(|e| HoraeError::Cuda(format!("copying KV block: {e:?}")))?;
        }
        Ok(())
    }

    /// Run the batch; the `logit_rows` rows' logits are left in `self.logits` (on the GPU).
    pub fn forward(&mut self, input: &BatchInput<'_>) -> Result<()> {
        let c = &self.cfg;
        let (h, hd, nh, nkv, inter) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let (vocab, eps) = (c.vocab_size, c.rms_norm_eps);
        let t = input.tokens.len();
        if t == 0 {
            return Ok(());
        }
        self.gpu.bind()?;
        if let Some(&bad) = input.tokens.iter().find(|&&tok| tok as usize >= vocab) {
            return Err(HoraeError::Executor(format!("token id {bad} is outside the vocabulary ({})", vocab)));
        }
        self.ensure_activations(t)?;
        let rows = input.logit_rows.len();
        if self.logits.len() < rows * vocab {
            self.logits = alloc(&self.gpu, rows * vocab, "the logits buffer", "lower max_num_seqs")?;
        }
        let meta = StepMeta::build(input, self.block_size);
        let g = &self.gpu;
        let ints = upload(g, &meta.ints, "step metadata")?;
        let slots: Vec<i64> = input.slots.iter().map(|&s| s as i64).collect();
        let slots = upload(g, &slots, "step metadata")?;
        let ip = Ptr::of(g, &ints);
        let at = |off: usize| ip.offset::<i32>(off);
        let a = self.acts.as_ref().expect("allocated above");
        let (res, normed, qkv, attn, proj, gu, act) = (
            Ptr::of(g, &a.residual),
            Ptr::of(g, &a.normed),
            Ptr::of(g, &a.qkv),
            Ptr::of(g, &a.attn),
            Ptr::of(g, &a.proj),
            Ptr::of(g, &a.gate_up),
            Ptr::of(g, &a.act),
        );
        let dt = self.dt;
        let qkv_n = (nh + 2 * nkv) * hd;
        let row = nkv * hd;
        ops::embedding(g, dt, res, Ptr::of(g, &self.embed), at(meta.tokens), t, h, vocab)?;
        let dims = |max_blocks| AttnDims {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: self.block_size,
            max_blocks,
        };
        let prefill = PrefillMeta {
            tile_seq: at(meta.tile_seq),
            tile_q0: at(meta.tile_q0),
            seq_row: at(meta.p_row),
            seq_qlen: at(meta.p_qlen),
            seq_pos0: at(meta.p_pos0),
            tiles: meta.tiles,
        };
        for (li, l) in self.layers.iter().enumerate() {
            // residual += previous layer's MLP output (nothing before layer 0), then norm.
            let delta = if li == 0 { Ptr::NULL } else { proj };
            ops::add_rms_norm(g, dt, normed, res, delta, Ptr::of(g, &l.input_norm), Ptr::NULL, t, h, eps)?;
            ops::linear(g, dt, normed, t, h, Ptr::of(g, &l.qkv), qkv_n, qkv, false)?;
            if let Some(b) = &l.qkv_bias {
                ops::add_bias(g, dt, qkv, Ptr::of(g, b), t, qkv_n)?;
            }
            ops::rope(g, dt, qkv, qkv_n, at(meta.positions), Ptr::of(g, &self.inv_freq), t, nh + nkv, hd)?;
            let (kc, vc) = (Ptr::of(g, &self.k_cache[li]), Ptr::of(g, &self.v_cache[li]));
            let (k, v) = (qkv.offset::<u16>(nh * hd), qkv.offset::<u16>(nh * hd + row));
            ops::reshape_and_cache(g, kc, vc, k, v, qkv_n, Ptr::of(g, &slots), t, row)?;
            let io = AttnIo {
                out: attn,
                out_stride: nh * hd,
                q: qkv,
                q_stride: qkv_n,
                k_cache: kc,
                v_cache: vc,
                block_tables: at(meta.d_tables),
            };
            if meta.decode_seqs > 0 {
                let scratch = &mut self.decode_scratch;
                ops::paged_decode(
                    g,
                    dt,
                    dims(meta.d_width),
                    io,
                    at(meta.d_rows),
                    at(meta.d_ctx),
                    meta.decode_seqs,
                    meta.d_max_ctx,
                    scratch,
                )?;
            }
            if meta.tiles > 0 {
                ops::prefill_attention(
                    g,
                    dt,
                    dims(meta.p_width),
                    AttnIo { block_tables: at(meta.p_tables), ..io },
                    &prefill,
                )?;
            }
            ops::linear(g, dt, attn, t, nh * hd, Ptr::of(g, &l.o), h, proj, false)?;
            ops::add_rms_norm(g, dt, normed, res, proj, Ptr::of(g, &l.post_norm), Ptr::NULL, t, h, eps)?;
            ops::linear(g, dt, normed, t, h, Ptr::of(g, &l.gate_up), 2 * inter, gu, false)?;
            ops::silu_and_mul(g, dt, act, gu, t, inter)?;
            ops::linear(g, dt, act, t, inter, Ptr::of(g, &l.down), h, proj, false)?;
        }
        // The final norm of the rows whose logits are wanted (adding the last MLP output).
        ops::add_rms_norm(g, dt, normed, res, proj, Ptr::of(g, &self.norm), at(meta.logit_rows), rows, h, eps)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        ops::linear(g, dt, normed, rows, h, Ptr::of(g, head), vocab, Ptr::of(g, &self.logits), true)?;
        // The step's uploads must outlive the kernels that read them.
        g.sync()?;
        drop((ints, slots));
        Ok(())
    }

    /// The last forward's logits, `[rows, vocab]`, on the host.
    pub fn logits_to_host(&self, rows: usize) -> Result<Vec<f32>> {
        let n = rows * self.cfg.vocab_size;
        let mut out = vec![0.0f32; n];
        self.gpu
            .stream
            .memcpy_dtoh(&self.logits.slice(..n), &mut out)
            .map_err(|e| HoraeError::Cuda(format!("copying logits to the host: {e:?}")))?;
        self.gpu.sync()?;
        Ok(out)
    }
}

/// Every integer the step's kernels read, packed into one buffer (one host-to-device copy);
/// the fields are offsets into `ints`.
struct StepMeta {
    ints: Vec<i32>,
    tokens: usize,
    positions: usize,
    logit_rows: usize,
    // Decode sequences (one query row each): their rows, context lengths, block tables.
    decode_seqs: usize,
    d_rows: usize,
    d_ctx: usize,
    d_tables: usize,
    d_width: usize,
    d_max_ctx: usize,
    // Prefill sequences (several rows, or a chunk): per sequence and per tile of rows.
    p_row: usize,
    p_qlen: usize,
    p_pos0: usize,
    p_tables: usize,
    p_width: usize,
    tile_seq: usize,
    tile_q0: usize,
    tiles: usize,
}

impl StepMeta {
    fn build(input: &BatchInput<'_>, block_size: usize) -> Self {
        let mut ints: Vec<i32> = Vec::new();
        let put = |ints: &mut Vec<i32>, v: &mut dyn Iterator<Item = i32>| {
            let off = ints.len();
            ints.extend(v);
            off
        };
        let tokens = put(&mut ints, &mut input.tokens.iter().map(|&t| t as i32));
        let positions = put(&mut ints, &mut input.positions.iter().map(|&p| p as i32));
        let logit_rows = put(&mut ints, &mut input.logit_rows.iter().map(|&r| r as i32));
        let (decode, prefill): (Vec<&AttnSeq<'_>>, Vec<_>) = input.seqs.iter().partition(|s| s.num_tokens == 1);
        let table = |ints: &mut Vec<i32>, seqs: &[&AttnSeq<'_>]| {
            // Only the blocks the step reads: positions 0 ..= the last query position.
            let width = seqs.iter().map(|s| (s.start + s.num_tokens).div_ceil(block_size)).max().unwrap_or(1).max(1);
            let off = ints.len();
            for s in seqs {
                let n = (s.start + s.num_tokens).div_ceil(block_size);
                ints.extend(s.block_table[..n].iter().map(|&b| b as i32));
                ints.extend(std::iter::repeat_n(0, width - n));
            }
            (off, width)
        };
        let d_rows = put(&mut ints, &mut decode.iter().map(|s| s.row as i32));
        let d_ctx = put(&mut ints, &mut decode.iter().map(|s| (s.start + 1) as i32));
        let (d_tables, d_width) = table(&mut ints, &decode);
        let d_max_ctx = decode.iter().map(|s| s.start + 1).max().unwrap_or(0);
        let p_row = put(&mut ints, &mut prefill.iter().map(|s| s.row as i32));
        let p_qlen = put(&mut ints, &mut prefill.iter().map(|s| s.num_tokens as i32));
        let p_pos0 = put(&mut ints, &mut prefill.iter().map(|s| s.start as i32));
        let (p_tables, p_width) = table(&mut ints, &prefill);
        let mut tile_seq = Vec::new();
        let mut tile_q0 = Vec::new();
        for (i, s) in prefill.iter().enumerate() {
            for q0 in (0..s.num_tokens).step_by(PREFILL_TILE) {
                tile_seq.push(i as i32);
                tile_q0.push(q0 as i32);
            }
        }
        let tiles = tile_seq.len();
        let tile_seq_off = put(&mut ints, &mut tile_seq.into_iter());
        let tile_q0_off = put(&mut ints, &mut tile_q0.into_iter());
        if ints.is_empty() {
            ints.push(0);
        }
        Self {
            ints,
            tokens,
            positions,
            logit_rows,
            decode_seqs: decode.len(),
            d_rows,
            d_ctx,
            d_tables,
            d_width,
            d_max_ctx,
            p_row,
            p_qlen,
            p_pos0,
            p_tables,
            p_width,
            tile_seq: tile_seq_off,
            tile_q0: tile_q0_off,
            tiles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_metadata_splits_decode_and_prefill_rows() {
        // Row layout: seq A decodes at position 40 (row 0); seq B prefills 70 tokens after a
        // 20-token cached prefix (rows 1..71); seq C decodes at position 3 (row 71).
        let (ta, tb, tc) = (vec![9u32, 4, 7], vec![5u32, 6, 1, 2, 8, 0], vec![3u32]);
        let input = BatchInput {
            tokens: (0..72).collect(),
            positions: vec![0; 72],
            slots: vec![0; 72],
            seqs: vec![
                AttnSeq { row: 0, num_tokens: 1, start: 40, block_table: &ta },
                AttnSeq { row: 1, num_tokens: 70, start: 20, block_table: &tb },
                AttnSeq { row: 71, num_tokens: 1, start: 3, block_table: &tc },
            ],
            logit_rows: vec![0, 70, 71],
        };
        let m = StepMeta::build(&input, 16);
        let at = |off: usize, n: usize| m.ints[off..off + n].to_vec();
        assert_eq!(at(m.logit_rows, 3), vec![0, 70, 71]);
        assert_eq!(m.decode_seqs, 2);
        assert_eq!(at(m.d_rows, 2), vec![0, 71]);
        assert_eq!(at(m.d_ctx, 2), vec![41, 4]);
        assert_eq!(m.d_max_ctx, 41);
        // Width = blocks of the longest decode context (41 tokens: 3 blocks), zero-padded.
        assert_eq!(m.d_width, 3);
        assert_eq!(at(m.d_tables, 6), vec![9, 4, 7, 3, 0, 0]);
        assert_eq!((at(m.p_row, 1), at(m.p_qlen, 1), at(m.p_pos0, 1)), (vec![1], vec![70], vec![20]));
        // 90 positions need 6 blocks; 70 query rows make 3 tiles of 32.
        assert_eq!((m.p_width, at(m.p_tables, 6)), (6, vec![5, 6, 1, 2, 8, 0]));
        assert_eq!(m.tiles, 3);
        assert_eq!((at(m.tile_seq, 3), at(m.tile_q0, 3)), (vec![0, 0, 0], vec![0, 32, 64]));
    }
}
