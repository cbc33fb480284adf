"""Joint GLM predictive over a batch, diagonal outputs, and reward modelling (laplace-torch's meanings)."""

import pytest
import torch
from dense import augmented_jacobian, dense_ggn, targets, tiny_cnn, tiny_mlp
from test_layers import token_ids, token_model
from torch import nn

from fastlaplace import Laplace

MODELS = {
    "cnn": (lambda: tiny_cnn(5), lambda n, g: torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=g)),
    "tokens": (token_model, token_ids),
    "mlp": (lambda: tiny_mlp(True), lambda n, g: torch.randn(n, 3, dtype=torch.float64, generator=g)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("structure", ["diag", "full", "lowrank", "kron"])
def test_joint_covariance_equals_the_dense_form(name, structure, generator):
    make_model, make_inputs = MODELS[name]
    model = make_model()
    x = make_inputs(1, generator)  # one datum: Kron exact for vector Linear layers, low rank 3 covers it
    y = targets("regression", 1, generator=generator)
    options = {"low_rank": 3} if structure == "lowrank" else {}
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure=structure, **options)
    la.fit([(x, y)])
    x_test = make_inputs(3, generator)
    mean, cov = la(x_test, joint=True)
    assert mean.shape == (9,) and cov.shape == (9, 9)
    torch.testing.assert_close(mean, model(x_test).detach().flatten())
    marginal = la.functional_variance(x_test)[1]
    blocks = cov.view(3, 3, 3, 3)
    torch.testing.assert_close(torch.stack([blocks[n, :, n] for n in range(3)]), marginal)
    if structure == "kron" and name != "mlp":
        return  # K-FAC is not exact for shared weights; the marginal blocks above are its test
    ggn = dense_ggn(model, x, "regression")
    if structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    elif structure == "kron":  # tiny_mlp(True): [W | b] blocks of 4 x (3 + 1), then 3 x (4 + 1)
        ggn = torch.block_diag(ggn[:16, :16], ggn[16:, 16:])
    jac = augmented_jacobian(model, x_test).flatten(0, 1)
    precision = ggn + torch.eye(ggn.shape[0], dtype=torch.float64)
    torch.testing.assert_close(cov, jac @ torch.linalg.solve(precision, jac.T))


def test_diagonal_output_and_sampled_network_leave_out_the_noise(generator):
    model = tiny_mlp(True)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    y = targets("regression", 6, generator=generator)
    # Last layer: the output is linear in the posterior's weights, so the sampled network is the GLM.
    la = Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="full", sigma_noise=0.5)
    la.fit([(x, y)])
    mean, cov = la(x)
    _, variance = la(x, diagonal_output=True)
    torch.testing.assert_close(variance, cov.diagonal(dim1=1, dim2=2))
    _, std = la.predict(x)
    torch.testing.assert_close(std, (variance + 0.25).sqrt())
    _, sampled = la(x, pred_type="nn", n_samples=20000, generator=torch.Generator().manual_seed(0))
    assert (sampled - variance).abs().max() < 0.1 * variance.max(), "the sampled variance excludes σ² too"


def test_mc_link_with_diagonal_output_samples_each_logit_independently(generator):
    model = tiny_mlp(True)
    x = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 4, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="full")
    la.fit([(x, y)])
    mean, cov = la.functional_variance(x[:2])
    draws = torch.randn(40000, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = (mean + draws * cov.diagonal(dim1=1, dim2=2).sqrt()).softmax(-1).mean(0)
    got = la(x[:2], link_approx="mc", n_samples=40000, diagonal_output=True)
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)


def test_reward_model_fits_as_a_classifier_and_predicts_as_a_regressor(generator):
    model = tiny_mlp(True, classes=2)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 8, classes=2, generator=generator)
    reward = Laplace(model, "reward_modeling", subset_of_weights="all", hessian_structure="kron")
    reward.fit([(x, y)])
    classifier = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    classifier.fit([(x, y)])
    torch.testing.assert_close(reward.log_marginal_likelihood(), classifier.log_marginal_likelihood())
    mean, cov = reward(x)
    expected_mean, expected_cov = classifier.functional_variance(x)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(cov, expected_cov)
    torch.testing.assert_close(reward(x, fitting=True), classifier(x))
    with pytest.raises(ValueError, match="sigma_noise must be 1 for reward_modeling"):
        Laplace(model, "reward_modeling", sigma_noise=2.0)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        Laplace(model, "ranking")


def test_joint_is_for_regression_only(generator):
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x, targets("classification", 3, classes=2, generator=generator))])
    torch.testing.assert_close(la(x, joint=True), la(x))  # as laplace-torch: joint ignored for classification
