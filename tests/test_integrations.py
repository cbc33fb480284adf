"""fastlaplace as a laplace-torch backend (``backend=FastGGN`` / ``FastEF``) against laplace-torch's own backends.

Same model, data and options on both sides; the fitted curvature (every Kron factor, or the
diagonal / dense matrix), the log marginal likelihood and the GLM predictive must agree to
float64 precision. References: ``BackPackGGN`` (exact GGN) and ``BackPackEF`` (empirical
Fisher); BackPACK has no empirical-Fisher K-FAC, so FastEF's Kron is compared with
``CurvlinopsEF``. For Conv2d, BackPACK's KFLR uses another factorisation (the output
factor from gradients summed over locations, the input factor summed rather than
averaged over them), so FastGGN's Conv2d Kron is compared with ``CurvlinopsGGN``
(laplace-torch's default backend), which is K-FAC "expand" as fastlaplace.
"""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from laplace import Laplace as ReferenceLaplace
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN
from torch import nn

from fastlaplace import Laplace
from fastlaplace.integrations import FastEF, FastGGN

OPTIONS = {"prior_precision": 0.9, "temperature": 1.2}


class Batches(list):
    """A list of batches with the ``dataset`` laplace-torch reads N from; iterating it draws no random numbers."""

    def __init__(self, batches, size):
        super().__init__(batches)
        self.dataset = range(size)


def mlp(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
    ).double()


def data(likelihood: str, input_shape=(3,), size: int = 12, seed: int = 1):
    torch.manual_seed(seed)
    x = torch.randn(size, *input_shape, dtype=torch.float64)
    y = torch.randint(0, 4, (size,)) if likelihood == "classification" else torch.randn(size, 4, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)


def fit(model, likelihood, subset, structure, backend, loader, **options):
    sigma = 1.0 if likelihood == "classification" else 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = ReferenceLaplace(
            model,
            likelihood,
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=backend,
            sigma_noise=sigma,
            **OPTIONS,
            **options,
        )
        la.fit(loader)
    return la


def assert_same_curvature(ours, reference, structure):
    if structure == "kron":
        assert len(ours.H_facs.kfacs) == len(reference.H_facs.kfacs)
        for got, want in zip(ours.H_facs.kfacs, reference.H_facs.kfacs):
            assert len(got) == len(want)
            for factor, expected in zip(got, want):
                assert factor.dtype == expected.dtype == torch.float64
                torch.testing.assert_close(factor, expected, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(ours.H, reference.H, rtol=1e-10, atol=1e-12)


def assert_same_posterior(ours, reference, likelihood, x):
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.log_marginal_likelihood(), reference.log_marginal_likelihood(), rtol=1e-10, atol=0)
    mean, var = ours._glm_predictive_distribution(x)
    want_mean, want_var = reference._glm_predictive_distribution(x)
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-10, atol=1e-12)
    if likelihood == "classification":
        probs, want_probs = ours(x, link_approx="probit"), reference(x, link_approx="probit")
        torch.testing.assert_close(probs, want_probs, rtol=1e-10, atol=0)


def reference_backend(backend, structure):
    if backend is FastGGN:
        return BackPackGGN
    return CurvlinopsEF if structure == "kron" else BackPackEF


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", [FastGGN, FastEF])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mlp_agrees_with_laplace_torch_backends(likelihood, subset, structure, backend, bias):
    loader = data(likelihood)
    # Separate copies: BackPACK extends the model it is given, which torch.func's Jacobians cannot trace.
    reference = fit(mlp(bias), likelihood, subset, structure, reference_backend(backend, structure), loader)
    ours = fit(mlp(bias), likelihood, subset, structure, backend, loader)
    assert isinstance(ours.backend, backend)
    assert_same_curvature(ours, reference, structure)
    assert_same_posterior(ours, reference, likelihood, torch.randn(6, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", [FastGGN, FastEF])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_cnn_agrees_with_laplace_torch_backends(likelihood, structure, backend):
    loader = data(likelihood, input_shape=(2, 6, 6))
    reference_cls = reference_backend(backend, structure)
    if structure == "kron":
        reference_cls = CurvlinopsGGN if backend is FastGGN else CurvlinopsEF
    reference = fit(cnn(), likelihood, "all", structure, reference_cls, loader)
    ours = fit(cnn(), likelihood, "all", structure, backend, loader)
    assert_same_curvature(ours, reference, structure)
    assert_same_posterior(ours, reference, likelihood, torch.randn(3, 2, 6, 6, dtype=torch.float64))


def test_cnn_kron_differs_from_backpack_kflr_by_its_convention():
    """BackPACK's Conv2d K-FAC is another approximation: the difference is real, not a layout slip."""
    loader = data("classification", input_shape=(2, 6, 6))
    backpack = fit(cnn(), "classification", "all", "kron", BackPackGGN, loader)
    ours = fit(cnn(), "classification", "all", "kron", FastGGN, loader)
    g_ours, a_ours = ours.H_facs.kfacs[0]
    g_backpack, a_backpack = backpack.H_facs.kfacs[0]
    locations = 6 * 6
    torch.testing.assert_close(a_backpack, a_ours * locations)  # summed, not averaged, over the locations
    assert not torch.allclose(g_backpack, g_ours)  # gradients summed over locations before the outer product
    for got, want in zip(ours.H_facs.kfacs[-2:], backpack.H_facs.kfacs[-2:]):  # the Linear layer agrees
        for factor, expected in zip(got, want):
            torch.testing.assert_close(factor, expected)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_frozen_layer_agrees_with_curvlinops(structure):
    """Frozen parameters are left out (BackPACK refuses such models; laplace-torch's default backend does not)."""
    loader = data("classification")
    models = [mlp(True), mlp(True)]
    for model in models:
        model[0].requires_grad_(False)
    reference = fit(models[0], "classification", "all", structure, CurvlinopsGGN, loader)
    ours = fit(models[1], "classification", "all", structure, FastGGN, loader)
    assert ours.n_params == 5 * 4 + 4
    assert_same_curvature(ours, reference, structure)
    assert_same_posterior(ours, reference, "classification", torch.randn(6, 3, dtype=torch.float64))


def test_frozen_layer_full_is_the_block_of_the_trainable_parameters():
    """Curvlinops' dense GGN in laplace-torch goes through float32 (``torch.eye``): compare with BackPACK's block."""
    loader = data("classification")
    everything = fit(mlp(True), "classification", "all", "full", BackPackGGN, loader)
    model = mlp(True)
    model[0].requires_grad_(False)
    ours = fit(model, "classification", "all", "full", FastGGN, loader)
    trainable = slice(3 * 5 + 5, None)
    torch.testing.assert_close(ours.H, everything.H[trainable, trainable], rtol=1e-10, atol=1e-12)


def test_subnetwork_agrees_with_backpack():
    loader = data("classification")
    chosen = torch.tensor([1, 4, 9, 21, 22, 40, 43])
    options = {"subnetwork_indices": chosen}
    reference = fit(mlp(True), "classification", "subnetwork", "full", BackPackGGN, loader, **options)
    ours = fit(mlp(True), "classification", "subnetwork", "full", FastGGN, loader, **options)
    assert ours.H.shape == (7, 7)
    assert_same_curvature(ours, reference, "full")
    assert_same_posterior(ours, reference, "classification", torch.randn(6, 3, dtype=torch.float64))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_with_a_fixed_seed_is_fastlaplaces_mc_mode(likelihood):
    """Same global seed, same draws: FastGGN(stochastic) in laplace-torch is fastlaplace's ``curvature_mode='mc'``."""
    loader = data(likelihood)
    batches = Batches(list(loader), 12)
    sigma = 1.0 if likelihood == "classification" else 0.7
    models = [mlp(True), mlp(True)]
    torch.manual_seed(5)
    reference = fit(models[0], likelihood, "all", "diag", FastGGN, batches, backend_kwargs={"stochastic": True})
    own = Laplace(models[1], likelihood, "all", "diag", curvature_mode="mc", sigma_noise=sigma, **OPTIONS)
    torch.manual_seed(5)
    own.fit(batches)
    torch.testing.assert_close(reference.H, own._to_parameter_order(own.curvature.diagonals), rtol=1e-10, atol=1e-12)
    # rtol 1e-7: laplace-torch rounds a regression's sigma_noise to float32 in its log likelihood.
    torch.testing.assert_close(reference.log_marginal_likelihood(), own.log_marginal_likelihood(), rtol=1e-7, atol=0)
    exact = fit(mlp(True), likelihood, "all", "diag", FastGGN, batches)
    assert not torch.allclose(reference.H, exact.H, rtol=1e-3)  # the draws are random, not the exact GGN


@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_averages_to_the_exact_ggn(likelihood, structure):
    loader = data(likelihood)
    torch.manual_seed(2)
    exact = fit(mlp(True), likelihood, "all", structure, FastGGN, loader)
    samples = fit(mlp(True), likelihood, "all", structure, FastGGN, loader, backend_kwargs={"stochastic": True})
    averaged_options = {"stochastic": True, "num_samples": 4000}
    many = fit(mlp(True), likelihood, "all", structure, FastGGN, loader, backend_kwargs=averaged_options)

    def matrices(la):
        if structure != "kron":
            return [la.H]
        return [torch.kron(*f) if len(f) == 2 else f[0] for f in la.H_facs.kfacs]

    for one, averaged, want in zip(matrices(samples), matrices(many), matrices(exact)):
        assert one.shape == averaged.shape == want.shape
        if one.dim() == 2:
            torch.testing.assert_close(one, one.T)
            torch.testing.assert_close(averaged, averaged.T)
            assert torch.linalg.eigvalsh(one).min() > -1e-10  # positive semi-definite
        error = ((averaged - want).norm() / want.norm()).item()
        assert error < 0.04, f"4000-sample MC Fisher is {error:.3f} (relative) from the exact GGN"
    one_error = max(((a - w).norm() / w.norm()).item() for a, w in zip(matrices(samples), matrices(exact)))
    assert one_error > 0.1  # a single sample is not yet the exact GGN: the average is what converges


def test_backend_returns_laplace_torch_layout_and_loss():
    """The ``kron`` call itself: factor shapes in ``parameters()`` order, the loss scaled as laplace-torch's."""
    model = mlp(True)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    backend = FastGGN(model, "regression")
    loss, kron = backend.kron(x, y, N=21)
    shapes = [[tuple(f.shape) for f in block] for block in kron.kfacs]
    assert shapes == [[(5, 5), (3, 3)], [(5, 5)], [(4, 4), (5, 5)], [(4, 4)]]
    torch.testing.assert_close(loss, 0.5 * ((model(x) - y) ** 2).sum().detach())
    reference_loss, reference_kron = BackPackGGN(mlp(True), "regression").kron(x, y, N=21)
    torch.testing.assert_close(loss, reference_loss)
    for got, want in zip(kron.kfacs, reference_kron.kfacs):
        for factor, expected in zip(got, want):
            torch.testing.assert_close(factor, expected)


def test_unsupported_layers_are_named():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return self.alpha * x

    model = nn.Sequential(nn.Linear(3, 4).double(), Scale())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    with pytest.raises(
        ValueError, match=r"FastGGN: layer '1' \(Scale\) has trainable parameters \['alpha'\] but is not supported"
    ):
        FastGGN(model, "classification").diag(x, y)
    normed = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).double()
    with pytest.raises(ValueError, match=r"FastEF.kron: layer '1' \(LayerNorm\) has no Kronecker factors"):
        FastEF(normed, "classification").kron(x, y, N=5)
    with pytest.raises(TypeError, match="unsupported option"):
        FastGGN(normed, "classification").diag(x, y, damping=1.0)


def test_layer_norm_diag_agrees_with_dense_ggn():
    """diag / full also cover the layers fastlaplace supports beyond Linear and Conv2d (BackPACK has no LayerNorm)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    backend = FastGGN(model, "classification")
    _, diagonal = backend.diag(x, y)
    _, dense = backend.full(x, y)
    _, reference = CurvlinopsGGN(model, "classification").full(x, y)
    torch.testing.assert_close(dense, reference)
    torch.testing.assert_close(diagonal, reference.diagonal())


def test_import_fastlaplace_does_not_import_laplace_torch():
    code = "import sys, fastlaplace, fastlaplace.integrations; assert 'laplace' not in sys.modules, 'laplace imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_laplace_torch_raises_a_clear_import_error(monkeypatch):
    for name in [n for n in sys.modules if n == "laplace" or n.startswith("laplace.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "fastlaplace.integrations.laplace_torch")
    with pytest.raises(ImportError, match="pip install laplace-torch"):
        importlib.import_module("fastlaplace.integrations.laplace_torch")
