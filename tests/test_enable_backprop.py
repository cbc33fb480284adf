"""enable_backprop=True: predictive mean and covariance differentiable w.r.t. the input (laplace-torch's option)."""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, targets, tiny_mlp

from fastlaplace import Laplace


def dense_precision(model, x, structure):
    ggn = dense_ggn(model, x, "regression")
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    elif structure == "kron":  # one datum: K-FAC is the block diagonal of the GGN
        ggn = torch.block_diag(ggn[:16, :16], ggn[16:, 16:])
    return ggn + torch.eye(ggn.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
def test_gradient_of_the_glm_predictive_equals_the_dense_one(structure, generator):
    model = tiny_mlp(True)
    x = torch.randn(1, 3, dtype=torch.float64, generator=generator)
    y = targets("regression", 1, generator=generator)
    options = {"low_rank": 3} if structure == "lowrank" else {}
    la = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure=structure, enable_backprop=True, **options
    )
    la.fit([(x, y)])
    precision = dense_precision(model, x, structure)
    x_test = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    mean, cov = la(x_test)
    (got,) = torch.autograd.grad(mean.square().sum() + cov.sum(), x_test)

    def dense(inputs):
        jac = augmented_jacobian(model, inputs)
        return model(inputs).square().sum() + (jac @ torch.linalg.solve(precision, jac.mT)).sum()

    (expected,) = torch.autograd.grad(dense(x_test), x_test)
    torch.testing.assert_close(got, expected)


def test_last_layer_kron_variance_gradient_and_detached_default(generator):
    model = tiny_mlp(True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = targets("regression", 6, generator=generator)
    la = Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="kron", enable_backprop=True)
    la.fit([(x, y)])
    x_test = torch.randn(3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    _, variance = la(x_test, diagonal_output=True)
    (got,) = torch.autograd.grad(variance.sum(), x_test)
    step = 1e-6
    numeric = torch.zeros_like(x_test)
    for index in range(x_test.numel()):
        shift = torch.zeros_like(x_test).flatten()
        shift[index] = step
        shift = shift.view_as(x_test)
        plus = la(x_test.detach() + shift, diagonal_output=True)[1].sum()
        minus = la(x_test.detach() - shift, diagonal_output=True)[1].sum()
        numeric.view(-1)[index] = (plus - minus) / (2 * step)
    torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7)
    plain = Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="kron")
    plain.fit([(x, y)])
    assert not plain(x_test)[1].requires_grad
