"""What a model's layers contribute to the curvature of the loss.

:func:`layer_statistics` runs one batch and returns, for every supported layer, its
inputs and the output gradients whose outer products make up the GGN (exact), the
Monte-Carlo Fisher or the empirical Fisher. :class:`KronCurvature` and
:class:`DiagCurvature` accumulate them over batches with the fused operators.
"""

from fastlaplace.curvature.accumulate import DiagCurvature, KronCurvature
from fastlaplace.curvature.last_layer import FEATURE_REDUCTIONS, LastLayerModel, last_layer
from fastlaplace.curvature.loss import (
    LIKELIHOODS,
    MODES,
    output_gradient_columns,
    split_heteroscedastic,
    summed_negative_log_likelihood,
)
from fastlaplace.curvature.statistics import (
    LayerStatistics,
    layer_statistics,
    output_jacobians,
    supported_layers,
    trainable_bias,
    weight_matrix,
)

__all__ = [
    "LIKELIHOODS",
    "MODES",
    "FEATURE_REDUCTIONS",
    "DiagCurvature",
    "KronCurvature",
    "LastLayerModel",
    "LayerStatistics",
    "last_layer",
    "layer_statistics",
    "output_gradient_columns",
    "output_jacobians",
    "split_heteroscedastic",
    "summed_negative_log_likelihood",
    "supported_layers",
    "trainable_bias",
    "weight_matrix",
]
