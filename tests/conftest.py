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
    from horae.bench.model import kernels_in_use

    return f"horae CPU kernels: {kernels_in_use(_core.cpu_kernels())}"
