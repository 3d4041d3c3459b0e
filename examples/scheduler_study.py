"""The scheduler study of docs/benchmarks.md: four policies on real traces and the paper's length
sets, in the simulator, on a 7B model preset whose KV pool (120k tokens) binds.

    python examples/scheduler_study.py --data ../shared/data --out docs/study

Writes one JSON and two PNGs per workload under --out and prints the goodput tables.
"""

import argparse
import time
from pathlib import Path

from horae import sim
from horae.sim.plot import plot_goodput, plot_kv_usage

SLA = dict(sim.PAPER_SLA)  # TTFT <= 10 s, max inter-token gap <= 1.5 s


def run(name, trace, out, **kw):
    t0 = time.perf_counter()
    rep = sim.sweep(trace, sla=SLA, progress=False, **kw)
    print(f"\n=== {name}: {trace!r}  ({time.perf_counter() - t0:.1f}s)")
    print(rep.format())
    (out / f"{name}.json").write_text(rep.to_json())
    plot_goodput(rep, out / f"{name}_goodput.png", title=f"{name}: goodput vs load")
    plot_kv_usage(rep, rep.points[-1], out / f"{name}_kv_usage.png")
    return rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="docs/study")
    ap.add_argument("--hardware", default="a100-80gb")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--history-window", type=int, default=1000, help="Past-Future window (primed with half)")
    a = ap.parse_args()
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(model="llama-2-7b", hardware=a.hardware, kv_cache_tokens=120_000, max_tokens=4096,
                  history_window=a.history_window)
    studies = {
        "azure_conv": lambda: run("azure_conv", sim.load_trace(data / "AzureLLMInferenceTrace_conv.csv"), out,
                                  rate_scales=[0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5], **common),
        "azure_code": lambda: run("azure_code", sim.load_trace(data / "AzureLLMInferenceTrace_code.csv"), out,
                                  rate_scales=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0], **common),
        # ShareGPT lengths, Poisson arrivals at 1 req/s, scaled to 0.5-2.5 req/s.
        "sharegpt": lambda: run("sharegpt", sim.load_trace(data / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv")
                                .head(4000).with_arrivals(1.0, seed=0), out,
                                rate_scales=[0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5], **common),
    }
    for d in ["dist-1", "dist-2", "dist-3"]:
        # Closed loop, as the paper: N clients from 10 to 100. Outputs reach 5k, so the client's
        # bound is 8192 here (it is still never the true length).
        studies[d] = (lambda d=d: run(d.replace("-", ""), sim.synthetic(d, 1500, seed=1), out,
                                      clients=[10, 15, 20, 25, 30, 40, 60, 100],
                                      **{**common, "max_tokens": 8192}))
    for name, f in studies.items():
        if a.only and name not in a.only:
            continue
        f()


if __name__ == "__main__":
    main()
