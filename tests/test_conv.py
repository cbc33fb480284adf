"""Conv2d layers in the curvature and the posteriors, against dense brute force."""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, layer_sizes, output_hessians, targets, tiny_cnn
from test_layers import grouped_cnn
from torch import nn

from fastlaplace import Laplace
from fastlaplace.curvature import DiagCurvature, layer_statistics, memory
from fastlaplace.optim import KFACPreconditioner
from fastlaplace.posterior import shared_weights


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diagonal_of_a_cnn_equals_the_dense_ggn_diagonal(likelihood, generator):
    model = tiny_cnn(5)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=generator)
    diag = DiagCurvature()
    diag.update(layer_statistics(model, x, targets(likelihood, 4, generator=generator), likelihood)[1])
    got = torch.cat([d.flatten() for d in diag.diagonals])
    torch.testing.assert_close(got, dense_ggn(model, x, likelihood).diagonal())


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_cnn_posterior_marglik_and_glm_equal_dense(structure, generator):
    model = tiny_cnn(5)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=1.5)
    la.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    ggn = dense_ggn(model, x, "classification")
    curvature = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    precision = curvature + 1.5 * torch.eye(ggn.shape[0], dtype=torch.float64)
    theta = torch.cat(
        [torch.cat([m.weight.flatten(1), m.bias.unsqueeze(1)], 1).flatten() for m in model if hasattr(m, "weight")]
    )
    log_lik = -nn.functional.cross_entropy(model(x), y, reduction="sum").detach()
    expected = log_lik - 0.5 * (
        torch.logdet(precision) - ggn.shape[0] * torch.log(torch.tensor(1.5)) + 1.5 * theta @ theta
    )
    torch.testing.assert_close(la.log_marginal_likelihood(), expected.to(torch.float64))
    x_test = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    torch.testing.assert_close(
        la.functional_variance(x_test)[1], jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    )


def test_kron_of_a_conv_with_one_output_location_is_exact_for_one_datum(generator):
    model = tiny_cnn(3)  # a 3x3 kernel on a 3x3 image: a single output location
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("classification", 1, generator=generator))])
    dense = dense_ggn(model, x, "classification")
    size = layer_sizes(model)[0]
    conv_block = torch.kron(la.curvature.output_factors[0], la.curvature.input_factors[0])
    torch.testing.assert_close(conv_block, dense[:size, :size])


@pytest.mark.parametrize("image", [3, 5])  # one location (d_out > 2 L: rows), 9 (blocks: channel_gram)
def test_conv_output_factor_sums_the_ggn_of_every_location(image, generator):
    """Expand's G of a conv: Σ_n Σ_l J_nlᵀ H_n J_nl, J_nl the Jacobian of the outputs w.r.t. location l's channels."""
    model = tiny_cnn(image)
    x = torch.randn(4, 2, image, image, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit([(x, targets("classification", 4, generator=generator))])
    pre_activation = model[0](x)
    head = nn.Sequential(*model[1:])
    jac = torch.func.vmap(torch.func.jacrev(lambda z: head(z.unsqueeze(0))[0]))(pre_activation)  # (N, C, d, H, W)
    jac = jac.flatten(3)  # (N, C, d, L)
    expected = torch.einsum("ncdl,nce,nefl->df", jac, output_hessians(model, x, "classification"), jac)
    torch.testing.assert_close(la.curvature.output_factors[0], expected)


@pytest.mark.parametrize("image", [5, 7])  # 7: more locations (25) than C d_G (9), the patch sum rotated after
@pytest.mark.parametrize("locations_per_class", [0, 100])  # through the rotated Jacobian / the location kernel
def test_kron_glm_covariance_of_a_cnn_equals_its_dense_form(image, locations_per_class, generator, monkeypatch):
    monkeypatch.setattr(shared_weights, "LOCATIONS_PER_CLASS", locations_per_class)
    model = tiny_cnn(image)
    x = torch.randn(5, 2, image, image, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=0.5)
    la.fit([(x, targets("classification", 5, generator=generator))])
    c = la.curvature
    blocks = [
        torch.kron(g, a) / (c.num_data * locations)
        for a, g, locations in zip(c.input_factors, c.output_factors, c.locations, strict=True)
    ]
    assert c.locations == [(image - 2) ** 2, 1]
    precision = torch.block_diag(*blocks) + 0.5 * torch.eye(sum(layer_sizes(model)), dtype=torch.float64)
    x_test = torch.randn(2, 2, image, image, dtype=torch.float64, generator=generator)
    jac = augmented_jacobian(model, x_test)
    expected = jac @ torch.linalg.solve(precision, jac.transpose(1, 2))
    torch.testing.assert_close(la.functional_variance(x_test)[1], expected)
    torch.testing.assert_close(la.functional_variance_diagonal(x_test)[1], expected.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize(
    "conv, message",
    [
        (
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
            r"needs padding_mode='zeros'; got padding_mode='reflect'",
        ),
        (nn.Conv2d(2, 4, 2, padding="same"), r"has padding='same' with an even kernel \(2, 2\)"),
    ],
    ids=["reflect", "same-even-kernel"],
)
def test_unsupported_convolutions_are_refused_by_name(conv, message):
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) " + message):
        Laplace(model, "classification", subset_of_weights="all")


def test_kfac_preconditions_one_group_convolutions_and_leaves_grouped_ones_their_gradient(generator):
    model = grouped_cnn()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=0.1)
    assert [layer.name for layer in pre._layers] == ["0", "9"]  # the 'same'-padded conv and the head
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64, generator=generator)
    y = targets("classification", 6, generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    pre.step()
    for name, p in model.named_parameters():
        if name.startswith(("3.", "5.", "1.")):  # the grouped convolutions and the BatchNorm: untouched
            torch.testing.assert_close(p.grad, plain[name], rtol=0, atol=0)
        else:
            assert not torch.allclose(p.grad, plain[name])


def test_grouped_convolution_blocks_too_large_are_refused_before_the_fit(monkeypatch):
    monkeypatch.setattr(memory, "MEMORY_LIMIT_GIB", 1e-6)  # 1 KiB; the depthwise layer's blocks are 4 x 9 x 9
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.Flatten(), nn.Linear(4, 2, bias=False))
    with pytest.raises(
        memory.AllocationTooLargeError,
        match=r"layer '0''s unit-wise curvature blocks would need .*\(4, 9, 9\).*'diag'",
    ):
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")


def test_a_singular_grouped_convolution_block_is_refused_by_name(generator):
    model = grouped_cnn()  # one image: the depthwise filters' 10 x 10 blocks have rank at most 2
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=0.0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=generator)
    la.fit([(x, targets("classification", 1, generator=generator))])
    for call in (lambda: la(x), lambda: la.sample(2)):
        with pytest.raises(ValueError, match="grouped Conv2d's per-channel precision block is not positive definite"):
            call()
    with pytest.raises(ValueError, match="needs a positive prior precision"):
        la.log_marginal_likelihood()
