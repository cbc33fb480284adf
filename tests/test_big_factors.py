"""LM-head support: the closed-form softmax output factor, truncated (sketched) Kron factors, size checks."""

import pytest
import torch
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import memory, output_gradient_columns
from fastlaplace.curvature.big_factors import SketchedFactor
from fastlaplace.curvature.closed_form import softmax_hessian_sum
from fastlaplace.curvature.memory import AllocationTooLargeError
from fastlaplace.posterior import KronLaplace
from fastlaplace.posterior.parametric import ParametricLaplace

CLASSES = 40


def head_model(hidden: int = 6, classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def data(n: int, classes: int = CLASSES):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, dtype=torch.float64, generator=generator)
    y = torch.randint(classes, (n,), generator=generator)
    return x, y


def fitted(model, x, y, batches: int = 2, **options):
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron", **options)
    la.fit(list(zip(x.chunk(batches), y.chunk(batches), strict=True)))
    la.prior_precision = 0.7
    return la


def test_closed_form_softmax_factor_equals_hessian_root_columns():
    probs = torch.randn(9, 7, dtype=torch.float64).softmax(-1)
    columns = output_gradient_columns(probs.log(), torch.zeros(9), "classification", "ggn")
    exact = torch.einsum("nck,ndk->cd", columns, columns)
    torch.testing.assert_close(softmax_hessian_sum(probs), exact, rtol=0, atol=1e-14)


def test_last_layer_fit_uses_the_closed_form_and_matches_the_columns_path(monkeypatch):
    model, (x, y) = head_model(), data(12)
    closed = fitted(model, x, y)
    monkeypatch.setattr(KronLaplace, "_batch_statistics", ParametricLaplace._batch_statistics)
    columns = fitted(model, x, y)
    for a, b in zip(closed.curvature.output_factors, columns.curvature.output_factors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(closed.log_marginal_likelihood(), columns.log_marginal_likelihood())


@pytest.mark.parametrize("options", [{}, {"max_dense_factor": 16, "factor_rank": 8}])
def test_last_layer_fit_never_builds_hessian_root_columns(monkeypatch, options):
    def refuse(probs):
        raise AssertionError("the (N, C, C - 1) columns were built")

    monkeypatch.setattr("fastlaplace.curvature.loss._softmax_hessian_root", refuse)
    model, (x, y) = head_model(), data(12)
    fitted(model, x, y, **options).log_marginal_likelihood()


def test_sketch_is_exact_when_its_width_covers_the_rank():
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(5, 40, dtype=torch.float64, generator=generator)
    factor = SketchedFactor.zeros(40, 8, torch.device("cpu"))
    for part in rows.chunk(3):  # streaming: batches add up
        factor.add_gram(part)
    values, vectors = factor.eigenpairs(8, torch.float64)
    dense_values, dense_vectors = torch.linalg.eigh(rows.T @ rows)
    torch.testing.assert_close(values, dense_values[-8:], rtol=1e-10, atol=1e-10)
    top = dense_vectors[:, -5:]  # the 5 non-zero eigenvalues: their projector is determined
    torch.testing.assert_close(vectors[:, -5:] @ vectors[:, -5:].T, top @ top.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_softmax_sketch_gives_the_dense_factors_top_eigenpairs():
    probs = torch.randn(30, CLASSES, dtype=torch.float64).mul(2).softmax(-1)
    factor = SketchedFactor.zeros(CLASSES, CLASSES - 1, torch.device("cpu"))  # width 39 = rank of G
    factor.add_softmax_hessian(probs)
    values, vectors = factor.eigenpairs(CLASSES - 1, torch.float64)
    dense_values, dense_vectors = torch.linalg.eigh(softmax_hessian_sum(probs))
    torch.testing.assert_close(values, dense_values[1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vectors @ vectors.T, dense_vectors[:, 1:] @ dense_vectors[:, 1:].T, rtol=0, atol=1e-9)


@pytest.mark.parametrize("hidden", [6, 20])  # 20: the input factor (21 > 16) is sketched as well
def test_truncated_path_equals_dense_path_when_the_rank_covers_the_spectrum(hidden):
    model, (x, y) = head_model(hidden), data(10)
    dense = fitted(model, x, y)
    truncated = fitted(model, x, y, max_dense_factor=16, factor_rank=CLASSES - 1)
    assert isinstance(truncated.curvature.output_factors[0], SketchedFactor)
    assert isinstance(truncated.curvature.input_factors[0], SketchedFactor) == (hidden == 20)
    torch.testing.assert_close(truncated.log_marginal_likelihood(), dense.log_marginal_likelihood(), rtol=1e-10, atol=0)
    test_x = x[:4] + 0.3
    torch.testing.assert_close(truncated(test_x), dense(test_x), rtol=1e-10, atol=1e-13)
    for diagonal in (truncated.functional_variance_diagonal(test_x), dense.functional_variance_diagonal(test_x)):
        torch.testing.assert_close(diagonal[1], dense.functional_variance(test_x)[1].diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(truncated.functional_variance(test_x), dense.functional_variance(test_x))
    samples = [p.sample(3, torch.Generator().manual_seed(4)) for p in (truncated, dense)]
    torch.testing.assert_close(samples[0], samples[1], rtol=1e-9, atol=1e-10)


def explicit_precision(la) -> torch.Tensor:
    """``P = Π diag(s λ μ + δ) Πᵀ + δ (I − Π Πᵀ)`` as a dense (C d_A)² matrix, row-major [W | b]."""
    (qa,), (va,), (qg,), (vg,) = la.eigendecomposition()
    scale, delta = la._scale(la.sigma_noise)[0], la.prior_precision[0]
    basis = torch.kron(qg, qa)
    size = basis.shape[0]
    return basis @ torch.diag((scale * torch.outer(vg, va) + delta).flatten()) @ basis.T + delta * (
        torch.eye(size, dtype=basis.dtype) - basis @ basis.T
    )


def test_truncated_evidence_predictive_and_samples_use_delta_on_the_complement():
    model, (x, y) = head_model(), data(12)
    la = fitted(model, x, y, max_dense_factor=16, factor_rank=8)
    (qg,) = la.eigendecomposition()[2]
    assert qg.shape == (CLASSES, 8)
    precision = explicit_precision(la)
    torch.testing.assert_close(la.log_det_posterior(la.prior_precision, la.sigma_noise), torch.logdet(precision))
    test_x = x[:3] - 0.2
    features = torch.cat([model[1](model[0](test_x)), torch.ones(3, 1, dtype=torch.float64)], 1)
    jacobian = torch.einsum("cd,na->ncda", torch.eye(CLASSES, dtype=torch.float64), features).flatten(2)
    exact = jacobian @ torch.linalg.inv(precision) @ jacobian.transpose(1, 2)
    torch.testing.assert_close(la.functional_variance(test_x)[1], exact)
    torch.testing.assert_close(la.functional_variance_diagonal(test_x)[1], exact.diagonal(dim1=1, dim2=2))
    draws = la.sample(20000, torch.Generator().manual_seed(5)) - torch.cat([p.flatten() for p in model[2].parameters()])
    # Parameter order is W then b; rotate the explicit covariance to it and compare a block of it.
    order = torch.arange(CLASSES * 7).view(CLASSES, 7)
    order = torch.cat([order[:, :6].flatten(), order[:, 6]])
    covariance = torch.linalg.inv(precision)[order][:, order]
    torch.testing.assert_close(
        draws.T.cov()[:50, :50], covariance[:50, :50], rtol=0, atol=0.05 * covariance.diag().max()
    )


def test_truncated_state_dict_round_trip_and_refit_add_up():
    model, (x, y) = head_model(), data(12)
    la = fitted(model, x, y, max_dense_factor=16, factor_rank=8)
    restored = fitted(model, x[:2], y[:2], batches=1, max_dense_factor=16, factor_rank=8)
    restored.load_state_dict(la.state_dict())
    assert isinstance(restored.curvature.output_factors[0], SketchedFactor)
    torch.testing.assert_close(restored.log_marginal_likelihood(), la.log_marginal_likelihood())
    torch.testing.assert_close(restored(x[:3]), la(x[:3]))
    half = fitted(model, x[:6], y[:6], batches=1, max_dense_factor=16, factor_rank=8)
    half.fit([(x[6:], y[6:])], override=False)
    torch.testing.assert_close(half.log_marginal_likelihood(), la.log_marginal_likelihood())


def test_truncated_factors_refuse_damping_and_the_joint_predictive():
    model, (x, y) = head_model(), data(12)
    with pytest.raises(ValueError, match="damping=True is not available with truncated factors"):
        fitted(model, x, y, max_dense_factor=16, damping=True).log_marginal_likelihood()
    la = fitted(model, x, y, max_dense_factor=16, factor_rank=8)
    with pytest.raises(ValueError, match="joint predictive is not available with the truncated factors of layer '2'"):
        la._jacobian_cross_covariance(None)


def test_oversized_allocations_are_refused_with_layer_size_and_option(monkeypatch):
    model, (x, y) = head_model(), data(12)
    monkeypatch.setattr(memory, "MEMORY_LIMIT_GIB", 1e-6)  # 1 KiB: a 40 x 40 float64 factor is 12.5 KiB
    with pytest.raises(
        AllocationTooLargeError, match=r"output factor of layer '2' would need 0\.0 GiB.*max_dense_factor"
    ):
        fitted(model, x, y)
    la = fitted(model, x, y, max_dense_factor=16, factor_rank=4)  # sketched G, 7 x 7 A: under the limit
    with pytest.raises(AllocationTooLargeError, match=r"\(N, C, C\).*diagonal_output=True"):
        la.functional_variance(x)
    assert la(x).shape == (12, CLASSES)  # the probit needs the variances alone
    with pytest.raises(AllocationTooLargeError, match=r"Hessian-root columns.*curvature_mode='mc'"):
        output_gradient_columns(torch.zeros(12, CLASSES), y, "classification", "ggn")


def test_an_all_weights_glm_over_many_outputs_is_refused_with_what_avoids_it(monkeypatch):
    model, (x, y) = head_model(), data(12)
    kron = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", curvature_mode="mc")
    diag = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    for la in (kron, diag):
        la.fit([(x, y)])
    expected = kron(x[:2], pred_type="glm", link_approx="probit")
    # Kron's probit: (C, 8, C) float64 identity columns per chunk of 8 inputs are 100 KiB, one input's 12.5 KiB
    monkeypatch.setattr(memory, "MEMORY_LIMIT_GIB", 50 / 2**20)
    with pytest.raises(
        AllocationTooLargeError, match=r"identity columns, one backward per output \(C = 40\).*pred_type='nn'.*fewer"
    ):
        kron(x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(kron(x[:2], pred_type="glm", link_approx="probit"), expected)  # small enough
    # a diagonal posterior's probit needs the (N, C, C) covariance: Kron is the way to the variances alone
    with pytest.raises(AllocationTooLargeError, match=r"\(N, C, C\).*pred_type='nn'.*hessian_structure='kron'"):
        diag(x, pred_type="glm", link_approx="probit")
    monkeypatch.setattr(memory, "MEMORY_LIMIT_GIB", 10 / 2**20)  # not even one input: no "fewer inputs"
    with pytest.raises(AllocationTooLargeError, match=r"a last-layer posterior \(its GLM needs no columns\)$"):
        kron(x[:1], pred_type="glm", link_approx="probit")
    assert kron(x, pred_type="nn", n_samples=3).shape == (12, CLASSES)
