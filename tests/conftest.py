"""Shared by the Python tests: the default model's goldens, written by HF transformers
(scripts/make_goldens.py)."""

import json
from pathlib import Path

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2.json").read_text())


def returned_tokens(greedy):
    """HF's greedy continuation as horae returns it: HF's includes the end-of-sequence token that
    ended it; horae, like OpenAI, returns neither its text nor the token (docs/architecture.md)."""
    eos = GOLDEN["eos"] if isinstance(GOLDEN["eos"], list) else [GOLDEN["eos"]]
    return greedy[:-1] if greedy and greedy[-1] in eos else greedy


def pytest_report_header(config):
    """Which CPU kernels this machine runs, so a log says which ones its tests covered (the Rust
    tests check each available kernel against the portable one)."""
    from horae import _core

    k = _core.cpu_kernels()
    amx = (f"; AMX tiles for bf16 products from {k['amx_min_rows']} rows, and for f32 prefill attention in"
           " three bf16 products" if k["amx_min_rows"] else "")
    if k["amx_int8_min_rows"]:
        amx += f", int8 tiles for q8_0/q4_1 weights from {k['amx_int8_min_rows']} rows"
    if k["avx512_bf16_min_rows"]:
        amx += "; vdpbf16ps for bf16 products"
    return f"horae CPU kernels: {', '.join(k['available'])} (the engine uses {k['selected']}{amx})"
