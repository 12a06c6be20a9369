"""What machine a run is on: whether it multiplies bf16 in hardware, and a one-line description for reports.

Benchmarks of CPU runs are only comparable between machines that agree on bf16: with AMX, bf16 products run
about 5x faster than float32; on a CPU with neither AMX nor AVX512-BF16 torch emulates them, far slower
(a 2-core AMD EPYC with AVX2: 0.3 GFLOP/s in bf16 against 102 in float32, a 2048 x 2048 product).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def native_bf16(device: str | None = None) -> bool:
    """Whether bf16 matrix products run in hardware on ``device`` ("cuda" or "cpu"; default: CUDA where there
    is one): a CUDA GPU that supports them, or a CPU with AMX or AVX512-BF16 (torch's own feature checks; a
    torch without them is taken to emulate)."""
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe(device: str) -> str:
    """One line for a benchmark's report: the GPU and CUDA version, or the CPU, its cores and its bf16."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    bf16 = "bf16 in hardware" if native_bf16("cpu") else "bf16 emulated (no AMX or AVX512-BF16)"
    return f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cores, {bf16}, torch {torch.__version__}"
