"""Peak memory of one call, shared by the benchmarks (method: see bench_ops.py's docstring)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def return_freed_memory() -> None:
    """Fix glibc's malloc thresholds so that freed blocks over 128 KiB go back to the OS at once."""
    libc = ctypes.CDLL(None)
    for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD):
        libc.mallopt(option, 128 * 1024)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status")


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Memory one call of fn needs above what is in use before it, in MiB (CPU: Linux only)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    fn()
    return max(0.0, (status_kib("VmHWM") - before) / 1024)  # the kernel's RSS counters lag by a few pages


def fresh_process_peak(script: str, index: int, arguments: list[str]) -> float:
    """Peak (MiB) of job ``index`` of a benchmark script, which measures it in a fresh process.

    The script must accept ``--peak-of INDEX``: call :func:`return_freed_memory` before
    anything is allocated, build its jobs, run job INDEX once as a warm-up and print
    :func:`peak_mib` of a second call on its last line.
    """
    command = [sys.executable, script, "--peak-of", str(index), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])
