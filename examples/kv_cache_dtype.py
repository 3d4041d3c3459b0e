#!/usr/bin/env python3
"""Decode and prefill with the KV cache in f32 and in bf16 (`kv_cache_dtype`), in one process.

A decode step reads every weight once and, for each sequence, its whole KV history: with
SmolLM2-135M that is 46 KB a token of context in f32 (30 layers, 3 KV heads of 64, K and V), so
after 2,000 tokens one sequence reads 92 MB of K and V against 96 MB of Q4_1 weights. A bf16
cache halves those bytes. Here two engines of one weight dtype, one per cache dtype, alternate
run by run (this shared machine's bandwidth moves by a third within minutes, so each pair is
read side by side), and each row prints the bf16 cache's rate over the f32 cache's, median of
the pairs.

    python examples/kv_cache_dtype.py [--dtypes q4_1,bfloat16] [--pairs 3]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics

from horae import Engine
from horae.bench.model import _decode_rate, _prefill_rate
from horae.models import resolve_model

# (name, sequences, new tokens, prompt length): short and long histories, one sequence and eight.
DECODE = [("decode 1 sequence after 16 tokens", 1, 48, 16), ("decode 1 sequence after 2,000", 1, 32, 2000),
          ("decode 1 sequence after 4,000", 1, 24, 4000), ("decode 8 sequences after 1,500", 8, 16, 1500)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="q4_1,bfloat16", help="weight dtypes, comma-separated")
    ap.add_argument("--pairs", type=int, default=3, help="alternations of the two caches per row")
    ap.add_argument("--no-prefill", action="store_true", help="decode rows only")
    args = ap.parse_args()
    model = resolve_model(None)
    # Every prompt its own salt: a prompt seen before would be served from the prefix cache.
    salts = itertools.count(1000)
    for dtype in args.dtypes.split(","):
        engines = {kv: Engine(model, dtype=dtype, kv_cache_dtype=kv, kv_cache_tokens=16384, max_num_seqs=8)
                   for kv in ("float32", "bfloat16")}
        print(f"-- weights {dtype}: tok/s with the KV cache in f32 -> bf16, each pair run side by side")
        rows = [(name, lambda e, b=b, n=n, p=p: _decode_rate(e, b, n, prompt_len=p)) for name, b, n, p in DECODE]
        if not args.no_prefill:
            rows += [("prefill 512 tokens",
                      lambda e: statistics.median(_prefill_rate(e, 512, next(salts)) for _ in range(5))),
                     ("prefill 6,000 tokens", lambda e: _prefill_rate(e, 6000, next(salts)))]
        for e in engines.values():
            _prefill_rate(e, 64, salt=999)  # warm-up: thread pool, buffers
        for name, run in rows:
            pairs = [(run(engines["float32"]), run(engines["bfloat16"])) for _ in range(args.pairs)]
            cells = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in pairs)
            ratio = statistics.median(b / a for a, b in pairs)
            print(f"{name:<34} {cells}   bf16 / f32 {ratio:.2f}x", flush=True)
        del engines
        gc.collect()


if __name__ == "__main__":
    main()
