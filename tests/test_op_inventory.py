"""Every public operator has its whole set of files: schema, CPU and CUDA kernels, wrapper, fake, reference, test.

The list is ``fastlaplace.ops.OPS``; an operator registered under ``torch.ops.fastlaplace``
but missing from it fails here too, so a new operator cannot be half added
(docs/design.md, "How to add an operator").
"""

from pathlib import Path

import pytest
import torch
from torch._library.simple_registry import singleton

import fastlaplace.ops as ops
from fastlaplace import reference

ROOT = Path(__file__).resolve().parents[1]


def file_name(op: str) -> str:
    """An operator's file name: its name without the in-place trailing underscore."""
    return op.removesuffix("_")


def has_fake(op: str) -> bool:
    entry = singleton.find(f"fastlaplace::{op}")
    return entry.fake_impl.kernel is not None


def registered_public_ops() -> set[str]:
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastlaplace::")}
    return {n for n in names if n != "build_info" and not n.endswith(("_emulated", "_emulated_"))}


def test_the_list_is_every_registered_operator():
    assert len(set(ops.OPS)) == len(ops.OPS)
    assert set(ops.OPS) == registered_public_ops()
    assert set(ops.__all__) == {*ops.OPS, "OPS", "build_info", "extension_loaded"}


@pytest.mark.parametrize("op", ops.OPS)
def test_operator_has_all_its_parts(op):
    name = file_name(op)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlaplace::{op}", "CPU"), f"{op}: no CPU kernel"
    assert (ROOT / "csrc" / "cpu" / f"{name}.cpp").is_file(), f"{op}: no csrc/cpu/{name}.cpp"
    assert (ROOT / "csrc" / "cuda" / f"{name}.cu").is_file(), f"{op}: no csrc/cuda/{name}.cu"
    assert f'"{op}"' in (ROOT / "csrc" / "cuda" / f"{name}.cu").read_text(), f"{op}: cuda/{name}.cu registers no {op}"
    assert f'"{op}"' in (ROOT / "csrc" / "cpu" / f"{name}.cpp").read_text(), f"{op}: cpu/{name}.cpp registers no {op}"
    assert callable(getattr(ops, op)), f"{op}: no wrapper in fastlaplace.ops"
    assert getattr(ops, op).__module__ == f"fastlaplace.ops.{name}", f"{op}: wrapper outside fastlaplace/ops/{name}.py"
    assert has_fake(op), f"{op}: no register_fake"
    assert callable(getattr(reference, op, None)), f"{op}: no reference in fastlaplace.reference"
    assert (ROOT / "tests" / f"test_{name}.py").is_file(), f"{op}: no tests/test_{name}.py"


def test_a_missing_fake_is_detected():
    library = torch.library.Library("fastlaplace_inventory_probe", "FRAGMENT")
    library.define("bare(Tensor x) -> Tensor")
    entry = singleton.find("fastlaplace_inventory_probe::bare")
    assert entry.fake_impl.kernel is None
    torch.library.register_fake("fastlaplace_inventory_probe::bare", lambda x: torch.empty_like(x), lib=library)
    assert entry.fake_impl.kernel is not None
