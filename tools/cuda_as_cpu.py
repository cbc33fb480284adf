"""A dry run of the GPU tests and benchmarks on a machine without one: "cuda" stands for the CPU.

Every tensor asked for on "cuda" is made on the CPU, ``.cuda()`` copies on the CPU, and
``torch.cuda``'s queries, streams and synchronisation answer as a GPU's would, so that the
GPU tests' and benchmarks' own code (names, shapes, arguments, tolerances) runs before a
GPU session's few minutes are spent on it. The kernels that run are the CPU ones: this
says nothing about the CUDA kernels.

``python -m pytest -p cuda_as_cpu -k cuda tests`` (with this folder on PYTHONPATH), or
``python tools/cuda_as_cpu.py SCRIPT [ARGS]`` for a script; ``make gpu-dry-run`` runs both.
"""

import contextlib
import runpy
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


def _on_cpu(value):
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        args = tuple(_on_cpu(a) for a in args)
        kwargs = {k: _on_cpu(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


class _Stream:
    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def _patch() -> None:
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.get_device_name = lambda *args: "the CPU standing in for CUDA (tools/cuda_as_cpu.py)"
    for name in ("synchronize", "set_sync_debug_mode", "reset_peak_memory_stats", "empty_cache"):
        setattr(cuda, name, lambda *args, **kwargs: None)
    cuda.max_memory_allocated = lambda *args: 0
    cuda.Stream = lambda *args, **kwargs: _Stream()
    cuda.current_stream = lambda *args: _Stream()
    cuda.stream = lambda stream: contextlib.nullcontext()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.clone()
    _CudaAsCpu().__enter__()  # for the rest of the process


_patch()

if __name__ == "__main__":
    script = Path(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
