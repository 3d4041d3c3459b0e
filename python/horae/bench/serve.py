"""`horae bench serve`: a load generator against any OpenAI-compatible server (ours or another),
with vLLM benchmark_serving's option names where they fit.

Load: open loop (Gamma arrivals at `--request-rate` with `--burstiness`, 1 = Poisson, or the
trace's own timestamps times `--trace-scale`), or closed loop (`--max-concurrency` clients with an
infinite rate). Requests come from a trace (Azure, Mooncake, ... through `horae.sim.load_trace`) or
one of the simulator's length sets (`--dataset dist-1|dist-2|dist-3`).

Each request is a streamed `/v1/completions` call whose prompt is exactly the trace's input
length in token ids. Its true output length is reached with `ignore_eos` and a client-side stop:
the client reads until it has that many tokens (vLLM's `continuous_usage_stats` counts them) and
hangs up. `max_tokens` carries only the bound (`--max-tokens`, default: what the context leaves),
never the true length, so the scheduler is not told what it must predict.

Reports TTFT, TPOT, ITL, e2e latency at p50/p90/p99, throughput, and goodput: requests per
second (and their output tokens per second) that meet every `--goodput` bound.

With `--retry-failed` a request the server turned away or cut (a 503, or an SSE error with code
`queue_timeout`, `sla_abort` or `overloaded`) is sent again at once, as the Past-Future paper's
client does, up to `MAX_ATTEMPTS` times; its times count from the last send, and the summary
reports attempts per request, time-outs, SLA aborts and the tokens wasted on failed attempts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "itl": "max_itl"}

#: Sends of one request before a retrying client gives up.
MAX_ATTEMPTS = 100
#: Error codes a server uses for "turned away or cut by a rule: send it again".
RETRY_CODES = ("queue_timeout", "sla_abort", "overloaded")


@dataclass
class RequestResult:
    prompt_len: int
    target_len: int
    arrival: float  # seconds after the start
    ok: bool = False
    error: str = ""
    output_len: int = 0
    ttft: float = float("nan")
    e2el: float = float("nan")
    itls: List[float] = field(default_factory=list)
    #: The server's error code when it turned the request away or cut it (a retry may help).
    code: Optional[str] = None
    attempts: int = 1
    #: Failed sends of this request, by cause.
    timeouts: int = 0
    sla_aborts: int = 0
    #: Prompt and output tokens of failed attempts that had started (a time-out costs nothing).
    wasted_tokens: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2el - self.ttft) / (self.output_len - 1) if self.output_len > 1 else float("nan")

    @property
    def max_itl(self) -> float:
        return max(self.itls) if self.itls else 0.0


def parse_goodput(items: Optional[Sequence[str]]) -> Dict[str, float]:
    """`ttft:MS tpot:MS e2el:MS itl:MS` (milliseconds, as vLLM) -> seconds per metric."""
    slo = {}
    for item in items or []:
        key, _, ms = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"unknown goodput metric {key!r}: use {', '.join(SLO_KEYS)}")
        try:
            v = float(ms)
        except ValueError:
            raise ValueError(f"goodput bound {item!r} needs a number of milliseconds") from None
        if not v > 0:
            raise ValueError(f"goodput bound {item!r} must be positive")
        slo[SLO_KEYS[key]] = v / 1000.0
    return slo


def meets(r: RequestResult, slo: Dict[str, float]) -> bool:
    if not r.ok:
        return False
    for metric, bound in slo.items():
        v = getattr(r, metric)
        if not (v <= bound or (metric == "tpot" and np.isnan(v))):
            return False
    return True


def build_workload(args) -> tuple:
    """(arrival offsets in seconds or None for closed loop, prompt lengths, output lengths)."""
    from horae import sim

    if args.trace and args.dataset:
        raise ValueError("give --trace or --dataset, not both")
    if args.dataset:
        trace = sim.synthetic(args.dataset, args.num_prompts or 100, seed=args.seed)
    elif args.trace:
        trace = sim.load_trace(args.trace)
    else:
        trace = sim.bundled_trace()
    if args.num_prompts:
        trace = trace.head(min(args.num_prompts, len(trace)))
    if args.trace_scale is not None:
        if not trace.timed:
            raise ValueError("--trace-scale needs a trace with timestamps")
        trace = trace.scaled(args.trace_scale)
        arrivals = trace.arrivals()
    elif np.isfinite(args.request_rate):
        arrivals = trace.with_arrivals(args.request_rate, args.burstiness, args.seed).arrivals()
    else:
        arrivals = None
    scale = args.length_scale
    p = np.maximum(1, np.round(trace.prompt_lens() * scale)).astype(int)
    o = np.maximum(1, np.round(trace.output_lens() * scale)).astype(int)
    if arrivals is not None:
        arrivals = arrivals - arrivals[0]
    return arrivals, p, o


async def _one(client, url: str, model: str, prompt: List[int], target: int, max_tokens: int,
               res: RequestResult, headers: Dict[str, str]) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                body = await resp.aread()
                res.error = f"HTTP {resp.status_code}: {body[:200]!r}"
                try:
                    res.code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    res.code = "overloaded" if resp.status_code == 503 else None
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    res.code = (chunk["error"] or {}).get("code") if isinstance(chunk["error"], dict) else None
                    return
                if not chunk.get("choices"):
                    continue
                usage = chunk.get("usage") or {}
                n = usage.get("completion_tokens")
                if n is None:  # a server without continuous usage: count one token per chunk
                    n = res.output_len + 1
                if n <= res.output_len:
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                # A chunk may carry several tokens (the server sends what a lagging reader has
                # not read yet at once): the request is the trace's length, so what comes past
                # it is the hang-up's lag, not output the workload asked for.
                last, res.output_len = now, min(n, target)
                if n >= target:
                    break  # the client-side stop: leaving the block hangs up
        if res.output_len >= target or res.output_len == max_tokens:
            res.ok, res.e2el = True, last - t0
        else:
            res.error = f"stream ended after {res.output_len} of {target} tokens"
    except Exception as e:  # a refused connection, a timeout: counted as a failed request
        res.error = f"{type(e).__name__}: {e}"[:200]


async def run_load(args, arrivals, prompt_lens, output_lens) -> tuple:
    import httpx
    from tqdm.auto import tqdm

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=httpx.Limits(max_connections=None)) as client:
        model = args.model
        info = (await client.get(base + "/v1/models", headers=headers)).json()
        if model is None:
            model = info["data"][0]["id"]
        ctx = next((m.get("max_model_len") for m in info["data"] if m["id"] == model), None) or args.max_model_len
        rng = random.Random(args.seed)
        vocab_hi = args.vocab_size
        results, tasks = [], []
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = tqdm(total=len(prompt_lens), desc="requests", unit="req", disable=args.no_progress)
        start = time.perf_counter()

        async def launch(i):
            p = int(prompt_lens[i])
            o = int(output_lens[i])
            if ctx:
                p = min(p, ctx - o - 1) if ctx > o + 1 else max(1, ctx // 2)
                o = min(o, ctx - p)
            bound = args.max_tokens if args.max_tokens else ((ctx - p) if ctx else o)
            bound = max(bound, o)  # the bound must allow the true length
            res = RequestResult(p, o, time.perf_counter() - start)
            results.append(res)
            prompt = [rng.randrange(100, vocab_hi) for _ in range(p)]

            async def send():
                while True:
                    await _one(client, base + "/v1/completions", model, prompt, o, bound, res, headers)
                    if res.ok or not args.retry_failed or res.code not in RETRY_CODES or res.attempts >= MAX_ATTEMPTS:
                        return
                    # Sent again at once; its times count from this send.
                    if res.code == "sla_abort":
                        res.wasted_tokens += res.prompt_len + res.output_len
                    res.timeouts += res.code == "queue_timeout"
                    res.sla_aborts += res.code == "sla_abort"
                    res.attempts += 1
                    res.error, res.code, res.output_len, res.itls = "", None, 0, []
                    res.ttft = res.e2el = float("nan")

            if sem is None:
                await send()
            else:
                async with sem:
                    res.arrival = time.perf_counter() - start
                    await send()
            bar.update()

        for i in range(len(prompt_lens)):
            if arrivals is not None:
                delay = arrivals[i] - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(launch(i)))
        await asyncio.gather(*tasks)
        bar.close()
        duration = time.perf_counter() - start
    return results, duration, model


def summarize(results: List[RequestResult], duration: float, slo: Dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]

    def pct(values):
        v = np.array([x for x in values if np.isfinite(x)], dtype=float) * 1000
        if v.size == 0:
            return {"mean": None, "p50": None, "p90": None, "p99": None}
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
                "p99": float(np.percentile(v, 99))}

    good = [r for r in ok if meets(r, slo)]
    out_tokens = sum(r.output_len for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
        "goodput_rps": len(good) / duration if slo else None,
        # tokens (prompt + output) of requests within the SLO per second: the Past-Future paper's goodput
        "goodput_tps": sum(r.prompt_len + r.output_len for r in good) / duration if slo else None,
        "slo_attainment": len(good) / len(results) if slo and results else None,
        "slo_ms": {k: v * 1000 for k, v in slo.items()},
        "ttft_ms": pct(r.ttft for r in ok), "tpot_ms": pct(r.tpot for r in ok),
        "itl_ms": pct(x for r in ok for x in r.itls), "max_itl_ms": pct(r.max_itl for r in ok),
        "e2el_ms": pct(r.e2el for r in ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "attempts_per_request": sum(r.attempts for r in results) / len(results) if results else None,
        "timeouts": sum(r.timeouts + (r.code == "queue_timeout") for r in results),
        "sla_aborts": sum(r.sla_aborts + (r.code == "sla_abort") for r in results),
        "wasted_tokens": sum(r.wasted_tokens for r in results),
    }


def print_summary(s: dict) -> None:
    print(f"completed {s['completed']}, failed {s['failed']}, in {s['duration_s']:.1f} s")
    if s["attempts_per_request"] and s["attempts_per_request"] > 1:
        print(f"retries: {s['attempts_per_request']:.2f} sends per request, {s['timeouts']} queue time-outs, "
              f"{s['sla_aborts']} SLA aborts, {s['wasted_tokens']} tokens wasted on failed attempts")
    print(f"throughput: {s['request_throughput']:.3f} req/s, {s['output_throughput']:.1f} output tok/s, "
          f"{s['total_token_throughput']:.1f} total tok/s")
    if s["goodput_rps"] is not None:
        bounds = ", ".join(f"{k} <= {v:g} ms" for k, v in s["slo_ms"].items())
        print(f"goodput ({bounds}): {s['goodput_rps']:.3f} req/s, {s['goodput_tps']:.1f} tok/s; "
              f"SLO attainment {100 * s['slo_attainment']:.1f}%")
    print(f"{'ms':>10} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "max_itl_ms", "e2el_ms"):
        row = s[k]
        cells = " ".join(f"{row[q]:>9.1f}" if row[q] is not None else f"{'-':>9}" for q in ("mean", "p50", "p90", "p99"))
        print(f"{k[:-3]:>10} {cells}")
    for e in s["errors"]:
        print(f"error: {e}")


def plot_cdf(results: List[RequestResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, unit, vals) in zip(axes, [("TTFT", "s", [r.ttft for r in ok]), ("TPOT", "ms", [r.tpot * 1000 for r in ok]),
                                              ("e2e latency", "s", [r.e2el for r in ok])]):
        v = np.sort([x for x in vals if np.isfinite(x)])
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size)
        ax.set_xlabel(f"{name} ({unit})")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (the /v1 routes are under it)")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key")
    p.add_argument("--trace", help="trace file (azure/mooncake/burstgpt csv or jsonl, sharegpt, castillo, "
                   "usage-json); "
                   "default: the bundled 10-minute Azure conv sample")
    p.add_argument("--dataset", choices=["dist-1", "dist-2", "dist-3"], help="a synthetic length set instead of a trace")
    p.add_argument("--num-prompts", type=int, help="use the first N requests")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1 = Poisson)")
    p.add_argument("--trace-scale", type=float, help="replay the trace's own timestamps this many times faster")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight (closed loop with rate inf)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply prompt and output lengths (to fit a small machine)")
    p.add_argument("--max-tokens", type=int, help="the max_tokens bound sent (default: what the context leaves)")
    p.add_argument("--max-model-len", type=int, help="context, when the server does not report it")
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt token ids are drawn from [100, this)")
    p.add_argument("--goodput", nargs="+", metavar="METRIC:MS", help="SLO bounds: ttft, tpot, e2el, itl (max gap)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--retry-failed", action="store_true",
                   help="send a request the server turned away or cut (503, queue_timeout, sla_abort) again, "
                        "as the Past-Future paper's client does")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", help="write the summary and per-request figures as JSON")
    p.add_argument("--plot", help="write latency CDFs to this PNG")
    p.add_argument("--no-progress", action="store_true")


def check_args(args) -> None:
    for name in ("num_prompts", "max_concurrency", "max_tokens", "max_model_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.request_rate > 0 or not args.burstiness > 0 or not args.length_scale > 0:
        raise ValueError("--request-rate, --burstiness and --length-scale must be positive")
    if args.trace_scale is not None and not args.trace_scale > 0:
        raise ValueError("--trace-scale must be positive")


def run(args) -> dict:
    """Run the benchmark described by `args` (the CLI's namespace); returns the summary dict."""
    check_args(args)
    slo = parse_goodput(args.goodput)
    arrivals, prompt_lens, output_lens = build_workload(args)
    results, duration, model = asyncio.run(run_load(args, arrivals, prompt_lens, output_lens))
    summary = summarize(results, duration, slo)
    summary["model"] = model
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"summary": summary, "requests": [{**asdict(r), "tpot": r.tpot} for r in results]}, f, indent=1)
    if args.plot:
        plot_cdf(results, args.plot)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="horae bench serve", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    import httpx

    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"horae bench serve: error: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:  # the server cannot be reached at all (each request's own errors are counted)
        print(f"horae bench serve: error: cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0
