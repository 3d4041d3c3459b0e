"""The CUDA side of horae from Python: finding pip-installed CUDA libraries, and checking that every
kernel compiles and assembles (NVRTC, then ``ptxas``) without a GPU.

    python -m horae.cuda            # compile + assemble every kernel for sm_80 and sm_90, print
                                    # registers, shared memory and spills per kernel
    python -m horae.cuda --device   # where device="auto" would run, and why

The core loads libcuda, libnvrtc and libcublas at run time by their sonames, so a CPU-only install
never needs them. NVIDIA's pip wheels (``nvidia-cuda-nvrtc-cu12``, ``nvidia-cublas-cu12``) put the
libraries inside site-packages, off the loader's path: ``preload_libraries`` opens them by full
path first (as PyTorch does), after which the core's lookups by soname find them.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from horae import _core

# (package, library files in load order: dependencies first)
_PIP_LIBRARIES = [
    ("nvidia.cuda_nvrtc", ["libnvrtc-builtins.so.12*", "libnvrtc.so.12"]),
    ("nvidia.cublas", ["libcublasLt.so.12", "libcublas.so.12"]),
]
_preloaded: Optional[List[str]] = None


def _package_dirs(package: str) -> List[Path]:
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return []
    return [Path(p) for p in getattr(mod, "__path__", [])]


def library_dirs() -> List[str]:
    """The ``lib`` folders of the NVIDIA pip wheels installed here (for ``LD_LIBRARY_PATH``)."""
    return [str(base / "lib") for package, _ in _PIP_LIBRARIES for base in _package_dirs(package) if (base / "lib").is_dir()]


def preload_libraries() -> List[str]:
    """Open the CUDA libraries that NVIDIA's pip wheels installed, so the core finds them.

    Returns the files loaded (empty when none are installed: then the system's libraries on the
    loader path are used, if any). Safe to call more than once."""
    global _preloaded
    if _preloaded is not None:
        return _preloaded
    loaded = []
    for package, patterns in _PIP_LIBRARIES:
        for base in _package_dirs(package):
            lib = base / "lib"
            for pattern in patterns:
                for f in sorted(lib.glob(pattern)):
                    if ".alt." in f.name:
                        continue
                    try:
                        ctypes.CDLL(str(f), mode=ctypes.RTLD_GLOBAL)
                        loaded.append(str(f))
                    except OSError:
                        pass  # a broken wheel: the core reports the library as missing
    _preloaded = loaded
    return loaded


def resolve_device(device: str = "auto") -> Tuple[str, Optional[str]]:
    """Where ``device`` runs: ``("cpu" | "cuda:N", reason the GPU was not used or None)``."""
    if device != "cpu":
        preload_libraries()
    return _core.resolve_device(device)


def find_ptxas() -> Optional[str]:
    """``ptxas`` from the ``nvidia-cuda-nvcc-cu12`` wheel, else from ``$PATH``."""
    for base in _package_dirs("nvidia.cuda_nvcc"):
        p = base / "bin" / "ptxas"
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return shutil.which("ptxas")


@dataclasses.dataclass
class KernelReport:
    """What ``ptxas -v`` said about one kernel on one architecture."""

    name: str
    file: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str, file: str) -> List[KernelReport]:
    """Per-kernel figures from ``ptxas -v`` output (entry, then its properties and usage lines)."""
    reports: List[KernelReport] = []
    current = None
    props = (0, 0, 0)
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), int(m.group(2)))
            props = (0, 0, 0)
        elif (m := _PROPS.search(line)) and current:
            props = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif (m := _USED.search(line)) and current:
            name, arch = current
            reports.append(KernelReport(name, file, arch, int(m.group(1)), props[1], props[2], props[0],
                                        int(m.group(2) or 0)))
            current = None
    return reports


class KernelBuildError(RuntimeError):
    pass


def check_kernels(archs: Sequence[int] = (80, 90), ptxas: Optional[str] = None) -> List[KernelReport]:
    """Compile every kernel file with NVRTC for each architecture, assemble it with ``ptxas``, and
    return one report per kernel. Raises ``KernelBuildError`` on any error, or when an entry point
    of the PTX has no report (so a kernel cannot silently go unchecked)."""
    preload_libraries()
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise KernelBuildError("ptxas was not found: pip install nvidia-cuda-nvcc-cu12")
    reports: List[KernelReport] = []
    with tempfile.TemporaryDirectory() as tmp:
        for file in _core.cuda_kernel_files():
            for arch in archs:
                try:
                    ptx = _core.cuda_compile_ptx(file, arch)
                except _core.HoraeCoreError as e:
                    raise KernelBuildError(str(e)) from None
                src = Path(tmp) / f"{file}_sm{arch}.ptx"
                src.write_text(ptx)
                run = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}", str(src), "-o", str(src.with_suffix(".cubin"))],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    raise KernelBuildError(f"ptxas failed on kernels/{file}.cu for sm_{arch}:\n{run.stderr}")
                got = parse_ptxas(run.stderr + run.stdout, file)
                entries = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx, re.M))
                missing = entries - {r.name for r in got}
                if not entries or missing:
                    raise KernelBuildError(f"kernels/{file}.cu sm_{arch}: no ptxas report for {sorted(missing) or 'any kernel'}")
                reports.extend(got)
    return reports


def format_reports(reports: Sequence[KernelReport]) -> str:
    archs = sorted({r.arch for r in reports})
    by: Dict[Tuple[str, int], KernelReport] = {(r.name, r.arch): r for r in reports}
    names = list(dict.fromkeys((r.file, r.name) for r in reports))
    head = f"{'kernel':42} {'file':18}" + "".join(f" | sm_{a}: regs smem    spill" for a in archs)
    lines = [head, "-" * len(head)]
    for file, name in names:
        row = f"{name:42} {file:18}"
        for a in archs:
            r = by[(name, a)]
            row += f" | {r.registers:10} {r.shared_bytes:6} {r.spills:6}B"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m horae.cuda", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    ap.add_argument("--device", action="store_true", help="only say where device='auto' runs")
    args = ap.parse_args(argv)
    if args.device:
        dev, why = resolve_device("auto")
        print(dev if why is None else f"{dev} ({why})")
        return 0
    try:
        reports = check_kernels(args.arch or (80, 90))
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_reports(reports))
    spilled = [r for r in reports if r.spills]
    print(f"\n{len({r.name for r in reports})} kernels, {len(reports)} builds, "
          f"{len(spilled)} with register spills" + (": " + ", ".join(sorted({r.name for r in spilled})) if spilled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
