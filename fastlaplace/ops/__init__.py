"""Typed wrappers of the ``torch.ops.fastlaplace`` operators, one module per operator.

Every wrapper validates its arguments (errors name the argument and the layer index), then
calls the compiled operator, or the pure-PyTorch version of :mod:`fastlaplace.reference`
where the extension is missing (see :mod:`fastlaplace.ops._extension`). Each operator's
module also registers its fake kernel, so that the operators trace under ``torch.compile``;
``kron_logdet`` is differentiable in ``scale`` and ``delta``, ``kron_predictive_variance``
in its inputs and output Jacobians.

:data:`OPS` is the one list of the public operators: the tests derive theirs from it, and
``tests/test_op_inventory.py`` checks that each has its schema, kernels, wrapper, fake,
reference and test file (docs/design.md, "How to add an operator").
"""

from fastlaplace.ops._extension import build_info as build_info
from fastlaplace.ops._extension import extension_loaded as extension_loaded
from fastlaplace.ops.batched_eigh import batched_eigh as batched_eigh
from fastlaplace.ops.conv_input_factor import conv_input_factor_ as conv_input_factor_
from fastlaplace.ops.damped_inverses import damped_inverses as damped_inverses
from fastlaplace.ops.diag_ggn import diag_ggn as diag_ggn
from fastlaplace.ops.ekfac_scales import ekfac_scales_ as ekfac_scales_
from fastlaplace.ops.factor_accumulate import factor_accumulate_ as factor_accumulate_
from fastlaplace.ops.kron_inverse_precondition import kron_inverse_precondition_ as kron_inverse_precondition_
from fastlaplace.ops.kron_logdet import kron_logdet as kron_logdet
from fastlaplace.ops.kron_precondition import kron_precondition_ as kron_precondition_
from fastlaplace.ops.kron_predictive_variance import kron_predictive_variance as kron_predictive_variance
from fastlaplace.ops.kron_solve import kron_solve as kron_solve

#: the public operators, by their ``torch.ops.fastlaplace`` names (in-place ones end in ``_``)
OPS = (
    "factor_accumulate_",
    "conv_input_factor_",
    "diag_ggn",
    "batched_eigh",
    "damped_inverses",
    "kron_solve",
    "kron_precondition_",
    "kron_inverse_precondition_",
    "kron_logdet",
    "kron_predictive_variance",
    "ekfac_scales_",
)

__all__ = ["OPS", "build_info", "extension_loaded", *OPS]
