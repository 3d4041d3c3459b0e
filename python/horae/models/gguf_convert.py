"""Convert a Llama-architecture GGUF file into an HF-style model folder: dequantized f32
safetensors, config.json, tokenizer.json (from the GGUF's BPE vocabulary and merges),
tokenizer_config.json (chat template, special tokens) and generation_config.json; and
`quantized.safetensors`, the GGUF's Q4_1 and Q8_0 tensors kept as their raw GGML blocks, which the
CPU runtime runs as they are (`dtype="auto"` or `"q4_1"`). The f32 copy is what HF transformers
(and the goldens) read, and what `dtype="float32"` / `"bfloat16"` load.

llama.cpp stores the attention Q and K weights permuted for its rope layout; the converter undoes
that permutation (without it the model only emits end-of-sequence), on the blocks' rows too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFConversionError(ValueError):
    pass


# The GGML formats the runtime runs natively (`rust/core/src/backend/quant/`).
NATIVE = ("Q4_1", "Q8_0")
QUANTIZED_FILE = "quantized.safetensors"
# Written last into a converted folder: a folder without it (or of an older converter) is
# converted again.
MARKER = "horae_gguf.json"
CONVERTER_VERSION = 2


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None or not f.data:
        return default
    import gguf

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    part = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for Q/K: rows were reordered from HF's rotate-half layout
    (first half, second half of each head) to interleaved pairs."""
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise GGUFConversionError(f"unsupported tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _tokenizer_json(tokens: List[str], merges: List[str], token_types: List[int], pre: str) -> Dict:
    vocab = {t: i for i, t in enumerate(tokens)}
    # token_type 3 = control: these are the special tokens (<|im_start|>, <|endoftext|>, ...).
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(token_types) if t == 3
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("smollm", "starcoder", "refact"):
        # SmolLM's pre-tokenizer splits every digit on its own before the GPT-2 regex.
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre_tok = byte_level
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [m.split(" ", 1) for m in merges],
        },
    }


def convert_gguf(gguf_path: os.PathLike, out_dir: os.PathLike) -> Path:
    """Write the HF-style folder for `gguf_path` at `out_dir` atomically: everything is written to a
    temporary sibling folder that is renamed into place last, so a partial folder is never seen."""
    try:
        import gguf
        from safetensors.numpy import save_file
    except ImportError as e:  # pragma: no cover - both are dependencies of horae
        raise GGUFConversionError(f"GGUF conversion needs the 'gguf' and 'safetensors' packages: {e}") from e

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    try:
        reader = gguf.GGUFReader(str(src))
    except Exception as e:
        raise GGUFConversionError(f"{src} is not a readable GGUF file: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFConversionError(f"{src}: architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
    hidden = int(g("embedding_length"))

    tensors: Dict[str, np.ndarray] = {}
    blocks: Dict[str, np.ndarray] = {}
    kinds: Dict[str, str] = {}
    others: Dict[str, int] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in NATIVE and len(t.shape) == 2:
            raw = np.asarray(t.data, dtype=np.uint8)
            if t.name.endswith("attn_q.weight"):
                raw = _unpermute(raw, n_head)
            elif t.name.endswith("attn_k.weight"):
                raw = _unpermute(raw, n_kv)
            blocks[_hf_name(t.name)] = np.ascontiguousarray(raw)
            kinds[_hf_name(t.name)] = kind.lower()
        elif kind not in ("F32", "F16", "BF16"):
            others[kind] = others.get(kind, 0) + 1
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFConversionError(
                f"{src}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from e
        w = np.asarray(w, dtype=np.float32).reshape([int(x) for x in reversed(t.shape.tolist())])
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    if others:
        print(f"horae: {src.name} holds {', '.join(f'{n} {k}' for k, n in sorted(others.items()))} tensors, which horae "
              f"does not run natively (it runs {' and '.join(NATIVE)}); they are dequantized to f32", file=sys.stderr)
    tied = "lm_head.weight" not in tensors
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]

    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges or _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFConversionError(f"{src}: only GPT-2 style BPE tokenizers (with merges) are supported")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    tok_cfg = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": config["max_position_embeddings"],
    }
    gen_cfg = {"bos_token_id": bos, "eos_token_id": eos}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": src.name})
        # Always written (possibly empty): its metadata also names the formats that were not kept.
        save_file(blocks, str(tmp / QUANTIZED_FILE),
                  metadata={"source": src.name, "horae.quant": json.dumps(kinds), "horae.gguf_other": json.dumps(others)})
        (tmp / MARKER).write_text(json.dumps({"source": src.name, "converter": CONVERTER_VERSION,
                                              "native": sorted(set(kinds.values())), "dequantized": others}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        pre = _field(reader, "tokenizer.ggml.pre", "")
        (tmp / "tokenizer.json").write_text(json.dumps(_tokenizer_json(tokens, merges, types, pre)))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # someone else won the race only if complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
