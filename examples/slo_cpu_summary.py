#!/usr/bin/env python3
"""Issue 15's real-engine check, summarised from `examples/serving_study.py` runs saved under
`--dir` as `<queue>-<trace scale>/` (the default model on this CPU; the loop that makes them is in
docs/benchmarks.md). Prints each run's real goodput, the simulator's with the cost model fitted to
that run's own steps, and with the one fitted to the other queue's run at the same load (held out);
then the knee (the lowest load at which FCFS's simulated throughput, with the first run's cost
model, reaches 95% of its highest, as examples/slo_study.py defines it) and the SLO queue's goodput
at twice it against its own peak and against FCFS with the 8 s deadline.

    python examples/slo_cpu_summary.py --dir docs/study/cpu_slo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from horae import sim


def pct(x: float, real: float) -> str:
    return f"{100 * (x - real) / real:+.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("docs/study/cpu_slo"))
    args = ap.parse_args()
    runs = {}
    for d in sorted(args.dir.iterdir()):
        if (d / "study.json").is_file():
            queue, scale = d.name.rsplit("-", 1)
            runs[(queue, float(scale))] = json.loads((d / "study.json").read_text())
    print(f"{'run':>10} {'real tok/s':>11} {'sim':>8} {'vs real':>8} {'sim, held-out cost':>19} {'vs real':>8}")
    for (queue, scale), study in sorted(runs.items()):
        a = study["args"]
        real = study["rows"][0]["real_goodput_tps"]
        own = study["rows"][0]["sim_goodput_tps"]
        other = runs.get(("fcfs" if queue == "slo" else "slo", scale))
        held = None
        if other is not None:
            slo = {}
            for spec in a["goodput"]:
                k, v = spec.split(":")
                slo[{"itl": "max_itl", "ttft": "ttft"}[k]] = float(v) / 1000.0
            trace = sim.load_trace(str(args.dir / f"{queue}-{a['trace_scale']}" / "workload.jsonl"))
            held = sim.simulate(trace, "past-future", cost_coef=other["cost_coef"], sla=slo,
                                kv_cache_tokens=a["kv_cache_tokens"], block_size=16, max_num_seqs=a["max_num_seqs"],
                                max_batched_tokens=a["max_batched_tokens"], max_tokens=a["max_tokens"],
                                history_window=a["history_window"], queue=a["queue"],
                                queue_timeout=a["queue_timeout"]).goodput_tps
        print(f"{queue + ' ' + str(scale):>10} {real:>11.1f} {own:>8.1f} {pct(own, real):>8} "
              f"{'' if held is None else f'{held:.1f}':>19} {'' if held is None else pct(held, real):>8}")
    # The knee: FCFS's simulated throughput across loads on the first run's workload and cost model.
    (q0, s0), first = min(runs.items())
    a = first["args"]
    base = sim.load_trace(str(args.dir / f"{q0}-{a['trace_scale']}" / "workload.jsonl"))
    sweep = [0.2, 0.4, 0.8, 1.2, 1.6, 2.4, 3.2, 4.8]
    thr = {x: sim.simulate(base.scaled(x / s0), "past-future", cost_coef=first["cost_coef"], sla={},
                           kv_cache_tokens=a["kv_cache_tokens"], max_num_seqs=a["max_num_seqs"],
                           max_batched_tokens=a["max_batched_tokens"], max_tokens=a["max_tokens"],
                           history_window=a["history_window"]).summary["throughput_tps"] for x in sweep}
    knee = min(x for x in sweep if thr[x] >= 0.95 * max(thr.values()))
    print("\nFCFS simulated throughput (tok/s) by load: " + ", ".join(f"{x}: {t:.0f}" for x, t in thr.items())
          + f"; knee {knee}")
    slo = {s: r["rows"][0]["real_goodput_tps"] for (q, s), r in runs.items() if q == "slo"}
    fcfs = {s: r["rows"][0]["real_goodput_tps"] for (q, s), r in runs.items() if q == "fcfs"}
    two = 2 * knee
    if two in slo:
        print(f"SLO queue at 2x the knee ({two}) / its peak over {sorted(slo)}: {slo[two] / max(slo.values()):.2f}"
              f"  (target >= 0.8)")
        if two in fcfs:
            print(f"SLO queue / FCFS + deadline at 2x the knee: {slo[two] / fcfs[two]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
