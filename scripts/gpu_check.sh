#!/usr/bin/env bash
# The GPU machine's check (docs/cuda.md): build, every CUDA kernel against its CPU reference,
# end-to-end greedy on the GPU against the CPU, then the decode-attention and 8B-shaped model
# benchmarks. Meant to finish within 10 minutes on an H200. Everything it prints is also kept in
# $OUT (default ./gpu_check_out): device.txt, cuda_tests.txt, gpu_check.txt, gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export HORAE_CACHE="${HORAE_CACHE:-$PWD/.horae-cache}"
[ -d .venv-gpu ] || python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
# The wheel (release build) with NVRTC and cuBLAS from pip; an offline machine keeps what it has.
python3 -m pip install --quiet ".[cuda]" || python3 -m pip install --quiet --no-build-isolation --no-deps . || exit 1
# The Rust tests load libnvrtc / libcublas by soname: put the pip wheels' folders on the path.
LIBS=$(python3 -c "import horae.cuda as c; print(':'.join(c.library_dirs()))")
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0
python3 -m horae.cuda --device 2>&1 | tee "$OUT/device.txt"
cargo test --release -p horae-core --test cuda -- --ignored --test-threads=1 --nocapture 2>&1 | tee "$OUT/cuda_tests.txt" || status=1
python3 -m horae.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.txt" || status=1
exit $status
