#!/usr/bin/env bash
# The whole test suite: hygiene (format, lints, layer order), the Rust core (no Python needed),
# then the Python package, installed from this checkout with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
python3 scripts/check_layers.py
cargo test --release -p horae-core
python3 -m pip install --quiet ".[test]"
python3 -m ruff check .
# Every CUDA kernel through NVRTC and ptxas for sm_80 and sm_90, with registers and spills in the
# log (no GPU needed; tests/test_cuda_build.py asserts on the same build).
python3 -m horae.cuda
python3 -m pytest -q tests
