"""The kron GLM predictive in chunks of inputs and of rotated Jacobians equals the one-shot computation.

The one-shot form is checked against the dense ``J P⁻¹ Jᵀ`` in tests/test_conv.py.
"""

import torch
from dense import targets
from resnets import cifar_resnet18

from fastlaplace import Laplace
from fastlaplace.posterior import kron, shared_weights


def test_chunked_kron_glm_covariance_of_a_resnet_equals_the_one_shot_form(generator, monkeypatch):
    model = cifar_resnet18(width=2, classes=3).double()
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64, generator=generator)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=0.5)
    la.fit([(x, targets("classification", 5, generator=generator))])
    x_test = torch.randn(7, 3, 32, 32, dtype=torch.float64, generator=generator)
    monkeypatch.setattr(kron, "PREDICTIVE_CHUNK", 100)
    monkeypatch.setattr(shared_weights, "ROTATED_JACOBIAN_BYTES", 1 << 40)
    mean, one_shot = la.functional_variance(x_test)
    monkeypatch.setattr(kron, "PREDICTIVE_CHUNK", 3)  # chunks of 3, 3 and 1 inputs
    monkeypatch.setattr(shared_weights, "ROTATED_JACOBIAN_BYTES", 1)  # one sample at a time
    chunked_mean, chunked = la.functional_variance(x_test)
    torch.testing.assert_close(chunked_mean, mean, rtol=1e-13, atol=1e-15)  # batch size changes conv rounding
    torch.testing.assert_close(chunked, one_shot, rtol=1e-13, atol=1e-15)
