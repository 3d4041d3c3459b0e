"""Shared by the Python tests: the default model's goldens, written by HF transformers
(scripts/make_goldens.py), and a conversation in which it calls a tool."""

import json
from pathlib import Path

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2.json").read_text())


def returned_tokens(greedy):
    """HF's greedy continuation as horae returns it: HF's includes the end-of-sequence token that
    ended it; horae, like OpenAI, returns neither its text nor the token (docs/architecture.md)."""
    eos = GOLDEN["eos"] if isinstance(GOLDEN["eos"], list) else [GOLDEN["eos"]]
    return greedy[:-1] if greedy and greedy[-1] in eos else greedy


def hermes_call(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>' % city


#: A conversation that shows the default model the Hermes tool-call format by example (its own
#: chat template has no tools): asked about Paris, it writes `hermes_call("Paris")` greedily, with
#: every CPU kernel (tool_choice "auto" through the server and through Ray's ingress).
WEATHER_SHOWN = [
    {"role": "system", "content": "You may call get_weather(city). For each call, write <tool_call>"
                                  '{"name": <function-name>, "arguments": <args-json-object>}</tool_call>.'},
    {"role": "user", "content": "What is the weather in London?"}, {"role": "assistant", "content": hermes_call("London")},
    {"role": "user", "content": "What is the weather in Rome?"}, {"role": "assistant", "content": hermes_call("Rome")},
    {"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


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
