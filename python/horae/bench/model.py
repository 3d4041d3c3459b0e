"""`horae bench model`: the CPU engine on a model (default: SmolLM2-135M-Instruct, f32).

Prints prefill tokens/s, decode tokens/s at 1, 8 and 32 concurrent sequences, each also as model
FLOP/s (2 x parameters x tokens) and as a ratio to the machine's GEMM peak measured in the same
run, and, when torch and transformers are installed, HF transformers' batch-1 greedy decode on the
same weights.
"""

from __future__ import annotations

import json
import time
from typing import List, Optional

from horae import _core
from horae.llm import Engine, SamplingParams


def _params(model_dir) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, l, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", h // nh)
    per_layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * i
    # Matmul parameters a token goes through: layers plus the LM head (embedding lookup is free).
    return l * per_layer + v * h


def _decode_rate(engine: Engine, batch: int, new_tokens: int) -> float:
    """Decode tokens/s with `batch` sequences all decoding (prefill steps excluded)."""
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, {"prompt_token_ids": [1 + (7 * i + j) % 5000 for j in range(16)]}, p)
    tokens, seconds = 0, 0.0
    while engine.has_unfinished_requests():
        _, _, running, waiting = engine._core.stats()
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        # Count only steps where the whole batch decodes one token each.
        n = sum(1 for o in outs if o.outputs[0].token_ids)
        if waiting == 0 and n == batch and all(len(o.outputs[0].token_ids) > 1 for o in outs):
            tokens += n
            seconds += dt
    return tokens / seconds if seconds else float("nan")


def _prefill_rate(engine: Engine, length: int) -> float:
    ids = [1 + (13 * j) % 5000 for j in range(length)]
    engine.add_request(None, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return length / (time.perf_counter() - t)


def _hf_decode_rate(model_dir, new_tokens: int) -> Optional[float]:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([[1 + j for j in range(16)]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        dt = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) / dt


def run(model=None, batches: List[int] = (1, 8, 32), new_tokens: int = 64, prefill: int = 512, hf: bool = True) -> dict:
    engine = Engine(model, kv_cache_tokens=max(8192, max(batches) * (16 + new_tokens) * 2), max_num_seqs=max(batches))
    params = _params(engine.model_dir)
    h = json.loads((engine.model_dir / "config.json").read_text())["hidden_size"]
    i = json.loads((engine.model_dir / "config.json").read_text())["intermediate_size"]
    peak = max(_core.bench_gemm(512, i, h), _core.bench_gemm(512, h, i))
    res = {"model": str(engine.model_dir), "gemm_peak_gflops": peak, "params_matmul": params}
    print(f"model {engine.model_dir.name}: {params / 1e6:.0f}M matmul parameters, f32")
    print(f"GEMM peak (f32, 512x{i}x{h}, same run): {peak:.1f} GFLOP/s")
    pre = _prefill_rate(engine, prefill)
    res["prefill_tok_s"] = pre
    print(f"prefill {prefill} tokens: {pre:8.1f} tok/s = {2 * params * pre / 1e9:6.1f} GFLOP/s = {2 * params * pre / 1e9 / peak:5.2f} x peak")
    for b in batches:
        r = _decode_rate(engine, b, new_tokens)
        res[f"decode_{b}_tok_s"] = r
        gf = 2 * params * r / 1e9
        print(f"decode at {b:>2} sequences: {r:8.1f} tok/s = {gf:6.1f} GFLOP/s = {gf / peak:5.2f} x peak")
    if hf:
        r = _hf_decode_rate(engine.model_dir, new_tokens)
        if r is None:
            print("HF transformers: not installed (pip install torch transformers to compare)")
        else:
            res["hf_decode_1_tok_s"] = r
            print(f"HF transformers f32 batch-1 decode: {r:.1f} tok/s; horae / HF = {res['decode_1_tok_s'] / r:.2f}x")
    return res
