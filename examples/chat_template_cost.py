#!/usr/bin/env python3
"""What rendering a chat template costs a request, compiled each time or once, in one process.

Every chat request renders the model's template in jinja2's sandbox (`horae.chat_template`),
on the server's event loop. Here the default model's template renders the same short
conversation with the compiled template dropped before each render (what every request paid
before templates were kept compiled) and kept (as now), alternating round by round; it prints
microseconds per render for each, and the ratio, median of the rounds.

    python examples/chat_template_cost.py [--rounds 5] [--renders 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from horae import Engine
from horae import chat_template as ct

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


def per_render_us(engine: Engine, renders: int, compile_each: bool) -> float:
    start = time.perf_counter()
    for _ in range(renders):
        if compile_each:
            ct.compiled.cache_clear()
        engine.apply_chat_template(MESSAGES)
    return (time.perf_counter() - start) / renders * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--renders", type=int, default=200)
    args = p.parse_args()
    engine = Engine(kv_cache_tokens=256)
    engine.apply_chat_template(MESSAGES)  # jinja2 imported, the template read
    ratios = []
    for r in range(args.rounds):
        each = per_render_us(engine, args.renders, compile_each=True)
        once = per_render_us(engine, args.renders, compile_each=False)
        ratios.append(each / once)
        print(f"round {r}: compiled each render {each:8.1f} us, compiled once {once:6.1f} us, {each / once:6.1f}x")
    print(f"median: compiling once renders {statistics.median(ratios):.1f}x faster")


if __name__ == "__main__":
    main()
