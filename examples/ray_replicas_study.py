#!/usr/bin/env python3
"""Replicas on Ray Serve against one replica, on this machine, at the same load (issue 16's real
deployment check).

The workload is `serving_study.py`'s (a trace cut to `--requests`, lengths scaled to fit two CPU
cores, arrivals replayed `--trace-scale` times as fast), written once. For each replica count the
default model is served by `horae.cluster.serve_replicas` (the same Ray Serve ingress, router and
per-replica engine settings; each replica's kernels get the machine's cores shared evenly), and
`horae bench serve` replays the workload against the ingress over HTTP. Prints goodput (tokens of
requests within the SLA per second, the paper's) per run and the ratio to one replica.

    python examples/ray_replicas_study.py --out docs/study/ray_replicas
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from serving_study import write_workload  # noqa: E402  (the same workload file)

from horae.bench import serve as bench  # noqa: E402
from horae.cluster import serve_replicas  # noqa: E402
from horae.serve import ServerConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--trace-scale", type=float, default=0.4, help="arrivals this many times as fast as the trace's")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--router", default="forecast")
    p.add_argument("--kv-cache-tokens", type=int, default=1536, help="each replica's KV pool")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--goodput", nargs="+", default=["ttft:10000", "itl:1500"], help="the paper's SLA by default")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default="ray_replicas")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = out / "workload.jsonl"
    write_workload(args, workload)
    rows = []
    for n in [int(x) for x in args.replicas.split(",")]:
        t0 = time.time()
        cluster = serve_replicas(replicas=n, router=args.router, port=args.port, kv_cache_tokens=args.kv_cache_tokens,
                                 max_num_seqs=args.max_num_seqs, dtype="bfloat16", seed=0,
                                 server=ServerConfig(max_queue=10_000))
        try:
            time.sleep(3.0)  # every replica up and publishing
            ns = SimpleNamespace(
                base_url=cluster.url, model=None, api_key=None, trace=str(workload), dataset=None, num_prompts=None,
                request_rate=float("inf"), burstiness=1.0, trace_scale=1.0, max_concurrency=None, length_scale=1.0,
                max_tokens=args.max_tokens, max_model_len=None, vocab_size=49152, goodput=args.goodput,
                timeout=3600.0, seed=0, result_file=str(out / f"replicas_{n}.json"), plot=None, no_progress=True,
                retry_failed=False)
            s = bench.run(ns)
        finally:
            cluster.shutdown()
        rows.append({"replicas": n, "goodput_tps": s["goodput_tps"], "throughput_tps": s.get("output_throughput"),
                     "completed": s.get("completed"), "wall_s": time.time() - t0})
        print(f"{n} replica(s): goodput {s['goodput_tps']:.1f} tok/s", flush=True)
    base = rows[0]["goodput_tps"]
    for r in rows:
        r["vs_first"] = r["goodput_tps"] / base if base else None
        print(f"{r['replicas']} replica(s): goodput {r['goodput_tps']:.1f} tok/s = {r['vs_first']:.2f}x "
              f"{rows[0]['replicas']} replica(s)")
    (out / "study.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
