#!/usr/bin/env python3
"""The Past-Future paper's study in the simulator, side by side with its baselines.

Workloads, models, pools, clients, SLAs and server rules are the paper's (see
../shared/notes/past-future-paper-setup.md and docs/benchmarks.md):
- ShareGPT-o1 (1,981 requests, max_tokens 12,000: its longest output is 10,935) and the length
  sets Dist-1/2/3 (500 requests each, max_tokens 8,192);
- Llama-2-7B with 120k KV tokens and Llama-2-13B with 64k on one A100 (10-100 clients, SLA 10 s
  first token / 1.5 s gap, queue deadline 8 s); Llama-2-70B on four A100s with 550k (100-500
  clients, SLA 15 s / 5 s, deadline 10 s);
- the paper's server rules for every policy: the queue deadline and clients that resend what it
  turned away (`--rules paper`); `--rules none` is the rule-free view, `--rules gap` adds the gap
  abort (the paper's Past-Future and conservative servers had it at 1.49 s; its aggressive did not).
Policies: Past-Future cold (its default settings) and warm (started from the history a previous
run of the same workload saved), aggressive at 95% and 99% (vLLM-like), conservative (reserves
max_tokens) and the oracle (Past-Future given the true lengths: what the paper's live curves are).

    examples/paper_study.py --data ../shared/data --out study/          # the whole grid: about 2 minutes on 2 cores
    examples/paper_study.py --workloads sharegpt-o1 --models 13b         # one panel
    examples/paper_study.py --compare '{}' '{"redraw": true}'             # Past-Future variants, whole grid
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

MODELS = {
    # name: (preset, hardware, KV tokens, clients, SLA, queue deadline)
    "7b": ("llama-2-7b", "a100-80gb", 120_000, [10, 20, 50, 100], {"ttft": 10.0, "max_itl": 1.5}, 8.0),
    "13b": ("llama-2-13b", "a100-80gb", 64_000, [10, 20, 50, 100], {"ttft": 10.0, "max_itl": 1.5}, 8.0),
    "70b": ("llama-2-70b", "a100-80gb-tp4", 550_000, [100, 200, 300, 500], {"ttft": 15.0, "max_itl": 5.0}, 10.0),
}
WORKLOADS = ["sharegpt-o1", "dist-1", "dist-2", "dist-3"]
BASELINES = ["aggressive", "aggressive-99", "conservative"]
# The artifact's prefill batch (LightLLM's batch_max_tokens 18,000, no chunked prefill there).
MAX_BATCHED_TOKENS = 18_000


def workload(name: str, data: Path):
    if name == "sharegpt-o1":
        return sim.load_trace(data / "ShareGPT-o1.json"), 12_000
    return sim.synthetic(name, 500, seed=0), 8_192


def run_panel(wname, mname, data, rules, pf_settings, workers):
    trace, max_tokens = workload(wname, data)
    preset, hardware, kv, clients, sla, deadline = MODELS[mname]
    common = dict(model=preset, hardware=hardware, kv_cache_tokens=kv, max_tokens=max_tokens, sla=sla,
                  max_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=1024)
    if rules in ("paper", "gap"):
        common.update(queue_timeout=deadline, retry_failed=True)
    if rules == "gap":
        common["max_itl_abort"] = sla["max_itl"] - 0.01
    # Warm start: the history a cold run of this workload saved at its end, as a restarted server
    # would load it (the middle load point's run).
    cold = sim.simulate(trace, "past-future", clients=clients[len(clients) // 2], **common, **pf_settings)
    warm_history = cold.history
    jobs = [(c, p) for c in clients for p in ["past-future", "past-future-warm", *BASELINES, "oracle"]]

    def one(job):
        c, p = job
        if p == "past-future":
            return job, sim.simulate(trace, p, clients=c, **common, **pf_settings)
        if p == "past-future-warm":
            return job, sim.simulate(trace, "past-future", clients=c, history=warm_history, **common, **pf_settings)
        return job, sim.simulate(trace, p, clients=c, **common)

    out = {}
    with ThreadPoolExecutor(workers) as pool:
        for (c, p), r in pool.map(one, jobs):
            s = r.summary
            out.setdefault(c, {})[p] = {k: s[k] for k in ("goodput_tps", "sla_attainment", "preemptions",
                                                          "attempts_per_request", "wasted_tokens", "timeouts",
                                                          "timed_out_sends")}
    return out


def ratios(panel):
    rows = []
    for c, res in panel.items():
        best = max(res[b]["goodput_tps"] for b in BASELINES)
        best_name = max(BASELINES, key=lambda b: res[b]["goodput_tps"])
        o = res["oracle"]["goodput_tps"]
        rows.append((c, best, best_name, o, res["past-future"]["goodput_tps"], res["past-future-warm"]["goodput_tps"]))
    return rows


def targets(results) -> str:
    """Issue 14's target lines, from this run's results (min over the points each line covers)."""
    lines = []

    def ratio_rows(pred=lambda w, m, c, res: True):
        for key, panel in results.items():
            w, m = key.split("/")
            for c, res in panel.items():
                if pred(w, m, c, res):
                    best = max(res[b]["goodput_tps"] for b in BASELINES)
                    yield w, m, c, res, best

    def span(xs):
        return f"{min(xs):.3f}-{max(xs):.3f}" if xs else "n/a"

    def verdict(xs, goal):
        # Judged on the unrounded minimum: 0.9698 prints as 0.970 but misses 0.97.
        if not xs:
            return "(not in this run)"
        return f"(target >= {goal}: {'met' if min(xs) >= goal else f'MISSED, min {min(xs):.4f}'})"

    for pf in ("past-future", "past-future-warm"):
        name = "cold" if pf == "past-future" else "warm"
        head = [r for r in ratio_rows(lambda w, m, c, res: w == "sharegpt-o1" and m == "13b" and int(c) == 100)]
        x = [res[pf]["goodput_tps"] / best for *_, res, best in head]
        lines.append(f"ShareGPT-o1, 13B, 100 clients: PF {name} / best baseline {span(x)}  {verdict(x, 2.0)}")
        x = [res[pf]["goodput_tps"] / res["oracle"]["goodput_tps"] for *_, res, best in ratio_rows()]
        lines.append(f"every workload, model, client count: PF {name} / oracle {span(x)}  {verdict(x, 0.9)}")

        def light(w, m, c, res):
            top = max(BASELINES, key=lambda b: res[b]["goodput_tps"])
            return res[top]["sla_attainment"] >= 0.95
        x = [res[pf]["goodput_tps"] / best for *_, res, best in ratio_rows(light)]
        lines.append(f"light load (best baseline meets the SLA for >= 95%): PF {name} / best {span(x)}  {verdict(x, 0.97)}")
        for sets, goal in ((("dist-1", "dist-2"), 1.2), (("dist-3",), 0.97)):
            x = [res[pf]["goodput_tps"] / best for w, m, c, res, best in ratio_rows()
                 if w in sets and int(c) == max(int(k) for k in results[f"{w}/{m}"])]
            o = [res["oracle"]["goodput_tps"] / best for w, m, c, res, best in ratio_rows()
                 if w in sets and int(c) == max(int(k) for k in results[f"{w}/{m}"])]
            lines.append(f"{'/'.join(sets)} at the heaviest load: PF {name} / best {span(x)}, oracle / best {span(o)}"
                         f"  {verdict(x, goal)}")
    return "\n".join(lines)


def compare(settings, data, rules, workers) -> None:
    """One line per Past-Future setting over the whole grid: cold and warm against the oracle
    (min and mean over every point), at light load against the best baseline, and at the
    heaviest load of each panel against the best baseline."""
    for pf in settings:
        t0 = time.perf_counter()
        cold, warm, light, heavy = [], [], [], []
        for w in WORKLOADS:
            for m in MODELS:
                panel = run_panel(w, m, data, rules, pf, workers)
                for c, best, bn, o, pc, pw in ratios(panel):
                    cold.append(pc / o)
                    warm.append(pw / o)
                    if panel[c][bn]["sla_attainment"] >= 0.95:
                        light.append(pc / best)
                c = max(panel, key=int)
                best = max(panel[c][b]["goodput_tps"] for b in BASELINES)
                heavy.append(f"{w}/{m} {panel[c]['past-future']['goodput_tps'] / best:.2f}")
        f = lambda xs: f"min {min(xs):.3f} mean {sum(xs) / len(xs):.3f}"  # noqa: E731
        print(f"{json.dumps(pf)}: cold/oracle {f(cold)} | warm/oracle {f(warm)} | light cold/best {f(light)} "
              f"({time.perf_counter() - t0:.0f} s)\n    heaviest load, cold/best: {', '.join(heavy)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rules", default="paper", choices=["paper", "gap", "none"])
    ap.add_argument("--pf", type=json.loads, default={}, help="Past-Future settings as JSON, e.g. '{\"history_window\": 200}'")
    ap.add_argument("--out", type=Path, help="write study.json (and plots with --plot) here")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compare", nargs="+", type=json.loads, metavar="JSON",
                    help="instead of the tables: one summary line per Past-Future setting over the whole grid")
    args = ap.parse_args()
    if args.compare:
        compare(args.compare, args.data, args.rules, args.workers)
        return 0
    t0 = time.perf_counter()
    results = {}
    for w in args.workloads.split(","):
        for m in args.models.split(","):
            panel = run_panel(w, m, args.data, args.rules, args.pf, args.workers)
            results[f"{w}/{m}"] = panel
            print(f"\n{w}, {m} ({args.rules} rules)  goodput tok/s")
            print(f"{'clients':>8} {'best baseline':>22} {'oracle':>8} {'PF cold':>8} {'PF warm':>8} "
                  f"{'cold/best':>9} {'warm/best':>9} {'cold/orc':>8} {'warm/orc':>8}")
            for c, best, bn, o, pc, pw in ratios(panel):
                print(f"{c:>8} {best:>9.0f} ({bn:>11}) {o:>8.0f} {pc:>8.0f} {pw:>8.0f} {pc / best:>9.2f} {pw / best:>9.2f} "
                      f"{pc / o:>8.2f} {pw / o:>8.2f}", flush=True)
    print(f"\ntargets ({args.rules} rules)\n" + targets(results))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"study-{args.rules}.json").write_text(json.dumps({"rules": args.rules, "pf": args.pf,
                                                                       "results": results}, indent=1))
        if args.plot:
            from horae.sim.plot import plot_paper_grid

            for p in plot_paper_grid(results, args.out / f"paper-{args.rules}.png", rules=args.rules):
                print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
