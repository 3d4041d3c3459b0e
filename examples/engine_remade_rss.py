#!/usr/bin/env python3
"""What a process holds after its engine is made again, as a notebook cell `llm = LLM()` re-run.

Each round makes an `LLM` on the default model (the one before it dropped as the name is
rebound), generates a few tokens, and prints the process's resident memory and its ratio to the
first round's. The KV cache is a mapping of its own (`backend::huge::try_mapped`): its pages are
resident only once written, and a dropped engine's go back to the kernel. (When it came from the
allocator, glibc served the second engine's cache from memory the first had freed, zeroed whole:
the whole pool resident from the start, and more with each remake.)

    python examples/engine_remade_rss.py [--rounds 5] [--kv-cache-tokens 16384]
"""

from __future__ import annotations

import argparse
import gc
import resource

from horae import LLM, SamplingParams


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kv-cache-tokens", type=int, default=None, help="default: the engine's")
    args = ap.parse_args()
    first = None
    llm = None
    for i in range(args.rounds):
        llm = LLM(kv_cache_tokens=args.kv_cache_tokens)
        llm.generate(["Hi", "Tell me a story."], SamplingParams(max_tokens=8), use_tqdm=False)
        gc.collect()
        now = rss_mb()
        first = first or now
        print(f"engine {i + 1}: resident {now:7.1f} MB, {now / first:.2f}x the first", flush=True)


if __name__ == "__main__":
    main()
