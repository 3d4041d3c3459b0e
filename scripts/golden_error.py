#!/usr/bin/env python3
"""How far the engine's teacher-forced logits are from HF transformers', per weight dtype: the
largest absolute difference over the golden rows (tests/golden/smollm2.json, which
scripts/make_goldens.py regenerates). The goldens' tests allow 1e-3; this prints the margin, so
a kernel change can say what it costs in precision. Set HORAE_CPU_KERNEL to compare kernels.

    python scripts/golden_error.py                 # the default model's own Q4_1 blocks and float32
    HORAE_CPU_KERNEL=avx512 python scripts/golden_error.py auto float32
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from horae import LLM, _core

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "tests" / "golden" / "smollm2.json").read_text())


def largest_difference(dtype: str) -> float:
    llm = LLM(kv_cache_tokens=4096, dtype=dtype)
    worst = 0.0
    for forced in GOLDEN["teacher_forced"]:
        logits = llm.engine.logits(forced["ids"])
        for row in forced["rows"]:
            worst = max(worst, float(np.abs(logits[row["position"], row["ids"]] - np.array(row["values"])).max()))
    return worst


def main(dtypes: list[str]) -> int:
    kernels = _core.cpu_kernels()
    print(f"kernel {kernels['selected']}, AMX tiles from {kernels['amx_min_rows']} rows"
          if kernels["amx_min_rows"] else f"kernel {kernels['selected']}, no AMX tiles")
    for dtype in dtypes:
        try:
            worst = largest_difference(dtype)
        except ValueError as e:  # an unknown dtype, or one the checkpoint cannot take: say which
            print(f"golden_error: {e}", file=sys.stderr)
            return 2
        print(f"{dtype}: largest |logit - HF| over the golden rows {worst:.2e} (the goldens allow 1e-3)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["auto", "float32"]))
