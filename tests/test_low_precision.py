"""The fit's matrix products in bf16 / fp16 (curvature_dtype): exact loss, curvature close to fp32."""

import warnings

import pytest
import torch
from torch import nn

from fastlaplace import Laplace

# On CPUs without bf16 / fp16 units every fit here warns that it is emulated (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:curvature_dtype=.*matrix units")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def data(generator):
    x = torch.randn(96, 20, generator=generator)
    y = torch.randint(0, 5, (96,), generator=generator)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


# Factor errors follow the format's precision (bf16: 8 bits, fp16: 11) through the backward pass.
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_kron_factors_are_close_and_the_loss_exact(dtype, tolerance, generator):
    model, loader = mlp(), data(generator)
    exact = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    exact.fit(loader)
    fast = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", curvature_dtype=dtype)
    fast.fit(loader)
    assert fast.loss == exact.loss
    for got, want in zip(
        fast.curvature.input_factors + fast.curvature.output_factors,
        exact.curvature.input_factors + exact.curvature.output_factors,
        strict=True,
    ):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= tolerance * want.norm()
    assert abs(fast.log_marginal_likelihood() - exact.log_marginal_likelihood()) <= 1e-3 * abs(
        exact.log_marginal_likelihood()
    )
    x = loader[0][0]
    torch.testing.assert_close(fast(x), exact(x), atol=2e-3, rtol=0)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_other_structures_accept_the_option(structure, generator):
    model, loader = mlp(), data(generator)
    exact = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure=structure)
    exact.fit(loader)
    fast = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        curvature_dtype=torch.bfloat16,
    )
    fast.fit(loader)
    assert abs(fast.log_marginal_likelihood() - exact.log_marginal_likelihood()) <= 1e-3 * abs(
        exact.log_marginal_likelihood()
    )


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="curvature_dtype must be None, torch.bfloat16 or torch.float16"):
        Laplace(mlp(), "classification", subset_of_weights="all", curvature_dtype=torch.float64)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_low_precision_is_warned_about(native, dtype, monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda native=native: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Laplace(mlp(), "classification", subset_of_weights="all", hessian_structure="kron", curvature_dtype=dtype)
    emulated = [w for w in caught if "matrix units" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    assert all(w.filename == __file__ for w in emulated), "the warning points at the caller's line"
