"""The CUDA backend without a GPU: every kernel compiles with NVRTC and assembles with ptxas for
Ampere (sm_80) and Hopper (sm_90) with no register spills, device selection falls back to the CPU
with a reason, and asking for a GPU that is not there is a clear error. The kernels' numerics are
checked on a GPU (rust/core/tests/cuda.rs, run by scripts/gpu_check.sh)."""

import pytest

from horae import Engine, HoraeCoreError, _core, cuda

# Every kernel the backend launches (rust/core/src/backend/cuda/ops.rs), so a kernel that stops
# being built fails here rather than at run time on a GPU.
LAUNCHED = {
    "add_rms_norm_bf16", "rope_neox_bf16", "silu_and_mul_bf16", "embedding_bf16", "reshape_and_cache",
    "add_bias_bf16", "fill_uniform_bf16", "argmax_f32", "sample_f32",
    *(f"paged_decode_{d}_hd{h}_bs{b}" for d in ("bf16", "f16") for h in (64, 128) for b in (16, 32)),
    *(f"paged_decode_reduce_{d}_hd{h}" for d in ("bf16", "f16") for h in (64, 128)),
    *(f"prefill_attention_{d}_hd{h}" for d in ("bf16", "f16") for h in (64, 128)),
}


@pytest.fixture(scope="module")
def reports():
    return cuda.check_kernels((80, 90))


def test_every_kernel_compiles_and_assembles_for_sm80_and_sm90(reports):
    print("\n" + cuda.format_reports(reports))
    for arch in (80, 90):
        names = {r.name for r in reports if r.arch == arch}
        assert LAUNCHED <= names, f"sm_{arch}: not built: {sorted(LAUNCHED - names)}"
        assert all(r.registers > 0 for r in reports if r.arch == arch)


def test_no_kernel_spills_registers(reports):
    spilled = [f"{r.name} sm_{r.arch}: {r.spill_stores}B stores, {r.spill_loads}B loads" for r in reports if r.spills]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_decode_attention_leaves_room_for_several_blocks_per_sm(reports):
    # 128 threads a block: at most 128 registers keeps 4+ blocks (16 warps) resident per SM, and
    # static shared memory must stay under the 48 KiB that needs no opt-in.
    for r in reports:
        if r.name.startswith(("paged_decode_", "prefill_attention_")):
            assert r.registers <= 128, f"{r.name} sm_{r.arch}: {r.registers} registers"
            assert r.shared_bytes <= 48 * 1024, f"{r.name} sm_{r.arch}: {r.shared_bytes} B shared"


def test_ptxas_report_parser():
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 132 bytes smem
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers
"""
    r = cuda.parse_ptxas(text, "f")
    assert [(x.name, x.registers, x.spills, x.shared_bytes) for x in r] == [("k1", 40, 8, 132), ("k2", 12, 0, 0)]


def test_kernel_sources_carry_the_common_header_and_errors_name_the_file():
    src = _core.cuda_kernel_source("paged_decode")
    assert "struct Bf16" in src and '#line' in src
    assert not any(line.strip() == '#include "common.cuh"' for line in src.splitlines())
    with pytest.raises(HoraeCoreError, match="no kernel file 'nope'"):
        _core.cuda_compile_ptx("nope", 90)


def _has_gpu() -> bool:
    return cuda.resolve_device("auto")[0].startswith("cuda")


def test_auto_device_falls_back_to_the_cpu_with_a_reason():
    dev, why = cuda.resolve_device("auto")
    if dev == "cpu":
        assert why and "cuda" in why.lower()
    else:
        assert why is None
    assert cuda.resolve_device("cpu") == ("cpu", None)
    with pytest.raises(HoraeCoreError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        cuda.resolve_device("tpu")


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_requesting_a_missing_gpu_is_a_clear_error():
    with pytest.raises(HoraeCoreError, match="no NVIDIA driver was found"):
        Engine(device="cuda")
    with pytest.raises(HoraeCoreError, match="no NVIDIA driver"):
        Engine(device="cuda:1")


def test_bad_device_arguments_are_rejected():
    with pytest.raises(HoraeCoreError, match="device must be"):
        Engine(device="gpu0")
    with pytest.raises(HoraeCoreError, match="gpu_memory_utilization must be in"):
        Engine(device="cpu", gpu_memory_utilization=0.0)


def test_cpu_engine_reports_its_device():
    e = Engine(device="cpu", kv_cache_tokens=1024)
    assert e.device == "cpu" and e.cpu_fallback_reason is None
    assert e.dtype == "q4_1"  # the default model's own GGUF blocks
    auto = Engine(kv_cache_tokens=1024)
    if not _has_gpu():
        assert auto.device == "cpu" and "NVIDIA" in auto.cpu_fallback_reason
