//! The Llama-family forward pass (Llama 2/3, SmolLM2, Qwen2, Mistral) over one flattened batch of
//! prefill chunks and decode tokens, reading and writing the paged KV cache.

use std::path::Path;

use super::config::ModelConfig;
use super::weights::{names, Weights};
use crate::backend::attention::{self, AttnSeq};
use crate::backend::cpu;
use crate::backend::gemm::{PackedLinear, Products, WeightDtype};
use crate::backend::isa::Isa;
use crate::backend::kv_cache::{KvBuf, KvDtype};
use crate::backend::prefill_attention;
use crate::backend::quant::{self, QuantKind};
use crate::backend::team;
use crate::error::{HoraeError, Result};

struct Layer {
    input_norm: Vec<f32>,
    /// q, k and v projections stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv: PackedLinear,
    qkv_bias: Option<Vec<f32>>,
    o: PackedLinear,
    post_norm: Vec<f32>,
    /// gate and up projections stacked: `[2 * intermediate, hidden]`.
    gate_up: PackedLinear,
    down: PackedLinear,
}

pub struct LlamaModel {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`; rows are read for the embedding lookup and, when tied, it is the LM head.
    embed: PackedLinear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when tied to the embedding.
    lm_head: Option<PackedLinear>,
    /// How the matmul weights are stored (norms and biases stay f32).
    pub dtype: WeightDtype,
    /// A bf16 model's products (prefill attention tiles, and linear layers where AMX runs): bf16
    /// where the CPU has `vdpbf16ps` (as a bf16 model's flash attention does), f32 otherwise.
    /// With a bf16 KV cache an f32 or quantized model's attention takes bf16 ones too
    /// (`attention_products`); its linear layers keep their own kernels.
    products: Products,
    /// What its KV cache holds: bf16 for a bf16 model (the "auto" of vLLM's `kv_cache_dtype`:
    /// the model's dtype), else f32 unless set (`with_kv_dtype`).
    kv_dtype: KvDtype,
    inv_freq: Vec<f64>,
}

/// The paged KV cache, one K and one V buffer per layer, `[blocks, block_size, kv_heads,
/// head_dim]`, in the model's `kv_dtype`.
pub struct KvCache {
    pub k: Vec<KvBuf>,
    pub v: Vec<KvBuf>,
    pub block_size: usize,
    row: usize,
}

impl KvCache {
    /// A cache the machine cannot hold is an error naming its size, not the abort a failed
    /// allocation is.
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize, dtype: KvDtype) -> Result<Self> {
        let row = cfg.num_kv_heads * cfg.head_dim;
        let tokens = num_blocks.saturating_mul(block_size);
        let too_large = || {
            let per_token = 2 * cfg.num_layers * row * if dtype == KvDtype::Bf16 { 2 } else { 4 };
            HoraeError::InvalidConfig(format!(
                "a KV cache of {tokens} tokens needs {:.1} GiB ({per_token} bytes a token), more than this machine can \
                 allocate; give a smaller kv_cache_tokens",
                tokens as f64 * per_token as f64 / (1u64 << 30) as f64
            ))
        };
        let n = tokens.checked_mul(row).ok_or_else(too_large)?;
        let bufs =
            || (0..cfg.num_layers).map(|_| KvBuf::zeros(dtype, n)).collect::<Option<Vec<_>>>().ok_or_else(too_large);
        let (k, v) = (bufs()?, bufs()?);
        Ok(Self { k, v, block_size, row })
    }

    pub fn num_blocks(&self) -> usize {
        self.k.first().map_or(0, |k| k.len() / (self.block_size * self.row))
    }

    /// Copy-on-write: block `src`'s KV into block `dst`, in every layer.
    pub fn copy_block(&mut self, src: usize, dst: usize) {
        let len = self.block_size * self.row;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.copy_within(src * len..(src + 1) * len, dst * len);
        }
    }
}

/// One step's input: a flattened batch.
pub struct BatchInput<'a> {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Cache slot (`block * block_size + offset`) of every token.
    pub slots: Vec<usize>,
    pub seqs: Vec<AttnSeq<'a>>,
    /// Rows whose logits are wanted.
    pub logit_rows: Vec<usize>,
}

impl LlamaModel {
    /// Teacher-forced logits of one sequence (`len x vocab`), with a private scratch cache.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let n = tokens.len();
        let bs = 16;
        let table: Vec<u32> = (0..n.div_ceil(bs) as u32).collect();
        let mut cache = KvCache::new(&self.cfg, table.len(), bs, self.kv_dtype())?;
        let input = BatchInput {
            tokens: tokens.to_vec(),
            positions: (0..n).collect(),
            slots: (0..n).collect(),
            seqs: vec![AttnSeq { row: 0, num_tokens: n, start: 0, block_table: &table }],
            logit_rows: (0..n).collect(),
        };
        let mut logits = Vec::new();
        self.forward(&input, &mut cache, &mut logits)?;
        Ok(logits)
    }

    /// Load a model folder. `dtype` is how matmul weights are kept; `None` runs a converted
    /// GGUF's own quantized blocks, else follows the folder's `torch_dtype` (bf16 for bf16 or f16
    /// checkpoints, else f32).
    pub fn load(dir: &Path, dtype: Option<WeightDtype>) -> Result<Self> {
        Self::load_first_layers(dir, dtype, None)
    }

    /// Load only the first `layers` decoder layers (with the final norm and LM head): a cheap
    /// draft model for speculative decoding made from any checkpoint.
    pub fn load_first_layers(dir: &Path, dtype: Option<WeightDtype>, layers: Option<usize>) -> Result<Self> {
        let mut cfg = ModelConfig::from_dir(dir)?;
        if let Some(n) = layers {
            if n == 0 || n > cfg.num_layers {
                return Err(HoraeError::InvalidConfig(format!(
                    "the model has {} layers; cannot keep {n}",
                    cfg.num_layers
                )));
            }
            cfg.num_layers = n;
        }
        let mut w = Weights::load(dir)?;
        let dtype = resolve_dtype(dir, &w, dtype.unwrap_or(default_dtype(&cfg, &w)))?;
        let (h, hd, nh, nkv, inter) =
            (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let p = |i: usize, n: &str| names::layer(i, n);
        let embed = pack(&mut w, &[(names::EMBED.into(), cfg.vocab_size)], h, dtype)?;
        // Grown as loaded: a config.json that claims more layers than the file holds stops at the
        // first missing tensor, not on a reservation for them.
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let qkv_parts = [(p(i, names::Q), nh * hd), (p(i, names::K), nkv * hd), (p(i, names::V), nkv * hd)];
            let qkv_bias = if cfg.qkv_bias {
                let mut b = w.take(&p(i, names::Q_BIAS), &[nh * hd])?;
                b.extend(w.take(&p(i, names::K_BIAS), &[nkv * hd])?);
                b.extend(w.take(&p(i, names::V_BIAS), &[nkv * hd])?);
                Some(b)
            } else {
                None
            };
            layers.push(Layer {
                input_norm: w.take(&p(i, names::INPUT_NORM), &[h])?,
                qkv: pack(&mut w, &qkv_parts, h, dtype)?,
                qkv_bias,
                o: pack(&mut w, &[(p(i, names::O), h)], nh * hd, dtype)?,
                post_norm: w.take(&p(i, names::POST_NORM), &[h])?,
                gate_up: pack(&mut w, &[(p(i, names::GATE), inter), (p(i, names::UP), inter)], h, dtype)?,
                down: pack(&mut w, &[(p(i, names::DOWN), h)], inter, dtype)?,
            });
        }
        let norm = w.take(names::NORM, &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains(names::LM_HEAD) {
            None
        } else {
            Some(pack(&mut w, &[(names::LM_HEAD.into(), cfg.vocab_size)], h, dtype)?)
        };
        let inv_freq = cfg.rope_inv_freq();
        let products = if dtype == WeightDtype::Bf16 && prefill_attention::bf16_runs(Isa::detect()) {
            Products::Bf16
        } else {
            Products::F32
        };
        let kv_dtype = if dtype == WeightDtype::Bf16 { KvDtype::Bf16 } else { KvDtype::F32 };
        Ok(Self { cfg, embed, layers, norm, lm_head, dtype, products, kv_dtype, inv_freq })
    }

    /// A bf16 model's products: `Products::F32` (exact where a bf16 model's weights are, as the
    /// goldens check), or `Products::Bf16` where the CPU runs them (the prefill attention through
    /// `vdpbf16ps`; the linear layers through AMX tiles where `gemm::amx_runs`).
    pub fn with_products(mut self, products: Products) -> Result<Self> {
        if products == Products::Bf16 && !prefill_attention::bf16_runs(Isa::detect()) {
            return Err(HoraeError::InvalidConfig("bf16 products need a CPU with AVX-512 BF16".into()));
        }
        self.products = products;
        Ok(self)
    }

    pub fn products(&self) -> Products {
        self.products
    }

    /// The KV cache in `dtype` instead of the model's default (bf16 halves it for an f32 or
    /// quantized model, at bf16's rounding of K and V; `attention_products`).
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// Attention's products: the model's own, but an f32 or quantized model with a bf16 KV cache
    /// takes bf16 ones where the CPU runs them: only Q and the softmax weights are rounded
    /// further, as llama.cpp's CPU flash attention rounds Q for its f16 cache (a 6,000-token Q4_1
    /// prefill 1.27x faster with them on a Zen 4). Derived, not stored, so that neither the
    /// order of `with_products` and `with_kv_dtype` nor a second call changes it.
    fn attention_products(&self) -> Products {
        let cache_only = self.dtype != WeightDtype::Bf16 && self.kv_dtype == KvDtype::Bf16;
        if cache_only && prefill_attention::bf16_runs(Isa::detect()) {
            Products::Bf16
        } else {
            self.products
        }
    }

    /// What a KV cache for this model holds (`KvCache::new` takes it).
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Bytes of weights one decode step streams from memory: every layer's matrices and the LM
    /// head (the embedding table when tied); norms are negligible and the embedding lookup reads
    /// one row a token. The bench divides it by the step time for the bandwidth decode reaches.
    pub fn decode_weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.lm_head.as_ref().unwrap_or(&self.embed).bytes()
    }

    /// Run the batch, writing `logit_rows.len() x vocab` logits into `logits` (a buffer the caller
    /// keeps between steps: at 32 rows it is 6 MB, and allocating it fresh cost page faults and a
    /// memset every step).
    pub fn forward(&self, input: &BatchInput<'_>, cache: &mut KvCache, logits: &mut Vec<f32>) -> Result<()> {
        team::step(|| self.forward_on_worker(input, cache, logits))
    }

    fn forward_on_worker(&self, input: &BatchInput<'_>, cache: &mut KvCache, logits: &mut Vec<f32>) -> Result<()> {
        let c = &self.cfg;
        let (h, hd, nh, nkv, inter) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size);
        let t = input.tokens.len();
        let mut x = vec![0.0f32; t * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(&input.tokens) {
            let tok = tok as usize;
            if tok >= c.vocab_size {
                return Err(HoraeError::Executor(format!(
                    "token id {tok} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
            self.embed.row(tok, row);
        }
        let qkv_n = (nh + 2 * nkv) * hd;
        let (mut normed, mut qkv) = (vec![0.0; t * h], vec![0.0; t * qkv_n]);
        let (mut q, mut k, mut v) = (vec![0.0; t * nh * hd], vec![0.0; t * nkv * hd], vec![0.0; t * nkv * hd]);
        let (mut attn, mut proj) = (vec![0.0; t * nh * hd], vec![0.0; t * h]);
        let (mut gu, mut act) = (vec![0.0; t * 2 * inter], vec![0.0; t * inter]);
        let row = nkv * hd;
        let rope = cpu::RopeTable::new(&input.positions, &self.inv_freq);
        let attention_products = self.attention_products();
        for (li, l) in self.layers.iter().enumerate() {
            cpu::rms_norm(&x, &l.input_norm, c.rms_norm_eps, &mut normed);
            l.qkv.forward_products(&normed, t, &mut qkv, self.products);
            // Each product names the next one before this thread's stretch alone (here RoPE and
            // attention): in decode the helper thread pulls up its share meanwhile.
            l.o.warm(t);
            if let Some(b) = &l.qkv_bias {
                cpu::add_bias(&mut qkv, b);
            }
            for r in 0..t {
                let src = &qkv[r * qkv_n..(r + 1) * qkv_n];
                q[r * nh * hd..(r + 1) * nh * hd].copy_from_slice(&src[..nh * hd]);
                k[r * row..(r + 1) * row].copy_from_slice(&src[nh * hd..nh * hd + row]);
                v[r * row..(r + 1) * row].copy_from_slice(&src[nh * hd + row..]);
            }
            cpu::rope(&mut q, &rope, nh, hd);
            cpu::rope(&mut k, &rope, nkv, hd);
            for (r, &slot) in input.slots.iter().enumerate() {
                cache.k[li].write(slot * row, &k[r * row..(r + 1) * row]);
                cache.v[li].write(slot * row, &v[r * row..(r + 1) * row]);
            }
            attention::paged_attention(
                &q,
                &input.seqs,
                cache.k[li].rows(),
                cache.v[li].rows(),
                cache.block_size,
                nh,
                nkv,
                hd,
                attention_products,
                &mut attn,
            );
            l.o.forward_products(&attn, t, &mut proj, self.products);
            l.gate_up.warm(t);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);

            cpu::rms_norm(&x, &l.post_norm, c.rms_norm_eps, &mut normed);
            l.gate_up.forward_products(&normed, t, &mut gu, self.products);
            l.down.warm(t);
            cpu::silu_mul_rows(&gu, inter, &mut act);
            l.down.forward_products(&act, t, &mut proj, self.products);
            match self.layers.get(li + 1) {
                Some(next) => next.qkv.warm(t),
                None => self.lm_head.as_ref().unwrap_or(&self.embed).warm(t),
            }
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        }
        let rows = input.logit_rows.len();
        let mut sel = Vec::with_capacity(rows * h);
        for &r in &input.logit_rows {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut final_norm = vec![0.0; rows * h];
        cpu::rms_norm(&sel, &self.norm, c.rms_norm_eps, &mut final_norm);
        logits.resize(rows * c.vocab_size, 0.0);
        self.lm_head.as_ref().unwrap_or(&self.embed).forward_products(&final_norm, rows, logits, self.products);
        Ok(())
    }
}

/// "auto": a checkpoint converted from a GGUF runs its own blocks (named by its 4-bit format if
/// it has one); others follow `torch_dtype`.
fn default_dtype(cfg: &ModelConfig, w: &Weights) -> WeightDtype {
    let kinds = w.quant_kinds();
    match kinds.iter().find(|&&k| k == QuantKind::Q4_1).or(kinds.first()) {
        Some(&k) => WeightDtype::Quant(k),
        None => cfg.default_dtype(),
    }
}

/// Check that `dtype` fits the checkpoint: Q4_1 runs a GGUF's own 4-bit blocks and is not made
/// at load (4-bit quantization loses what the GGUF's quantizer chose to keep); Q8_0 can be.
fn resolve_dtype(dir: &Path, w: &Weights, dtype: WeightDtype) -> Result<WeightDtype> {
    if dtype == WeightDtype::Quant(QuantKind::Q4_1) && !w.quant_kinds().contains(&QuantKind::Q4_1) {
        let native: Vec<&str> = QuantKind::ALL.iter().map(|k| k.name()).collect();
        let has = match (w.quant_kinds().first(), w.other_formats()) {
            (Some(k), _) => format!("its quantized blocks are {}", k.name()),
            (None, []) => "it holds no quantized blocks (an HF checkpoint)".to_string(),
            (None, other) => format!(
                "its GGUF held {}, which horae does not run natively (it runs {}), so they were dequantized at conversion",
                other.join(", "),
                native.join(" and ")
            ),
        };
        return Err(HoraeError::InvalidConfig(format!(
            "dtype 'q4_1' runs the Q4_1 blocks of a GGUF checkpoint (convert one with `horae convert-gguf`), \
             and {} has none: {has}. Use 'q8_0' to quantize at load, or 'float32' / 'bfloat16'",
            dir.display()
        )));
    }
    Ok(dtype)
}

/// The matrix stacking `parts` (each `(name, rows)`, all `k` wide) in `dtype`. A quantized dtype
/// takes the checkpoint's own blocks where every part has them in one format (Q4_1 takes any
/// format the checkpoint has, Q8_0 only Q8_0), else quantizes the weights to Q8_0 at load.
fn pack(w: &mut Weights, parts: &[(String, usize)], k: usize, dtype: WeightDtype) -> Result<PackedLinear> {
    let n: usize = parts.iter().map(|(_, rows)| rows).sum();
    if let WeightDtype::Quant(want) = dtype {
        let kinds: Vec<_> = parts.iter().map(|(name, _)| w.quant_kind(name)).collect();
        let native =
            kinds[0].filter(|&q| kinds.iter().all(|&o| o == Some(q)) && (want == QuantKind::Q4_1 || q == want));
        if let Some(kind) = native {
            let mut raw = Vec::new();
            for (name, rows) in parts {
                let (_, bytes) = w.take_quantized(name, &[*rows, k])?.expect("checked above");
                raw.extend(bytes);
            }
            return PackedLinear::from_ggml(kind, &raw, n, k)
                .map_err(|e| HoraeError::Model(format!("{}: {e}", parts[0].0)));
        }
        if !k.is_multiple_of(quant::QK) {
            return Err(HoraeError::InvalidConfig(format!(
                "dtype '{}' keeps weights in blocks of {} along the input, and {} has {k} inputs: use 'float32' or 'bfloat16'",
                dtype.name(),
                quant::QK,
                parts[0].0
            )));
        }
    }
    let mut data = Vec::with_capacity(n * k);
    for (name, rows) in parts {
        data.extend(w.take(name, &[*rows, k])?);
    }
    let dtype = match dtype {
        WeightDtype::Quant(_) => WeightDtype::Quant(QuantKind::Q8_0),
        other => other,
    };
    Ok(PackedLinear::new(&data, n, k, dtype))
}
