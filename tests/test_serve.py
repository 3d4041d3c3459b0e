"""The OpenAI-compatible server on the default model, driven by the official `openai` client:
chat and completions, streaming and not, errors in OpenAI's shape, concurrent clients, a client
that disconnects mid-stream, overload, and a short schemathesis run. After each, /metrics and the
block manager must show nothing leaked."""

import asyncio
import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import WEATHER_SHOWN, WEATHER_TOOL

from horae import SamplingParams, __version__
from horae.async_llm import AsyncLLM, EngineDeadError, RequestDroppedError
from horae.serve import ServerConfig, ServerThread, build_app

KEY = "sk-horae-test"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    llm = AsyncLLM(kv_cache_tokens=4096, max_num_seqs=16)
    app = build_app(llm, ServerConfig(model_name="smollm2", api_key=KEY, max_queue=64))
    srv = ServerThread(app)
    srv.llm = llm
    yield srv
    srv.stop()
    llm.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    m = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _assert_idle(server, timeout: float = 15.0):
    """Every request finished or aborted, every KV block back (in use = 0), and /metrics agrees."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = server.llm.engine.stats()
        used, running, waiting = st["kv_used_blocks"], st["running"], st["waiting"]
        if used == 0 and running == 0 and waiting == 0 and server.llm.num_in_flight == 0 and server.llm.num_streams == 0:
            break
        time.sleep(0.05)
    assert server.llm.engine.stats()["kv_used_blocks"] == 0, "KV blocks leaked"
    assert server.llm.num_in_flight == 0 and server.llm.num_streams == 0 and not server.llm.times
    assert _metric(server, "horae:num_requests_running") == 0
    assert _metric(server, "horae:kv_cache_usage_perc") == 0


def test_chat_non_streaming_and_streaming_agree(server, client):
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."  # the HF golden
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    prompt_tokens = httpx.post(server.url + "/tokenize", json={"messages": CAPITAL},
                               headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    # 7 tokens of text; the end-of-sequence token that ended it is neither counted nor listed.
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 7

    chunks = list(client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    # OpenAI's usage.prompt_tokens_details.cached_tokens: the prompt's full blocks of 16 the prefix
    # cache served, here all but the last partial block (the same messages ran above).
    cached = (prompt_tokens - 1) // 16 * 16
    assert r.usage.prompt_tokens_details.cached_tokens in (0, cached)  # 0 if it ran first
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    # Summed over a completion's prompts (41 tokens each: two full blocks), once they are cached.
    for _ in range(2):
        c = client.completions.create(model="smollm2", prompt=["hi " * 40, "hi " * 40], max_tokens=1)
    assert c.usage.prompt_tokens == 82 and c.usage.prompt_tokens_details.cached_tokens == 64
    # AsyncLLM's reset_prefix_cache (vLLM's): the same prompts are computed in full after it.
    assert asyncio.run(server.llm.reset_prefix_cache()) is True
    for cached in (0, 32):
        c = client.completions.create(model="smollm2", prompt="hi " * 40, max_tokens=1)
        assert c.usage.prompt_tokens_details.cached_tokens == cached
    _assert_idle(server)


def test_chat_sampling_options_and_logprobs(server, client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story"}], max_completion_tokens=12,
              temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.5, user="u1")
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same text
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=4, temperature=0, n=2,
                                       logprobs=True, top_logprobs=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    lp = r.choices[0].logprobs.content
    assert len(lp) == 4 and lp[0].token == "The" and len(lp[0].top_logprobs) == 3
    assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[1].logprob and lp[0].logprob <= 0


def test_logit_bias_bans_and_forces_tokens(server, client):
    """OpenAI's `logit_bias`: token ids (JSON's string keys) to a bias in [-100, 100] added to that
    token's logit before sampling; logprobs are reported from the logits before it, as vLLM's."""
    base = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=1)
    assert base.choices[0].message.content.startswith("The capital")
    the = base.choices[0].logprobs.content[0]
    the_id = httpx.post(server.url + "/tokenize", json={"prompt": the.token},
                        headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    assert len(the_id) == 1
    # -100 on the greedy first token: another one comes first, and the rest follows from it.
    banned = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=6, temperature=0,
                                            logit_bias={str(the_id[0]): -100}, logprobs=True, top_logprobs=1)
    assert not banned.choices[0].message.content.startswith(the.token)
    # +100 on one token: every sample of every step is that token, sampled or not.
    colon = httpx.post(server.url + "/detokenize", json={"tokens": [42]}, headers={"Authorization": f"Bearer {KEY}"})
    assert colon.json()["prompt"] == ":"
    for temperature in (0, 1.0):
        forced = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, n=2,
                                           temperature=temperature, seed=3, logit_bias={"42": 100}, logprobs=1)
        assert [c.text for c in forced.choices] == ["::::", "::::"]
        # The logprob is the model's own: far below 0, not the biased certainty.
        assert forced.choices[0].logprobs.token_logprobs[0] < -5
    # Streaming takes it too.
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=3, temperature=0,
                                       logit_bias={"42": 100}, stream=True)
    assert "".join(c.choices[0].text for c in stream) == ":::"
    h = {"Authorization": f"Bearer {KEY}"}
    for bias, what in [({"49152": 5}, "outside the vocabulary"), ({"42": 100.5}, "[-100, 100]"),
                       ({"K": 1}, "token ids (integers)"), ({"42": "x"}, ""), ([42], "")]:
        body = {"model": "smollm2", "prompt": "hi", "max_tokens": 2, "logit_bias": bias}
        err = _error(httpx.post(server.url + "/v1/completions", json=body, headers=h), 400)
        assert err["param"].split(".")[0] == "logit_bias" and what in err["message"], (bias, err)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=2, logit_bias={"-1": 1})
    # vLLM's allowed_token_ids (extra_body), beside a bias within them.
    only = client.completions.create(model="smollm2", prompt="hi", max_tokens=4, temperature=1.0, seed=2,
                                     extra_body={"allowed_token_ids": [42, 43], "ignore_eos": True},
                                     logit_bias={"43": -100})
    assert only.choices[0].text == "::::"
    err = _error(httpx.post(server.url + "/v1/completions", headers=h,
                            json={"model": "smollm2", "prompt": "hi", "allowed_token_ids": []}), 400)
    assert err["param"] == "allowed_token_ids", err
    _assert_idle(server)


def test_structured_output_through_the_openai_client(server, client):
    """OpenAI's `response_format` (a JSON schema, any JSON object) and vLLM's `structured_outputs`
    (extra_body: choice, regex, grammar): every answer is in its language and ends where it does,
    streamed or not, sampled or greedy."""
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Give me a person named Alice aged 30 as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}}
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=60, temperature=0,
                                       response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    v = json.loads(r.choices[0].message.content)
    assert set(v) == {"name", "age"} and isinstance(v["name"], str) and isinstance(v["age"], int), v
    # Streamed, sampled, n=2: each choice's deltas join to JSON under the schema.
    stream = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=60, temperature=1.0, seed=4,
                                            n=2, response_format=fmt, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    for t in texts:
        assert set(json.loads(t)) == {"name", "age"}, t
    # Without the schema the same greedy answer is not JSON: the mask did it.
    free = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=30, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    obj = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=40, temperature=0,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.startswith("{")
    # llama.cpp's server's spelling of a schema: {"type": "json_object", "schema": ...}.
    llama_cpp = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=60, temperature=0,
                                               response_format={"type": "json_object", "schema": person})
    assert set(json.loads(llama_cpp.choices[0].message.content)) == {"name", "age"}, llama_cpp
    err = _error(httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "smollm2", "messages": msgs, "response_format": {"type": "text", "schema": person}}), 400)
    assert "schema (llama.cpp's) is given with type 'json_object' only" in err["message"], err
    yes_no = [{"role": "user", "content": "Is Paris the capital of France? Answer yes or no."}]
    for temperature in (0, 1.0):
        c = client.chat.completions.create(model="smollm2", messages=yes_no, max_tokens=10, temperature=temperature,
                                           seed=1, n=3, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        assert all(x.message.content in ("yes", "no") and x.finish_reason == "stop" for x in c.choices), c
    year = client.completions.create(model="smollm2", prompt="World War II ended in the year", max_tokens=8,
                                     temperature=0, extra_body={"structured_outputs": {"regex": " [0-9]{4}"}})
    assert re.fullmatch(r" [0-9]{4}", year.choices[0].text) and year.choices[0].finish_reason == "stop"
    fruit = client.completions.create(model="smollm2", prompt="My favourite fruit:", max_tokens=8, temperature=1.0,
                                      seed=5, n=4, extra_body={"structured_outputs": {"grammar": 'start: " apple" | " pear"'}})
    assert {c.text for c in fruit.choices} <= {" apple", " pear"}
    gbnf = client.completions.create(model="smollm2", prompt="My favourite fruit:", max_tokens=8, temperature=1.0,
                                     seed=5, n=4, extra_body={"structured_outputs": {"grammar": 'root ::= " apple" | " pear"'}})
    assert [c.text for c in gbnf.choices] == [c.text for c in fruit.choices]  # GBNF: the same language, the same draws
    err = _error(httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "smollm2", "prompt": "Hi", "structured_outputs": {"grammar": 'fruit ::= "apple"'}}), 400)
    assert err["param"] == "structured_outputs" and "No 'root' rule found" in err["message"], err
    _assert_idle(server)


def test_tool_calls_forced_by_tool_choice(server, client):
    """OpenAI's `tools` with `tool_choice` naming a function or 'required': the call's arguments
    are structured output under the function's schema (vLLM's way), answered as `tool_calls`,
    streamed or not; the conversation goes on with the call and a tool message in its history.
    'auto', the default when tools are given, needs the server's tool-call parser: refused by name
    here (test_tool_calls_chosen_by_the_model serves it)."""
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                              "required": ["city"], "additionalProperties": False}}}
    time_in = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40, temperature=0,
                                       tools=[weather, time_in], tool_choice=named)
    m = r.choices[0].message
    assert m.content is None and len(m.tool_calls) == 1 and m.tool_calls[0].function.name == "get_weather", m
    args = json.loads(m.tool_calls[0].function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    assert r.choices[0].finish_reason == "stop" and m.tool_calls[0].id.startswith("chatcmpl-tool-")
    # Streamed: the id and name come first, the arguments in pieces that join to the same text.
    parts, ids, names = [], set(), set()
    for chunk in client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=40, temperature=0,
                                                tools=[weather, time_in], tool_choice=named, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            ids |= {d.id} - {None}
            names |= {d.function.name} - {None}
            parts.append(d.function.arguments or "")
    assert len(ids) == 1 and names == {"get_weather"} and "".join(parts) == m.tool_calls[0].function.arguments
    # 'required': one call or more, each to one of the tools with its own arguments; streamed,
    # each call's id and name first, then its arguments in pieces, the same calls in the end.
    answers = []
    for stream in (False, True):
        req = dict(model="smollm2", messages=msgs, max_tokens=80, temperature=0.8, seed=3,
                   tools=[weather, time_in], tool_choice="required", stream=stream)
        if stream:
            calls, finish, pieces = {}, None, 0
            for chunk in client.chat.completions.create(**req):
                for d in chunk.choices[0].delta.tool_calls or []:
                    assert (d.index in calls) == (d.id is None), d  # the id once, in the call's first piece
                    name, args = calls.get(d.index, (d.function.name, ""))
                    calls[d.index], pieces = (name, args + d.function.arguments), pieces + 1
                finish = chunk.choices[0].finish_reason or finish
            calls = [calls[k] for k in range(len(calls))]
            assert pieces > len(calls), "the arguments come in pieces"
        else:
            r = client.chat.completions.create(**req)
            calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
            finish = r.choices[0].finish_reason
        assert finish == "tool_calls" and calls, (finish, calls)
        for name, args in calls:
            assert (name, set(json.loads(args))) in (("get_weather", {"city"}), ("get_time", {"zone"})), calls
        answers.append(calls)
    assert answers[0] == answers[1], answers
    # The call and its answer in the history: the conversation goes on.
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [m.tool_calls[0].model_dump()]},
                      {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "Sunny, 21 C"}]
    more = client.chat.completions.create(model="smollm2", messages=history, max_tokens=8, temperature=0,
                                          tools=[weather], tool_choice="none")
    assert more.choices[0].message.content and more.choices[0].message.tool_calls is None
    h = {"Authorization": f"Bearer {KEY}"}
    nope = {"type": "function", "function": {"name": "nope"}}
    for extra, what in [({"tool_choice": "auto"}, "--enable-auto-tool-choice and --tool-call-parser"),
                        ({}, "the default when tools are given"), ({"tool_choice": nope}, "not among the tools"),
                        ({"tool_choice": "required", "tools": None}, "needs tools"),
                        ({"tool_choice": "auto", "tools": None}, "'auto' needs tools"),
                        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "not both")]:
        body = {"model": "smollm2", "messages": msgs, "tools": [weather], **extra}
        err = _error(httpx.post(server.url + "/v1/chat/completions", json=body, headers=h), 400)
        assert what in err["message"], (extra, err)
    bad = {"model": "smollm2", "messages": [{"role": "user", "content": None}]}
    assert _error(httpx.post(server.url + "/v1/chat/completions", json=bad, headers=h), 400)["param"].startswith("messages")
    _assert_idle(server)


def test_tool_call_deltas_and_a_required_list_cut_by_max_tokens():
    """The chat route's tool-call shaping alone: a named call streams its arguments, id and name
    first; a 'required' list comes whole when complete, and a list cut by max_tokens is answered
    as text (no calls to parse)."""
    from horae.serve.answer import Answer
    from horae.serve.tools import Named, Required

    d = Answer(Named("f")).stream()
    first, rest, done = d.delta('{"x', False), d.delta('{"x": 1}', False), d.delta('{"x": 1}', True)
    assert first["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x'} and first["tool_calls"][0]["id"]
    assert rest == {"tool_calls": [{"index": 0, "function": {"arguments": '": 1}'}}]} and done == {}
    r = Answer(Required()).stream()
    assert r.delta('[{"name": "f"', False) == {}
    whole = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]'
    first = r.delta(whole[:32], False)["tool_calls"]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in first] == [(0, "f", '{"x')]
    calls = r.delta(whole, True)["tool_calls"]
    got = [(c["index"], c["function"].get("name"), c["function"]["arguments"]) for c in calls]
    assert got == [(0, None, '": 1}'), (1, "g", "{}")]
    # Cut by max_tokens: the calls as far as they were written; before any arguments, the text.
    cut = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {"y'
    assert Answer(Required()).split(cut, True) == ("", "", [("f", '{"x": 1}'), ("g", '{"y')])
    assert Answer(Required()).stream().delta('[{"name": "f"', True) == {"content": '[{"name": "f"'}
    assert Answer(Required()).message('[{"name": "f"') == {"role": "assistant", "content": '[{"name": "f"'}
    assert Answer().message("hi") == {"role": "assistant", "content": "hi"}
    ends = [Answer(Required()).finish_reason(whole, "stop"), Answer(Required()).finish_reason(whole, "length"),
            Answer(Named("f")).finish_reason("{}", "stop"), Answer(Required()).finish_reason('[{"name"', "stop")]
    assert ends == ["tool_calls", "length", "stop", "stop"]


# Answers in each parser's format, and what they read as: (content, [(name, arguments)]).
_HERMES = [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     ("Let me look.\n", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')])),
    ("Paris is sunny; <tools> are not calls", ("Paris is sunny; <tools> are not calls", [])),
    ('<tool_call>{"name": "f", "arguments": {"a": "\u00e9"}}', ("", [("f", '{"a": "\u00e9"}')])),  # cut: read
    ('<tool_call>{"name": "f", "argu', ('<tool_call>{"name": "f", "argu', [])),  # cut mid-call: text
    ('<tool_call>{not json}</tool_call> then text', ('<tool_call>{not json}</tool_call> then text', [])),
    ('<tool_call>{"name": "f", "parameters": "{\\"a\\": 1}"}</tool_call>\nDone.', ("Done.", [("f", '{"a": 1}')])),
    # Arguments as the model wrote them (spacing kept), a string holding the end tag in them.
    ('<tool_call>{"name":"f","arguments":{"s":"a</tool_call>b", "n": [1,2]}}</tool_call>x',
     ("x", [("f", '{"s":"a</tool_call>b", "n": [1,2]}')])),
    # A call whose end tag is left out ends where the next begins.
    ('<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": {"b": 2}}</tool_call>',
     ("", [("f", "{}"), ("g", '{"b": 2}')])),
    # Broken arguments end at the end tag; what follows is read on.
    ('<tool_call>{"name": "f", "arguments": {"a": oops}</tool_call>Sorry.', ("Sorry.", [("f", '{"a": oops}')])),
]
_LLAMA3 = [
    ('{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}', ("", [("f", '{"a": 1}'), ("g", "{}")])),
    ('<|python_tag|>{"name": "f", "parameters": {"a": 1}}', ("", [("f", '{"a": 1}')])),
    ("Hello, the answer is {x}", ("Hello, the answer is {x}", [])),
    ('  {"answer": 42}', ('  {"answer": 42}', [])),  # JSON that is not a call stays content
    ('{"name": "f", "parameters": {"a": 1}} and some words', ("and some words", [("f", '{"a": 1}')])),
    ('{"name": "f", "parameters": {"a"', ("", [("f", '{"a"')])),  # cut in its arguments: as written
    ('{"parameters": {"a": 1}, "name": "f"}', ("", [("f", '{"a": 1}')])),  # named last: given whole
]


_MISTRAL = [
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
     ("", [("f", '{"a": 1}'), ("g", "{}")])),
    ('Sure. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', ("Sure. ", [("f", '{"a": 1}')])),
    ("No call here [TOOL", ("No call here [TOOL", [])),
    ('[TOOL_CALLS] [{"name": "f", "argu', ('[TOOL_CALLS] [{"name": "f", "argu', [])),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {}}, oops]', ("oops]", [("f", "{}")])),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"q": "long'
     ' text"}}, {"name": "g", "arguments": {"b": [true]}}]', ("", [("f", '{"q": "long text"}'), ("g", '{"b": [true]}')])),
]


@pytest.mark.parametrize("name,cases", [("hermes", _HERMES), ("llama3_json", _LLAMA3), ("mistral", _MISTRAL)])
def test_tool_call_parsers_read_whole_answers_and_every_prefix(name, cases):
    """tool_choice 'auto': each parser's reading of whole answers, and of every prefix while it is
    written: only decided content and calls, each a prefix of the whole's (a call named first
    with its arguments so far), so the stream's deltas add up to the whole answer, calls with one
    id each and their arguments in pieces."""
    from horae.serve.answer import Answer
    from horae.serve.tool_parsers import tool_parser
    from horae.serve.tools import Auto

    parser, sent_in_pieces = tool_parser(name), 0
    for text, want in cases:
        assert parser.split(text, True) == want, text
        content, calls = want
        stream, got, pieces = Answer(Auto(parser)).stream(), "", {}
        for n in range(len(text) + 1):
            c, cs = parser.split(text[:n], False)
            assert content.startswith(c) and len(cs) <= len(calls), (text, n, c, cs)
            assert all(a == b[0] and b[1].startswith(x) for (a, x), b in zip(cs, calls)), (text, n, cs)
            d = stream.delta(text[:n], n == len(text))
            got += d.get("content", "")
            for p in d.get("tool_calls", []):
                if p["index"] in pieces:  # more of a call's arguments
                    assert set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}, p
                    name, args = pieces[p["index"]]
                    pieces[p["index"]] = (name, args + p["function"]["arguments"])
                    sent_in_pieces += 1
                    continue
                assert p["id"] and p["type"] == "function", p
                pieces[p["index"]] = (p["function"]["name"], p["function"]["arguments"])
        assert got == content and [pieces[k] for k in range(len(pieces))] == calls, (text, got, pieces)
        m = Answer(Auto(parser)).message(text)
        assert m["content"] == (content or None if calls else content), m
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", [])] == calls
    assert sent_in_pieces > 10, "a call's arguments are sent as they are written"
    # parallel_tool_calls false: the first call only, whole and streamed.
    two = _HERMES[0][0]
    one = Answer(Auto(tool_parser("hermes"), parallel=False))
    assert [c["function"]["name"] for c in one.message(two)["tool_calls"]] == ["get_weather"]
    stream = one.stream()
    sent = [p["index"] for n in range(len(two) + 1) for p in stream.delta(two[:n], n == len(two)).get("tool_calls", [])]
    assert set(sent) == {0}, sent
    with pytest.raises(ValueError, match="unknown tool-call parser 'pythonic'; choose one of hermes, llama3_json, mistral"):
        tool_parser("pythonic")


def test_tool_calls_chosen_by_the_model(server, client, monkeypatch):
    """tool_choice 'auto' (the default with tools) on a server with `--tool-call-parser hermes`:
    the real model, shown the format by example, calls the tool itself, answered as `tool_calls`
    whole and streamed (the arguments as they are written); a question it answers in text stays text, the same as without tools.
    The fixture's server, with the parser `horae serve --enable-auto-tool-choice` would give it."""
    monkeypatch.setattr(server.app.state.server.config, "tool_call_parser", "hermes")
    shown, weather = WEATHER_SHOWN, WEATHER_TOOL
    r = client.chat.completions.create(model="smollm2", messages=shown, max_tokens=40, temperature=0, tools=[weather])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None, r
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="smollm2", messages=shown, max_tokens=40, temperature=0,
                                                tools=[weather], stream=True):
        assert not chunk.choices[0].delta.content, chunk  # the call's text is not content
        pieces += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    # The call's id and name first, then its arguments in pieces as the model writes them.
    assert finish == "tool_calls" and {p.index for p in pieces} == {0} and pieces[0].function.name == "get_weather"
    assert [p.id is not None for p in pieces] == [True] + [False] * (len(pieces) - 1) and len(pieces) > 2, pieces
    assert "".join(p.function.arguments for p in pieces) == m.tool_calls[0].function.arguments
    plain = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=12, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=CAPITAL, max_tokens=12, temperature=0, tools=[weather], stream=True))
    asked = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=12, temperature=0,
                                           tools=[weather], tool_choice="auto")
    assert asked.choices[0].message.tool_calls is None and asked.choices[0].finish_reason == "stop"
    assert asked.choices[0].message.content == text == plain.choices[0].message.content, (asked, text, plain)
    _assert_idle(server)


_R1 = [  # (text, reasoning, content) as deepseek_r1 reads them
    ("<think>Five plus five is ten.</think>The answer is 10.", "Five plus five is ten.", "The answer is 10."),
    ("It is ten.\n</think>\n\nTen.", "It is ten.\n", "\n\nTen."),  # the template opened <think>
    ("Still thinking when cut", "Still thinking when cut", ""),
    ("a </thin and more</think>", "a </thin and more", ""),
]


def test_reasoning_parser_reads_whole_answers_and_every_prefix():
    """--reasoning-parser deepseek_r1: the thinking apart from the answer, whole and at every
    prefix (only what is decided, so a stream's deltas add up to the whole), and then the answer
    read for tool calls: reasoning first, as vLLM reads both."""
    from horae.serve.answer import Answer
    from horae.serve.reasoning import reasoning_parser
    from horae.serve.tool_parsers import tool_parser
    from horae.serve.tools import Auto

    r1 = reasoning_parser("deepseek_r1")
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    cases = [(t, r, c, []) for t, r, c in _R1] + [("<think>Use f.</think>" + call, "Use f.", "", [("f", '{"a": 1}')])]
    for text, thought, content, calls in cases:
        answer = Answer(Auto(tool_parser("hermes")), r1)
        assert answer.split(text, True) == (thought, content, calls), text
        stream, got = answer.stream(), {"reasoning": "", "reasoning_content": "", "content": ""}
        for n in range(len(text) + 1):
            t, c, _ = answer.split(text[:n], False)
            assert thought.startswith(t) and content.startswith(c), (text, n, t, c)
            d = stream.delta(text[:n], n == len(text))
            for k in got:
                got[k] += d.get(k, "")
        assert got == {"reasoning": thought, "reasoning_content": thought, "content": content}, (text, got)
        m = answer.message(text)
        assert (m["reasoning"], m["reasoning_content"], m["content"]) == (thought or None, thought or None, content or None)
    hidden = Answer(None, r1, include_reasoning=False)
    assert hidden.message(_R1[0][0]) == {"role": "assistant", "content": "The answer is 10."}
    assert hidden.stream().delta(_R1[0][0], True) == {"content": "The answer is 10."}
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen3'; choose one of deepseek_r1"):
        reasoning_parser("qwen3")


def test_reasoning_apart_from_the_answer(server, client, monkeypatch):
    """A server with --reasoning-parser deepseek_r1: the real model, shown by example to think in
    <think></think>, has its thinking answered as `reasoning` (and `reasoning_content`) and the
    rest as content, whole and streamed, the two joining to the text it wrote; include_reasoning
    false leaves the thinking out; a grammar (a response format, a forced tool call) holds the
    answer after the thinking, not the thinking (vLLM's rule)."""
    shown = [{"role": "system", "content": "Think inside <think></think> first, then answer."},
             {"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "<think>Two plus two is four.</think>The answer is 4."},
             {"role": "user", "content": "What is 3 + 3?"},
             {"role": "assistant", "content": "<think>Three plus three is six.</think>The answer is 6."},
             {"role": "user", "content": "What is 5 + 5?"}]
    ask = dict(model="smollm2", messages=shown, max_tokens=40, temperature=0)
    text = client.chat.completions.create(**ask).choices[0].message.content
    assert text.startswith("<think>") and "</think>" in text, text
    monkeypatch.setattr(server.app.state.server.config, "reasoning_parser", "deepseek_r1")
    m = client.chat.completions.create(**ask).choices[0].message
    assert m.reasoning == m.reasoning_content and f"<think>{m.reasoning}</think>{m.content}" == text, (m, text)
    assert m.reasoning and m.content
    got = {"reasoning": "", "reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(**ask, stream=True):
        d = chunk.choices[0].delta
        for k in got:
            got[k] += getattr(d, k, None) or ""
    assert got == {"reasoning": m.reasoning, "reasoning_content": m.reasoning, "content": m.content}, got
    hidden = client.chat.completions.create(**ask, extra_body={"include_reasoning": False}).choices[0].message
    assert hidden.content == m.content and "reasoning" not in (hidden.model_extra or {}), hidden
    cut = client.chat.completions.create(**{**ask, "max_tokens": 4}).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None and cut.message.reasoning, cut
    shaped = client.chat.completions.create(**ask, response_format={"type": "json_object"}).choices[0].message
    assert shaped.reasoning == m.reasoning and isinstance(json.loads(shaped.content), dict), shaped
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    named = {"type": "function", "function": {"name": "add"}}
    called = client.chat.completions.create(**ask, tools=[tool], tool_choice=named).choices[0].message
    assert called.reasoning == m.reasoning and called.content is None, called
    assert set(json.loads(called.tool_calls[0].function.arguments)) == {"a", "b"}, called
    monkeypatch.setattr(server.app.state.server.config, "reasoning_parser", None)
    at_once = client.chat.completions.create(**ask, response_format={"type": "json_object"}).choices[0].message
    assert not at_once.content.startswith("<think>"), "without the parser the grammar holds the whole text"
    _assert_idle(server)


def _response_events(client, **ask) -> list:
    """A streamed response's events, checked for what every Responses stream holds: numbered
    from 0 in order, opened by created and in_progress, each item added before it is written and
    done after, ended by completed or incomplete with the response whole."""
    events = list(client.responses.create(**ask, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"], events[:2]
    assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(events[-1].response.output))), (added, done)
    for e in events:
        if hasattr(e, "item_id") and e.item_id is not None:  # written only while added and not done
            assert e.item_id == events[-1].response.output[e.output_index].id, e
    return events


def test_responses_api_is_the_chat_route_answered_as_output_items(server, client):
    """OpenAI's Responses API (`client.responses`), without state: the same answer as the chat
    route for the same conversation (instructions as its system message; function calls and
    their outputs as the assistant's tool_calls and tool messages, the same prompt tokens),
    whole and streamed, with logprobs, a cut, structured output, forced calls, and 400s naming
    the field of the Responses request."""
    ask = dict(model="smollm2", input="What is the capital of France?", max_output_tokens=20, temperature=0)
    r = client.responses.create(**ask)
    chat = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=20, temperature=0)
    assert r.status == "completed" and r.output_text == chat.choices[0].message.content, (r, chat)
    assert [(o.type, o.role, o.status) for o in r.output] == [("message", "assistant", "completed")]
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "smollm2" and r.incomplete_details is None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    events = _response_events(client, **ask)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == "response.completed" and events[-1].response.output_text == r.output_text
    # Instructions are the system message; a cut answer is incomplete, its logprobs those of chat.
    system = [{"role": "system", "content": "Answer in one word."}, *CAPITAL]
    cut = client.responses.create(**{**ask, "max_output_tokens": 3}, instructions="Answer in one word.", top_logprobs=2,
                                  include=["message.output_text.logprobs"])
    chat = client.chat.completions.create(model="smollm2", messages=system, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens", cut
    assert cut.output_text == chat.choices[0].message.content and cut.usage.input_tokens == chat.usage.prompt_tokens
    lps, chat_lps = cut.output[0].content[0].logprobs, chat.choices[0].logprobs.content
    # (The second reads the first's prompt from the prefix cache: the same values to float error.)
    assert [(lp.token, [t.token for t in lp.top_logprobs]) for lp in lps] == [
        (lp.token, [t.token for t in lp.top_logprobs]) for lp in chat_lps] and len(lps) == 3
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(lps, chat_lps)), (lps, chat_lps)
    events = _response_events(client, **{**ask, "max_output_tokens": 3})
    assert events[-1].type == "response.incomplete" and events[-1].response.output[0].status == "incomplete"
    # A forced call, then the call and its output sent back: the prompt chat makes of them.
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    called = client.responses.create(**ask, tools=[tool], tool_choice={"type": "function", "name": "get_weather"})
    (call,) = called.output
    assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed"), called
    assert set(json.loads(call.arguments)) >= {"city"}, call
    events = _response_events(client, **ask, tools=[tool], tool_choice="required")
    (item,) = events[-1].response.output
    assert item.type == "function_call" and "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta") == item.arguments
    turn = [{"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}]
    answered = client.responses.create(model="smollm2", input=turn, tools=[tool], tool_choice="none", temperature=0,
                                       max_output_tokens=20)
    chat = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=20, tools=[WEATHER_TOOL],
                                          tool_choice="none", messages=[
        turn[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}])
    assert answered.usage.input_tokens == chat.usage.prompt_tokens and answered.output_text == chat.choices[0].message.content
    # text.format is chat's response_format.
    shaped = client.responses.create(**{**ask, "max_output_tokens": 60}, text={"format": {
        "type": "json_schema", "name": "place", "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"], "additionalProperties": False}}})
    assert set(json.loads(shaped.output_text)) == {"city"}, shaped.output_text
    h = {"Authorization": f"Bearer {KEY}"}
    for body, param in [({}, "input"), ({"input": []}, "input"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"background": True}, "background"), ({"truncation": "auto"}, "truncation"),
                        ({"include": ["file_search_call.results"]}, "include"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                         "input.0.content"),
                        ({"input": [{"type": "web_search_call"}]}, "input.0"), ({"max_output_tokens": 0}, "max_output_tokens"),
                        ({"top_logprobs": 21}, "top_logprobs"),
                        ({"text": {"format": {"type": "json_schema"}}}, "text.format.name"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
                        ({"temperature": "hot"}, "temperature"), ({"model": "other"}, "model")]:
        sent = {"model": "smollm2", "input": "Hi", **body}
        if body == {}:
            sent.pop("input")
        err = _error(httpx.post(server.url + "/v1/responses", headers=h, json=sent), 404 if param == "model" else 400)
        assert err["param"] == param and (param is None or err["message"].startswith(param) or param == "model"), (body, err)
    # A union's furthest branch names the field at fault (a completion's prompt as token lists).
    err = _error(httpx.post(server.url + "/v1/completions", headers=h, json={"model": "smollm2", "prompt": [[1, "x"]]}), 400)
    assert err["param"] == "prompt.0.1", err
    _assert_idle(server)


def test_responses_api_answers_reasoning_and_tool_calls_as_items(server, client, monkeypatch):
    """With the server's parsers (`--reasoning-parser`, `--tool-call-parser`), a response's
    thinking is a reasoning item (its tokens counted in usage) before the message, and a call
    the model chose is a function_call item, whole and streamed, as the chat route reads them."""
    shown = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "<think>Two plus two is four.</think>The answer is 4."},
             {"role": "user", "content": "What is 5 + 5?"}]
    ask = dict(model="smollm2", input=shown, max_output_tokens=40, temperature=0,
               instructions="Think inside <think></think> first, then answer.")
    monkeypatch.setattr(server.app.state.server.config, "reasoning_parser", "deepseek_r1")
    m = client.chat.completions.create(model="smollm2", messages=[{"role": "system", "content": ask["instructions"]}, *shown],
                                       max_tokens=40, temperature=0).choices[0].message
    r = client.responses.create(**ask)
    assert [o.type for o in r.output] == ["reasoning", "message"], r
    assert (r.output[0].content[0].text, r.output_text) == (m.reasoning, m.content), (r, m)
    thought = server.llm.encode(f"<think>{m.reasoning}</think>")
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert abs(r.usage.output_tokens_details.reasoning_tokens - len(thought)) <= 2, (r.usage, len(thought))
    events = _response_events(client, **ask)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == m.reasoning
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == m.content
    monkeypatch.setattr(server.app.state.server.config, "reasoning_parser", None)
    monkeypatch.setattr(server.app.state.server.config, "tool_call_parser", "hermes")
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    weather = dict(model="smollm2", input=WEATHER_SHOWN, tools=[tool], max_output_tokens=40, temperature=0)
    r = client.responses.create(**weather)
    assert [(o.type, o.name, json.loads(o.arguments)) for o in r.output] == [("function_call", "get_weather", {"city": "Paris"})]
    events = _response_events(client, **weather)
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 2 and "".join(pieces) == events[-1].response.output[0].arguments == r.output[0].arguments
    _assert_idle(server)


def test_beam_search_over_http(server, client):
    """vLLM's `use_beam_search` (n the beam width, `length_penalty`): the choices are the beams
    `LLM.beam_search` finds on the same model, best first, whole or streamed, on completions
    and chat; what beam search would not honour is a 400 naming it."""
    from horae import LLM, BeamSearchParams

    local = LLM(kv_cache_tokens=2048)
    want = local.beam_search(["The capital of France is"], BeamSearchParams(beam_width=3, max_tokens=10,
                                                                            length_penalty=0.5))[0].sequences
    ask = dict(model="smollm2", prompt="The capital of France is", max_tokens=10, n=3,
               extra_body={"use_beam_search": True, "length_penalty": 0.5})
    r = client.completions.create(**ask, logprobs=1)
    n = 5  # the prompt's tokens
    assert [c.text for c in r.choices] == [local.engine.decode(s.tokens[n:-1] if s.finish_reason == "stop" else s.tokens[n:])
                                           for s in want], (r, want)
    assert [c.finish_reason for c in r.choices] == [s.finish_reason for s in want]
    assert r.usage.completion_tokens == sum(len(s.tokens) - n for s in want)
    assert all(len(c.logprobs.tokens) == len(s.tokens) - n for c, s in zip(r.choices, want))
    plain = client.completions.create(**ask)
    assert [c.text for c in plain.choices] == [c.text for c in r.choices] and all(c.logprobs is None for c in plain.choices)
    streamed = ["", "", ""]
    for chunk in client.completions.create(**ask, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in r.choices]
    chat = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=20, n=2,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content, chat
    h = {"Authorization": f"Bearer {KEY}"}
    for body, message in [({"n": 11}, "n is the beam width: at most 10"), ({"stop": ["."]}, "stop is not used by beam search"),
                          ({"echo": True}, "echo is not used"), ({"top_p": 0.5}, "top_p is not used"),
                          ({"temperature": -1.0}, "temperature must be at least 0"),
                          ({"length_penalty": 1e308}, None)]:
        sent = {"model": "smollm2", "prompt": "Hi", "use_beam_search": True, **body}
        if message is None:  # a length penalty far past any use still ranks the beams (found by a fuzzer: a 500)
            assert httpx.post(server.url + "/v1/completions", headers=h, json={**sent, "max_tokens": 3}).status_code == 200
            continue
        err = _error(httpx.post(server.url + "/v1/completions", headers=h, json=sent), 400)
        assert message in err["message"], (body, err)
    err = _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json={
        "model": "smollm2", "messages": CAPITAL, "use_beam_search": True, "logprobs": True, "top_logprobs": 30}), 400)
    assert err["param"] == "top_logprobs" and "top_logprobs must be 0-20" in err["message"], err
    forced = {"type": "function", "function": {"name": "get_weather"}}
    err = _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json={
        "model": "smollm2", "messages": CAPITAL, "use_beam_search": True, "tools": [WEATHER_TOOL], "tool_choice": forced}), 400)
    assert "beam search does not use" in err["message"], err
    _assert_idle(server)


def test_bad_words_over_http(server, client):
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=12, temperature=0,
                                       extra_body={"bad_words": ["Paris"]})
    assert r.choices[0].message.content.startswith("The capital of France is") and "Paris" not in r.choices[0].message.content
    h = {"Authorization": f"Bearer {KEY}"}
    for words in ([""], "Paris", [1]):
        body = {"model": "smollm2", "prompt": "hi", "max_tokens": 2, "bad_words": words}
        err = _error(httpx.post(server.url + "/v1/completions", headers=h, json=body), 400)
        assert err["param"].startswith("bad_words"), err
    _assert_idle(server)


def test_cache_salt_over_http(server, client):
    """vLLM's `cache_salt` on both routes: the prompt's cached blocks are read back only under
    the same salt (usage's cached_tokens); an empty salt is a 400 naming the field."""
    prompt = [1 + (37 * j) % 3000 for j in range(50)]  # 3 full blocks of 16

    def cached(salt=None, **kw):
        extra = {} if salt is None else {"cache_salt": salt}
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, extra_body=extra, **kw)
        return r.usage.prompt_tokens_details.cached_tokens

    assert [cached(), cached("s1"), cached("s1"), cached("s2"), cached()] == [0, 0, 48, 0, 48]
    chat = [client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=1, extra_body={"cache_salt": "c"})
            for _ in range(2)]
    assert chat[0].usage.prompt_tokens_details.cached_tokens == 0 < chat[1].usage.prompt_tokens_details.cached_tokens
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smollm2", "messages": CAPITAL, "max_tokens": 1, "cache_salt": ""}
    assert _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json=body), 400)["param"] == "cache_salt"
    _assert_idle(server)


def test_truncate_prompt_tokens_over_http(server, client):
    """vLLM's truncate_prompt_tokens on both routes: usage counts the tokens kept, and `echo`
    gives their text, not the prompt sent; a bad count is a 400 naming the field."""
    text = "A long preamble that the model need not read. Then: the capital of France is"
    kept = server.llm.encode(text, False)[-5:]
    r = client.completions.create(model="smollm2", prompt=text, max_tokens=2, temperature=0, echo=True,
                                  extra_body={"truncate_prompt_tokens": 5})
    assert r.usage.prompt_tokens == 5 and r.choices[0].text.startswith(server.llm.decode(kept, skip_special_tokens=False))
    assert not r.choices[0].text.startswith("A long"), r
    whole = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=1)
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=1,
                                       extra_body={"truncate_prompt_tokens": 8})
    assert r.usage.prompt_tokens == 8 < whole.usage.prompt_tokens, (r.usage, whole.usage)
    h = {"Authorization": f"Bearer {KEY}"}
    for k in (0, -2, 10**9, "5"):
        body = {"model": "smollm2", "prompt": text, "max_tokens": 2, "truncate_prompt_tokens": k}
        err = _error(httpx.post(server.url + "/v1/completions", headers=h, json=body), 400)
        assert err["param"] == "truncate_prompt_tokens", err
    _assert_idle(server)


def test_chat_template_options_over_http(server, client, monkeypatch):
    """vLLM's chat-template fields on the chat route and /tokenize: `continue_final_message`
    (the model goes on with an assistant reply begun for it), `chat_template_kwargs`, and a
    request's own `chat_template`, refused unless the server trusts them; each error names its
    field."""
    h = {"Authorization": f"Bearer {KEY}"}
    begun = CAPITAL + [{"role": "assistant", "content": "The capital of France is"}]
    r = client.chat.completions.create(model="smollm2", messages=begun, max_tokens=3, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert r.choices[0].message.content.startswith(" Paris"), r
    tok = httpx.post(server.url + "/tokenize", headers=h, json={"messages": begun, "add_generation_prompt": False,
                                                                 "continue_final_message": True}).json()
    assert server.llm.decode(tok["tokens"], skip_special_tokens=False).endswith("assistant\nThe capital of France is")
    mine = "{{ greeting }}{% for m in messages %}{{ m.content }}{% endfor %}"
    body = {"model": "smollm2", "messages": CAPITAL, "chat_template": mine, "chat_template_kwargs": {"greeting": "Hi! "}}
    err = _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json={**body, "max_tokens": 1}), 400)
    assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"], err
    monkeypatch.setattr(server.app.state.server.config, "trust_request_chat_template", True)
    tok = httpx.post(server.url + "/tokenize", headers=h, json=body).json()
    assert server.llm.decode(tok["tokens"]) == "Hi! What is the capital of France?", tok
    bad = {"prompt": "hi", "add_generation_prompt": False}
    err = _error(httpx.post(server.url + "/tokenize", headers=h, json=bad), 400)
    assert "add_generation_prompt: only with messages, not with a prompt" in err["message"], err
    for extra, param in [({"continue_final_message": True}, "continue_final_message"),
                         ({"chat_template_kwargs": {"tools": 1}}, "chat_template_kwargs"),
                         ({"chat_template": "{% for %}"}, "chat_template"),
                         ({"chat_template_kwargs": "x"}, "chat_template_kwargs")]:
        bad = {"model": "smollm2", "messages": CAPITAL, "max_tokens": 1, **extra}
        assert _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json=bad), 400)["param"] == param, extra
    _assert_idle(server)


def test_serve_options_of_the_chat_route(capsys, tmp_path):
    """--enable-auto-tool-choice with --tool-call-parser, --reasoning-parser and --chat-template:
    bad ones fail at start, before the model loads, naming the option."""
    import argparse

    from horae.cli import main
    from horae.serve import add_arguments, server_config

    for args in (["--enable-auto-tool-choice"], ["--tool-call-parser", "hermes"]):
        assert main(["serve", "--port", "0", *args]) == 2
        assert "--enable-auto-tool-choice and --tool-call-parser go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"])
    assert "invalid choice: 'pythonic'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown tool-call parser 'pythonic'"):
        ServerConfig(model_name="m", tool_call_parser="pythonic")
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen3'; choose one of deepseek_r1"):
        ServerConfig(reasoning_parser="qwen3")
    with pytest.raises(SystemExit):
        main(["serve", "--reasoning-parser", "qwen3"])
    assert "invalid choice: 'qwen3'" in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--chat-template", "no/such/template.jinja"]) == 2
    assert "--chat-template: no file 'no/such/template.jinja'" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    add_arguments(p)
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    with pytest.raises(ValueError, match="--chat-template does not compile"):
        server_config(p.parse_args(["--chat-template", "{% for %}"]))
    for given in (str(tmp_path / "t.jinja"), "{{ messages[0].content }}"):
        config = server_config(p.parse_args(["--chat-template", given, "--reasoning-parser", "deepseek_r1"]))
        assert (config.chat_template, config.reasoning_parser) == ("{{ messages[0].content }}", "deepseek_r1")
    assert server_config(p.parse_args(["--return-tokens-as-token-ids"])).return_tokens_as_token_ids
    assert not server_config(p.parse_args([])).return_tokens_as_token_ids
    assert server_config(p.parse_args(["--served-model-name", "mine"])).model_name == "mine"
    assert server_config(p.parse_args([])).model_name == ""  # build_app names it after the model folder
    # An unnamed config serves the model under its folder's name, and is left as it was given.
    unnamed, engine = ServerConfig(), SimpleNamespace(model_dir=Path("/m/SmolLM2-135M-Instruct"), listeners=[],
                                                        abort_listeners=[])
    assert build_app(engine, unnamed).state.config.model_name == "SmolLM2-135M-Instruct" and unnamed.model_name == ""


def test_completions(server, client):
    # More than OpenAI's 4 stop strings, as vLLM takes them (code tasks in eval harnesses send 5+).
    code_stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", " Paris"]
    r = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0,
                                  stop=code_stops)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.choices[0].model_extra["stop_reason"]) == ("", "stop", " Paris")
    r = client.completions.create(model="smollm2", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=6,
                                  temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith(" Paris")
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    # A stop string is not returned, and the reason says which.
    s = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
                                  stop=["."])
    assert s.choices[0].text == " Paris" and s.choices[0].finish_reason == "stop"
    kept = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0,
                                     stop=["."], stream=True, extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in kept) == " Paris."
    raw = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert "<|im_end|>" in raw.choices[0].message.content
    # Token-id prompts and vLLM's extra fields.
    ids = client.completions.create(model="smollm2", prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0,
                                    extra_body={"top_k": 5, "ignore_eos": True, "min_tokens": 3})
    assert ids.usage.prompt_tokens == 5 and ids.usage.completion_tokens == 3
    _assert_idle(server)


def test_completions_echo_scores_a_continuation_as_lm_eval_does(server, client):
    """lm-evaluation-harness's `local-completions` scores a continuation by sending context +
    continuation with `echo`, `logprobs=1`, `max_tokens=1` and reading the prompt's logprobs past
    the context. Those (the prefill's) must agree with the logprobs the same tokens got when
    decoded one by one, and the greedy check must see them as the argmax."""
    ctx = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    gen = client.completions.create(model="smollm2", prompt=ctx, max_tokens=5, temperature=0, logprobs=1)
    decoded = gen.choices[0].logprobs.token_logprobs
    cont = server.llm.encode(gen.choices[0].text)
    assert len(cont) == 5, "the continuation re-tokenizes to the tokens generated"
    e = client.completions.create(model="smollm2", prompt=ctx + cont, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(ctx) + 5 + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    scored = lp.token_logprobs[len(ctx):-1]
    assert max(abs(a - b) for a, b in zip(scored, decoded)) < 2e-3, (scored, decoded)
    assert all(t == max(top.values()) for t, top in zip(scored, lp.top_logprobs[len(ctx):-1])), "greedy"
    assert e.choices[0].text == "".join(lp.tokens) == "The capital of France is" + gen.choices[0].text + lp.tokens[-1]
    assert lp.text_offset == [sum(map(len, lp.tokens[:j])) for j in range(len(lp.tokens))]
    assert e.usage.completion_tokens == 1
    # max_tokens 0: the prompt alone, scored; nothing generated is returned or counted.
    only = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=0, logprobs=2,
                                     echo=True)
    c = only.choices[0]
    assert c.text == "The capital of France is" and len(c.logprobs.tokens) == len(ctx) and c.finish_reason == "length"
    # (The same positions as in the longer prompt above, whose prefill tiles differ: within 1e-3.)
    assert c.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ctx)], abs=1e-3)
    assert only.usage.completion_tokens == 0
    # Streamed, the prompt comes first and the text is the same.
    whole = client.completions.create(model="smollm2", prompt=ctx, max_tokens=4, temperature=0, echo=True)
    parts = list(client.completions.create(model="smollm2", prompt=ctx, max_tokens=4, temperature=0, echo=True,
                                           stream=True))
    assert parts[0].choices[0].text.startswith("The capital of France is")
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    # Each choice's first chunk carries the prompt's logprobs too, for every sample of every
    # prompt (the engine sends them with the first tokens, not with the end).
    firsts = {}
    for p in client.completions.create(model="smollm2", prompt=[ctx, ctx[:3]], n=2, max_tokens=3, temperature=0.7,
                                       seed=1, logprobs=1, echo=True, stream=True):
        firsts.setdefault(p.choices[0].index, p.choices[0])
    assert sorted(firsts) == [0, 1, 2, 3]
    for i, first in firsts.items():
        n = len(ctx) if i < 2 else 3
        assert first.logprobs.token_logprobs[0] is None and len(first.logprobs.tokens) >= n, (i, first.logprobs)
        assert first.logprobs.token_logprobs[1:n] == pytest.approx(lp.token_logprobs[1:n], abs=1e-3)
    streamed0 = list(client.completions.create(model="smollm2", prompt=ctx, max_tokens=0, echo=True, stream=True))
    assert "".join(p.choices[0].text for p in streamed0) == "The capital of France is"
    assert streamed0[-1].choices[0].finish_reason == "length"
    # A token id outside the vocabulary is the engine's 400, echoed or not.
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="smollm2", prompt=[1, 10**6], max_tokens=0, echo=True)
    # Without echo, max_tokens 0 is still refused by name.
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):
        client.completions.create(model="smollm2", prompt=ctx, max_tokens=0)
    _assert_idle(server)


def test_prompt_logprobs_as_vllm_answers_them(server, client):
    """vLLM's `prompt_logprobs` field: on completions each choice's, on chat the response's, per
    prompt token null (the first) or {token id: {logprob, rank, decoded_token}}, the prompt's own
    token among them with its rank in the whole vocabulary; the same values as an echoed prompt's
    legacy logprobs. Not with stream (vLLM's 400)."""
    ctx = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    r = client.completions.create(model="smollm2", prompt=ctx, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ctx) and plp[0] is None, plp
    for t, d in zip(ctx[1:], plp[1:]):
        assert str(t) in d and 2 <= len(d) <= 3 and d[str(t)]["decoded_token"] == server.llm.decode([t]), d
        assert sorted(v["rank"] for k, v in d.items() if k != str(t)) in ([1, 2], [1], [2])
        assert (d[str(t)]["rank"] <= 2) == (len(d) == 2), d  # outside the top 2: a third entry
    echo = client.completions.create(model="smollm2", prompt=ctx, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert [d[str(t)]["logprob"] for t, d in zip(ctx[1:], plp[1:])] == pytest.approx(
        echo.choices[0].logprobs.token_logprobs[1:len(ctx)], abs=1e-6)
    chat = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert len(plp) == chat.usage.prompt_tokens and plp[0] is None and all(len(d) == 1 for d in plp[1:]), plp
    assert max(next(iter(d.values()))["rank"] for d in plp[1:]) > 1  # a prompt token's rank, not a top place
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "smollm2", "messages": CAPITAL, "prompt_logprobs": 1, "stream": True}
    err = _error(httpx.post(server.url + "/v1/chat/completions", headers=h, json=body), 400)
    assert "prompt_logprobs are not available when stream is true" in err["message"], err
    body = {"model": "smollm2", "prompt": "hi", "prompt_logprobs": 99}
    assert _error(httpx.post(server.url + "/v1/completions", headers=h, json=body), 400)["param"] == "prompt_logprobs"
    _assert_idle(server)


def test_return_token_ids_as_vllm_answers_them(server, client, monkeypatch):
    """vLLM's `return_token_ids`: the prompt's ids and each choice's output ids beside the text,
    whole or streamed (the prompt's in the first chunk, each chunk's new ids), the same ids both
    ways, decoding to the text; and `return_tokens_as_token_ids`, logprobs naming tokens by id."""
    ctx = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    extra = {"return_token_ids": True}
    r = client.completions.create(model="smollm2", prompt=ctx, max_tokens=6, temperature=0, extra_body=extra)
    c = r.choices[0].model_extra
    assert c["prompt_token_ids"] == ctx and len(c["token_ids"]) == 6, c
    assert server.llm.decode(c["token_ids"]) == r.choices[0].text
    parts = [p.choices[0].model_extra for p in client.completions.create(
        model="smollm2", prompt=ctx, max_tokens=6, temperature=0, stream=True, extra_body=extra)]
    assert parts[0]["prompt_token_ids"] == ctx and all("prompt_token_ids" not in p for p in parts[1:])
    assert sum((p["token_ids"] for p in parts), []) == c["token_ids"]
    chat = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=8, temperature=0, extra_body=extra)
    ids = chat.model_extra["prompt_token_ids"]
    assert len(ids) == chat.usage.prompt_tokens and server.llm.decode(ids).endswith("What is the capital of France?\nassistant\n")
    out = chat.choices[0].model_extra["token_ids"]
    assert server.llm.decode(out) == chat.choices[0].message.content and len(out) == chat.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=8, temperature=0,
                                                 stream=True, extra_body=extra))
    assert chunks[0].model_extra["prompt_token_ids"] == ids
    assert sum((ch.choices[0].model_extra.get("token_ids", []) for ch in chunks), []) == out
    plain = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=2)
    assert "prompt_token_ids" not in plain.model_extra and "token_ids" not in plain.choices[0].model_extra
    # return_tokens_as_token_ids: logprobs name tokens "token_id:N" (the offsets stay the text's).
    as_ids = {**extra, "return_tokens_as_token_ids": True}
    r = client.completions.create(model="smollm2", prompt=ctx, max_tokens=4, temperature=0, logprobs=2, echo=True,
                                  extra_body=as_ids)
    lp, out = r.choices[0].logprobs, r.choices[0].model_extra["token_ids"]
    assert lp.tokens == [f"token_id:{t}" for t in ctx + out], lp.tokens
    assert all(k.startswith("token_id:") for top in lp.top_logprobs[1:] for k in top) and lp.text_offset[1] == len("The")
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body=as_ids)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [f"token_id:{t}" for t in r.choices[0].model_extra["token_ids"]]
    assert content[0].bytes == list(content[0].token.encode()) and content[0].top_logprobs[0].token.startswith("token_id:")
    # The server's --return-tokens-as-token-ids: by id unless a request says otherwise.
    monkeypatch.setattr(server.app.state.server.config, "return_tokens_as_token_ids", True)
    names = [client.completions.create(model="smollm2", prompt=ctx, max_tokens=2, temperature=0, logprobs=0,
                                       extra_body=body).choices[0].logprobs.tokens
             for body in ({}, {"return_tokens_as_token_ids": False})]
    assert names[0][0].startswith("token_id:") and not names[1][0].startswith("token_id:"), names
    _assert_idle(server)


def test_models_health_tokenize(server, client):
    # vLLM's AsyncLLM.get_tokenizer (a coroutine): the /tokenize route's ids.
    tok = asyncio.run(server.llm.get_tokenizer())
    assert tok.apply_chat_template(CAPITAL, add_generation_prompt=True) == httpx.post(
        server.url + "/tokenize", headers={"Authorization": f"Bearer {KEY}"}, json={"messages": CAPITAL}).json()["tokens"]
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.url + "/version").json() == {"version": __version__}  # nor here
    models = httpx.get(server.url + "/v1/models", headers=h).json()
    assert models["data"][0]["id"] == "smollm2"
    # The openai client's models.retrieve reads GET /v1/models/{id}.
    assert client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    toks = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    back = httpx.post(server.url + "/detokenize", json={"tokens": toks["tokens"]}, headers=h).json()
    assert back["prompt"] == "Hello world" and toks["count"] == len(toks["tokens"])


def _error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_errors_in_openai_shape(server, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    def post(path, body):
        return httpx.post(server.url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body), headers=h)

    chat, cmpl = {"model": "smollm2", "messages": CAPITAL}, {"model": "smollm2", "prompt": "hi"}
    assert _error(post("/v1/chat/completions", "{not json"), 400)["message"]
    assert _error(post("/v1/chat/completions", {**chat, "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert _error(post("/v1/chat/completions", {**chat, "n": 1000}), 400)["param"] == "n"
    assert _error(post("/v1/chat/completions", {**chat, "messages": []}), 400)["param"] == "messages"
    assert _error(post("/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert _error(post("/v1/chat/completions", {**chat, "temperature": "hot"}), 400)["param"] == "temperature"
    # Chat's top_logprobs is the engine's logprobs: the error names the field sent.
    err = _error(post("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 25}), 400)
    assert (err["param"], err["message"]) == ("top_logprobs", "top_logprobs must be at most 20, got 25")
    assert "bogus" in _error(post("/v1/chat/completions", {**chat, "bogus": 1}), 400)["message"]
    # Structured output's errors name their field; plain text, which some clients always name, is taken.
    for fmt in ({"type": "xml"}, "json", {"type": "json_schema"}, {"type": "json_object", "json_schema": {"name": "x"}}):
        err = _error(post("/v1/chat/completions", {**chat, "response_format": fmt}), 400)
        assert err["param"].split(".")[0] == "response_format", (fmt, err)
    for so in ({"regex": "a", "choice": ["b"]}, {}, {"choice": "yes"}, {"json_object": True, "xml": "<a/>"}):
        err = _error(post("/v1/chat/completions", {**chat, "structured_outputs": so}), 400)
        assert err["param"].split(".")[0] == "structured_outputs", (so, err)
    for so in ({"regex": "(a"}, {"grammar": "start: undefined_rule"}, {"json": {"type": 5}}, {"choice": []}):
        err = _error(post("/v1/completions", {"model": "smollm2", "prompt": "hi", "structured_outputs": so}), 400)
        assert err["param"] == "structured_outputs" and err["message"].startswith("structured_outputs"), err
    # A grammar that does not compile is refused naming the body field it came from.
    schema = {"type": "object", "properties": {"a": {"type": "strin"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for path, body, param in [
            ("/v1/chat/completions", {**chat, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, "response_format"),
            ("/v1/completions", {**cmpl, "response_format": {"type": "json_object", "schema": schema}}, "response_format"),
            ("/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": "required"}, "tools"),
            ("/v1/responses", {"model": "smollm2", "input": "hi",
                               "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}, "text.format"),
            ("/v1/responses", {"model": "smollm2", "input": "hi", "tool_choice": "required",
                               "tools": [{"type": "function", "name": "f", "parameters": schema}]}, "tools")]:
        err = _error(post(path, body), 400)
        assert err["param"] == param and err["message"].startswith(f"{param}: cannot compile it"), (body, err)
    both = {**chat, "structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}
    assert _error(post("/v1/chat/completions", both), 400)["param"] == "response_format"
    # A check across fields names the field it blames, as OpenAI's errors do, first in the message.
    for path, body, param in [
            ("/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}, "stream_options"),
            ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
            ("/v1/chat/completions", {**chat, "tool_choice": "required"}, "tool_choice"),
            ("/v1/chat/completions", {**chat, "messages": [{"role": "user"}]}, "messages.0.content"),
            ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
            ("/v1/completions", {**cmpl, "prompt": ""}, "prompt"), ("/v1/completions", {**cmpl, "best_of": 3}, "best_of"),
            ("/v1/completions", {**cmpl, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
            ("/v1/completions", {**cmpl, "use_beam_search": True, "n": 11}, "n"),
            ("/v1/completions", {**cmpl, "use_beam_search": True, "n": 2, "top_k": 3}, "top_k"),
            ("/tokenize", {"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt")]:
        err = _error(post(path, body), 400)
        assert err["param"] == param and err["message"].startswith(param), (body, err)
    text = post("/v1/chat/completions", {**chat, "max_tokens": 2, "response_format": {"type": "text"}})
    assert text.status_code == 200, text.text
    assert _error(post("/v1/completions", {"model": "smollm2", "prompt": ""}), 400)
    assert _error(post("/v1/completions", {"model": "smollm2", "prompt": [10**9]}), 400)
    assert _error(post("/v1/chat/completions", {**chat, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    # A string UTF-8 cannot hold (a lone surrogate, which JSON can escape) anywhere in a body is a
    # 400 naming it (a fuzzer found 500s: a model name on every route, the 404's message could not
    # be written; Responses' metadata, echoed back; and codec errors naming no field), keys too.
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {**cmpl, "stream": True}),
                       ("/v1/responses", {"input": "hi"}), ("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        err = _error(post(path, {**body, "model": "a\ud800"}), 400)
        assert err["param"] == "model" and err["message"].startswith("model is not valid UTF-8 text"), (path, err)
    for path, body, param in (
            ("/v1/responses", {"input": "hi", "metadata": {"k": "\ud800"}}, "metadata.k"),
            ("/v1/responses", {"input": "hi", "stream": True, "metadata": {"\ud800": "v"}}, "metadata.\\ud800"),
            ("/v1/chat/completions", {**chat, "structured_outputs": {"regex": "a\ud800"}}, "structured_outputs.regex"),
            ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
             "messages.0.content.0.text")):
        err = _error(post(path, {"model": "smollm2", **body}), 400)
        assert err["param"] == param and "is not valid UTF-8 text" in err["message"], (path, err)
    # A model name that is text but not served stays OpenAI's 404, quoting the name.
    err = _error(post("/v1/completions", {**cmpl, "model": "a\x00b"}), 404)
    assert err["code"] == "model_not_found" and "a\x00b" in err["message"], err
    # A body that is not an object says so (was pydantic's "Field required" for an empty one).
    for body in ("", "[]", "1", "null"):
        err = _error(post("/v1/chat/completions", body), 400)
        assert err["message"].startswith("the request body must be a JSON object"), (body, err)
    long = {"model": "smollm2", "prompt": "hello " * 9000}
    assert _error(post("/v1/completions", long), 400)["code"] == "context_length_exceeded"
    huge = {"model": "smollm2", "prompt": "hi", "max_tokens": 10**6}
    assert _error(post("/v1/completions", huge), 400)["code"] == "context_length_exceeded"
    # The pool (4,096 tokens here) bounds a request too, and a chat without max_tokens fits it.
    assert httpx.get(server.url + "/v1/models", headers=h).json()["data"][0]["max_model_len"] == 4096
    over_pool = {"model": "smollm2", "prompt": "hi", "max_tokens": 5000}
    assert _error(post("/v1/completions", over_pool), 400)["code"] == "context_length_exceeded"
    assert _error(post("/v1/completions", b"x" * (5 << 20)), 413)
    assert _error(httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert _error(httpx.get(server.url + "/v1/models"), 401)
    assert _error(httpx.get(server.url + "/v1/nothing", headers=h), 404)
    assert _error(post("/detokenize", {"tokens": [-1]}), 400)["param"] == "tokens"
    assert _error(post("/tokenize", {"prompt": "a", "messages": CAPITAL}), 400)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CAPITAL)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=CAPITAL, top_logprobs=3)
    # The server is still up and serving.
    assert client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=3, temperature=0).choices
    _assert_idle(server)


def test_end_of_sequence_is_not_returned(server, client):
    """OpenAI returns neither the end-of-sequence token's logprob nor counts it (nor does horae):
    the logprobs cover exactly the counted tokens, and none of them is <|im_end|>."""
    r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=20, temperature=0,
                                       logprobs=True, top_logprobs=1)
    lp = r.choices[0].logprobs.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "The capital of France is Paris."
    assert len(lp) == r.usage.completion_tokens == 7
    assert "".join(t.token for t in lp) == r.choices[0].message.content
    assert all(t.token != "<|im_end|>" for t in lp)
    ids = httpx.post(server.url + "/tokenize", json={"messages": CAPITAL}, headers={"Authorization": f"Bearer {KEY}"}).json()
    c = client.completions.create(model="smollm2", prompt=ids["tokens"], max_tokens=20, temperature=0, logprobs=1)
    assert c.choices[0].finish_reason == "stop"
    assert len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
    assert "<|im_end|>" not in c.choices[0].logprobs.tokens
    _assert_idle(server)


def test_logprob_bytes_join_to_the_text_where_tokens_split_a_character(server, client):
    """OpenAI's logprob `bytes`: "useful where characters are represented by multiple tokens and
    their byte representations must be combined". SmolLM2 writes an emoji as three tokens, each
    part of the character (named by a replacement character); their bytes join to its UTF-8."""
    msgs = [{"role": "user", "content": "Write three emoji about the sea and the sun."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content, lp = r.choices[0].message.content, r.choices[0].logprobs.content
    assert any(t.token == "\ufffd" for t in lp) and any(ord(ch) > 0xFFFF for ch in content), (content, lp)
    joined = b"".join(bytes(t.bytes) for t in lp)
    assert joined.decode("utf-8", "ignore") == content.rstrip("\ufffd"), (joined, content)
    assert all(isinstance(b, int) and 0 <= b < 256 for t in lp for alt in t.top_logprobs for b in alt.bytes)
    # The same through the Responses API.
    resp = client.responses.create(model="smollm2", input=msgs[0]["content"], max_output_tokens=12, temperature=0,
                                   top_logprobs=2, include=["message.output_text.logprobs"])
    part = resp.output[0].content[0]
    assert b"".join(bytes(t.bytes) for t in part.logprobs).decode("utf-8", "ignore") == part.text.rstrip("\ufffd")
    _assert_idle(server)


def test_malformed_input_gets_a_400_never_a_500(server):
    """Defects found by outside clients: lone surrogates, integers past 64 bits, and loose type
    coercion each get a 400 in OpenAI's shape, and the server goes on serving."""
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    post = lambda path, raw: httpx.post(server.url + path, content=raw, headers=h)
    chat = {"model": "smollm2", "messages": CAPITAL, "max_tokens": 2}
    # A lone surrogate, as JSON escapes it ("\ud800"), in a prompt, a message and /tokenize.
    surrogate = json.dumps("a \ud800 b")
    assert '\\ud800' in surrogate
    for path, raw in [("/v1/completions", '{"model": "smollm2", "max_tokens": 2, "prompt": %s}' % surrogate),
                      ("/v1/chat/completions",
                       '{"model": "smollm2", "max_tokens": 2, "messages": [{"role": "user", "content": %s}]}' % surrogate),
                      ("/v1/completions", '{"model": "smollm2", "max_tokens": 2, "prompt": "hi", "stop": [%s]}' % surrogate),
                      ("/tokenize", '{"prompt": %s}' % surrogate)]:
        assert _error(post(path, raw), 400)["message"], path
    # The same character as raw bytes (ED A0 80): not UTF-8, so not JSON.
    raw = b'{"model": "smollm2", "max_tokens": 2, "prompt": "a \xed\xa0\x80 b"}'
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert _error(post(path, raw), 400)
    # Integers at or beyond 2^63: a 400 that names the field.
    for field in ("top_k", "seed", "max_tokens", "min_tokens"):
        assert _error(post("/v1/chat/completions", json.dumps({**chat, field: 2**63})), 400)["param"] == field, field
    assert _error(post("/v1/completions", json.dumps({"model": "smollm2", "prompt": [2**64]})), 400)
    # No loose coercion, as OpenAI and vLLM.
    for field, value in [("max_tokens", "10"), ("n", "2"), ("stream", "yes"), ("temperature", "0.5")]:
        assert _error(post("/v1/chat/completions", json.dumps({**chat, field: value})), 400)["param"] == field, field
    assert _error(post("/v1/completions", json.dumps({"model": "smollm2", "prompt": [True, False]})), 400)
    # Value rules are the engine's, with the field named.
    assert _error(post("/v1/chat/completions", json.dumps({**chat, "temperature": -1})), 400)["param"] == "temperature"
    assert _error(post("/v1/chat/completions", json.dumps({**chat, "top_k": -5})), 400)["param"] == "top_k"
    assert _error(post("/v1/chat/completions", json.dumps({**chat, "stop_token_ids": [10**9]})), 400)["param"] == "stop_token_ids"
    # Issue 15's fields: an SLO of zero or below, an unknown SLO key, a priority that is no integer.
    for body, param in [({"slo": {"ttft": 0}}, "slo"), ({"slo": {"e2e": -3}}, "slo"), ({"slo": {"deadline": 1}}, "slo"),
                        ({"slo": {"ttft": "1"}}, "slo"), ({"slo": [1]}, "slo"), ({"priority": 1.5}, "priority"),
                        ({"priority": "high"}, "priority"), ({"priority": 2**63}, "priority")]:
        err = _error(post("/v1/chat/completions", json.dumps({**chat, **body})), 400)
        assert err["param"].split(".")[0] == param and err["message"], (body, err)
    assert "unknown slo key" in _error(post("/v1/chat/completions", json.dumps({**chat, "slo": {"x": 1}})), 400)["message"]
    ok = {**chat, "slo": {"ttft": 30, "max_itl": 5.5}, "priority": -2}
    assert httpx.post(server.url + "/v1/chat/completions", json=ok, headers=h).status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json=chat, headers=h).status_code == 200
    _assert_idle(server)


def test_concurrent_clients_share_the_engine(server, client):
    def one(i):
        if i % 2:
            r = client.completions.create(model="smollm2", prompt=f"Number {i} is", max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.usage.completion_tokens
        chunks = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"Say {i}"}],
                                                max_tokens=16, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return list(chunks)[-1].usage.completion_tokens

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(12))) == [16] * 12
    _assert_idle(server)


def test_disconnect_mid_stream_aborts_the_request(server):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()  # kept alive: closing it would hang up already
            assert sum(bool(next(lines).strip()) for _ in range(6)) == 3
            assert server.llm.num_in_flight == 1 and server.llm.engine.stats()["kv_used_blocks"] > 0
    # The client hung up long before 2000 tokens: the request is aborted and its blocks freed.
    _assert_idle(server, timeout=10)
    # ... and counted, under its own finish reason.
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert re.search(r'^horae:request_success_total\{[^}]*finished_reason="abort"[^}]*\} [1-9]', text, re.M), text


def test_hang_up_before_a_non_streamed_answer_aborts_it(server):
    # A beam search answers once, when it ends (here after 1,000 steps, far more than a minute):
    # a client that leaves first must stop it, not wait for no one. The handler is cancelled on
    # the hang-up (not at the next output), and the step's requests still running are aborted.
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 1000, "n": 2, "use_beam_search": True,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5)
    _assert_idle(server, timeout=5)
    # Idle for good, not between two of the search's steps.
    generated = _metric(server, "horae:generation_tokens_total")
    time.sleep(0.5)
    # (Not asserted: an abort counted. Where the hang-up lands between two steps, after one's
    # one-token requests finished, nothing is left to abort.)
    assert _metric(server, "horae:generation_tokens_total") == generated and server.llm.num_in_flight == 0


def test_a_burst_never_queues_past_max_queue():
    """`--max-queue` bounds the requests waiting in the engine, also in a burst of concurrent
    requests: each counts as waiting from its first read on the server's loop, before it has
    reached the `AsyncLLM`'s own loop (counted only there, 98 waited against a bound of 64)."""
    llm = AsyncLLM(kv_cache_tokens=8192, max_num_seqs=4)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2", max_queue=16)))
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], llm.engine.stats()["waiting"])
            time.sleep(0.001)

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as http:
            async def one(i):
                r = await http.post(srv.url + "/v1/completions", json={"model": "smollm2", "prompt": f"n {i}", "max_tokens": 4})
                return r.status_code
            return await asyncio.gather(*[one(i) for i in range(200)])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        codes = asyncio.run(burst())
    finally:
        done.set()
        watcher.join()
        srv.stop()
        llm.shutdown()
    assert set(codes) == {200, 503}, codes
    assert peak[0] <= 16, f"{peak[0]} requests waited in the engine, against max_queue 16"


def test_overload_answers_503_and_loses_nothing(server):
    server.app.state.config.max_queue = 2
    try:
        def one(i):
            return httpx.post(server.url + "/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "smollm2", "prompt": f"Count {i}:", "max_tokens": 24, "ignore_eos": True})

        with ThreadPoolExecutor(16) as pool:
            resps = list(pool.map(one, range(16)))
    finally:
        server.app.state.config.max_queue = 64
    codes = [r.status_code for r in resps]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r in resps:
        if r.status_code == 503:
            assert r.headers["retry-after"] and _error(r, 503)["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 24  # every accepted request finished in full
    _assert_idle(server)


def test_async_llm_cancel_frees_blocks_within_a_step(server, client):
    llm = server.llm
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=1)  # the engine runs on the server's loop

    async def main():
        gen = llm.generate("Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()  # what cancelling the consumer does
        steps = llm.stats.get("step_seconds") or 0.1
        await asyncio.sleep(3 * steps + 0.05)

    asyncio.run_coroutine_threadsafe(main(), llm._loop).result(timeout=60)
    assert llm.engine.stats()["kv_used_blocks"] == 0 and llm.num_in_flight == 0


def test_serve_refuses_a_port_out_of_range(capsys):
    # uvicorn took 99999 and listened on 99999 - 65536 without a word.
    from horae.serve import main

    for bad in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as exit_:
            main(["--port", bad])
        assert exit_.value.code == 2
        assert "argument --port" in capsys.readouterr().err
    # vLLM's --no-enable-prefix-caching reaches the engine (each replica's too: the same arguments).
    import argparse

    from horae.serve import add_arguments, engine_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert engine_args(p.parse_args([]))["enable_prefix_caching"] is True
    assert engine_args(p.parse_args(["--no-enable-prefix-caching"]))["enable_prefix_caching"] is False


def test_cors_lets_a_browser_page_call_the_server(server, capsys):
    """vLLM's CORS flags: a browser's preflight (no key) is answered for any origin by default,
    and every answer to a page, a 401 or a stream included, carries the header it needs; a
    narrower list answers its own origins only."""
    page = {"Origin": "http://localhost:3000"}
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        **page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*", pre.headers
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    denied = httpx.get(server.url + "/v1/models", headers=page)
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"
    body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={**page, "Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["access-control-allow-origin"] == "*" and "[DONE]" in r.read().decode()

    llm = server.llm  # a second app on the same engine, with one origin allowed
    narrow = ServerThread(build_app(llm, ServerConfig(model_name="smollm2", allowed_origins=["http://a.test"],
                                                      allowed_methods=["GET", "POST"])))
    try:
        ask = {"Access-Control-Request-Method": "POST"}
        ok = httpx.options(narrow.url + "/v1/completions", headers={"Origin": "http://a.test", **ask})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://a.test"
        other = httpx.options(narrow.url + "/v1/completions", headers={"Origin": "http://b.test", **ask})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        assert "access-control-allow-origin" not in httpx.get(narrow.url + "/health", headers={"Origin": "http://b.test"}).headers
    finally:
        narrow.stop()
    with pytest.raises(ValueError, match="allowed_origins must be a list of strings"):
        ServerConfig(allowed_origins="*")
    from horae.serve import main

    for flag, bad in (("--allowed-origins", "*"), ("--allowed-headers", '{"a": 1}')):
        with pytest.raises(SystemExit):
            main([flag, bad])
        assert f"argument {flag}" in capsys.readouterr().err
    _assert_idle(server)


def test_the_app_mounted_in_a_users_app_keeps_its_open_routes():
    """`build_app` inside a user's own FastAPI app (`outer.mount("/llm", ...)`): /health stays open
    to a probe (it needed the key), the rest needs it, and requests are served."""
    from fastapi import FastAPI

    llm = AsyncLLM(kv_cache_tokens=1024, max_num_seqs=4)  # an engine serves one event loop: its own
    outer = FastAPI()
    outer.mount("/llm", build_app(llm, ServerConfig(model_name="smollm2", api_key=KEY)))
    srv = ServerThread(outer)
    try:
        assert httpx.get(srv.url + "/llm/health").status_code == 200
        assert _error(httpx.get(srv.url + "/llm/v1/models"), 401)["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/llm/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
        llm.shutdown()


def test_serve_fails_at_once_on_a_port_in_use_or_a_host_that_does_not_resolve(capsys):
    # The socket is bound before the model loads, as vLLM's server does: no load, then an error.
    import socket

    from horae.cli import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
        assert "Address already in use" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["serve", "--host", "256.1.1.1"]) == 2
    assert "cannot serve on --host '256.1.1.1'" in capsys.readouterr().err


def test_schemathesis_finds_no_server_error():
    # Bounded: a server of its own with short contexts, few examples, a time limit.
    llm = AsyncLLM(kv_cache_tokens=1024, max_num_seqs=8, max_model_len=48)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2", api_key=KEY, max_queue=64)))
    srv.llm = llm
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", srv.url + "/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "12", "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60", "--seed", "1",
             "--no-color"],
            capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        _assert_idle(srv)
    finally:
        srv.stop()
        llm.shutdown()


def test_bench_serve_reaches_true_lengths_without_telling_the_server(server, tmp_path):
    from horae.bench import serve as bench

    trace = tmp_path / "t.jsonl"
    rows = [(0, 12, 5), (50, 30, 9), (100, 7, 1), (150, 20, 14)]
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": p, "output_length": o}) + "\n" for t, p, o in rows))
    ns = SimpleNamespace(base_url=server.url, model=None, api_key=KEY, trace=str(trace), dataset=None, num_prompts=None,
                         request_rate=float("inf"), burstiness=1.0, trace_scale=1.0, max_concurrency=None, length_scale=1.0,
                         max_tokens=None, max_model_len=None, vocab_size=49152, goodput=["ttft:60000", "itl:60000"],
                         timeout=120.0, seed=0, result_file=str(tmp_path / "r.json"), plot=str(tmp_path / "cdf.png"),
                         no_progress=True, retry_failed=False)
    summary = bench.run(ns)
    assert summary["completed"] == 4 and summary["failed"] == 0, summary["errors"]
    reqs = json.loads((tmp_path / "r.json").read_text())["requests"]
    assert [(r["prompt_len"], r["output_len"]) for r in reqs] == [(p, o) for _, p, o in rows]
    assert summary["goodput_rps"] == pytest.approx(summary["request_throughput"])  # loose bounds: all good
    assert (tmp_path / "cdf.png").stat().st_size > 1000
    _assert_idle(server)  # the client hung up at each true length: nothing left running
    # Closed loop over a length set; impossible bounds give zero goodput.
    ns2 = SimpleNamespace(**{**vars(ns), "trace": None, "dataset": "dist-3", "num_prompts": 3, "max_concurrency": 2,
                             "trace_scale": None, "length_scale": 0.005, "goodput": ["ttft:0.001"], "result_file": None,
                             "plot": None})
    s2 = bench.run(ns2)
    assert s2["completed"] == 3 and s2["goodput_rps"] == 0


def test_bench_serve_bad_input():
    from horae.bench import serve as bench

    for bad in (["ttft"], ["speed:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            bench.parse_goodput(bad)
    assert bench.main(["--goodput", "nope:1", "--base-url", "http://127.0.0.1:9"]) == 2
    assert bench.main(["--request-rate", "0"]) == 2
    # Nothing listening: a clear error, not a traceback.
    assert bench.main(["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--retry-failed", "--no-progress"]) == 2


def test_async_llm_bad_input_is_refused_before_queueing(server, client):
    client.completions.create(model="smollm2", prompt="Hi", max_tokens=1)  # the engine runs on the server's loop
    llm = server.llm

    async def main():
        for prompt, params, exc in [("", None, ValueError), (42, None, TypeError),
                                    ({"prompt_token_ids": [10**9]}, None, ValueError),
                                    ("hi", SamplingParams(max_tokens=5000), ValueError),
                                    ("hi", SamplingParams(slo={"ttft": -1}), ValueError),
                                    ("hi", SamplingParams(slo={"latency": 1}), ValueError),
                                    ("hi", SamplingParams(slo=5), ValueError),
                                    ("hi", SamplingParams(priority="high"), ValueError),
                                    ("hi", SamplingParams(priority=None), ValueError)]:
            with pytest.raises(exc):
                async for _ in llm.generate(prompt, params):
                    pass
        # and the engine still serves
        outs = [o async for o in llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True))]
        return outs[-1]

    last = asyncio.run_coroutine_threadsafe(main(), llm._loop).result(timeout=60)
    assert last.finished and len(last.outputs[0].token_ids) == 3
    _assert_idle(server)


def test_async_llm_output_kinds(server, client):
    """vLLM's `RequestOutputKind` on `AsyncLLM.generate`: DELTA outputs hold only what is new
    (they join to the cumulative run's text, tokens and logprobs; prompt logprobs once), and
    FINAL_ONLY gives the finished output alone."""
    from horae.sampling_params import RequestOutputKind

    client.completions.create(model="smollm2", prompt="Hi", max_tokens=1)  # the engine runs on the server's loop
    llm = server.llm
    base = dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=1, n=2)

    async def run(kind):
        return [o async for o in llm.generate("The capital of France is", SamplingParams(**base, output_kind=kind))]

    def go(kind):
        return asyncio.run_coroutine_threadsafe(run(kind), llm._loop).result(timeout=60)

    whole, delta, final = go(RequestOutputKind.CUMULATIVE), go(RequestOutputKind.DELTA), go(RequestOutputKind.FINAL_ONLY)
    assert len(final) == 1 and final[0].finished and len(delta) > 2
    for i in range(2):
        parts = [c for o in delta for c in o.outputs if c.index == i]
        ref = whole[-1].outputs[i]
        assert "".join(c.text for c in parts) == ref.text == final[0].outputs[i].text
        assert sum((c.token_ids for c in parts), []) == ref.token_ids and len(ref.token_ids) == 12
        joined = [lp for c in parts for lp in c.logprobs]
        # The same tokens, ranks and text; values to float error (a run whose prompt the prefix
        # cache holds from an earlier one computes it in other batches: 2e-6 apart, seen in CI).
        assert [{t: (v.rank, v.decoded_token) for t, v in d.items()} for d in joined] == [
            {t: (v.rank, v.decoded_token) for t, v in d.items()} for d in ref.logprobs]
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for a, b in zip(joined, ref.logprobs) for t in a)
    assert delta[0].prompt_logprobs == whole[-1].prompt_logprobs and all(o.prompt_logprobs is None for o in delta[1:])
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=7)
    _assert_idle(server)


@pytest.mark.parametrize("events_before_failure", [0, 2])
def test_a_request_the_model_fails_on_gets_an_error_and_the_server_goes_on(server, client, events_before_failure):
    # The core reports a request whose step failed (a GPU fault, say) as an output with finish
    # reason "error" and the message (rust/core/tests/scheduler.rs checks the engine side). The
    # server is otherwise idle: make the request's output after `events_before_failure` steps
    # such an output, as the core would.
    llm = server.llm
    target = {"skip": events_before_failure}
    original = llm._on_step

    def on_step(outputs, stats, died=False):
        if outputs and target.get("armed"):
            if target["skip"] == 0:
                failed = SimpleNamespace(request_id=outputs[0].request_id, new_token_ids=[], new_text="",
                                         new_logprobs=[], prompt_logprobs=[], finish_reason="error", stop_reason=None,
                                         error="cuda: an illegal memory access was encountered",
                                         num_draft_tokens=None, num_accepted_tokens=None, num_cached_tokens=None)
                outputs = [failed] + list(outputs[1:])
                target["armed"] = False
            else:
                target["skip"] -= 1
        original(outputs, stats, died)

    llm._on_step = on_step
    try:
        target["armed"] = True
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=16, temperature=0)
        assert err.value.status_code == 500 and "illegal memory access" in str(err.value)
        assert err.value.code == "engine_error"
    finally:
        del llm._on_step
    # The server keeps serving, and nothing leaked.
    ok = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=8, temperature=0)
    assert ok.choices[0].message.content
    _assert_idle(server)


@pytest.mark.parametrize("death", ["a step panicked", "reading outputs failed"])
def test_an_engine_that_died_fails_health_and_every_request_with_503(death):
    """The core ends its step loop when a step panics (a bug) and says the engine died
    (rust/core/tests/scheduler.rs); a bug in reading a step's outputs leaves no output to trust
    either. From then on, as vLLM's server: the requests in flight fail, new ones get 503
    `engine_dead` at once instead of waiting for a loop that is gone, and /health answers 503 so
    that an orchestrator (or Ray Serve's health check) restarts it."""
    llm = AsyncLLM(kv_cache_tokens=1024, max_num_seqs=4)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")))
    armed = {"on": False}
    if death == "a step panicked":
        original, why = llm._on_step, "index out of bounds"

        def on_step(events, stats, died=False):  # the core's report of a panicked step, as it sends it
            if armed["on"] and events:
                armed["on"] = False
                return original(None, "the engine died (a step panicked: index out of bounds); restart it", True)
            return original(events, stats, died)

        llm._on_step = on_step
    else:
        process, why = llm.engine.process_outputs, "KeyError"

        def process_outputs(events):  # an output processor's bug, once
            if armed["on"]:
                armed["on"] = False
                raise KeyError(12345)
            return process(events)

        llm.engine.process_outputs = process_outputs
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": True}
    try:
        assert httpx.get(srv.url + "/health").status_code == 200 and not llm.errored
        armed["on"] = True
        err = _error(httpx.post(srv.url + "/v1/completions", json=body, timeout=60), 503)
        assert err["code"] == "engine_dead" and why in err["message"], err
        assert llm.errored and _error(httpx.get(srv.url + "/health"), 503)["code"] == "engine_dead"
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json={"model": "smollm2", "messages": CAPITAL, "stream": True}) as r:
            assert r.status_code == 503 and json.loads(r.read())["error"]["code"] == "engine_dead"
        with pytest.raises(EngineDeadError, match="restart it"):
            asyncio.run(llm.check_health())
        deadline = time.time() + 10
        while llm.num_in_flight and time.time() < deadline:
            time.sleep(0.05)
        assert llm.num_in_flight == 0 and llm.num_streams == 0, "the request in flight was dropped"
    finally:
        srv.stop()
        llm.shutdown()


def test_a_listener_that_fails_does_not_stop_the_requests(server, client, caplog):
    def broken(outs, stats, times):
        raise ZeroDivisionError("a metrics bug")

    server.llm.listeners.append(broken)
    try:
        r = client.completions.create(model="smollm2", prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    finally:
        server.llm.listeners.remove(broken)
    assert r.usage.completion_tokens == 4 and not server.llm.errored
    assert "an AsyncLLM listener failed" in caplog.text
    _assert_idle(server)


def test_readme_async_llm_runs_in_a_notebook_and_in_a_script(tmp_path):
    """The README's AsyncLLM snippets: the notebook form runs as Jupyter runs a cell (top-level
    `await` inside an already running event loop, where `asyncio.run` fails), the script form as
    a script."""
    import ast
    import re as regex
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = regex.findall(r"```python\n(.*?)```", readme, regex.S)
    script = next(b for b in blocks if "asyncio.run(main())" in b)
    cell = next(b for b in blocks if "async for" in b and "asyncio.run" not in b and "def " not in b)
    cell = cell.replace("AsyncLLM()", "AsyncLLM(kv_cache_tokens=1024)")
    code = compile("from horae import AsyncLLM, SamplingParams\n" + cell, "<cell>", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict = {}

    async def jupyter():  # a running loop, as in a notebook kernel
        pending = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            asyncio.run(pending)  # what the old snippet did: refused inside a running loop
        pending.close()
        await eval(code, namespace)
        namespace["llm"].shutdown()

    asyncio.run(jupyter())
    path = tmp_path / "snippet.py"
    path.write_text(script.replace("AsyncLLM()", "AsyncLLM(kv_cache_tokens=1024)"))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    # The server on a thread, as the README runs it in a notebook: served, then stopped.
    snippet = next(b for b in blocks if "ServerThread(" in b).replace("AsyncLLM()", "AsyncLLM(kv_cache_tokens=1024)")
    served = snippet.replace("server.stop()", "import openai\n"
                             "answer = openai.OpenAI(base_url=server.url + '/v1', api_key='-').completions.create(\n"
                             "    model='SmolLM2-135M-Instruct', prompt='Hi', max_tokens=2)\n"
                             "print(answer.usage.completion_tokens)\nserver.stop()")
    path.write_text(served)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "2" and "http://127.0.0.1:" in out.stdout, out.stderr


def test_one_async_llm_serves_a_notebook_and_a_server_thread():
    """A notebook's cells and a server on a thread share one AsyncLLM: its outputs are processed
    on its own loop and handed to each caller's, so a cell that calls the server synchronously
    (blocking the notebook's loop) is answered, and a stream closed early aborts its request.
    Before, whichever loop came second got errors (the server a 500)."""
    llm = AsyncLLM(kv_cache_tokens=2048, max_num_seqs=4)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")))
    srv.llm = llm
    ask = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    try:
        async def cells():  # a notebook's loop
            first = [o async for o in llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))]
            r = httpx.post(srv.url + "/v1/completions", json=ask, timeout=20)  # a synchronous call: this loop waits
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == first[-1].outputs[0].text
            r = httpx.post(srv.url + "/v1/completions", json=ask | {"max_tokens": -1}, timeout=20)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
            stream = llm.generate("Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True))
            out = await stream.__anext__()
            assert llm.num_in_flight == 1 and llm._loop is not asyncio.get_running_loop()
            await stream.aclose()
            with pytest.raises(ValueError, match="max_tokens"):
                await llm.generate("Hi", SamplingParams(max_tokens=0)).__anext__()
            return out

        assert asyncio.run(cells()).outputs[0].token_ids
        assert asyncio.run(cells()).outputs[0].token_ids  # a second loop, the first one closed
        # A loop closed without closing a stream it began: the request is aborted, not run on.
        loop = asyncio.new_event_loop()
        stream = llm.generate("Once upon a time", SamplingParams(max_tokens=2000, ignore_eos=True))
        loop.run_until_complete(stream.__anext__())
        loop.close()
        deadline = time.time() + 2  # the 2,000 tokens take 7 s or more here
        while llm.num_in_flight and time.time() < deadline:
            time.sleep(0.01)
        assert llm.num_in_flight == 0
        _assert_idle(srv)
    finally:
        srv.stop()
        home = llm._thread
        llm.shutdown()
    assert home.name == "horae-outputs" and not home.is_alive() and llm._thread is None


@pytest.mark.parametrize("served", [False, True])
def test_an_async_llm_nobody_holds_is_freed(served):
    """An `AsyncLLM` that has served, alone or behind a server since stopped, and that nobody
    holds any more (a notebook cell run again) is collected: its threads stop and its model is
    freed. The engine's thread holds its callback for as long as it runs, and the callback held
    the `AsyncLLM`; FastAPI keeps every endpoint it has called in a process-wide cache, and the
    endpoints held the server's state: either way each one lived on, model and all, until the
    process ended."""
    import gc
    import weakref

    def serve_once():
        llm = AsyncLLM(kv_cache_tokens=1024)
        if served:
            srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")))
            r = httpx.post(srv.url + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 3}, timeout=60)
            assert r.status_code == 200, r.text
            srv.stop()
        else:
            async def main():
                return [o async for o in llm.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True))]

            assert asyncio.run(main())[-1].finished
        return weakref.ref(llm), llm._thread

    for _ in range(2):
        llm, home = serve_once()
        deadline = time.time() + 5  # (the home thread may still be finishing the last step's outputs)
        while llm() is not None and time.time() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert llm() is None, "an AsyncLLM nobody holds is still alive"
        home.join(timeout=10)
        assert not home.is_alive()


def test_a_stopped_server_thread_has_stopped():
    """`ServerThread.stop()` ends the server as `horae serve` ends on a signal: a request still
    streaming after the grace is cut and aborted, and the thread has ended when `stop` returns.
    Before, `stop` gave up after 10 s with the server still serving (and its port taken) until
    the stream's end, 50 s later here. uvicorn says in one line that it cut the request, without
    the cancellation's traceback it also logged (which read as a crash in a notebook)."""
    llm = AsyncLLM(kv_cache_tokens=4096)
    for bad in ("5", -1, float("nan")):
        with pytest.raises(ValueError, match="timeout_graceful_shutdown must be a number of seconds"):
            ServerThread(build_app(llm, ServerConfig(model_name="smollm2")), timeout_graceful_shutdown=bad)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")), timeout_graceful_shutdown=0.5)
    records = []  # uvicorn's log (after the server's start, whose logging set-up drops handlers)
    catch = logging.Handler()
    catch.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(catch)
    body = {"model": "smollm2", "prompt": "Once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    ended = []

    def client():
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    pass
            ended.append("whole")
        except httpx.HTTPError:
            ended.append("cut")

    reader = threading.Thread(target=client)
    reader.start()
    deadline = time.time() + 30
    while not llm.num_in_flight and time.time() < deadline:
        time.sleep(0.01)
    try:
        t0 = time.time()
        srv.stop()
        assert not srv.thread.is_alive() and time.time() - t0 < 5
        reader.join(timeout=10)
        assert ended == ["cut"]
        deadline = time.time() + 5
        while llm.num_in_flight and time.time() < deadline:
            time.sleep(0.01)
        assert llm.num_in_flight == 0 and llm.engine.stats()["kv_used_blocks"] == 0
        said = [r.getMessage() for r in records]
        assert any("timeout graceful shutdown exceeded" in m for m in said), said
        assert not any(r.exc_info for r in records) and not any("Exception in ASGI" in m for m in said), said
    finally:
        logging.getLogger("uvicorn.error").removeHandler(catch)
        llm.shutdown()


@contextlib.contextmanager
def _one_at_a_time(**engine):
    """The default model served with a 2,048-token pool and one sequence at a time (so a second
    request waits behind the first), stopped afterwards."""
    llm = AsyncLLM(kv_cache_tokens=2048, max_num_seqs=1, **engine)
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")))
    srv.llm = llm
    try:
        yield srv
    finally:
        srv.stop()
        llm.shutdown()


# The long request's length: over a second even at 200 tok/s (the default model's Q4_1 blocks
# decode at about 140 tok/s on an AVX-512 machine; 60 tokens once took 2 s and now take 0.4 s,
# less than the deadline below needs).
LONG_TOKENS = 300


def _behind_a_long_request(srv, body):
    """Send a long completion (LONG_TOKENS), then, while it runs, POST `body`: the first's usage,
    the second's response, and how long the second took."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    long = dict(model="smollm2", prompt="Once upon a time", max_tokens=LONG_TOKENS, temperature=0,
                extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.completions.create, **long)
        time.sleep(0.2)  # the first is running; one sequence at a time, so the next waits
        t0 = time.monotonic()
        second = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        waited = time.monotonic() - t0
        return first.result().usage, second, waited


def test_the_slo_queue_serves_short_requests_after_a_one_token_start():
    """The SLO queue's step model, fitted to steps of one token only (a one-token prompt and its
    decode steps), once predicted a full prefill step at 2,048 times a decode step and shed every
    later short request at once; an idle server with a 10 s first-token bound serves them all."""
    llm = AsyncLLM(kv_cache_tokens=1024, queue="slo", slo={"ttft": 10.0})

    async def main():
        ends = []
        for i in range(4):
            try:
                outs = [o async for o in llm.generate("Hi", SamplingParams(max_tokens=2), f"hi-{i}")]
                ends.append(outs[-1].outputs[0].finish_reason)
            except RequestDroppedError as e:
                ends.append(e.reason)
        return ends

    try:
        assert len(llm.engine.prompt_token_ids("Hi")[1]) == 1, "the case needs a one-token prompt"
        assert asyncio.run(main()) == ["length"] * 4
    finally:
        llm.shutdown()


def test_the_slo_queue_charges_a_short_prompt_its_own_step_not_a_full_one():
    """On this CPU a full 2,048-token step takes seconds, so a queue that charged every prompt a
    full step shed every short request against a 0.5 s first-token bound (served 2 of 24 here),
    which an idle server meets in tens of milliseconds. Prompts of 1-100 tokens, one at a time:
    every one is served."""
    llm = AsyncLLM(kv_cache_tokens=8192, queue="slo", slo={"ttft": 0.5})
    prompts = ["Hi", "What is the capital of France?", "Write a haiku about the sea, please.", "Tell me a joke."]

    async def main():
        ends = []
        for i in range(12):
            try:
                p = prompts[i % 4] * (1 + (i % 3) * 5)
                outs = [o async for o in llm.generate(p, SamplingParams(max_tokens=2, ignore_eos=True), f"s-{i}")]
                ends.append(outs[-1].outputs[0].finish_reason)
            except RequestDroppedError as e:
                ends.append(e.reason)
        return ends

    try:
        assert asyncio.run(main()) == ["length"] * 12
    finally:
        llm.shutdown()


def test_a_request_that_waited_elsewhere_keeps_its_first_arrival():
    """`arrival_time` (vLLM's; what the Ray ingress sends with a resend): the queue deadline and
    the request's times count from its first arrival, not from when it reached this engine."""
    llm = AsyncLLM(kv_cache_tokens=1024, queue_timeout=5.0)
    ttft = {}  # what /metrics observes, by request
    llm.listeners.append(lambda outs, stats, touched: ttft.update(
        {rid: t.ttft for rid, t in touched.items() if t.ttft is not None}))

    async def main():
        p = SamplingParams(max_tokens=2)
        with pytest.raises(RequestDroppedError) as dropped:
            async for _ in llm.generate("Hi", p, "late", arrival_time=time.time() - 10):
                pass
        assert dropped.value.reason == "timeout"
        outs = [o async for o in llm.generate("Hi", p, "fresh", arrival_time=time.time() - 1)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2
        assert ttft["fresh"] >= 1.0, "its first token counts from its first arrival"
        with pytest.raises(ValueError, match="arrival_time must be a finite number of seconds"):
            async for _ in llm.generate("Hi", p, "bad", arrival_time=float("nan")):
                pass

    try:
        asyncio.run(main())
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()


def test_queue_deadline_answers_503_and_the_engine_goes_on():
    """With the server's queue deadline, a request still waiting when it passes gets a 503 with
    Retry-After and code queue_timeout (it cost no compute), /metrics counts it, and the server
    goes on serving."""
    with _one_at_a_time(queue_timeout=0.3) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        usage, resp, _ = _behind_a_long_request(srv, {"model": "smollm2", "prompt": "Hi", "max_tokens": 4})
        assert usage.completion_tokens == LONG_TOKENS
        err = _error(resp, 503)
        assert err["code"] == "queue_timeout" and resp.headers["Retry-After"] == "1"
        text = httpx.get(srv.url + "/metrics").text
        assert re.search(r'^horae:request_success_total\{[^}]*finished_reason="timeout"[^}]*\} 1\.0', text, re.M), text
        assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=3).usage.completion_tokens <= 3
        _assert_idle(srv)
    with pytest.raises(ValueError, match="queue_timeout"):
        AsyncLLM(kv_cache_tokens=1024, queue_timeout=0)



def test_slo_queue_sheds_a_request_that_cannot_meet_its_slo_with_a_503():
    """`queue="slo"`: a request whose first-token bound cannot be met behind a running one (one
    sequence at a time) is answered at once with 503 + Retry-After, code queue_timeout, having
    cost nothing; one with a bound it can meet is served; the engine goes on."""
    with _one_at_a_time(queue="slo", slo={"max_itl": 30.0}) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        usage, hopeless, waited = _behind_a_long_request(
            srv, {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "slo": {"ttft": 0.05}})
        assert usage.completion_tokens == LONG_TOKENS
        err = _error(hopeless, 503)
        assert err["code"] == "queue_timeout" and hopeless.headers["Retry-After"] == "1"
        assert "SLO" in err["message"]
        assert waited < 5, f"shed as soon as it could not make it, not after the long request ({waited:.1f} s)"
        served = client.completions.create(model="smollm2", prompt="Hi", max_tokens=3,
                                           extra_body={"slo": {"ttft": 60}, "priority": 1})
        assert served.usage.completion_tokens <= 3
        _assert_idle(srv)
    with pytest.raises(ValueError, match="expected one of fcfs, slo"):
        AsyncLLM(kv_cache_tokens=1024, queue="edf")
    with pytest.raises(ValueError, match="slo.ttft"):
        AsyncLLM(kv_cache_tokens=1024, slo={"ttft": 0})


def test_bench_serve_retries_what_the_queue_deadline_turned_away(tmp_path):
    """`horae bench serve --retry-failed` against a server with a queue deadline and room for one
    request at a time: requests turned away with 503 queue_timeout are sent again until served,
    and the summary counts the attempts; a time-out wastes no tokens."""
    from horae.bench import serve as bench

    with _one_at_a_time(queue_timeout=0.2) as srv:
        trace = tmp_path / "t.jsonl"
        trace.write_text("".join(json.dumps({"timestamp": 0, "input_length": 8, "output_length": 24}) + "\n"
                                 for _ in range(4)))
        ns = SimpleNamespace(base_url=srv.url, model=None, api_key=None, trace=str(trace), dataset=None, num_prompts=None,
                             request_rate=float("inf"), burstiness=1.0, trace_scale=None, max_concurrency=None,
                             length_scale=1.0, max_tokens=None, max_model_len=None, vocab_size=49152, goodput=None,
                             timeout=120.0, seed=0, result_file=None, plot=None, no_progress=True, retry_failed=True)
        s = bench.run(ns)
        assert s["completed"] == 4 and s["failed"] == 0, s["errors"]
        assert s["timeouts"] > 0 and s["attempts_per_request"] > 1 and s["wasted_tokens"] == 0, s
        # Without retries the same load loses requests to the deadline.
        s = bench.run(SimpleNamespace(**{**vars(ns), "retry_failed": False}))
        assert s["failed"] > 0 and s["timeouts"] == s["failed"], s
        _assert_idle(srv)


def test_async_abort_ends_the_stream_and_passes_over_ids_no_longer_in_flight():
    """`AsyncLLM.abort` (vLLM's): a running stream ends with CancelledError and its blocks come
    back; an id that already finished, or was never sent, is passed over (a client may cancel a
    request just as it finishes), and a list aborts each of its ids."""
    llm = AsyncLLM(kv_cache_tokens=2048)
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def drain(rid):
        return [o async for o in llm.generate("Once upon a time", long, rid)]

    async def main():
        done = [o async for o in llm.generate("Hi", SamplingParams(max_tokens=2), "done")]
        assert done[-1].finished
        llm.abort("done")  # finished: nothing to do, no error
        llm.abort("never-sent")
        a, b = asyncio.ensure_future(drain("a")), asyncio.ensure_future(drain("b"))
        while llm.engine.stats()["kv_used_blocks"] == 0:
            await asyncio.sleep(0.01)
        llm.abort(["a", "b", "done"])
        for task in (a, b):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert not llm.engine.has_unfinished_requests() and not llm.times

    try:
        asyncio.run(main())
        assert llm.engine.stats()["kv_used_blocks"] == 0, "the aborted requests' blocks came back"
    finally:
        llm.shutdown()
