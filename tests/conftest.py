"""Shared fixtures: devices, dtypes, tolerances and random test data."""

import contextlib
import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

import fastlaplace.ops as ops

settings.register_profile("fastlaplace", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("fastlaplace")

CUDA_REASON = "CUDA is not available"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)),
]
INPUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FACTOR_DTYPES = [torch.float32, torch.float64]
PRIME_SIZES = [1, 2, 3, 5, 7, 13]
TILE = 64  # gram::kTile, the edge of the fused CUDA kernel's tiles (csrc/engines/tile_gram.h)


def preconditioned_layers():
    """Hypothesis lists of 1-3 layers ``(d_in, d_g, bias)`` on either side of a tile's edge."""
    sizes = st.tuples(st.sampled_from([1, 6, TILE]), st.sampled_from([1, 3, TILE + 1]), st.booleans())
    return st.lists(sizes, min_size=1, max_size=3)


def requires_extension() -> None:
    """Skip (with the reason) when the compiled ops are absent; CI forbids that state."""
    if not ops.extension_loaded():
        assert os.environ.get("FASTLAPLACE_REQUIRE_EXT") != "1"
        pytest.skip("compiled extension fastlaplace._C is not built")


def emulated_op(name: str, *trailing):
    """``torch.ops.fastlaplace.<name>``, a CUDA kernel's host emulation, with ``trailing`` arguments appended.

    Every call runs the kernel twice: blocks and each phase's threads from the first, and
    on copies of the arguments it writes, from the last. On the GPU both run in any order,
    so results that differ between the two (a thread reading what another writes in the
    same phase, a block what another block writes) are a race, and fail the call. The
    in-order run's result comes back; the arguments it writes are the caller's.
    """
    requires_extension()
    op = getattr(torch.ops.fastlaplace, name)
    written = [i for i, argument in enumerate(op.default._schema.arguments) if argument.alias_info is not None]

    def run(*args):
        args = (*args, *trailing)
        copies = [copy_with_strides(a) if i in written else a for i, a in enumerate(args)]
        reversed_result = op(*copies, reverse_order=True)
        result = op(*args)
        for got, want in zip(
            tensors_of(reversed_result, *(copies[i] for i in written)),
            tensors_of(result, *(args[i] for i in written)),
            strict=True,
        ):
            torch.testing.assert_close(
                got,
                want,
                rtol=0,
                atol=0,
                equal_nan=True,
                msg=lambda detail: f"{name} depends on the order of its blocks or threads (a race): {detail}",
            )
        return result

    return run


def copy_with_strides(value):
    """A copy of a tensor (or of each tensor of a list) with the original's strides."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).copy_(value)
    return [copy_with_strides(v) for v in value]


def tensors_of(*values) -> list[torch.Tensor]:
    """The tensors in ``values`` (tensors and nested lists or tuples of them, None skipped), in order."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(tensors_of(*value))
    return found


def assert_matches_float64(result, exact, rounded=None, k: float = 8.0) -> None:
    """Compare to the float64 ground truth ``exact``.

    The allowed error is k times the error that the reference itself makes in the result's
    precision (``rounded``: the reference evaluated in that precision), and never less than
    64 units of that precision's rounding at the result's scale.
    """
    eps = torch.finfo(result.dtype).eps
    exact = exact.double().cpu()
    result = result.double().cpu()
    own_error = 0.0 if rounded is None or not exact.numel() else (rounded.double().cpu() - exact).abs().max().item()
    scale = exact.abs().max().item() if exact.numel() else 0.0
    tolerance = max(k * own_error, 64 * eps * max(1.0, scale))
    error = (result - exact).abs().max().item() if exact.numel() else 0.0
    assert result.shape == exact.shape
    assert error <= tolerance, f"max error {error:.3e} exceeds {tolerance:.3e} (reference's own error {own_error:.3e})"


def random_spd(size: int, rank: int | None = None, dtype=torch.float64, generator=None) -> torch.Tensor:
    """Symmetric positive (semi-)definite matrix of the given rank (full by default)."""
    factor = torch.randn(size, size if rank is None else rank, dtype=dtype, generator=generator)
    return factor @ factor.T / max(1, factor.shape[1])


def eigen_layer(d_a: int, d_g: int, dtype=torch.float64, generator=None, rank_a=None):
    """Eigenpairs (Q_A, λ, Q_G, μ) and the factors (A, G) of one random Kron layer."""
    a = random_spd(d_a, rank_a, dtype, generator)
    g = random_spd(d_g, None, dtype, generator)
    la, qa = torch.linalg.eigh(a)
    lg, qg = torch.linalg.eigh(g)
    return qa, la, qg, lg, a, g


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@contextlib.contextmanager
def host_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block (the CPU kernels spread layers over them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gradient_blocks(d_in: int, d_g: int, bias: bool, transposed: bool) -> list[torch.Tensor]:
    """A layer's float64 weight gradient ``(d_g, d_in)`` (stored transposed if asked) and its bias gradient."""
    weight = (
        torch.randn(d_in, d_g, dtype=torch.float64).T if transposed else torch.randn(d_g, d_in, dtype=torch.float64)
    )
    return [weight] + ([torch.randn(d_g, dtype=torch.float64)] if bias else [])


def assert_in_place_like_reference(op, reference, grads: list[torch.Tensor], *args) -> None:
    """``op(grads, *args)`` equals ``reference`` on copies: the same ν, and blocks written in their own layout."""
    expected = [g.clone() for g in grads]
    strides = [g.stride() for g in grads]
    nu = op(grads, *args)
    torch.testing.assert_close(nu, reference(expected, *args))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert [g.stride() for g in grads] == strides


def assert_like_emulated_reference(nu, grads, expected_nu, expected, dtype) -> None:
    """An emulated preconditioner's ν and blocks against the reference's, at float32's or float64's tolerance."""
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(nu, expected_nu, **tolerance)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def assert_preconditioned(nu, grad, dtype, exact_nu, exact_grad, rounded_grad) -> None:
    """A preconditioning op's ν and gradient against the float64 reference (and the reference in ``dtype``)."""
    assert nu.dtype == dtype
    torch.testing.assert_close(nu.double().cpu(), exact_nu, rtol=1e-4, atol=0)
    if grad.dtype == torch.bfloat16:  # the result is rounded to the gradient's dtype on the way out
        torch.testing.assert_close(grad.cpu(), exact_grad.to(grad.dtype))
    else:
        assert_matches_float64(grad.cpu(), exact_grad, rounded_grad)
