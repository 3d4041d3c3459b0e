"""Regenerate the golden files in tests/golden/ with HF transformers, the reference nobody here
wrote. CI never runs this (it needs torch); the tests only read what it wrote.

    python scripts/make_goldens.py --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Needs torch, transformers, gguf, safetensors. The default model is loaded by transformers from the
GGUF file itself (its own dequantizer and tokenizer conversion), so the goldens also check horae's
GGUF converter. The tiny models are random-weight models this script writes next to their goldens.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden"

CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for learning to code.",
]
RAW = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The theory of relativity states that",
    "import numpy as np\n",
]
MAX_NEW = 32


def logit_sample(logits: np.ndarray, rng: np.random.Generator, k_top: int = 64, k_rand: int = 256):
    """A compact slice of a logit row: its top entries plus random ones (ids and values)."""
    top = np.argsort(-logits)[:k_top]
    rand = rng.choice(len(logits), size=k_rand, replace=False)
    ids = np.unique(np.concatenate([top, rand]))
    return ids.tolist(), logits[ids].astype(float).tolist()


@torch.no_grad()
def greedy(model, ids, eos):
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                         pad_token_id=eos, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@torch.no_grad()
def smollm2(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    eos = 2  # <|im_end|>
    cases = []
    for text in CHAT:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        cases.append({"kind": "chat", "text": text, "ids": list(ids), "greedy": greedy(model, list(ids), eos)})
    for text in RAW:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"kind": "raw", "text": text, "ids": ids, "greedy": greedy(model, ids, eos)})
    rng = np.random.default_rng(0)
    forced = []
    for case in cases[:2] + cases[6:8]:
        seq = case["ids"] + case["greedy"][:8]
        logits = model(torch.tensor([seq])).logits[0].numpy()
        rows = []
        for p in [len(case["ids"]) - 1, len(seq) - 1]:
            ids, vals = logit_sample(logits[p], rng)
            rows.append({"position": p, "ids": ids, "values": vals})
        forced.append({"ids": seq, "rows": rows})
    return {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized f32)", "source": gguf.name,
            "transformers": __import__("transformers").__version__, "max_new_tokens": MAX_NEW,
            "eos": eos, "cases": cases, "teacher_forced": forced}


@torch.no_grad()
def tiny(name, config, dtype):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    # Compute in f32 on exactly the stored (possibly bf16-rounded) weights, in a fresh f32 model so
    # that buffers such as rope's inv_freq are not rounded too (horae widens weights to f32).
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    rng = np.random.default_rng(1)
    cases = []
    for n in [1, 5, 17, 40]:
        ids = rng.integers(3, config.vocab_size, n).tolist()
        cases.append({"ids": ids, "greedy": greedy(model, ids, config.eos_token_id)})
    seq = cases[2]["ids"] + cases[2]["greedy"][:4]
    logits = model(torch.tensor([seq])).logits[0].numpy()
    gold = {"name": name, "dtype": str(dtype).replace("torch.", ""), "cases": cases,
            "teacher_forced": {"ids": seq, "logits": logits.astype(float).round(7).tolist()}}
    (folder / "golden.json").write_text(json.dumps(gold))


def tiny_models():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    llama3 = LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    tiny("tiny-llama3", llama3, torch.float32)
    tiny("tiny-llama-bf16", LlamaConfig(**common, tie_word_embeddings=False), torch.bfloat16)
    tiny("tiny-qwen2", Qwen2Config(**common, tie_word_embeddings=False), torch.float32)
    tiny("tiny-mistral", MistralConfig(**common, tie_word_embeddings=False, sliding_window=None), torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, required=True)
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tiny_models()
    (OUT / "smollm2.json").write_text(json.dumps(smollm2(a.gguf), indent=0))
    print(f"wrote goldens under {OUT}")


if __name__ == "__main__":
    main()
