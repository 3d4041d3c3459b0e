#!/usr/bin/env python3
"""How much prefix reuse a KV pool of a given size can win on the Mooncake trace, whatever the
router (issue 16): the bounds that the cluster study's hit rates sit under.

The trace names each prompt's 512-token blocks by `hash_ids`; a block is a hit where it is the
leading run of a prompt's blocks still cached (as a replica's prefix cache serves it). One cache
of the given size sees every request in arrival order, with nothing pinned by running requests
and no copy of a block on two replicas: the most a cluster with that much KV in all could keep.

- ``unbounded``: every block ever seen stays (the trace's own reuse);
- ``LRU``: least recently used goes first, a prompt's blocks refreshed tail first so that its head
  is the youngest (horae's `BlockPool` and `KvManager::free` / `touch_prefix`, and vLLM's);
- ``SLRU``: blocks read again at least once are kept in a protected part of the given share of
  the cache, evicted after the blocks read once (a scan-resistant LRU; not horae's);
- ``OPT``: Belady's rule, the block whose next use is furthest goes first: the bound no eviction
  rule that does not know the future can pass.

    python examples/prefix_cache_bounds.py                    # 1, 2, 4, 8 and 16M tokens
    python examples/prefix_cache_bounds.py --tokens 8000000
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import OrderedDict
from pathlib import Path

BLOCK_TOKENS = 512  # the trace's unit: one hash id a 512-token block


def leading_hits(cached, hashes) -> int:
    n = 0
    for h in hashes:
        if h not in cached:
            break
        n += 1
    return n


def lru(prompts, blocks: int) -> float:
    cache: OrderedDict = OrderedDict()
    hit = 0
    for hashes in prompts:
        hit += leading_hits(cache, hashes)
        for h in reversed(hashes):  # tail first: the head ends youngest
            cache[h] = True
            cache.move_to_end(h)
        while len(cache) > blocks:
            cache.popitem(last=False)
    return hit / sum(map(len, prompts))


def slru(prompts, blocks: int, protected_share: float) -> float:
    probation: OrderedDict = OrderedDict()
    protected: OrderedDict = OrderedDict()
    cap = int(blocks * protected_share)
    hit = 0
    for hashes in prompts:
        hit += leading_hits(_Either(probation, protected), hashes)
        for h in reversed(hashes):
            if h in protected:
                protected.move_to_end(h)
            elif h in probation:  # read again: protected
                del probation[h]
                protected[h] = True
            else:
                probation[h] = True
            while len(protected) > cap:  # the oldest protected go back to probation, youngest there
                old, _ = protected.popitem(last=False)
                probation[old] = True
        while len(probation) + len(protected) > blocks:
            (probation if probation else protected).popitem(last=False)
    return hit / sum(map(len, prompts))


class _Either:
    def __init__(self, a, b):
        self.a, self.b = a, b

    def __contains__(self, h) -> bool:
        return h in self.a or h in self.b


def belady(prompts, blocks: int) -> float:
    seq = [h for hashes in prompts for h in hashes]
    never = len(seq) + 1
    next_use = [never] * len(seq)
    last: dict = {}
    for t in range(len(seq) - 1, -1, -1):
        next_use[t] = last.get(seq[t], never)
        last[seq[t]] = t
    cached: dict = {}  # hash -> its next use
    heap: list = []  # (-next use, hash), stale entries skipped
    hit = t = 0
    for hashes in prompts:
        hit += leading_hits(cached, hashes)
        for h in hashes:
            cached[h] = next_use[t]
            heapq.heappush(heap, (-next_use[t], h))
            t += 1
            while len(cached) > blocks:
                nu, victim = heapq.heappop(heap)
                if cached.get(victim) == -nu:
                    del cached[victim]
    return hit / len(seq)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/synthetic_trace.jsonl",
                    help="a Mooncake-format JSONL trace (hash_ids)")
    ap.add_argument("--tokens", default="1000000,2000000,4000000,8000000,16000000",
                    help="cache sizes in tokens, comma-separated")
    ap.add_argument("--protected-share", type=float, default=0.5, help="SLRU's protected part of the cache")
    args = ap.parse_args()
    if not args.trace.is_file():
        ap.error(f"no trace at {args.trace}: give --trace (the Mooncake synthetic trace, synthetic_trace.jsonl)")
    try:
        sizes = [int(float(x)) for x in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens takes whole numbers of tokens, comma-separated; got {args.tokens!r}")
    if any(s < BLOCK_TOKENS for s in sizes):
        ap.error(f"every cache size must hold at least one {BLOCK_TOKENS}-token block")
    if not 0.0 < args.protected_share < 1.0:
        ap.error("--protected-share must be between 0 and 1")
    prompts = []
    for n, line in enumerate(args.trace.read_text(errors="replace").splitlines(), 1):
        try:
            if line.strip():
                prompts.append([int(h) for h in json.loads(line)["hash_ids"]])
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            ap.error(f"{args.trace}, line {n}: not a Mooncake JSONL row with a hash_ids list ({e!r})")
    if not prompts:
        ap.error(f"{args.trace} has no requests")
    total = sum(map(len, prompts))
    unique = len({h for hashes in prompts for h in hashes})
    print(f"{args.trace.name}: {len(prompts)} requests, {total} blocks of {BLOCK_TOKENS} tokens, {unique} distinct; "
          f"unbounded cache: hit rate {1 - unique / total:.3f}")
    print(f"{'cache tokens':>13} {'LRU':>6} {'SLRU':>6} {'OPT':>6}")
    for tokens in sizes:
        blocks = tokens // BLOCK_TOKENS
        print(f"{tokens:>13,} {lru(prompts, blocks):6.3f} {slru(prompts, blocks, args.protected_share):6.3f} "
              f"{belady(prompts, blocks):6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
