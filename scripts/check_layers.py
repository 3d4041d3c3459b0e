#!/usr/bin/env python3
"""Check that the code's layers run one way (docs/architecture.md): no module of horae-core or of
the Python package imports from a layer above its own. Run by scripts/test.sh; exits 1 and names
every import that runs upwards."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first; modules on one line share a layer and may import each other only where noted in
# docs/architecture.md (none of them do).
RUST_LAYERS = [
    ["error"],
    ["names"],
    ["stepcost", "sample", "kv", "tokenizer"],
    ["grammar"],
    ["request", "route"],
    ["plan"],
    ["sched", "backend"],
    ["model"],
    ["spec"],
    ["runner"],
    ["engine"],
    ["sim"],
    ["bench"],
]
PY_LAYERS = [
    ["_core", "checks"],
    ["models", "cuda", "priors", "sampling_params", "outputs", "chat_template", "tokenizer"],
    ["beam_search"],
    ["engine"],
    ["llm", "async_llm"],
    ["serve", "sim", "gpu_check"],
    ["cluster"],
    ["bench"],
    ["cli"],
    ["__main__"],
]


def layer_of(layers, name):
    for i, names in enumerate(layers):
        if name in names:
            return i
    return None


def check(layers, files, top_of, imports_of) -> list:
    bad = []
    for f in files:
        own = top_of(f)
        mine = layer_of(layers, own)
        if mine is None:
            bad.append(f"{f}: module '{own}' is in no layer (add it to scripts/check_layers.py and the docs)")
            continue
        for line_no, dep in imports_of(f):
            theirs = layer_of(layers, dep)
            if dep == own or theirs is None:
                continue
            if theirs > mine or (theirs == mine and dep != own):
                bad.append(f"{f}:{line_no}: '{own}' (layer {mine + 1}) imports '{dep}' (layer {theirs + 1})")
    return bad


def rust_imports(f: Path):
    text = f.read_text()
    for m in re.finditer(r"crate::(\w+)", text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1)


def py_imports(f: Path):
    text = f.read_text()
    for m in re.finditer(r"^\s*(?:from|import)\s+horae\.(\w+)|^\s*from horae import ([\w, ]+)", text, re.M):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1):
            yield line, m.group(1)
        else:
            for name in m.group(2).split(","):
                yield line, name.strip()


def main() -> int:
    src = ROOT / "rust/core/src"
    rust = sorted(p for p in src.rglob("*.rs") if p.name != "lib.rs")
    rust_top = lambda f: f.relative_to(src).parts[0].removesuffix(".rs")
    pkg = ROOT / "python/horae"
    py = sorted(p for p in pkg.rglob("*.py") if p != pkg / "__init__.py")
    py_top = lambda f: f.relative_to(pkg).parts[0].removesuffix(".py")
    bad = check(RUST_LAYERS, rust, rust_top, rust_imports) + check(PY_LAYERS, py, py_top, py_imports)
    for b in bad:
        print(b)
    print(f"layers: {len(rust)} Rust and {len(py)} Python files, {len(bad)} upward imports")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
