"""Serving study on the real CPU engine, then the same workload in the simulator.

1. A trace (default: the bundled 10-minute Azure conv sample) is cut to `--requests`, its lengths
   multiplied by `--length-scale` and its arrivals slowed by `--trace-scale`, so that two CPU cores
   can carry it. The workload is written once as Mooncake-style JSONL, which both sides read.
2. For each scheduler: the default model is served (`horae serve` in-process), `horae bench serve`
   replays the workload against it over HTTP, and the engine's per-step log (the cost model's
   features and the measured seconds) is kept.
3. A linear cost model is fitted to all measured steps, and the simulator runs the same workload,
   scheduler and engine settings with it. The report compares simulated with measured goodput,
   also with a cost model fitted only to the other schedulers' steps (held out). Step logs are
   saved as `steps_<scheduler>.npz`.

    python examples/serving_study.py --out docs/serving_study

`--queue slo` runs the SLO queue on both sides, the server's default SLO being the SLA the client
measures (`--goodput`). Issue 15's overload check (the SLO queue at the knee and at twice it):

    python examples/serving_study.py --requests 300 --trace-scale 0.4 --goodput ttft:2000 itl:1500 \
        --queue slo --schedulers past-future --out docs/study/cpu_slo/slo-1x

With `--clients N` the load is a closed loop of N clients instead of the trace's arrivals (for
length-only traces such as the Past-Future paper's ShareGPT-o1.json), and `--queue-timeout S
--retry-failed` apply the paper's server rules on both sides (issue 14's real-engine check):

    python examples/serving_study.py --trace ../shared/data/ShareGPT-o1.json --requests 150 \
        --length-scale 0.05 --clients 16 --kv-cache-tokens 1024 --max-tokens 600 \
        --queue-timeout 8 --retry-failed --schedulers past-future,aggressive --out docs/study/cpu_paper
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from horae import sim
from horae.async_llm import AsyncLLM
from horae.bench import serve as bench
from horae.serve import ServerConfig, ServerThread, build_app


def write_workload(args, path: Path) -> sim.Trace:
    trace = sim.load_trace(args.trace) if args.trace else sim.bundled_trace()
    trace = trace.head(min(args.requests, len(trace)))
    # Length-only traces (closed loop) get 1 ms apart timestamps: the clients decide when to send.
    t = trace.arrivals() - trace.arrivals()[0] if trace.timed else np.arange(len(trace)) * 1e-3
    p = np.maximum(1, np.round(trace.prompt_lens() * args.length_scale)).astype(int)
    o = np.maximum(1, np.round(trace.output_lens() * args.length_scale)).astype(int)
    with open(path, "w") as f:
        for ti, pi, oi in zip(t / args.trace_scale, p, o):
            f.write(json.dumps({"timestamp": float(ti) * 1000.0, "input_length": int(pi), "output_length": int(oi)}) + "\n")
    return sim.load_trace(str(path))


def engine_args(args, scheduler: str, sla: dict) -> dict:
    # The server promises the SLA the client measures: its default SLO (what queue="slo" orders by).
    return dict(scheduler=scheduler, kv_cache_tokens=args.kv_cache_tokens, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_batched_tokens, history_window=args.history_window,
                max_output_bound=args.max_tokens, queue_timeout=args.queue_timeout, queue=args.queue, slo=sla)


def run_real(args, scheduler: str, workload: Path, out: Path, sla: dict):
    llm = AsyncLLM(None, dtype=args.dtype, **engine_args(args, scheduler, sla))
    srv = ServerThread(build_app(llm, ServerConfig(model_name="horae", max_queue=10_000)))
    try:
        ns = SimpleNamespace(
            base_url=srv.url, model=None, api_key=None, trace=str(workload), dataset=None, num_prompts=None,
            request_rate=float("inf"), burstiness=1.0, trace_scale=1.0, max_concurrency=args.clients, length_scale=1.0,
            max_tokens=args.max_tokens, max_model_len=None, vocab_size=49152, goodput=args.goodput, timeout=3600.0,
            seed=0, result_file=str(out / f"real_{scheduler}.json"), plot=str(out / f"real_{scheduler}_cdf.png"),
            no_progress=True, retry_failed=args.retry_failed)
        summary = bench.run(ns)
        steps = llm.engine.take_step_log()
    finally:
        srv.stop()
        llm.shutdown()
    return summary, {k: np.asarray(v) for k, v in steps.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--length-scale", type=float, default=0.25)
    p.add_argument("--trace-scale", type=float, default=0.15, help="arrivals this many times as fast as the trace's")
    p.add_argument("--kv-cache-tokens", type=int, default=3072)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=512, help="the max_tokens bound every request is sent with")
    p.add_argument("--history-window", type=int, default=200)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--goodput", nargs="+", default=["ttft:10000", "itl:1500"], help="the paper's SLA by default")
    p.add_argument("--schedulers", default="past-future,aggressive,conservative")
    p.add_argument("--clients", type=int, help="closed loop: this many clients (default: the trace's arrivals)")
    p.add_argument("--queue-timeout", type=float, help="the server's queue deadline, seconds (the paper's rule)")
    p.add_argument("--retry-failed", action="store_true", help="clients resend what the deadline turned away")
    p.add_argument("--queue", default="fcfs", choices=["fcfs", "slo"], help="the queue discipline, both sides")
    p.add_argument("--out", default="serving_study")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload = out / "workload.jsonl"
    trace = write_workload(args, workload)
    slo = bench.parse_goodput(args.goodput)
    sla = {{"max_itl": "max_itl", "ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}[k]: v for k, v in slo.items()}
    print(f"workload: {trace!r}, prompt mean {trace.prompt_lens().mean():.0f}, output mean {trace.output_lens().mean():.0f}")

    real, logs = {}, {}
    for s in args.schedulers.split(","):
        t0 = time.time()
        real[s], logs[s] = run_real(args, s, workload, out, sla)
        print(f"real {s}: goodput {real[s]['goodput_rps']:.3f} req/s, completed {real[s]['completed']}, "
              f"{len(logs[s]['seconds'])} steps, {time.time() - t0:.0f} s")
        bench.print_summary(real[s])

    cols = ("num_tokens", "num_seqs", "attention_pairs", "seconds")
    pooled = {c: np.concatenate([logs[s][c] for s in logs]) for c in cols}
    coef = sim.fit_linear_cost(*(pooled[c] for c in cols))
    pred = coef[0] + coef[1] * pooled["num_tokens"] + coef[2] * pooled["num_seqs"] + coef[3] * pooled["attention_pairs"]
    fit_err = float(np.median(np.abs(pred - pooled["seconds"]) / pooled["seconds"]))
    print(f"cost model fitted to {len(pooled['seconds'])} measured steps: t = {coef[0]*1e3:.2f} ms + "
          f"{coef[1]*1e3:.3f} ms/token + {coef[2]*1e3:.3f} ms/seq + {coef[3]*1e6:.4f} us/attention pair; "
          f"median step error {100 * fit_err:.1f}%")

    for s in logs:
        np.savez_compressed(out / f"steps_{s}.npz", **logs[s])

    def simulate(s, c):
        return sim.simulate(trace, s, cost_coef=c, sla=sla, kv_cache_tokens=args.kv_cache_tokens, block_size=16,
                            max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                            max_tokens=args.max_tokens, history_window=args.history_window, clients=args.clients,
                            queue_timeout=args.queue_timeout, retry_failed=args.retry_failed and args.clients is not None,
                            queue=args.queue)

    rows = []
    for s in real:
        r = simulate(s, coef)
        # Held out: a cost model fitted only to the other schedulers' steps.
        others = [x for x in logs if x != s]
        held = (sim.fit_linear_cost(*(np.concatenate([logs[x][c] for x in others]) for c in cols))
                if others else coef)
        g_real, g_sim, g_held = real[s]["goodput_rps"], r.goodput_rps, simulate(s, held).goodput_rps
        rows.append({"scheduler": s, "real_goodput_rps": g_real, "sim_goodput_rps": g_sim,
                     "sim_vs_real": (g_sim - g_real) / g_real if g_real else None,
                     "heldout_sim_goodput_rps": g_held,
                     "heldout_sim_vs_real": (g_held - g_real) / g_real if g_real else None,
                     "real_goodput_tps": real[s]["goodput_tps"], "sim_goodput_tps": r.goodput_tps,
                     "sim_vs_real_tps": (r.goodput_tps - real[s]["goodput_tps"]) / real[s]["goodput_tps"]
                     if real[s]["goodput_tps"] else None,
                     # Every send the deadline turned away, as the real client counts them.
                     "sim_timeouts": int(r.summary.get("timed_out_sends", 0)),
                     "real_timeouts": int(real[s].get("timeouts", 0)),
                     "real_ttft_p50_ms": real[s]["ttft_ms"]["p50"], "sim_ttft_p50_ms": float(r.summary["ttft"]["p50"]) * 1000,
                     "real_slo_attainment": real[s]["slo_attainment"],
                     "sim_preemptions": int(r.summary["preemptions"])})
    pct = lambda d: "-" if d is None else f"{100 * d:+.1f}%"
    print(f"\n{'scheduler':>13} {'real req/s':>11} {'sim req/s':>10} {'sim vs real':>12} {'held-out sim':>13} "
          f"{'vs real':>8} {'real TTFT p50':>14} {'sim TTFT p50':>13}")
    for row in rows:
        print(f"{row['scheduler']:>13} {row['real_goodput_rps']:>11.3f} {row['sim_goodput_rps']:>10.3f} "
              f"{pct(row['sim_vs_real']):>12} {row['heldout_sim_goodput_rps']:>13.3f} {pct(row['heldout_sim_vs_real']):>8} "
              f"{row['real_ttft_p50_ms']:>12.0f}ms {row['sim_ttft_p50_ms']:>11.0f}ms")
    print(f"\n{'scheduler':>13} {'real tok/s':>11} {'sim tok/s':>10} {'sim vs real':>12}   (goodput, the paper's measure)")
    for row in rows:
        print(f"{row['scheduler']:>13} {row['real_goodput_tps']:>11.1f} {row['sim_goodput_tps']:>10.1f} "
              f"{pct(row['sim_vs_real_tps']):>12}")
    by = {row["scheduler"]: row for row in rows}
    if "past-future" in by and "aggressive" in by and by["aggressive"]["real_goodput_tps"]:
        pf, ag = by["past-future"], by["aggressive"]
        print(f"past-future / aggressive: real {pf['real_goodput_tps'] / ag['real_goodput_tps']:.2f}, "
              f"simulated {pf['sim_goodput_tps'] / max(ag['sim_goodput_tps'], 1e-9):.2f}")
    (out / "study.json").write_text(json.dumps({"args": vars(args), "cost_coef": coef, "median_step_error": fit_err,
                                                "rows": rows, "real": real}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
