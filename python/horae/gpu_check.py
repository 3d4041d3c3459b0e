"""The GPU half of horae's checks, for a machine with an NVIDIA GPU (scripts/gpu_check.sh runs the
CUDA kernel tests first, then this):

    python -m horae.gpu_check [--out DIR] [--skip-model-bench]

1. end-to-end greedy generation of the default model on the GPU (bf16) against the CPU, on the
   golden prompts: identical tokens, or a divergence at a near-tie of the CPU's own logits;
2. paged decode attention at batch 64, context 4096, 32 query / 8 KV heads, head dim 128, bf16:
   GB/s of KV read as a ratio to a device-to-device copy measured in the same run (goal >= 0.8),
   and against torch's scaled_dot_product_attention on contiguous KV when torch is installed
   (goal >= 1.0x);
3. an 8B-shaped random-weight Llama: decode tokens/s at batch 1/32/128, prefill tokens/s, with
   MFU and bandwidth utilisation.

Everything printed is also written to DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from horae import _core
from horae.cuda import preload_libraries

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for MFU. Unknown GPUs print no MFU.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10", 125e12), ("RTX 4090", 165e12)]

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def _peak(name: str) -> Optional[float]:
    return next((p for key, p in PEAK_BF16 if key in name), None)


def _golden_prompts() -> List[Any]:
    """The golden files' prompts as token ids (run from a checkout), else a few plain prompts."""
    path = Path(__file__).resolve().parents[2] / "tests" / "golden" / "smollm2.json"
    if path.is_file():
        cases = json.loads(path.read_text()).get("cases", [])
        prompts = [{"prompt_token_ids": c["ids"]} for c in cases if isinstance(c, dict) and "ids" in c]
        if prompts:
            return prompts
    return ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]


def end_to_end(max_tokens: int = 32) -> Dict[str, Any]:
    """Greedy on GPU (bf16) vs CPU (the checkpoint's dtype) on the golden prompts."""
    from horae import LLM, SamplingParams

    prompts = _golden_prompts()
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    cpu = LLM(device="cpu")
    gpu = LLM(device="cuda")
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts, greedy, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in gpu.generate(prompts, greedy, use_tqdm=False)]
    rows, ok = [], True
    for prompt, w, g in zip(prompts, want, got):
        at = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), None)
        ids = cpu.engine.encode(prompt) if isinstance(prompt, str) else list(prompt["prompt_token_ids"])
        row: Dict[str, Any] = {"prompt": cpu.engine.decode(ids)[-40:], "identical": at is None}
        if at is not None:
            # A flip is acceptable only where the CPU itself nearly tied the two tokens.
            logits = cpu.logits({"prompt_token_ids": ids + list(w[:at])})[-1]
            span = float(logits.max() - logits.min())
            gap = float(abs(logits[w[at]] - logits[g[at]]))
            row.update(diverges_at=at, logit_gap=gap, logit_range=span, near_tie=gap < 0.02 * span)
            ok &= row["near_tie"]
        rows.append(row)
    return {"device": gpu.engine.device, "dtype": gpu.engine.dtype, "prompts": rows, "ok": ok}


def attention(batch=64, ctx=4096, heads=32, kv_heads=8, head_dim=128) -> Dict[str, Any]:
    r = dict(_core.cuda_bench_decode_attention(batch=batch, ctx=ctx, heads=heads, kv_heads=kv_heads, head_dim=head_dim))
    r["ratio_to_copy"] = r["gbps"] / r["copy_gbps"]
    r["torch"] = _torch_sdpa(batch, ctx, heads, kv_heads, head_dim)
    if isinstance(r["torch"], dict):
        r["speedup_vs_torch"] = r["torch"]["ms"] / r["ms"]
    return r


def _torch_sdpa(batch, ctx, heads, kv_heads, head_dim):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return "torch is not installed: comparison skipped"
    if not torch.cuda.is_available():
        return "torch has no CUDA: comparison skipped"
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, ctx, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    try:
        run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        run()
        how = "enable_gqa"
    except TypeError:  # torch < 2.5: expand the KV heads (reads the same bytes from L2)
        k2, v2 = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        run = lambda: F.scaled_dot_product_attention(q, k2, v2)  # noqa: E731
        how = "repeat_interleave"
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        run()
    end.record()
    torch.cuda.synchronize()
    return {"ms": start.elapsed_time(end) / 20, "gqa": how, "torch": torch.__version__}


def model_bench(batches=(1, 32, 128), ctx=1024, prefill_tokens=2048) -> Dict[str, Any]:
    r = dict(_core.cuda_bench_model(json.dumps(LLAMA3_8B), list(batches), ctx=ctx, prefill_tokens=prefill_tokens))
    peak = _peak(r["gpu"])
    flops_per_token = 2 * r["params"]
    r["decode"] = [{"batch": b, "ms": ms, "tokens_per_s": tps, "bytes_per_step": nbytes,
                    "bandwidth_util": nbytes / (ms * 1e-3) / (r["copy_gbps"] * 1e9),
                    "mfu": flops_per_token * tps / peak if peak else None}
                   for b, ms, tps, nbytes in r["decode"]]
    tokens, ms, tps = r["prefill"]
    r["prefill"] = {"tokens": tokens, "ms": ms, "tokens_per_s": tps, "mfu": flops_per_token * tps / peak if peak else None}
    r["peak_bf16_flops"] = peak
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m horae.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json")
    ap.add_argument("--skip-model-bench", action="store_true", help="skip the 8B-shaped model (needs ~40 GB)")
    args = ap.parse_args(argv)
    preload_libraries()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev, why = _core.resolve_device("auto")
    if not dev.startswith("cuda"):
        print(f"no usable GPU: {why}", file=sys.stderr)
        return 2
    results: Dict[str, Any] = {"device": dict(_core.cuda_device_info()), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"GPU: {results['device']}", flush=True)
    steps = [("end_to_end", end_to_end), ("decode_attention", attention)]
    if not args.skip_model_bench:
        steps.append(("model_8b_random", model_bench))
    failed = False
    for name, fn in steps:
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:  # record and go on: one failing part must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        print(f"\n== {name} ({time.time() - t0:.0f} s)\n{json.dumps(results[name], indent=1, default=str)}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    e2e = results.get("end_to_end", {})
    att = results.get("decode_attention", {})
    print("\n== summary")
    print(f"end-to-end greedy GPU vs CPU: {'ok' if e2e.get('ok') else 'FAILED'}")
    if "ratio_to_copy" in att:
        print(f"decode attention: {att['gbps']:.0f} GB/s of KV = {att['ratio_to_copy']:.2f} x device copy (goal >= 0.8)"
              + (f"; {att['speedup_vs_torch']:.2f}x torch SDPA (goal >= 1.0)" if "speedup_vs_torch" in att
                 else f"; {att['torch']}"))
    for d in results.get("model_8b_random", {}).get("decode", []):
        mfu = f", MFU {d['mfu']:.1%}" if d["mfu"] is not None else ""
        print(f"8B decode batch {d['batch']:4}: {d['tokens_per_s']:9.0f} tok/s, {d['ms']:.2f} ms/step, "
              f"bandwidth {d['bandwidth_util']:.0%} of copy{mfu}")
    p = results.get("model_8b_random", {}).get("prefill")
    if p:
        print(f"8B prefill {p['tokens']} tokens: {p['tokens_per_s']:.0f} tok/s" + (f", MFU {p['mfu']:.1%}" if p["mfu"] else ""))
    return 1 if failed or not e2e.get("ok") else 0


if __name__ == "__main__":
    sys.exit(main())
