#!/usr/bin/env python3
"""What the prefix cache saves beam search, in one process.

Beam search (`LLM.beam_search`, `horae/beam_search.py`) sends every live beam to the engine at
each step as a prompt of all its tokens so far, asking for one more. With prefix caching (the
default) a step computes only each beam's last, partly filled block; without it, each beam's
whole prompt and output again. Two engines of the default model, one of each, run the same
search in alternating rounds; it prints seconds per search, the ratio (median of the rounds), and
checks that both found the same beams.

    python examples/beam_search_cost.py [--rounds 3] [--beam-width 4] [--max-tokens 32] [--prompt-words 150]
"""

from __future__ import annotations

import argparse
import statistics
import time

from horae import LLM, BeamSearchParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=150)
    args = p.parse_args()
    prompt = "Here is a list of words: " + " ".join(f"word{i}" for i in range(args.prompt_words)) + ". Now a story:"
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens)
    engines = {"cached": LLM(kv_cache_tokens=8192), "uncached": LLM(kv_cache_tokens=8192, enable_prefix_caching=False)}
    n_prompt = len(engines["cached"].engine.prompt_token_ids(prompt)[1])
    print(f"prompt {n_prompt} tokens, beam width {args.beam_width}, {args.max_tokens} new tokens")
    times = {k: [] for k in engines}
    beams = {}
    for r in range(args.rounds):
        for name, llm in engines.items():
            start = time.perf_counter()
            out = llm.beam_search([prompt], params)[0]
            times[name].append(time.perf_counter() - start)
            beams[name] = [s.tokens for s in out.sequences]
        print(f"round {r}: with the prefix cache {times['cached'][-1]:.2f} s, without {times['uncached'][-1]:.2f} s, "
              f"{times['uncached'][-1] / times['cached'][-1]:.2f}x")
    ratio = statistics.median(u / c for u, c in zip(times["uncached"], times["cached"]))
    print(f"median: {ratio:.2f}x faster with the prefix cache; the same beams: {beams['cached'] == beams['uncached']}")


if __name__ == "__main__":
    main()
