#!/usr/bin/env python3
"""What one send to a replica that sheds the request costs in the Ray deployment (issue 16's retry
rule): two local replicas of the default model with the SLO queue; completions whose first-token
bound (0.1 ms) no replica can meet go in over HTTP, through the ingress and a Ray streaming call
to a replica, are shed by that replica's next scan and come back as a 503. Their latency bounds
what a resend costs (a resend is the middle of that path); the same prompt served with one token
is the reference. Needs `pip install "horae[ray]"`.

    python examples/ray_resend_cost.py [--requests 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
import urllib.error
import urllib.request

from horae.cluster import serve_replicas


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, float]:
    """(HTTP status, seconds) of one completion."""
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    return code, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="completions of each kind per round")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for name in ("requests", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    cluster = serve_replicas(replicas=2, port=_free_port(), kv_cache_tokens=4096, seed=0, queue="slo")
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(cluster.url + "/v1/models", timeout=5) as r:
                    model = json.loads(r.read())["data"][0]["id"]
                break
            except (OSError, urllib.error.URLError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
        _post(cluster.url, body)  # warm-up
        for round_ in range(args.rounds):
            served = [_post(cluster.url, body) for _ in range(args.requests)]
            shed = [_post(cluster.url, {**body, "slo": {"ttft": 1e-4}}) for _ in range(args.requests)]
            for name, runs, want in (("served with one token", served, 200), ("shed (503)", shed, 503)):
                if any(code != want for code, _ in runs):
                    raise SystemExit(f"{name}: expected HTTP {want}, got {sorted({c for c, _ in runs})}")
                ms = sorted(1e3 * s for _, s in runs)
                print(f"round {round_}, {name}: median {statistics.median(ms):.1f} ms, "
                      f"p90 {ms[int(0.9 * len(ms))]:.1f} ms ({len(ms)} requests)", flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
