//! Tensors from `*.safetensors` (one file, or shards listed in `model.safetensors.index.json`),
//! memory-mapped and widened to f32 (from f32, bf16 or f16) when taken; and, where a folder was
//! converted from a GGUF, its quantized blocks from `quantized.safetensors` (`QUANTIZED_FILE`),
//! kept as they are.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::backend::quant::{self, QuantKind};
use crate::error::{HoraeError, Result};

/// The file beside `model.safetensors` that holds a GGUF's quantized tensors as raw GGML blocks:
/// u8 tensors `[rows, bytes a row]`, their formats in the header's metadata under
/// `QUANT_METADATA` (a JSON object from tensor name to "q4_1" or "q8_0").
pub const QUANTIZED_FILE: &str = "quantized.safetensors";
pub const QUANT_METADATA: &str = "horae.quant";
/// Metadata of the same file: the GGUF's other quantized formats, which were dequantized at
/// conversion (a JSON object from format name to tensor count).
pub const OTHER_FORMATS_METADATA: &str = "horae.gguf_other";

/// The HF names of a Llama-family checkpoint's tensors: the one table every loader (the CPU and
/// the GPU runtime, tests that write checkpoints) reads them by.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub const INPUT_NORM: &str = "input_layernorm.weight";
    pub const POST_NORM: &str = "post_attention_layernorm.weight";
    pub const Q: &str = "self_attn.q_proj.weight";
    pub const K: &str = "self_attn.k_proj.weight";
    pub const V: &str = "self_attn.v_proj.weight";
    pub const O: &str = "self_attn.o_proj.weight";
    pub const Q_BIAS: &str = "self_attn.q_proj.bias";
    pub const K_BIAS: &str = "self_attn.k_proj.bias";
    pub const V_BIAS: &str = "self_attn.v_proj.bias";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";

    /// Layer `i`'s tensor `part` (one of the per-layer names above).
    pub fn layer(i: usize, part: &str) -> String {
        format!("model.layers.{i}.{part}")
    }
}

/// Where a tensor's bytes are: which mapped file, its dtype and shape, the byte range.
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

pub struct Weights {
    files: Vec<Mmap>,
    tensors: HashMap<String, Entry>,
    /// GGML blocks by tensor name: format, `[rows, weights a row]`, where the bytes are.
    quantized: HashMap<String, (QuantKind, [usize; 2], Entry)>,
    /// The source GGUF's formats that are not run natively (dequantized at conversion).
    other_formats: Vec<String>,
}

fn model_err(m: impl Into<String>) -> HoraeError {
    HoraeError::Model(m.into())
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(model_err(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display())));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| model_err(format!("{}: {e}", index.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| model_err(format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| model_err(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn map(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| model_err(format!("{}: {e}", path.display())))?;
    // SAFETY: the file is opened read-only and not modified while mapped.
    unsafe { Mmap::map(&file) }.map_err(|e| model_err(format!("{}: {e}", path.display())))
}

/// A file's tensors as entries, and its header's metadata.
type FileIndex = (Vec<(String, Entry)>, Option<HashMap<String, String>>);

/// Every tensor of one mapped file, as entries (the header parsed once; nothing is copied).
fn entries(path: &Path, file: usize, mmap: &Mmap) -> Result<FileIndex> {
    let st = SafeTensors::deserialize(mmap)
        .map_err(|e| model_err(format!("{} is not a valid safetensors file: {e}", path.display())))?;
    let (_, meta) = SafeTensors::read_metadata(mmap)
        .map_err(|e| model_err(format!("{} is not a valid safetensors file: {e}", path.display())))?;
    let base = mmap.as_ptr() as usize;
    let list = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let start = view.data().as_ptr() as usize - base;
            let entry = Entry {
                file,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: start..start + view.data().len(),
            };
            (name, entry)
        })
        .collect();
    Ok((list, meta.metadata().clone()))
}

impl Weights {
    pub fn load(dir: &Path) -> Result<Self> {
        let mut w = Weights {
            files: Vec::new(),
            tensors: HashMap::new(),
            quantized: HashMap::new(),
            other_formats: Vec::new(),
        };
        for path in shard_files(dir)? {
            let mmap = map(&path)?;
            let (list, _) = entries(&path, w.files.len(), &mmap)?;
            w.files.push(mmap);
            w.tensors.extend(list);
        }
        let qpath = dir.join(QUANTIZED_FILE);
        if qpath.is_file() {
            let mmap = map(&qpath)?;
            let (list, meta) = entries(&qpath, w.files.len(), &mmap)?;
            w.files.push(mmap);
            let other: Option<HashMap<String, u64>> =
                meta.as_ref().and_then(|m| m.get(OTHER_FORMATS_METADATA)).and_then(|j| serde_json::from_str(j).ok());
            w.other_formats = other.map(|o| o.into_keys().collect()).unwrap_or_default();
            w.other_formats.sort();
            let kinds: HashMap<String, String> = meta
                .and_then(|m| m.get(QUANT_METADATA).cloned())
                .map(|j| serde_json::from_str(&j))
                .transpose()
                .map_err(|e| model_err(format!("{}: bad {QUANT_METADATA} metadata: {e}", qpath.display())))?
                .ok_or_else(|| model_err(format!("{}: no {QUANT_METADATA} metadata", qpath.display())))?;
            for (name, e) in list {
                let kind = kinds.get(&name).and_then(|k| QuantKind::parse(k)).ok_or_else(|| {
                    model_err(format!("{}: tensor {name} has no supported format in its metadata", qpath.display()))
                })?;
                let [rows, row_bytes] = e.shape[..] else {
                    return Err(model_err(format!("{}: tensor {name} is not [rows, bytes]", qpath.display())));
                };
                if e.dtype != Dtype::U8 || !row_bytes.is_multiple_of(kind.block_bytes()) {
                    return Err(model_err(format!(
                        "{}: tensor {name} is not whole {} blocks of u8",
                        qpath.display(),
                        kind.name()
                    )));
                }
                let cols = row_bytes / kind.block_bytes() * quant::QK;
                w.quantized.insert(name, (kind, [rows, cols], e));
            }
        }
        Ok(w)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    /// The quantized formats this checkpoint holds (none for an HF checkpoint).
    pub fn quant_kinds(&self) -> Vec<QuantKind> {
        QuantKind::ALL.into_iter().filter(|k| self.quantized.values().any(|(q, _, _)| q == k)).collect()
    }

    /// Remove a tensor as f32, checking its shape (dequantized if the checkpoint only has blocks).
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(e) = self.tensors.remove(name) else {
            let (kind, dims, e) =
                self.quantized.remove(name).ok_or_else(|| model_err(format!("missing tensor {name}")))?;
            check_shape(name, &dims, shape)?;
            let raw = &self.files[e.file][e.bytes];
            let mut out = vec![0.0; dims[0] * dims[1]];
            for (r, o) in raw.chunks_exact(raw.len() / dims[0].max(1)).zip(out.chunks_exact_mut(dims[1])) {
                quant::dequantize_row(kind, r, o);
            }
            return Ok(out);
        };
        check_shape(name, &e.shape, shape)?;
        let bytes = &self.files[e.file][e.bytes];
        Ok(match e.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(model_err(format!("tensor {name} has unsupported dtype {other:?}"))),
        })
    }

    /// Remove a tensor's GGML blocks, if the checkpoint has them: (format, the rows' bytes).
    pub fn take_quantized(&mut self, name: &str, shape: &[usize]) -> Result<Option<(QuantKind, Vec<u8>)>> {
        let Some((kind, dims, e)) = self.quantized.remove(name) else { return Ok(None) };
        check_shape(name, &dims, shape)?;
        self.tensors.remove(name);
        Ok(Some((kind, self.files[e.file][e.bytes].to_vec())))
    }

    /// The GGUF formats this checkpoint's source held that are not run natively.
    pub fn other_formats(&self) -> &[String] {
        &self.other_formats
    }

    /// The format of a tensor's blocks, if the checkpoint has it quantized.
    pub fn quant_kind(&self, name: &str) -> Option<QuantKind> {
        self.quantized.get(name).map(|(k, _, _)| *k)
    }
}

fn check_shape(name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(model_err(format!("tensor {name} has shape {got:?}, expected {want:?}")));
    }
    Ok(())
}
