#!/usr/bin/env python3
"""Prefill fairness on the real engine: a long prompt, then a short request a moment later.

Runs the default model twice in this process, without and with `long_prefill_token_threshold`,
and prints each request's time to first token and the ratios (the same prompts, the same engine
settings otherwise). Without a threshold the long prompt's chunks take every step's whole token
budget and the short request waits for its whole prefill; with one it starts beside it.

    python examples/prefill_fairness.py                          # 6,000 tokens, threshold 256
    python examples/prefill_fairness.py --long 3000 --threshold 512
"""

from __future__ import annotations

import argparse
import time

from horae import Engine, SamplingParams


def run(engine: Engine, long_ids, short_ids, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = {}
    engine.add_request("long", {"prompt_token_ids": long_ids}, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    engine.step()  # the long prompt's first chunk is under way when the short one arrives
    t_short = time.perf_counter()
    engine.add_request("short", {"prompt_token_ids": short_ids}, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    sent = {"long": t0, "short": t_short}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first and out.outputs[0].token_ids:
                first[out.request_id] = time.perf_counter() - sent[out.request_id]
    return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2)")
    ap.add_argument("--long", type=int, default=6000, help="tokens in the long prompt")
    ap.add_argument("--threshold", type=int, default=256, help="long_prefill_token_threshold of the second run")
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    results = {}
    for name, threshold in (("no threshold", None), (f"threshold {args.threshold}", args.threshold)):
        engine = Engine(args.model, kv_cache_tokens=16384, long_prefill_token_threshold=threshold)
        text = "The history of the river and the towns along it. " * (args.long // 8)
        long_ids = engine.encode(text)[: args.long]
        assert len(long_ids) == args.long, "the filler text is too short"
        short_ids = engine.encode("Write a short poem about the sea.")  # shares no block with the long one
        results[name] = run(engine, long_ids, short_ids, args.max_tokens)
        r = results[name]
        print(f"{name:>16}: short request TTFT {r['short']:7.2f} s   long request TTFT {r['long']:7.2f} s", flush=True)
    (a, b) = results.values()
    print(f"short TTFT with / without the threshold: {b['short'] / a['short']:.3f}x; "
          f"the long request's own TTFT: {b['long'] / a['long']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
