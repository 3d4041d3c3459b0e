#!/usr/bin/env python3
"""What handing a stream's outputs across event loops costs, in one process.

`AsyncLLM` processes the engine's outputs on an event loop of its own (its home, on a thread of
its own) and runs each caller's stream there, handing the outputs to the caller's loop
(`async_llm._across_loops`), so that one model serves a notebook's cells and a server on a
thread at once. Here one `AsyncLLM` runs the same batch of streams read on its home loop itself
(no hand-off: what a single-loop design costs) and read on the caller's loop (as every caller
now reads them), alternating round by round; it prints decode tokens/s and the process's CPU
seconds per 1,000 tokens for each, and the ratio, median of the rounds.

    python examples/async_handoff_cost.py [--rounds 3] [--streams 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from horae import AsyncLLM, SamplingParams


async def batch(llm: AsyncLLM, streams: int, tokens: int, seed: int) -> int:
    async def one(i: int) -> int:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.8, seed=seed + i)
        n = 0
        async for out in llm.generate(f"Story number {i}:", params):
            n = len(out.outputs[0].token_ids)
        return n

    return sum(await asyncio.gather(*[one(i) for i in range(streams)]))


def timed(run, seed: int) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    n = run(seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    llm = AsyncLLM(kv_cache_tokens=16384, max_num_seqs=args.streams)
    asyncio.run(batch(llm, 1, 8, 0))  # starts the home loop (and warms the engine)

    def on_home(seed: int) -> int:
        return asyncio.run_coroutine_threadsafe(batch(llm, args.streams, args.tokens, seed), llm._loop).result()

    def handed_across(seed: int) -> int:
        return asyncio.run(batch(llm, args.streams, args.tokens, seed))

    ratios = []
    for r in range(args.rounds):
        (home_tps, home_cpu), (across_tps, across_cpu) = timed(on_home, r), timed(handed_across, r)
        ratios.append(across_tps / home_tps)
        print(f"round {r}: on the home loop {home_tps:7.1f} tok/s, {home_cpu:.3f} CPU s/1k tokens | "
              f"handed across {across_tps:7.1f} tok/s, {across_cpu:.3f} CPU s/1k tokens | {ratios[-1]:.3f}x", flush=True)
    print(f"handed across / on the home loop, median of {args.rounds}: {statistics.median(ratios):.3f}x")
    llm.shutdown()


if __name__ == "__main__":
    main()
