#!/usr/bin/env python3
"""SLO-aware scheduling under overload, in the simulator (issue 15).

Open-loop load swept across each workload's knee, three queue settings on the same memory policy:
- ``fcfs``: arrival order, no rules;
- ``fcfs+deadline``: arrival order with the paper issue's 8 s queue deadline;
- ``slo``: least slack first, hopeless requests shed, preemption by least goodput lost.

Workloads (Llama-2-7B on an A100 with 120k KV tokens, the simulator's roofline):
- Azure conv and Azure code (one hour each; arrivals scaled);
- bursty: ShareGPT lengths (the first 4,000) with Gamma arrivals of shape 0.25 (vLLM's
  ``--burstiness``; BurstGPT fits its inter-arrival times with a Gamma).

SLOs: ``mixed`` (the default): every other request is interactive (TTFT 1 s, no gap over 0.2 s),
the rest batch (done within 300 s); ``paper``: every request TTFT 10 s, gap 1.5 s.

The knee is the workload's capacity, whatever the SLO: the lowest swept load at which FCFS's
throughput (every completed token, met or not) reaches 95% of its highest. Overload points are
1.5x, 2x and 3x it. Each ratio printed comes from this one run.

    examples/slo_study.py --out docs/study/slo --plot           # about 3 minutes on 2 cores
    examples/slo_study.py --slos paper --workloads azure-conv
    examples/slo_study.py --policy aggressive                     # another memory policy
    examples/slo_study.py --victims                               # preemption: newest or least loss

``--victims`` compares who a preemption takes, where memory (not compute) is the bottleneck: the
paper's regime (ShareGPT-o1, Llama-2-13B with 64k KV tokens, closed loop, clients that resend
what the rules turned away), every other request interactive (the paper's SLA: TTFT 10 s, gap
1.5 s), the rest batch (done within an hour).
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

SLOS = {
    "mixed": ({}, [{"ttft": 1.0, "max_itl": 0.2}, {"e2e": 300.0}]),
    "paper": ({"ttft": 10.0, "max_itl": 1.5}, None),
}
QUEUES = {"fcfs": {}, "fcfs+deadline": {"queue_timeout": 8.0}, "slo": {"queue": "slo"}}
SWEEP = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
OVERLOAD = [1.5, 2.0, 3.0]
COMMON = dict(model="llama-2-7b", hardware="a100-80gb", kv_cache_tokens=120_000, max_tokens=4096)

def workload(name: str, data: Path):
    if name == "azure-conv":
        return sim.load_trace(data / "AzureLLMInferenceTrace_conv.csv")
    if name == "azure-code":
        return sim.load_trace(data / "AzureLLMInferenceTrace_code.csv")
    if name == "bursty":
        t = sim.load_trace(data / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv").head(4000)
        return t.with_arrivals(4.0, burstiness=0.25, seed=0)
    raise ValueError(f"unknown workload {name!r}")

def run_point(trace, scale, queue, slos, policy):
    sla, classes = SLOS[slos]
    r = sim.simulate(trace, policy, rate_scale=scale, sla=sla, slo_classes=classes, **COMMON, **QUEUES[queue])
    s = r.summary
    met = r.requests["met_sla"].astype(bool)
    k = len(classes or [None])
    per_class = [float(met[i::k].mean()) for i in range(k)]
    return {"goodput_tps": s["goodput_tps"], "throughput_tps": s["throughput_tps"],
            "sla_attainment": s["sla_attainment"], "per_class": per_class, "timeouts": s["timeouts"],
            "preemptions": s["preemptions"]}

def study(wname, data, slos, policy, workers):
    trace = workload(wname, data)
    with ThreadPoolExecutor(workers) as pool:
        fcfs = dict(zip(SWEEP, pool.map(lambda x: run_point(trace, x, "fcfs", slos, policy), SWEEP)))
        top = max(p["throughput_tps"] for p in fcfs.values())
        knee = min(x for x in SWEEP if fcfs[x]["throughput_tps"] >= 0.95 * top)
        scales = sorted(set(SWEEP) | {round(knee * m, 4) for m in OVERLOAD})
        jobs = [(x, q) for x in scales for q in QUEUES if not (q == "fcfs" and x in fcfs)]
        out = {x: {} for x in scales}
        for x in SWEEP:
            out[x]["fcfs"] = fcfs[x]
        for (x, q), r in zip(jobs, pool.map(lambda j: run_point(trace, j[0], j[1], slos, policy), jobs)):
            out[x][q] = r
    return knee, out

def targets(results) -> str:
    lines = []

    def verdict(xs, goal):
        return f"(target >= {goal}: {'met' if xs and min(xs) >= goal else f'MISSED, min {min(xs):.4f}' if xs else 'n/a'})"

    for w, (knee, panel) in results.items():
        over = [round(knee * m, 4) for m in OVERLOAD]
        for q in QUEUES:
            peak = max(p[q]["goodput_tps"] for p in panel.values())
            x = [panel[s][q]["goodput_tps"] / peak for s in over]
            tail = verdict(x, 0.8) if q == "slo" else ""
            lines.append(f"{w}: {q} goodput at 1.5/2/3x the knee ({knee}) / its peak: "
                         f"{', '.join(f'{v:.2f}' for v in x)}  {tail}")
        two = round(knee * 2, 4)
        x = [panel[two]["slo"]["goodput_tps"] / max(panel[two]["fcfs+deadline"]["goodput_tps"], 1e-9)]
        lines.append(f"{w}: slo / fcfs+deadline at 2x the knee: {x[0]:.2f}  {verdict(x, 1.5)}")
        light = [panel[s]["slo"]["goodput_tps"] / panel[s]["fcfs"]["goodput_tps"]
                 for s in panel if "fcfs" in panel[s] and panel[s]["fcfs"]["sla_attainment"] >= 0.95]
        lines.append(f"{w}: light load (fcfs meets the SLO for >= 95%): slo / fcfs "
                     f"{', '.join(f'{v:.3f}' for v in light)}  {verdict(light, 0.99)}")
    return "\n".join(lines)

VICTIM_SLOS = [{"ttft": 10.0, "max_itl": 1.5}, {"e2e": 3600.0}]
VICTIM_RUNS = {"fcfs": {}, "fcfs+deadline": {"queue_timeout": 8.0},
               "slo, newest victim": {"queue": "slo", "preemption": "newest"},
               "slo, least-loss victim": {"queue": "slo", "preemption": "least-loss"}}


def victims(data: Path, workers: int) -> None:
    trace = sim.load_trace(data / "ShareGPT-o1.json")
    common = dict(model="llama-2-13b", hardware="a100-80gb", kv_cache_tokens=64_000, max_tokens=12_000, sla={},
                  slo_classes=VICTIM_SLOS, max_batched_tokens=18_000, max_num_seqs=1024, retry_failed=True)
    jobs = [(p, c, q) for p in ("aggressive", "past-future") for c in (50, 100) for q in VICTIM_RUNS]

    def one(job):
        p, c, q = job
        r = sim.simulate(trace, p, clients=c, **common, **VICTIM_RUNS[q])
        met = r.requests["met_sla"].astype(bool)
        return job, r.summary, met[0::2].mean(), met[1::2].mean()

    print("ShareGPT-o1, Llama-2-13B/64k, closed loop; goodput tok/s, interactive/batch attainment, preemptions")
    with ThreadPoolExecutor(workers) as pool:
        for (p, c, q), s, inter, batch in pool.map(one, jobs):
            print(f"{p:>12} {c:>4} clients  {q:<24} {s['goodput_tps']:>6.0f}  {inter:.3f}/{batch:.3f}  "
                  f"{s['preemptions']:>5}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    ap.add_argument("--workloads", default="azure-conv,azure-code,bursty")
    ap.add_argument("--slos", default="mixed", choices=list(SLOS))
    ap.add_argument("--policy", default="past-future", help="the memory policy every queue runs on")
    ap.add_argument("--out", type=Path, help="write slo-<slos>-<policy>.json (and plots with --plot) here")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--victims", action="store_true", help="only the preemption-victim comparison")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.victims:
        victims(args.data, args.workers)
        print(f"\n{time.perf_counter() - t0:.0f} s")
        return 0
    results = {}
    for w in args.workloads.split(","):
        knee, panel = study(w, args.data, args.slos, args.policy, args.workers)
        results[w] = (knee, panel)
        classes = "interactive/batch attainment" if args.slos == "mixed" else "attainment"
        print(f"\n{w}, {args.policy}, {args.slos} SLOs (knee: {knee}x the trace's rate)  goodput tok/s, {classes}")
        print(f"{'load':>6} " + " ".join(f"{q:>30}" for q in QUEUES))
        for x in sorted(panel):
            cells = []
            for q in QUEUES:
                r = panel[x].get(q)
                cells.append(" " * 30 if r is None else
                             f"{r['goodput_tps']:>8.0f} " + "/".join(f"{a:.3f}" for a in r["per_class"]).rjust(21))
            print(f"{x:>6} " + " ".join(cells), flush=True)
    print(f"\ntargets ({args.policy}, {args.slos} SLOs)\n" + targets(results))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"slo-{args.slos}-{args.policy}"
        (args.out / f"{name}.json").write_text(json.dumps(
            {w: {"knee": k, "points": {str(x): v for x, v in p.items()}} for w, (k, p) in results.items()}, indent=1))
        if args.plot:
            from horae.sim.plot import plot_slo_study

            for p in plot_slo_study(results, args.out / f"{name}.png", classes=SLOS[args.slos][1] is not None):
                print(f"wrote {p}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
