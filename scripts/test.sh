#!/usr/bin/env bash
# The whole test suite: the Rust core (no Python needed), then the Python package, installed
# from this checkout with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -p horae-core
python3 -m pip install --quiet ".[test]"
python3 -m pytest -q tests
