"""Speculative decoding on the default model: greedy output token-identical to HF's golden with
prompt lookup and with a draft model, fixed and adaptive k; sampling reproducible; stop tokens
inside a batch of accepted drafts; every bad configuration a clear error; the metrics the server
exports; and the simulator's spec decoding (the distribution test is in
rust/core/tests/speculative.rs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOLDEN, returned_tokens

from horae import LLM, HoraeCoreError, SamplingParams, StructuredOutputsParams
from horae import sim as hs

GREEDY = SamplingParams(temperature=0, max_tokens=GOLDEN["max_new_tokens"])
PROMPTS = [{"prompt_token_ids": c["ids"]} for c in GOLDEN["cases"]]
# A repetitive prompt: prompt lookup finds its drafts here.
DAYS = "List the days of the week, each followed by a sentence saying what you do that day, using the same sentence pattern."


@pytest.fixture(scope="module")
def ngram():
    return LLM(kv_cache_tokens=8192, speculative={"method": "ngram", "k_max": 4, "adaptive": False})


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "k_max": 4, "adaptive": False},
    {"method": "ngram", "k_max": 6},  # adaptive (SmartSpec) is the default
    {"method": "draft", "num_layers": 28, "k_max": 3, "adaptive": False},  # 28 of 30 layers: 73% accepted
])
def test_greedy_output_equals_the_golden_with_speculation(spec, ngram):
    llm = ngram if spec == {"method": "ngram", "k_max": 4, "adaptive": False} else LLM(kv_cache_tokens=8192, speculative=spec)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for case, out in zip(GOLDEN["cases"], outs):
        assert out.outputs[0].token_ids == returned_tokens(case["greedy"]), (spec, case["text"])
    # The drafts were really proposed and verified, and some accepted (with fixed k: adaptive k
    # follows measured step times, and a loaded machine may keep it at 0).
    rep = llm.chat([{"role": "user", "content": DAYS}], SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)[0]
    c = rep.outputs[0]
    assert c.num_draft_tokens is not None and c.num_accepted_tokens <= c.num_draft_tokens
    if spec.get("adaptive") is False:
        assert c.num_draft_tokens > 0 and c.num_accepted_tokens > 0, spec
    plain = LLM(kv_cache_tokens=8192).chat([{"role": "user", "content": DAYS}], SamplingParams(temperature=0, max_tokens=96),
                                            use_tqdm=False)[0]
    assert c.token_ids == plain.outputs[0].token_ids
    stats = llm.engine._core.step_stats()
    assert stats["spec_accepted_tokens"] >= c.num_accepted_tokens and 0 <= stats["spec_alpha"] <= 0.99


def test_sampling_with_speculation_is_seeded(ngram):
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=48, repetition_penalty=1.1, logprobs=2)
    a = ngram.chat([{"role": "user", "content": DAYS}], p, use_tqdm=False)[0].outputs[0]
    b = ngram.chat([{"role": "user", "content": DAYS}], p, use_tqdm=False)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.num_draft_tokens > 0
    # One logprob entry per emitted token, accepted drafts included.
    assert len(a.logprobs) == len(a.token_ids) and all(t in lp for t, lp in zip(a.token_ids, a.logprobs))


def test_a_stop_token_among_accepted_drafts_ends_the_output_there(ngram):
    plain = ngram.chat([{"role": "user", "content": DAYS}], SamplingParams(temperature=0, max_tokens=96), use_tqdm=False)[0]
    ids = plain.outputs[0].token_ids
    stop = ids[40]  # a token that appears mid-output (the first occurrence ends it)
    first = ids.index(stop)
    out = ngram.chat([{"role": "user", "content": DAYS}],
                     SamplingParams(temperature=0, max_tokens=96, stop_token_ids=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    # As vLLM: the stop token is the last token id, and its text is not in the output.
    assert out.text == ngram.engine.decode(ids[:first])
    assert ngram.engine.stats()["kv_used_blocks"] == 0  # blocks back


def test_a_logit_bias_holds_for_verified_drafts(ngram):
    """Drafts are verified against the biased logits: greedy with a bias is the same with prompt
    lookup as without it, and the bias changed the output."""
    days = [{"role": "user", "content": DAYS}]
    unbiased = ngram.chat(days, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0].token_ids
    common = max(set(unbiased), key=unbiased.count)  # the token the drafts would propose most
    p = SamplingParams(temperature=0, max_tokens=64, logit_bias={common: -100})
    out = ngram.chat(days, p, use_tqdm=False)[0].outputs[0]
    plain = LLM(kv_cache_tokens=8192).chat(days, p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain.token_ids and common not in out.token_ids
    assert out.token_ids != unbiased and out.num_draft_tokens > 0


def test_bad_words_hold_for_verified_drafts(ngram):
    """A bad word's last token is banned in every verified row after the drafts before it: with
    prompt lookup proposing the word's tokens, greedy output is the same as without drafts."""
    days = [{"role": "user", "content": DAYS}]
    p = SamplingParams(temperature=0, max_tokens=64, bad_words=["Monday", "Tuesday morning"])
    out = ngram.chat(days, p, use_tqdm=False)[0].outputs[0]
    plain = LLM(kv_cache_tokens=8192).chat(days, p, use_tqdm=False)[0].outputs[0]
    free = ngram.chat(days, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert "Monday" in free.text and "Monday" not in out.text and "Tuesday morning" not in out.text, out.text
    assert out.token_ids == plain.token_ids and out.num_draft_tokens > 0


def test_structured_output_verifies_drafts_under_its_grammar(ngram):
    """Drafts are cut where they leave the request's language and verified under the grammar's
    mask at each position: greedy under a grammar is the same with prompt lookup as without it,
    drafts were accepted, and the text is in the language; sampled, seeded, likewise."""
    days = [{"role": "user", "content": DAYS}]
    rx = "[A-Za-z ,.]+"
    for p in (SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(regex=rx)),
              SamplingParams(temperature=0.7, seed=5, max_tokens=64, structured_outputs=StructuredOutputsParams(regex=rx))):
        o = ngram.chat(days, p, use_tqdm=False)[0].outputs[0]
        assert re.fullmatch(rx, o.text), o.text
        assert o.num_draft_tokens > 0 and o.num_accepted_tokens > 0, (o.num_draft_tokens, o.num_accepted_tokens)
        if p.temperature == 0:
            alone = LLM(kv_cache_tokens=8192).chat(days, p, use_tqdm=False)[0].outputs[0]
            assert o.token_ids == alone.token_ids
        else:
            assert ngram.chat(days, p, use_tqdm=False)[0].outputs[0].token_ids == o.token_ids
    # A grammar that starts after a tag: drafts run free up to the token that completes it, and
    # are verified under the language after it; the same tokens as without drafts.
    p = SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(regex=rx,
                                                                                                start_after="Tuesday"))
    o = ngram.chat(days, p, use_tqdm=False)[0].outputs[0]
    head, tag, rest = o.text.partition("Tuesday")
    assert tag and ":" in head and re.fullmatch(rx, rest), o.text
    assert o.token_ids == LLM(kv_cache_tokens=8192).chat(days, p, use_tqdm=False)[0].outputs[0].token_ids
    assert o.num_accepted_tokens > 0


@pytest.mark.parametrize("spec, message", [
    ({"method": "ngram", "k_max": 0}, "k_max must be between 1 and 16"),
    ({"method": "ngram", "k_max": 17}, "k_max must be between 1 and 16"),
    ({"method": "medusa"}, "unknown method 'medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 3}, "unknown key 'num_speculative_tokens'"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "ngram", "k_max": "four"}, "'k_max'"),
    ({"method": "draft", "num_layers": 0}, "num_layers must be at least 1"),
    ({"method": "draft", "num_layers": 99}, "cannot keep 99"),
    ({"method": "draft", "model": str(Path(__file__).parent / "golden" / "tiny-llama3")},
     "vocabulary (256 tokens) differs from the target's (49152)"),
])
def test_bad_speculative_configs_are_clear_errors(spec, message):
    with pytest.raises(HoraeCoreError) as e:
        LLM(kv_cache_tokens=1024, speculative=spec)
    assert message in str(e.value)


def test_speculative_must_be_a_dict_and_serve_rejects_bad_json():
    with pytest.raises(TypeError, match="speculative must be a dict"):
        LLM(kv_cache_tokens=1024, speculative="ngram")
    r = subprocess.run([sys.executable, "-m", "horae.cli", "serve", "--speculative", "{k_max: 3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not valid JSON" in r.stderr


def test_metrics_export_acceptance_and_k():
    from horae import CompletionOutput, RequestOutput
    from horae.async_llm import RequestTimes
    from horae.serve.metrics import ServerMetrics

    m = ServerMetrics("m")
    stats = {"running": 1, "waiting": 0, "kv_total_blocks": 10, "kv_used_blocks": 2, "block_size": 16,
             "predicted_peak_tokens": None, "preemptions": 0, "prefix_hit_blocks": 0, "prefix_queried_blocks": 0,
             "step_seconds": 0.01, "spec_num_drafts": 4, "spec_draft_tokens": 12, "spec_accepted_tokens": 6,
             "spec_alpha": 0.55, "spec_k": 3}
    out = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "x", [5, 6, 7], "length", num_draft_tokens=12,
                                                               num_accepted_tokens=6)], finished=True)
    times = RequestTimes(arrival=0.0)
    m.observe_step([out], stats, {"r": times})
    text = m.render().decode()
    for line in ['horae:spec_decode_num_draft_tokens_total{model_name="m"} 12.0',
                 'horae:spec_decode_num_accepted_tokens_total{model_name="m"} 6.0',
                 'horae:spec_decode_num_drafts_total{model_name="m"} 4.0',
                 'horae:spec_decode_acceptance_rate{model_name="m"} 0.55',
                 'horae:spec_decode_mean_accepted_length{model_name="m"} 2.5',
                 'horae:spec_decode_k{model_name="m"} 3.0',
                 'horae:request_spec_acceptance_rate_sum{model_name="m"} 0.5']:
        assert line in text, line


def test_simulated_speculation_across_load():
    trace = hs.bundled_trace()
    sla = {"ttft": 5.0, "tpot": 0.05}

    def run(rate, spec):
        return hs.simulate(trace, "past-future", rate_scale=rate, sla=sla, model="llama-3-8b", kv_cache_tokens=200_000,
                           speculative=spec)

    low = {name: run(1.0, spec) for name, spec in [("off", None), ("adaptive", {"k_max": 5, "acceptance": 0.7})]}
    # At this load no speculation misses the TPOT bound for some requests; adaptive k does not.
    assert low["adaptive"].summary["goodput_rps"] > low["off"].summary["goodput_rps"]
    assert low["adaptive"].summary["tpot"]["p50"] < 0.6 * low["off"].summary["tpot"]["p50"]
    s = low["adaptive"].summary["spec"]
    assert 0 < s["accepted_tokens"] < s["draft_tokens"] and s["num_drafts"] > 0
    assert max(low["adaptive"].steps["spec_k"]) <= 5
    with pytest.raises(HoraeCoreError, match="acceptance needs a mean in"):
        run(1.0, {"k_max": 3, "acceptance": 1.5})
    with pytest.raises(HoraeCoreError, match="unknown key 'model'"):
        run(1.0, {"k_max": 3, "model": "x"})


def test_server_with_speculation_reports_it_in_metrics():
    import httpx

    from horae.async_llm import AsyncLLM
    from horae.serve import ServerConfig, ServerThread, build_app

    llm = AsyncLLM(kv_cache_tokens=4096, speculative={"method": "ngram", "k_max": 4, "adaptive": False})
    srv = ServerThread(build_app(llm, ServerConfig(model_name="smollm2")))
    try:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": DAYS}], "temperature": 0, "max_tokens": 64}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200
        plain = LLM(kv_cache_tokens=4096).chat([{"role": "user", "content": DAYS}],
                                                 SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
        assert r.json()["choices"][0]["message"]["content"] == plain.outputs[0].text
        text = httpx.get(srv.url + "/metrics").text
        accepted = [ln for ln in text.splitlines() if ln.startswith("horae:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0, text
        assert "horae:request_spec_acceptance_rate_count" in text and "horae:spec_decode_k{" in text
    finally:
        srv.stop()
        llm.shutdown()
