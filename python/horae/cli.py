"""`horae` command line: generate, chat, serve, simulate (scheduler study on a trace), convert-gguf, bench."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence


def _floats(s: str) -> List[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return vals


def _ints(s: str) -> List[int]:
    vals = _floats(s)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {s!r}")
    return [int(v) for v in vals]


def _names(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {s!r}")
    return v


def _schedulers(s: str) -> List[str]:
    # Checked here, so that a misspelt name is refused before the trace loads and the sweep starts.
    from horae.sim import SCHEDULERS

    names = _names(s)
    unknown = [n for n in names if n not in SCHEDULERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scheduler {', '.join(map(repr, unknown or [s]))}; "
                                         f"known: {', '.join(SCHEDULERS)}")
    return names


def _simulate_parser(sub) -> None:
    from horae.serve import add_prior_arguments
    from horae.sim import HARDWARE_PRESETS, MODEL_PRESETS, POLICIES, QUEUES, RETRY_RULES, ROUTERS

    p = sub.add_parser("simulate", help="compare schedulers on a trace in the simulator (no GPU)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", help="trace file (azure/mooncake/burstgpt csv or jsonl, sharegpt, castillo, "
                     "usage-json such as the paper's ShareGPT-o1.json); "
                     "default: the bundled 10-minute Azure conv sample")
    src.add_argument("--synthetic", choices=["dist-1", "dist-2", "dist-3"], help="the paper's length sets")
    p.add_argument("--format", help="trace format, if not detected from the header")
    p.add_argument("--num-requests", type=int, help="use only the first N requests (default: all; 1000 for --synthetic)")
    p.add_argument("--schedulers", type=_schedulers, default=list(POLICIES),
                   help="comma-separated (default: the four policies; also aggressive-99)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate-scales", type=_floats, help="open loop: arrival-rate multipliers (default 0.5,0.75,1,1.25,1.5)")
    load.add_argument("--clients", type=_ints, help="closed loop: numbers of concurrent clients, e.g. 10,20,50,100")
    p.add_argument("--request-rate", type=float, help="req/s for traces without timestamps (sharegpt, castillo, synthetic)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals with --request-rate (1 = Poisson)")
    p.add_argument("--model", default="llama-2-7b", choices=MODEL_PRESETS)
    p.add_argument("--hardware", default="a100-80gb", choices=HARDWARE_PRESETS)
    p.add_argument("--kv-cache-tokens", type=int, default=120_000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=4096, help="the client's output bound on every request")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--ttft", type=float, default=10.0, help="SLA: time to first token bound, seconds")
    p.add_argument("--max-itl", type=float, default=1.5, help="SLA: largest gap between tokens, seconds")
    p.add_argument("--tpot", type=float, help="SLA: mean time per output token bound, seconds")
    p.add_argument("--e2e", type=float, help="SLA: end-to-end latency bound, seconds")
    p.add_argument("--queue-timeout", type=float, metavar="SECONDS",
                   help="server rule: drop a request not started this long after it arrived (paper: 8)")
    p.add_argument("--max-itl-abort", type=float, metavar="SECONDS",
                   help="server rule: cut a started request without a token for this long")
    p.add_argument("--retry-failed", action="store_true",
                   help="closed loop: clients send a request the server's rules failed again, as the paper's do")
    p.add_argument("--queue", default="fcfs", choices=QUEUES,
                   help="queue discipline: arrival order, or least slack against the SLA first with hopeless "
                        "requests shed (see horae serve --queue)")
    p.add_argument("--history-window", type=int, default=1000, help="past-future: finished lengths remembered")
    add_prior_arguments(p)
    p.add_argument("--replicas", type=_positive_int, help="open loop: this many replicas behind --router (default: one engine)")
    p.add_argument("--router", default="forecast", choices=ROUTERS,
                   help="with --replicas: how requests are spread (forecast: horae's, forecast- and prefix-aware)")
    p.add_argument("--retry-shed", default="always", choices=RETRY_RULES,
                   help="with --replicas: where a request a replica shed goes next (always: any replica not tried, "
                        "while its first-token bound holds; in-time: only an idle replica that can still start it "
                        "in time; never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="DIR", help="write goodput-vs-load and KV-usage PNGs here")
    p.add_argument("--json", metavar="FILE", help="write all summaries as JSON")
    p.add_argument("--no-progress", action="store_true")


def cmd_simulate(args: argparse.Namespace) -> int:
    from horae import sim

    if args.synthetic:
        trace = sim.synthetic(args.synthetic, args.num_requests or 1000, seed=args.seed)
    elif args.trace:
        trace = sim.load_trace(args.trace, args.format)
    else:
        trace = sim.bundled_trace()
    if args.num_requests and not args.synthetic:
        trace = trace.head(args.num_requests)
    if args.request_rate is not None:
        trace = trace.with_arrivals(args.request_rate, args.burstiness, args.seed)
    rate_scales = args.rate_scales
    if args.clients is None and rate_scales is None:
        if not trace.timed:
            raise ValueError(f"trace {trace.name!r} has no arrival times: give --request-rate or --clients")
        rate_scales = [0.5, 0.75, 1.0, 1.25, 1.5]
    sla = {"ttft": args.ttft, "max_itl": args.max_itl}
    if args.tpot is not None:
        sla["tpot"] = args.tpot
    if args.e2e is not None:
        sla["e2e"] = args.e2e
    print(f"{trace!r}: {args.model} on {args.hardware}, KV pool {args.kv_cache_tokens} tokens, "
          f"max_tokens {args.max_tokens}", flush=True)
    t0 = time.perf_counter()
    report = sim.sweep(
        trace, args.schedulers, rate_scales=rate_scales, clients=args.clients,
        model=args.model, hardware=args.hardware, kv_cache_tokens=args.kv_cache_tokens, sla=sla,
        progress=not args.no_progress, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens, max_tokens=args.max_tokens,
        prefix_caching=not args.no_prefix_caching, seed=args.seed,
        queue_timeout=args.queue_timeout, max_itl_abort=args.max_itl_abort, retry_failed=args.retry_failed,
        queue=args.queue, history_window=args.history_window, history_prior=args.history_prior,
        **({} if args.replicas is None else
           {"replicas": args.replicas, "router": args.router, "retry_shed": args.retry_shed}),
        history_prior_weight=args.history_prior_weight,
    )
    print(report.format())
    print(f"\n{len(report.results)} simulations in {time.perf_counter() - t0:.1f}s")
    if args.json:
        Path(args.json).write_text(report.to_json())
        print(f"wrote {args.json}")
    if args.plot:
        from horae.sim.plot import plot_report

        for path in plot_report(report, Path(args.plot), prefix=trace.name):
            print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from horae import _core, sim

    if args.what == "model":
        from horae.bench.model import run

        run(args.model, hf=not args.no_hf, dtypes=args.dtypes)
        return 0
    if args.what == "admission":
        print("Past-Future admission cost (one decision; the naive baseline re-samples and re-sorts the batch)")
        print(f"{'running':>8} {'first/step us':>14} {'next us':>9} {'naive us':>9} {'speedup':>8} {'vs 20us goal':>13}")
        for n in args.running:
            first, nxt, naive = _core.bench_admission(n, args.iters, 0)
            print(f"{n:>8} {first:>14.2f} {nxt:>9.2f} {naive:>9.2f} {naive / first:>7.1f}x {first / 20.0:>12.2f}x")
        return 0
    if args.what == "queue":
        print("Engine time per step with FCFS and with the SLO queue (in the same process), against the step it")
        print("schedules (Llama-2-7B on an A100, modelled); the SLO queue orders and scans every waiting request")
        print(f"{'running':>8} {'waiting':>8} {'fcfs us':>9} {'slo us':>9} {'step ms':>8} {'slo / step':>11} {'vs 2% goal':>11}")
        for n in args.running:
            fcfs, slo, step = _core.bench_queue(n, 2 * n, min(args.iters, 200))
            share = slo / step
            print(f"{n:>8} {2 * n:>8} {fcfs:>9.1f} {slo:>9.1f} {step / 1e3:>8.2f} {share:>10.2%} {share / 0.02:>10.2f}x")
        return 0
    if args.what == "route":
        print("One routing decision (us): replicas each publishing 30,000 cached block hashes; a request of")
        print("2,500 blocks (a 40k-token prompt)")
        for n in args.replicas:
            row = _core.bench_route(n, 30_000, 2_500, args.iters)
            print(f"{n:>4} replicas  " + "  ".join(f"{k} {us:.2f}" for k, us in row)
                  + f"  (forecast vs 50 us goal: {dict(row)['forecast'] / 50:.2f}x)")
        print("The Ray router's call from Python (horae.cluster.router): stats published as Bloom filters,")
        print("the prompt's token ids hashed into blocks in the call (us per decision, forecast)")
        for n in args.replicas:
            print(f"{n:>4} replicas  " + "  ".join(f"{tokens}-token prompt {_ray_route_us(n, tokens, args.iters):.1f}"
                                                   for tokens in (2_000, 40_000)))
        return 0
    # sim-speed: one scheduler over a whole trace
    trace_path = args.trace
    t0 = time.perf_counter()
    trace = sim.load_trace(trace_path) if trace_path else sim.bundled_trace()
    load_s = time.perf_counter() - t0
    print(f"{trace!r} loaded in {load_s:.3f}s")
    print(f"{'scheduler':>13} {'sim seconds':>12} {'steps':>8} {'simulated s':>12} "
          f"{'speedup vs real time':>21} {'vs 2s goal':>11}")
    for s in args.schedulers:
        t0 = time.perf_counter()
        r = sim.simulate(trace, s)
        dt = time.perf_counter() - t0
        simulated = float(r.summary["duration"])
        print(f"{s:>13} {dt:>12.3f} {int(r.summary['num_steps']):>8} {simulated:>12.0f} "
              f"{simulated / dt:>20.0f}x {dt / 2.0:>10.2f}x")
    return 0


def _ray_route_us(replicas: int, prompt_tokens: int, iters: int) -> float:
    import random

    from horae import _core

    rng = random.Random(0)
    router = _core.Router("forecast")
    for i in range(replicas):
        router.publish(i, {"waiting": rng.randrange(4), "running": rng.randrange(8, 64), "waiting_tokens": rng.randrange(50_000),
                           "capacity_tokens": 400_000, "predicted_peak_tokens": rng.randrange(100_000, 400_000),
                           "planned_output": 200, "prefill_rate": 20_000.0, "block_size": 16,
                           "cached_bloom": rng.randbytes((30_000 * 10 + 63) // 64 * 8)})
    tokens = [rng.randrange(100, 49_000) for _ in range(prompt_tokens)]
    iters = max(1, min(iters, 500))
    t0 = time.perf_counter()
    for _ in range(iters):
        router.choose(tokens, 1024)
    return (time.perf_counter() - t0) * 1e6 / iters


def _generation_args(p) -> None:
    p.add_argument("--model", help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--scheduler", default="past-future")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "q8_0", "q4_1"],
                   help="how weights are held (auto: the checkpoint's own on the CPU, a GGUF's Q4_1/Q8_0 blocks included; "
                        "bfloat16 on a GPU; q8_0 quantizes at load)")
    p.add_argument("--device", default="auto", help="auto (a GPU if one works, else the CPU), cpu, cuda or cuda:N")


def _params(args):
    from horae import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _stream(engine, prompt, params) -> str:
    """Run one request, printing text as it arrives."""
    rid = engine.add_request(None, prompt, params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                new = out.outputs[0].text[len(text):]
                text = out.outputs[0].text
                print(new, end="", flush=True)
    except KeyboardInterrupt:
        engine.abort(rid)
    print(flush=True)
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from horae import Engine

    engine = Engine(args.model, scheduler=args.scheduler, dtype=args.dtype, device=args.device)
    params = _params(args)
    has_template = bool(engine.tokenizer_config.get("chat_template"))
    prompt = args.prompt
    if has_template and not args.raw:
        prompt = engine.apply_chat_template([{"role": "user", "content": args.prompt}])
    _stream(engine, prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from horae import Engine

    engine = Engine(args.model, scheduler=args.scheduler, dtype=args.dtype, device=args.device)
    params = _params(args)
    history = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.strip()})
        reply = _stream(engine, engine.apply_chat_template(history), params)
        history.append({"role": "assistant", "content": reply})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="horae", description="horae: LLM serving with the Past-Future scheduler")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    g = sub.add_parser("generate", help="generate text from a prompt (default model: SmolLM2-135M-Instruct)")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _generation_args(g)
    c = sub.add_parser("chat", help="chat on the terminal (one message a line; 'exit' or EOF ends)")
    c.add_argument("--system", help="a system message")
    _generation_args(c)
    cv = sub.add_parser("convert-gguf", help="convert a Llama-architecture GGUF file into an HF-style folder")
    cv.add_argument("gguf")
    cv.add_argument("out")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default model: SmolLM2-135M-Instruct)")
    from horae.serve import add_arguments

    add_arguments(sv)
    b = sub.add_parser("bench", help="benchmarks: admission, queue, route, sim-speed, model; "
                                     "`horae bench serve -h` for the serving load generator")
    b.add_argument("what", choices=["admission", "queue", "route", "sim-speed", "model", "serve"])
    b.add_argument("--model", help="model: model folder (default: SmolLM2-135M-Instruct)")
    b.add_argument("--no-hf", action="store_true", help="model: skip the HF transformers comparison")
    b.add_argument("--dtypes", type=_names, default=["float32", "bfloat16", "q4_1"],
                   help="model: weight dtypes to run (q4_1 and q8_0 need a converted GGUF, as the default model)")
    b.add_argument("--running", type=_ints, default=[64, 256, 1024], help="admission, queue: running requests")
    b.add_argument("--replicas", type=_ints, default=[8, 64], help="route: replica counts")
    b.add_argument("--iters", type=int, default=2000)
    b.add_argument("--trace", help="sim-speed: trace file (default: the bundled sample)")
    b.add_argument("--schedulers", type=_schedulers, default=["past-future", "aggressive", "conservative", "oracle"])
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:  # the load generator has its own (vLLM-style) options
        from horae.bench.serve import main as bench_serve

        return bench_serve(argv[2:])
    args = parser.parse_args(argv)
    try:
        if args.command == "serve" and args.replicas is not None:
            from horae.cluster.deploy import run

            return run(args)
        if args.command == "serve":
            if args.ray_address is not None:
                raise ValueError("--ray-address needs --replicas N")
            from horae.serve import run

            return run(args)
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "convert-gguf":
            from horae.models import convert_gguf

            if Path(args.out).exists():
                raise ValueError(f"{args.out} already exists")
            print(f"wrote {convert_gguf(args.gguf, args.out)}")
            return 0
        return cmd_bench(args)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError, ImportError, ConnectionError) as e:
        print(f"horae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
