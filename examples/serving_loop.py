"""A serving loop in a few lines on horae's low-level Engine: requests arrive while others are
running, text streams out as it is generated, and one request is cancelled midway.

    python examples/serving_loop.py
"""

from horae import Engine, SamplingParams

engine = Engine()  # SmolLM2-135M-Instruct, fetched and converted on first use
arrivals = {  # step number -> (request id, user message)
    0: ("capital", "What is the capital of France?"),
    2: ("haiku", "Write a haiku about the sea."),
    5: ("story", "Tell me a long story about a dragon."),
}
params = SamplingParams(temperature=0.2, top_p=0.9, seed=0, max_tokens=64)
shown = {}
step = 0
while arrivals or engine.has_unfinished_requests():
    if step in arrivals:
        rid, msg = arrivals.pop(step)
        engine.add_request(rid, engine.apply_chat_template([{"role": "user", "content": msg}]), params)
    if step == 20:
        engine.abort("story")  # its KV blocks are freed at once
        print("\n[story] cancelled")
    for out in engine.step():
        o = out.outputs[0]
        new = o.text[len(shown.get(out.request_id, "")):]
        shown[out.request_id] = o.text
        if new:
            print(f"[{out.request_id}] {new!r}")
        if out.finished:
            print(f"[{out.request_id}] finished ({o.finish_reason}): {o.text!r}")
    step += 1
