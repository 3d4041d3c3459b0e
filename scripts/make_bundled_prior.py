#!/usr/bin/env python3
"""Regenerate horae/priors/sharegpt_output_lengths.csv: 128 quantiles of the output lengths in
ShareGPT conversations (etalon's sharegpt_8k_filtered_stats_llama2_tokenizer.csv, Apache-2.0;
see ../shared/data/SOURCES.md). Usage: scripts/make_bundled_prior.py [path to that csv]."""

import csv
import sys
from pathlib import Path

import numpy as np

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
src = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
with src.open() as f:
    lengths = np.array([int(r["num_decode_tokens"]) for r in csv.DictReader(f)])
n = 128
q = np.quantile(lengths, (np.arange(n) + 0.5) / n, method="inverted_cdf").astype(int)
out = Path(__file__).resolve().parents[1] / "python/horae/priors/sharegpt_output_lengths.csv"
with out.open("w") as f:
    f.write("output_len\n")
    f.writelines(f"{max(1, int(v))}\n" for v in q)
print(f"{len(lengths)} lengths (mean {lengths.mean():.0f}) -> {n} quantiles (mean {q.mean():.0f}) in {out}")
