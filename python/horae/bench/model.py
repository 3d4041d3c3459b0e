"""`horae bench model`: the CPU engine on a model (default: SmolLM2-135M-Instruct).

Prints, all measured in the same run:
- the CPU, and the kernels it runs (portable, avx2, avx512) with the one the engine picked;
- the machine's GEMM peak: a plain f32 GEMM (faer, 512 x intermediate x hidden);
- the linear-layer kernels on the model's own shapes at 1, 8, 32 and 512 rows: faer on row-major
  weights against horae's packed kernel in f32, bf16 and Q4_1 (GGML blocks), with every packed
  kernel the CPU runs (why the packed kernel is used, and what each instruction set gives);
- one layer's prefill attention over the long prompt: the row kernel against the tiled kernel,
  with every kernel the CPU runs;
- for each weight dtype (float32, bfloat16 and q4_1 by default): prefill tokens/s for a 512-token
  prompt and a long one (6,000 tokens; medians of 5 and 3 prompts; the long one's per-token rate
  as a ratio to the short one's: attention's share), and decode tokens/s at 1, 8 and 32 concurrent sequences, each as model FLOP/s
  (2 x parameters x tokens) and as a ratio to the peak, and at 1 sequence after a 2,000-token
  prompt, as a ratio to the rate after 16 tokens (what a long history costs decode attention),
  and at the largest batch sampled (temperature 0.7, top-p 0.9) as a ratio to greedy; for a dtype
  whose KV cache is f32 (float32, q4_1), the long rows again with a bf16 cache
  (`kv_cache_dtype="bfloat16"`, as llama.cpp's f16 default), in an engine of its own;
- the machine's memory read bandwidth (every thread reading 1 GiB; measured after each dtype and
  just before and after each batch-1 decode run too, the highest used for the rooflines), and
  batch-1 decode's (the weight bytes a step reads times the steps a second), also as a ratio to
  the higher of the two readings taken around it (the same minute: this machine's bandwidth drifts);
- decode at each batch size as a fraction of its roofline: b / max(weight bytes / read bandwidth,
  step FLOPs / GEMM peak);
- with torch and transformers installed, HF transformers' bf16 decode at the same batch sizes on the
  same weights, timed the same way (the median step), with horae's bf16 as a ratio to it;
- with llama-cpp-python installed and the default model, llama.cpp at equal precision on the same
  weights: on the very GGUF horae's Q4_1 blocks come from, and for float32 and bfloat16 on that
  GGUF as llama.cpp's own quantizer rewrites it in F32 and BF16: 512-token prefill and batch-1
  decode (for q4_1 after 2,000 tokens too), with each of horae's dtypes as a ratio to them, run
  right after that dtype's own runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import List, Optional

from horae import _core
from horae.checks import is_int
from horae.engine import Engine
from horae.sampling_params import SamplingParams


def kernels_in_use(kernels: dict) -> str:
    """`_core.cpu_kernels()` in words: the kernels this CPU runs and the ones the engine takes
    (the bench's and the test log's header)."""
    words = f"{', '.join(kernels['available'])}; the engine uses {kernels['selected']}"
    if kernels["amx_min_rows"]:
        words += (f", and AMX tiles for a bf16 model's products from {kernels['amx_min_rows']} rows, and for an f32"
                  " or quantized model's prefill attention in three bf16 products")
    if kernels["amx_int8_min_rows"]:
        words += f", and AMX int8 tiles for q8_0/q4_1 weights from {kernels['amx_int8_min_rows']} rows"
    if kernels["avx512_bf16_min_rows"]:
        words += ", and vdpbf16ps for a bf16 model's products"
    return words

def _params(model_dir) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim", h // nh)
    per_layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * i
    # Matmul parameters a token goes through: layers plus the LM head (embedding lookup is free).
    return layers * per_layer + v * h


def _decode_rate(engine: Engine, batch: int, new_tokens: int, prompt_len: int = 16, **sampling) -> float:
    """Decode tokens/s with `batch` sequences all decoding: `batch` over the median time of the
    steps where every sequence decodes one token (prefill steps excluded). The median, because
    this shared machine has bursts of contention that a mean would charge to the engine. Greedy
    unless `sampling` names other parameters (temperature, top_p, seed...)."""
    p = SamplingParams(**{"temperature": 0, **sampling, "max_tokens": new_tokens, "ignore_eos": True})
    for i in range(batch):
        engine.add_request(None, {"prompt_token_ids": [1 + (7 * i + j) % 5000 for j in range(prompt_len)]}, p)
    times = []
    while engine.has_unfinished_requests():
        waiting = engine.stats()["waiting"]
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        n = sum(1 for o in outs if o.outputs[0].token_ids)
        if waiting == 0 and n == batch and all(len(o.outputs[0].token_ids) > 1 for o in outs):
            times.append(dt)
    return batch / statistics.median(times) if times else float("nan")


def _prefill_rate(engine: Engine, length: int, salt: int = 0) -> float:
    """Tokens/s of one prompt's prefill; prompts with different `salt` share no prefix, so none
    is served from the prefix cache."""
    ids = [1 + (13 * j + 101 * salt) % 5000 for j in range(length)]
    engine.add_request(None, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1))
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return length / (time.perf_counter() - t)


def _with_bf16_cache(model_dir, dtype: str, r: dict, prefill: int, long_prefill: int, long_decode: int) -> None:
    """The long rows again with the KV cache in bf16 (`kv_cache_dtype="bfloat16"`, as llama.cpp's
    default f16 cache), for a dtype whose own cache is f32: a step after a long history reads
    half the bytes of it, and prefill attention's products are bf16 where the CPU runs them."""
    engine = Engine(model_dir, kv_cache_tokens=max(long_prefill, long_decode) + 64, max_num_seqs=1, dtype=dtype,
                    kv_cache_dtype="bfloat16")
    print("  with a bf16 KV cache (kv_cache_dtype='bfloat16'):")
    _prefill_rate(engine, 64, salt=2)
    if long_prefill:
        pre = statistics.median(_prefill_rate(engine, prefill, salt=30 + i) for i in range(5))
        long = statistics.median(_prefill_rate(engine, long_prefill, salt=40 + i) for i in range(3))
        r.update({"bf16_kv_prefill_tok_s": pre, f"bf16_kv_prefill_{long_prefill}_tok_s": long})
        print(f"  prefill {prefill} tokens: {pre:8.1f} tok/s; {long_prefill} tokens: {long:8.1f} tok/s, "
              f"{long / pre:.2f}x the per-token rate of {prefill} tokens")
    if long_decode:
        rate = _decode_rate(engine, 1, 16, prompt_len=long_decode)
        r[f"decode_1_after_{long_decode}_bf16_kv_tok_s"] = rate
        f32 = r.get(f"decode_1_after_{long_decode}_tok_s")
        print(f"  decode at 1 sequence after a {long_decode}-token prompt: {rate:8.1f} tok/s"
              + (f", {rate / f32:.2f}x the f32 cache" if f32 else ""))


def _hf_decode_rates(model_dir, batches: List[int], new_tokens: int) -> Optional[dict]:
    """HF transformers' bf16 decode tokens/s at each batch size, timed as horae's are: `batch` over
    the median decode step (one forward of `batch` new tokens against the cache), on the same
    prompts. None without torch and transformers."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import inspect

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    # transformers 5 renamed `past_key_values` to `cache` (in the forward and in its output).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rates = {}
    for b in batches:
        ids = torch.tensor([[1 + (7 * i + j) % 5000 for j in range(16)] for i in range(b)])
        times = []
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            for _ in range(new_tokens):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                out = model(tok, use_cache=True, **{key: getattr(out, key)})
                times.append(time.perf_counter() - t)
        rates[b] = b / statistics.median(times)
    return {"version": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "decode_tok_s": rates}


def _llamacpp_peer(gguf, prefill: int, new_tokens: int, long_decode: int = 0, ftype: Optional[str] = None) -> Optional[dict]:
    """`_llamacpp_rates` in a child process, so that a peer that crashes (llama.cpp's AMX kernels
    were seen to segfault on a Xeon VM) costs its figures, not the bench: None if llama-cpp-python
    is not installed, {"error": ...} if the run failed."""
    import subprocess
    import sys

    code = ("import json, sys; from horae.bench.model import _llamacpp_rates; "
            "print(json.dumps(_llamacpp_rates(*json.loads(sys.argv[1]))))")
    args = json.dumps([str(gguf), prefill, new_tokens, long_decode, ftype])
    run = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if run.returncode != 0:
        why = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
        tail = run.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"llama.cpp run failed ({why}) {tail[0]}".strip()}
    return json.loads(run.stdout.strip().splitlines()[-1])


#: llama.cpp at each horae dtype's precision: the default GGUF itself for q4_1; for f32 and bf16,
#: the GGUF that llama.cpp's own quantizer (`llama_model_quantize`, requantizing) writes from it
#: in that type. Both sides then hold the same weights: the Q4_1 (and Q8_0 embedding) blocks
#: dequantized, rounded to bf16 for bf16, as horae's float32 and bfloat16 loads of that GGUF do.
_PEER_FTYPES = {"q4_1": None, "float32": "LLAMA_FTYPE_ALL_F32", "bfloat16": "LLAMA_FTYPE_MOSTLY_BF16"}


def _llamacpp_rates(gguf, prefill: int, new_tokens: int, long_decode: int = 0, ftype: Optional[str] = None) -> Optional[dict]:
    """llama.cpp (through llama-cpp-python, if installed) on `gguf`, or on a copy of it that
    llama.cpp requantizes to `ftype` (a `LLAMA_FTYPE_*` name) in a temporary folder: prefill
    tokens/s for one `prefill`-token prompt and batch-1 decode tokens/s (the median step), timed
    as horae's are; with `long_decode`, batch-1 decode after a prompt that long too (16 steps)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if ftype is None:
        return _llamacpp_timed(llama_cpp, gguf, prefill, new_tokens, long_decode)
    import ctypes
    import tempfile

    with tempfile.TemporaryDirectory(prefix="horae-bench-") as tmp:
        out = os.path.join(tmp, f"{ftype}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.allow_requantize = True
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(gguf).encode(), out.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not write {ftype} from {gguf}")
        return _llamacpp_timed(llama_cpp, out, prefill, new_tokens, long_decode)


def _llamacpp_timed(llama_cpp, gguf, prefill: int, new_tokens: int, long_decode: int) -> dict:
    """`_llamacpp_rates` on the GGUF at `gguf`: prefill the median of three prompts, as horae's
    are medians (single runs here were a third apart within a minute)."""
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(prefill + new_tokens, long_decode + 16) + 64, n_batch=prefill,
                          n_ubatch=prefill, n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = [1 + (13 * j + 101 * 3) % 5000 for j in range(prefill)]
    llm.eval(ids[:64])  # warm-up
    runs = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        runs.append(prefill / (time.perf_counter() - t))
    pre = statistics.median(runs)
    llm.reset()
    llm.eval(ids[:16])

    def decode(steps: int) -> float:
        times = []
        for i in range(steps):
            t = time.perf_counter()
            llm.eval([1 + (7 * i) % 5000])
            times.append(time.perf_counter() - t)
        return 1 / statistics.median(times)

    out = {"version": llama_cpp.__version__, "prefill_tok_s": pre, "decode_1_tok_s": decode(new_tokens)}
    if long_decode:
        llm.reset()
        llm.eval([1 + (7 * j) % 5000 for j in range(long_decode)])
        out[f"decode_1_after_{long_decode}_tok_s"] = decode(16)
    return out


def _shapes(cfg: dict) -> List[tuple]:
    """(out, in) of each linear layer of one decoder layer, as the runtime stacks them."""
    h, i, nh = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    nkv, hd = cfg.get("num_key_value_heads", nh), cfg.get("head_dim", h // nh)
    return [((nh + 2 * nkv) * hd, h), (h, nh * hd), (2 * i, h), (h, i)]


def _cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model (a virtual machine's name can be
    as bare as "AMD EPYC") and the vector features the kernels care about."""
    import platform

    try:
        info = {}
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    have = [f for f in wanted if f in flags]
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {' '.join(have) or 'no AVX2'}; {os.cpu_count()} threads)")


def run(model=None, batches: List[int] = (1, 8, 32), new_tokens: int = 64, prefill: int = 512, hf: bool = True,
        dtypes: List[str] = ("float32", "bfloat16", "q4_1"), long_prefill: int = 6000, long_decode: int = 2000) -> dict:
    import gc

    from horae.models import resolve_model

    bad = [d for d in dtypes if d not in ("auto", "float32", "bfloat16", "q8_0", "q4_1")]
    if bad:
        raise ValueError(f"unknown dtype {bad[0]!r}: use 'auto', 'float32', 'bfloat16', 'q8_0' or 'q4_1'")
    for name, value in (("long_prefill", long_prefill), ("long_decode", long_decode)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be a whole number of tokens, 0 to skip it; got {value!r}")
    model_dir = resolve_model(model)
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    params = _params(model_dir)

    def gemm_peak() -> float:
        return max(_core.bench_gemm(512, i, h), _core.bench_gemm(512, h, i))

    # This machine's speed drifts (shared cores): the peak is measured again after each dtype's
    # runs and the highest of all is the one every ratio is taken against (the strict choice).
    kernels = _core.cpu_kernels()
    peaks = [gemm_peak()]
    res = {"model": str(model_dir), "params_matmul": params, "linear": {}, "dtypes": {}, "cpu": _cpu_name(),
           "kernels": kernels}
    print(f"CPU {res['cpu']}; kernels it runs: {kernels_in_use(kernels)}")
    print(f"model {model_dir.name}: {params / 1e6:.0f}M matmul parameters")
    print(f"GEMM peak (faer f32, 512x{i}x{h}, same run): {peaks[0]:.1f} GFLOP/s")
    bandwidths = [_core.bench_read_bandwidth()]
    print(f"memory read bandwidth (all threads, 1 GiB, best of 10 passes, same run): {bandwidths[0]:.1f} GB/s")

    print(f"linear layers of this model ({cfg['num_hidden_layers']} layers, weights from memory), GFLOP/s:")
    # The portable kernel is the fallback where no SIMD kernel runs (and far slower: 10-20x); where
    # one runs, the table leaves it out to keep the bench short (the tests still check it).
    simd = [k for k in kernels["available"] if k != "portable"] or ["portable"]
    simd += ["amx"] if kernels["amx_min_rows"] else []
    simd += ["avx512 bf16"] if kernels["avx512_bf16_min_rows"] else []
    short = {"float32": "f32", "bfloat16": "bf16", "q4_1": "q4_1"}
    # AMX tiles run a bf16 model's products (bf16 tiles, from kernels["amx_min_rows"] rows) and
    # quantized weights (int8 tiles, from kernels["amx_int8_min_rows"]); vdpbf16ps a bf16 model's
    # where AMX does not run; below those rows, the AVX-512 kernel runs, as in the engine.
    cols = [(d, k) for k in simd for d in short
            if k not in ("amx", "avx512 bf16") or d == "bfloat16"
            or (k == "amx" and d == "q4_1" and kernels["amx_int8_min_rows"])]
    label = {"avx512 bf16": "vdpbf16ps"}  # the kernel's name in bench_linear, shorter in the table
    print(f"{'rows':>6} {'faer f32':>9} " + " ".join(f"{label.get(k, k) + ' ' + short[d]:>12}" for d, k in cols))
    for m in (1, 8, 32, 512):
        row = {}
        for d, k in cols:
            faer, row[f"{k}_{d}"] = _core.bench_linear(_shapes(cfg), cfg["num_hidden_layers"], m, d, kernel=k)
            if faer is not None:
                row["faer_f32"] = faer
        res["linear"][m] = row
        print(f"{m:>6} {row['faer_f32']:9.1f} " + " ".join(f"{row[f'{k}_{d}']:12.1f}" for d, k in cols))

    if long_prefill:
        nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        hd = cfg.get("head_dim", h // nh)
        rows, tiled = _core.bench_attention(long_prefill, nh, nkv, hd, iters=1)
        flops = 4 * long_prefill * long_prefill / 2 * nh * hd
        res["attention"] = {"tokens": long_prefill, "rows_s": rows, "tiled_s": dict(tiled)}
        print(f"prefill attention, one layer, {long_prefill} tokens ({nh} heads, {nkv} KV heads, head_dim {hd}):")
        print(f"  row kernel {rows * 1e3:8.1f} ms = {flops / rows / 1e9:6.1f} GFLOP/s")
        for name, t in tiled:
            print(f"  tiled {name:>8} {t * 1e3:6.1f} ms = {flops / t / 1e9:6.1f} GFLOP/s, {rows / t:5.1f}x the row kernel")

    peer = True  # llama.cpp is compared until it turns out not to be installed
    for dtype in dtypes:
        engine = Engine(model_dir, kv_cache_tokens=max(8192, max(batches) * (16 + new_tokens) * 2, long_prefill + 16,
                                                        long_decode + 16),
                        max_num_seqs=max(batches), dtype=dtype)
        r = {"kv_cache_dtype": engine.kv_cache_dtype}
        print(f"-- weights {dtype}, KV cache {engine.kv_cache_dtype}")
        _prefill_rate(engine, 64, salt=1)  # warm-up: thread pool, buffers
        # Medians of several prompts: one 512-token prefill takes a few hundred ms, and single
        # runs on a shared machine were 1.3x apart within minutes, which moved the ratio below.
        runs = [_prefill_rate(engine, prefill, salt=10 + i) for i in range(5)]
        pre = statistics.median(runs)
        r["prefill_tok_s"] = pre
        print(f"prefill {prefill} tokens: {pre:8.1f} tok/s = {2 * params * pre / 1e9:6.1f} GFLOP/s "
              f"(median of {len(runs)}: {min(runs):.0f}-{max(runs):.0f})")
        if long_prefill:
            longs = [_prefill_rate(engine, long_prefill, salt=20 + i) for i in range(3)]
            long = statistics.median(longs)
            r[f"prefill_{long_prefill}_tok_s"] = long
            print(f"prefill {long_prefill} tokens: {long:8.1f} tok/s (median of {len(longs)}: "
                  f"{min(longs):.0f}-{max(longs):.0f}), {long / pre:.2f}x the per-token rate of {prefill} tokens")
        for b in batches:
            # Batch-1 decode is bound by the read bandwidth, which drifts on a shared machine by a
            # third within minutes: it is measured just before and after this run too.
            around = [_core.bench_read_bandwidth()] if b == 1 else []
            rate = _decode_rate(engine, b, new_tokens)
            around += [_core.bench_read_bandwidth()] if b == 1 else []
            bandwidths += around
            r[f"decode_{b}_tok_s"] = rate
            gf = 2 * params * rate / 1e9
            line = f"decode at {b:>2} sequences: {rate:8.1f} tok/s = {gf:6.1f} GFLOP/s"
            r["weight_bytes"] = engine.decode_weight_bytes
            if b == 1 and engine.decode_weight_bytes:
                gbs = engine.decode_weight_bytes * rate / 1e9
                r["decode_1_gbs"] = gbs
                r["decode_1_bandwidth_around"] = around
                line += (f", {engine.decode_weight_bytes / 1e6:.0f} MB of weights a step: {gbs:.1f} GB/s = "
                         f"{gbs / max(around):.2f} of the read bandwidth measured just before and after "
                         f"({around[0]:.1f}, {around[1]:.1f} GB/s)")
            print(line)
        # Chat clients sample: with temperature and top-p every row's draw runs on the engine's
        # thread, which greedy decode does not show (it once halved the 32-sequence rate).
        top = max(batches)
        rate = _decode_rate(engine, top, new_tokens, temperature=0.7, top_p=0.9, seed=0)
        r[f"decode_{top}_sampled_tok_s"] = rate
        greedy = r.get(f"decode_{top}_tok_s")
        print(f"decode at {top:>2} sequences, sampled (temperature 0.7, top-p 0.9): {rate:8.1f} tok/s"
              + (f", {rate / greedy:.2f}x greedy" if greedy else ""))
        if long_decode:
            # A long history: decode attention reads it all every step, which the short-prompt
            # rows above do not show.
            rate = _decode_rate(engine, 1, 16, prompt_len=long_decode)
            r[f"decode_1_after_{long_decode}_tok_s"] = rate
            short = r.get("decode_1_tok_s")
            print(f"decode at  1 sequence after a {long_decode}-token prompt: {rate:8.1f} tok/s"
                  + (f", {rate / short:.2f}x the rate after 16 tokens" if short else ""))
        res["dtypes"][dtype] = r
        del engine
        gc.collect()
        if (long_prefill or long_decode) and r["kv_cache_dtype"] == "float32":
            _with_bf16_cache(model_dir, dtype, r, prefill, long_prefill, long_decode)
        peaks.append(gemm_peak())
        bandwidths.append(_core.bench_read_bandwidth())
        # llama.cpp at this precision right after horae's runs (this engine's threads are gone):
        # this machine drifts by a third within minutes, and a peer run after every dtype's came
        # minutes later than the runs it is compared with.
        if peer and model is None and dtype in _PEER_FTYPES:
            peer = _compare_llamacpp(res, dtype, prefill, new_tokens, long_decode)
    # The strict peak: the highest of faer's runs and of every packed kernel at 512 rows (horae's
    # own AVX-512 kernel outruns faer).
    packed = max(v for k, v in res["linear"][512].items() if k != "faer_f32")
    peak = max(peaks + [packed])
    res["gemm_peak_gflops"] = peak
    res["gemm_peak_runs"] = peaks
    print(f"GEMM peak: faer measured {len(peaks)} times, " + ", ".join(f"{p:.1f}" for p in peaks)
          + f" GFLOP/s, the best packed kernel at 512 rows {packed:.1f}; ratios against the highest, {peak:.1f}:")
    for dtype, r in res["dtypes"].items():
        cells = [f"prefill {2 * params * r['prefill_tok_s'] / 1e9 / peak:.2f}"]
        cells += [f"decode@{b} {2 * params * r[f'decode_{b}_tok_s'] / 1e9 / peak:.2f}" for b in batches]
        print(f"  {dtype:>8}: " + "  ".join(cells))
    # Decode's roofline at b sequences: a step reads every weight once and does 2 x params x b
    # FLOPs (attention over these short contexts is under 1% of them), so it takes at least
    # max(weight bytes / read bandwidth, step FLOPs / GEMM peak).
    # The bandwidth drifts as the peak does: measured after each dtype too, the highest used.
    bandwidth = max(bandwidths)
    res["read_bandwidth_gbs"] = bandwidth
    res["read_bandwidth_runs"] = bandwidths
    print("read bandwidth measured " + ", ".join(f"{b:.1f}" for b in bandwidths) + " GB/s; at 1 sequence decode "
          "reads every weight once a step, so there its roofline is the bandwidth:")
    print(f"decode against its roofline, b / max(weight bytes / {bandwidth:.1f} GB/s, 2 x params x b / {peak:.1f} GFLOP/s):")
    for dtype, r in res["dtypes"].items():
        if not r.get("weight_bytes"):
            continue
        cells = []
        for b in batches:
            roof = b / max(r["weight_bytes"] / (bandwidth * 1e9), 2 * params * b / (peak * 1e9))
            r[f"decode_{b}_roofline_tok_s"] = roof
            cells.append(f"@{b} {r[f'decode_{b}_tok_s'] / roof:.2f} of {roof:.0f} tok/s")
        print(f"  {dtype:>8}: " + "  ".join(cells))
    if hf:
        peer = _hf_decode_rates(model_dir, batches, new_tokens)
        if peer is None:
            print("HF transformers: not installed (pip install torch transformers to compare)")
        else:
            res["hf"] = peer
            print(f"HF transformers bf16 ({peer['version']}, {peer['threads']} threads), decode: " + ", ".join(
                f"{b} sequences {r:.1f} tok/s" for b, r in peer["decode_tok_s"].items()))
            if "bfloat16" in res["dtypes"]:
                ours = res["dtypes"]["bfloat16"]
                print("  horae bf16 / HF bf16: " + ", ".join(
                    f"{b} sequences {ours[f'decode_{b}_tok_s'] / r:.2f}x" for b, r in peer["decode_tok_s"].items()))
    return res


def _compare_llamacpp(res: dict, dtype: str, prefill: int, new_tokens: int, long_decode: int) -> bool:
    """llama.cpp at `dtype`'s precision (`_PEER_FTYPES`) on the same weights: 512-token prefill and
    batch-1 decode, with horae's as a ratio to them; after a long prompt too for q4_1, the
    default model's own format. False if llama-cpp-python is not installed."""
    from horae.models import _find_default_gguf, cache_dir

    gguf = _find_default_gguf(cache_dir() / "downloads")
    ftype = _PEER_FTYPES[dtype]
    long = long_decode if ftype is None else 0
    peer = _llamacpp_peer(gguf, prefill, new_tokens, long, ftype)
    if peer is None:
        print("llama.cpp: not installed (pip install llama-cpp-python to compare on the same weights)")
        return False
    res.setdefault("llama_cpp", {})[dtype] = peer
    if "error" in peer:
        print(f"llama.cpp, {dtype}: {peer['error']}; no comparison")
        return True
    ours = res["dtypes"][dtype]
    source = ("the same GGUF (Q4_1 layers, Q8_0 embedding)" if ftype is None
              else f"the same GGUF requantized by llama.cpp to {ftype.rsplit('_', 1)[-1]}")
    print(f"llama.cpp {peer['version']}, {dtype}, on {source}, {os.cpu_count()} threads: prefill {prefill} "
          f"tokens {peer['prefill_tok_s']:.1f} tok/s, decode at 1 sequence {peer['decode_1_tok_s']:.1f} tok/s; "
          f"horae {dtype} / llama.cpp: prefill {ours['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x, decode "
          f"{ours['decode_1_tok_s'] / peer['decode_1_tok_s']:.2f}x")
    key = f"decode_1_after_{long_decode}_tok_s"
    if long and key in ours:
        half = ours.get(f"decode_1_after_{long_decode}_bf16_kv_tok_s")
        print(f"  decode at 1 sequence after a {long_decode}-token prompt: llama.cpp {peer[key]:.1f} tok/s (f16 KV "
              f"cache), horae {dtype} / llama.cpp {ours[key] / peer[key]:.2f}x ({ours['kv_cache_dtype']} cache)"
              + (f", {half / peer[key]:.2f}x (bf16 cache)" if half else ""))
    return True
