"""The fused CUDA operators queue their launches without waiting for the GPU.

A host synchronisation inside an op that runs at every training step (a job table copied
from pageable memory, a ``.item()``) stalls the host behind all the GPU's earlier work.
torch's sync debug mode turns each synchronisation it makes into an error. The ops are
called through ``torch.ops`` directly: the Python wrappers' argument checks synchronise on
purpose (they read values to name a bad one).
"""

import pytest
import torch
from conftest import CUDA_REASON, eigen_layer, random_spd, requires_extension

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def fused_calls():
    """Each fused op on small CUDA inputs (made before the check: a host-to-device copy waits)."""
    requires_extension()
    fl = torch.ops.fastlaplace
    cuda = {"device": "cuda", "dtype": torch.float32}
    qa, la, qg, lg, a, g = (t.to(**cuda) for t in eigen_layer(7, 5))
    scale, delta, kl = torch.ones(1, **cuda), torch.full((1,), 0.1, **cuda), torch.full((1,), 1e3, **cuda)
    inputs = torch.randn(9, 6, **cuda)
    factors = [torch.zeros(7, 7, **cuda)]
    image, conv_factor = torch.randn(2, 3, 5, 5, **cuda), torch.zeros(28, 28, **cuda)
    spectrum = 1 / (scale * torch.outer(lg, la) + delta)
    inverse_a, inverse_g = (torch.linalg.inv(random_spd(n).to(**cuda) + torch.eye(n, **cuda)) for n in (7, 5))
    jacobians = torch.randn(3, 9, 5, **cuda).transpose(0, 1)  # a batched backward's (C, N, d_G) storage
    return {
        "factor_accumulate_": lambda: fl.factor_accumulate_(factors, [inputs], [True], 1.0, 0.95),
        "conv_input_factor_": lambda: fl.conv_input_factor_(
            conv_factor, image, [3, 3], [1, 1], [1, 1], [1, 1], True, 1.0, 1.0
        ),
        "diag_ggn": lambda: fl.diag_ggn([inputs], [torch.randn(9, 5, **cuda)], [True]),
        "kron_solve": lambda: fl.kron_solve([qa], [la], [qg], [lg], [torch.randn(5, 7, **cuda)], scale, delta, -1.0),
        "kron_logdet": lambda: fl.kron_logdet([la], [lg], scale, delta),
        "kron_precondition_": lambda: fl.kron_precondition_(
            [torch.randn(5, 6, **cuda), torch.randn(5, **cuda)], [2], [qa], [qg], [spectrum], kl
        ),
        "kron_inverse_precondition_": lambda: fl.kron_inverse_precondition_(
            [torch.randn(5, 6, **cuda), torch.randn(5, **cuda)], [2], [inverse_a], [inverse_g], kl
        ),
        "kron_predictive_variance": lambda: fl.kron_predictive_variance(
            [inputs], [jacobians], [qa], [la], [qg], [lg], scale, delta, [True], True
        ),
        "kron_predictive_variance, last layer": lambda: fl.kron_predictive_variance(
            [inputs], [None], [qa], [la], [qg], [lg], scale, delta, [True], False
        ),
    }


def test_fused_ops_never_wait_for_the_gpu():
    calls = fused_calls()
    for call in calls.values():  # first calls: allocator and handle set-up may synchronise
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, call in calls.items():
            try:
                call()
            except RuntimeError as error:
                pytest.fail(f"{name} synchronised with the GPU: {error}")
    finally:
        torch.cuda.set_sync_debug_mode(0)
