#!/usr/bin/env python3
"""Batch-1 decode of a bf16 model against the memory's read bandwidth, paired window by window
(issue 17's ">= 0.85 of the machine's read bandwidth").

On a shared virtual machine the bandwidth that `horae bench model` reads moves between levels
(on the 2-vCPU Zen 4 of 2026-12-06: 33-39 GB/s most of the time, 55-69 GB/s in bursts of seconds),
and the bench's "around" reading takes the best pass before and after decode. Here each window
reads the bandwidth (one 1 GiB pass) before and after, and in between times: the model's linear
layers at one row (`bench_linear`, as one decode step runs them), the same bytes in products of
sizes from 0.6 MB up (the stream's rate against the size of one product), and the engine's decode
of one sequence. Windows whose two readings agree on a level are grouped by it, and medians printed.

    python examples/decode_bandwidth_modes.py [--seconds 300] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from horae import Engine, _core
from horae.bench.model import _decode_rate, _shapes
from horae.models import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weights whose bytes a step streams as they are stored")
    ap.add_argument("--split", type=float, default=50.0, help="GB/s between the low and the high level")
    args = ap.parse_args()
    model = resolve_model(None)
    engine = Engine(model, kv_cache_tokens=8192, max_num_seqs=4, dtype=args.dtype)
    cfg = json.loads((model / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    h = cfg["hidden_size"]
    kernel = "avx512 bf16" if args.dtype == "bfloat16" and _core.cpu_kernels()["avx512_bf16_min_rows"] else None
    bytes_per_value = 2 if args.dtype == "bfloat16" else 4
    total = sum(n * k for n, k in _shapes(cfg)) * layers * bytes_per_value
    # Products of one shape, n x hidden, as many as make up the model's linear bytes.
    sizes = [512, 2048, 8192, 32768]
    _decode_rate(engine, 1, 8)
    rows: dict[str, list[dict]] = {"low": [], "high": []}
    t0 = time.time()
    while time.time() - t0 < args.seconds:
        before = _core.bench_read_bandwidth(1024, 1)
        row = {"layers": _core.bench_linear(_shapes(cfg), layers, 1, args.dtype, 3, kernel)[1] * bytes_per_value / 2}
        for n in sizes:
            count = max(1, total // (n * h * bytes_per_value))
            row[n] = _core.bench_linear([(n, h)], count, 1, args.dtype, 3, kernel)[1] * bytes_per_value / 2
        row["decode"] = engine.decode_weight_bytes * _decode_rate(engine, 1, 24) / 1e9
        after = _core.bench_read_bandwidth(1024, 1)
        row["bandwidth"] = max(before, after)
        if min(before, after) > args.split:
            rows["high"].append(row)
        elif max(before, after) < args.split:
            rows["low"].append(row)
    print(f"CPU: {_core.cpu_kernels()['selected']} kernels; {model.name}, {args.dtype}; "
          f"{total / 1e6:.0f} MB of linear weights a token; GB/s, medians over windows")
    mb = {n: n * h * bytes_per_value / 1e6 for n in sizes}
    head = ["level", "windows", "bandwidth", "layers", *(f"{mb[n]:.1f} MB" for n in sizes), "decode", "decode / bw"]
    print(" | ".join(head))
    for level, got in rows.items():
        if not got:
            continue
        med = {key: statistics.median(r[key] for r in got) for key in got[0]}
        ratio = statistics.median(r["decode"] / r["bandwidth"] for r in got)
        cells = [level, str(len(got)), f"{med['bandwidth']:.1f}", f"{med['layers']:.1f}",
                 *(f"{med[n]:.1f}" for n in sizes), f"{med['decode']:.1f}", f"{ratio:.2f}"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
