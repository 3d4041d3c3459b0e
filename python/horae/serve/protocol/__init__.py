"""Request bodies of the OpenAI-compatible API (pydantic): the JSON's shape only, one module per
endpoint family as `serve/` has one per route (`common.py`: what every generating route shares).
Types are strict (no "10" for 10, "yes" for true, or true for a token id) and integers fit 64 bits,
as OpenAI and vLLM refuse the rest; every value rule is the engine's
(horae_core::request::RequestParams). Unknown fields are rejected, as OpenAI does; vLLM's extra
sampling fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
allowed_token_ids, include_stop_str_in_output, skip_special_tokens, priority, bad_words,
truncate_prompt_tokens, return_token_ids, return_tokens_as_token_ids, cache_salt, prompt_logprobs,
structured_outputs) are accepted, as vLLM's clients send them through `extra_body`, and so is
horae's `slo`. A Responses API request (`responses.ResponsesRequest`) is checked here and answered
as the chat request it spells (`chat_fields`)."""
