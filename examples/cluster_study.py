#!/usr/bin/env python3
"""Replicas behind a router, in the cluster simulator (issue 16): the routers side by side.

Each replica is a simulated engine with the real scheduler and block manager (Past-Future, and
the SLO queue so that past the knee it sheds instead of collapsing); the router is
`horae_core::route`, the code the Ray Serve deployment is to route with, and it sees each
replica's stats as published every ``--staleness`` seconds plus what it sent since.

Workloads (open loop, arrivals scaled by the load):
- ``mooncake``: the Mooncake synthetic trace (Kimi's cluster; `hash_ids` name shared 512-token
  prefixes), Llama-3-8B on H200s with 1M KV tokens each;
- ``azure-conv``: the Azure conv hour, Llama-2-7B with 120k;
- ``sharegpt-o1``: the paper's ShareGPT-o1 with Poisson arrivals, Llama-2-7B with 120k (the
  paper's 7B pool).

    examples/cluster_study.py --workloads mooncake --replicas 8 --loads 1,2,3
    examples/cluster_study.py --out docs/study/cluster --plot-only     # the figure from the saved runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from horae import sim

ROUTERS = ["round-robin", "power-of-two", "prefix", "forecast"]
WORKLOADS = {
    # name: (model, hardware, KV tokens per replica, max_tokens, SLA)
    # Llama-3-8B on an H200: 141 GB less 16 GB of weights holds about 1M tokens at 128 KB each.
    "mooncake": ("llama-3-8b", "h200", 1_000_000, 1024, {"ttft": 30.0, "max_itl": 1.5}),
    "azure-conv": ("llama-2-7b", "a100-80gb", 120_000, 4096, {"ttft": 10.0, "max_itl": 1.5}),
    "sharegpt-o1": ("llama-2-7b", "a100-80gb", 120_000, 12_000, {"ttft": 10.0, "max_itl": 1.5}),
}


def workload(name: str, data: Path, replicas: int):
    if name == "mooncake":
        return sim.load_trace(data / "synthetic_trace.jsonl")
    if name == "azure-conv":
        return sim.load_trace(data / "AzureLLMInferenceTrace_conv.csv")
    if name == "sharegpt-o1":
        # 0.06 req/s a replica at load 1; the sweep's loads cross 7B/120k's capacity.
        return sim.load_trace(data / "ShareGPT-o1.json").with_arrivals(0.06 * replicas, 1.0, 0)
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")


def run(trace, name, replicas, router, load, staleness, retry_shed, seeds=1):
    """One point of the sweep: the mean of each figure over seeds 0..seeds-1 (the seed draws the
    routers' and schedulers' random choices; past the knee one seed's goodput can move by a
    quarter), with each seed's goodput kept under "goodput_per_seed". Both goodputs: the paper's
    (per second of the run, first arrival to last finish) and "window_goodput_tps" (the same
    tokens per second of the arrivals): between routers at one load its ratio is that of the
    SLA-meeting tokens served, which does not reward a router for draining its queue sooner once
    the trace ends (horae.sim's Summary says what each over- and understates)."""
    model, hardware, kv, max_tokens, sla = WORKLOADS[name]
    t0 = time.perf_counter()
    keys = ("goodput_tps", "window_goodput_tps", "sla_attainment", "prefix_hit_rate", "load_imbalance",
            "preemptions", "attempts_per_request")
    per_seed = []
    for seed in range(seeds):
        # Every replica runs the SLO queue (issue 15): past the knee it sheds what cannot make its
        # SLO, and the router sends it on by the retry rule (default: any replica not tried yet).
        r = sim.simulate(trace, "past-future", rate_scale=load, model=model, hardware=hardware, kv_cache_tokens=kv,
                         max_tokens=max_tokens, sla=sla, replicas=replicas, router=router, staleness=staleness,
                         queue="slo", retry_shed=retry_shed, seed=seed)
        per_seed.append({k: r.summary[k] for k in keys})
    out = {k: sum(p[k] for p in per_seed) / seeds for k in keys}
    if seeds > 1:
        out["goodput_per_seed"] = [p["goodput_tps"] for p in per_seed]
        out["window_goodput_per_seed"] = [p["window_goodput_tps"] for p in per_seed]
    out["seconds"] = time.perf_counter() - t0
    return out


def forecast_ratios(out, x) -> str:
    """The forecast router's goodput over power-of-two's and prefix affinity's at load `x`, by the
    paper's goodput and (in brackets) by the window goodput."""
    def r(base, key):
        return out[(x, "forecast")][key] / max(out[(x, base)][key], 1e-9)
    return ", ".join(f"forecast / {b} {r(b, 'goodput_tps'):.2f} ({r(b, 'window_goodput_tps'):.2f})"
                     for b in ("power-of-two", "prefix"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--loads", default="0.5,1,1.5,2,3", help="arrival-rate multipliers")
    ap.add_argument("--staleness", type=float, default=1.0, help="seconds between published routing stats")
    ap.add_argument("--retry-shed", default=sim.RETRY_RULES[0], choices=sim.RETRY_RULES,
                    help="where a shed request goes (the Ray ingress's rule too): any replica not tried while its "
                         "first-token bound holds (always, the default), only an idle replica that can still start "
                         "it in time (in-time), or nowhere (never)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run each point with seeds 0..N-1 and report the means (default 1: seed 0 alone)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--plot-only", action="store_true",
                    help="no runs: plot the saved <workloads>-<replicas>.json under --out into <workloads>.png there")
    args = ap.parse_args()
    if args.plot_only:
        return plot_saved(args.out)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    loads = [float(x) for x in args.loads.split(",")]
    results = {}
    for w in args.workloads.split(","):
        trace = workload(w, args.data, args.replicas)
        jobs = [(x, r) for x in loads for r in ROUTERS]
        with ThreadPoolExecutor(args.workers) as pool:
            runs = [pool.submit(run, trace, w, args.replicas, r, x, args.staleness, args.retry_shed, args.seeds)
                    for x, r in jobs]
            out = {j: f.result() for j, f in zip(jobs, runs)}
        results[w] = {str(x): {r: out[(x, r)] for r in ROUTERS} for x in loads}
        seeds = f", means over seeds 0-{args.seeds - 1}" if args.seeds > 1 else ""
        print(f"\n{w}, {args.replicas} replicas{seeds}: goodput tok/s (prefix hit rate, load imbalance max/mean, preemptions)")
        print(f"{'load':>6} " + " ".join(f"{r:>30}" for r in ROUTERS))
        for x in loads:
            cells = [f"{p['goodput_tps']:>8.0f} ({p['prefix_hit_rate']:.2f}, {p['load_imbalance']:.2f}, {p['preemptions']:>4})"
                     for p in (out[(x, r)] for r in ROUTERS)]
            print(f"{x:>6} " + " ".join(f"{c:>30}" for c in cells), flush=True)
        # The knee: the load at which the cluster's goodput (its best router's) peaks.
        knee = max(loads, key=lambda x: max(out[(x, r)]["goodput_tps"] for r in ROUTERS))
        for label, x in (("at the knee", knee), ("at the heaviest load", max(loads))):
            best_hit = max(out[(x, r)]["prefix_hit_rate"] for r in ROUTERS)
            print(f"{label} ({x}x): {forecast_ratios(out, x)}, "
                  f"hit rate {out[(x, 'forecast')]['prefix_hit_rate']:.3f} against the best {best_hit:.3f}")
        print("every load: " + "; ".join(f"{x}x {forecast_ratios(out, x)}" for x in loads))
        if args.seeds > 1:
            for x in loads:
                f, pre = (out[(x, r)]["goodput_per_seed"] for r in ("forecast", "prefix"))
                fw, prew = (out[(x, r)]["window_goodput_per_seed"] for r in ("forecast", "prefix"))
                print(f"{x}x, forecast / prefix seed by seed: " + ", ".join(f"{a / b:.2f}" for a, b in zip(f, pre))
                      + "; window " + ", ".join(f"{a / b:.2f}" for a, b in zip(fw, prew)))
        light = [x for x in loads if out[(x, "power-of-two")]["sla_attainment"] >= 0.95]
        ratios = [out[(x, "forecast")]["goodput_tps"] / out[(x, "power-of-two")]["goodput_tps"] for x in light]
        print("light load (power-of-two meets the SLA for >= 95%): forecast / power-of-two "
              + (", ".join(f"{v:.3f}" for v in ratios) or "n/a"), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.retry_shed == sim.RETRY_RULES[0] else f"-retry-{args.retry_shed}") + (
            f"-seeds-{args.seeds}" if args.seeds > 1 else "")
        name = "+".join(args.workloads.split(","))
        (args.out / f"{name}-{args.replicas}{suffix}.json").write_text(json.dumps(results, indent=1))
    return 0


def plot_saved(out: Path) -> int:
    """One figure per set of workloads (`<workloads>.png`), a column per saved run."""
    from horae.sim.plot import plot_cluster_study

    def order(f: Path):
        stem = f.stem.split("-retry-")[0]
        return ("-retry-" in f.stem, int(stem.rsplit("-", 1)[1]), f.stem)

    groups: dict = {}
    # Runs over several seeds (`-seeds-N`) are tables only; the figure shows the seed-0 runs.
    for f in sorted((f for f in out.glob("*.json") if "-seeds-" not in f.stem), key=order):
        rule = f.stem.split("-retry-")[1] if "-retry-" in f.stem else None
        name, replicas = f.stem.split("-retry-")[0].rsplit("-", 1)
        for w, panel in json.loads(f.read_text()).items():
            groups.setdefault(name, {})[f"{w}, {replicas} replicas" + (f" (retry {rule})" if rule else "")] = panel
    for name, panels in groups.items():
        for p in plot_cluster_study(panels, out / f"{name}.png"):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
