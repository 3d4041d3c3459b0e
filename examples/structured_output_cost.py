#!/usr/bin/env python3
"""What structured output costs a decode step, in one process.

Each step that samples for a request under a grammar computes the grammar's token mask (in the
scheduler, on the engine's thread: llguidance walks the vocabulary's trie) and the runner
masks the logits with it. Here one engine decodes the same prompts plainly and under a grammar,
alternating run by run (this shared machine's speed moves within minutes, so each pair is read
side by side), and prints decode tokens/s for each and the grammar's over the plain rate,
median of the pairs. Every request runs to `max_tokens` (`ignore_eos`; the grammars cannot end
sooner), so both do the same number of steps.

Then speculation under a grammar: a greedy answer in a JSON schema whose keys repeat, from an
engine with prompt lookup (k = 4, fixed) and one without, alternating; tokens/s of the whole
answer and the ratio (drafts are verified under the grammar's mask at each position).

    python examples/structured_output_cost.py [--pairs 3] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from horae import LLM, Engine, SamplingParams, StructuredOutputsParams

# Grammars that cannot end within the run: free text over letters; a JSON list of strings.
GRAMMARS = {
    "regex [a-z ,.]{2000}": StructuredOutputsParams(regex="[a-z ,.]{2000}"),
    "JSON list of 500+ strings": StructuredOutputsParams(
        json={"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 500}),
}


def decode_rate(engine: Engine, batch: int, new_tokens: int, salt: int, grammar=None) -> float:
    """Decode tokens/s over the steps where every sequence draws one token (prefill excluded)."""
    p = SamplingParams(temperature=0.8, seed=salt, max_tokens=new_tokens, ignore_eos=True, structured_outputs=grammar)
    for i in range(batch):
        engine.add_request(None, {"prompt_token_ids": [1 + (7 * i + 13 * salt + j) % 5000 for j in range(32)]}, p)
    tokens, seconds = 0, 0.0
    while engine.has_unfinished_requests():
        waiting = engine.stats()["waiting"]
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if waiting == 0 and all(len(o.outputs[0].token_ids) > 1 for o in outs) and len(outs) == batch:
            tokens, seconds = tokens + batch, seconds + dt
    return tokens / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    engine = Engine(kv_cache_tokens=8192, max_num_seqs=32)
    salts = itertools.count(1)
    decode_rate(engine, 1, 8, next(salts), GRAMMARS["regex [a-z ,.]{2000}"])  # warm-up: the vocabulary's trie
    for name, grammar in GRAMMARS.items():
        for batch in map(int, args.batches.split(",")):
            pairs = []
            for _ in range(args.pairs):
                plain = decode_rate(engine, batch, args.new_tokens, next(salts))
                under = decode_rate(engine, batch, args.new_tokens, next(salts), grammar)
                pairs.append((plain, under))
            shown = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in pairs)
            print(f"{name}, {batch} sequence(s): plain -> grammar {shown} tok/s; "
                  f"{statistics.median(b / a for a, b in pairs):.2f}x", flush=True)
    del engine
    speculation(args.pairs)


# Seven objects of three keys each: prompt lookup finds the keys in the prompt and in what came before.
WEEK = {"type": "array", "minItems": 7, "maxItems": 7, "items": {
    "type": "object", "additionalProperties": False, "required": ["day", "activity", "hours"],
    "properties": {"day": {"type": "string", "maxLength": 12}, "activity": {"type": "string", "maxLength": 40},
                   "hours": {"type": "integer", "minimum": 0, "maximum": 24}}}}


def speculation(pairs: int) -> None:
    msgs = [{"role": "user", "content": "Plan my week as a JSON list: for each day, the day, an activity and the hours."}]
    p = SamplingParams(temperature=0, max_tokens=400, structured_outputs=StructuredOutputsParams(json=WEEK))
    plain = LLM(kv_cache_tokens=4096)
    lookup = LLM(kv_cache_tokens=4096, speculative={"method": "ngram", "k_max": 4, "adaptive": False})
    rates = []
    for _ in range(pairs):
        row = []
        for llm in (plain, lookup):
            t = time.perf_counter()
            out = llm.chat(msgs, p, use_tqdm=False)[0].outputs[0]
            row.append((len(out.token_ids) / (time.perf_counter() - t), out))
        rates.append(row)
    (_, a), (_, b) = rates[0]
    assert a.token_ids == b.token_ids, "greedy under a grammar must not depend on speculation"
    shown = ", ".join(f"{x:.1f} -> {y:.1f}" for (x, _), (y, _) in rates)
    print(f"JSON week ({len(a.token_ids)} tokens, {a.finish_reason}), no speculation -> prompt lookup: {shown} tok/s; "
          f"{statistics.median(y / x for (x, _), (y, _) in rates):.2f}x; drafts {b.num_draft_tokens}, "
          f"accepted {b.num_accepted_tokens}", flush=True)


if __name__ == "__main__":
    main()
