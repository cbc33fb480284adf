"""The ``Laplace(...)`` factory with laplace-torch's arguments, validated in one place."""

from __future__ import annotations

import difflib
import functools

from torch import nn

from fastlaplace.posterior import (
    BaseLaplace,
    DiagLaplace,
    EKFACLaplace,
    FullLaplace,
    FunctionalLaplace,
    KronLaplace,
    LowRankLaplace,
)

SUBSETS_OF_WEIGHTS = ("all", "last_layer", "subnetwork")
HESSIAN_STRUCTURES = ("diag", "kron", "ekfac", "full", "lowrank", "gp")
OPTIONS = (
    "sigma_noise",
    "prior_precision",
    "prior_mean",
    "temperature",
    "curvature_mode",
    "kfac_approx",
    "dict_key_x",
    "dict_key_y",
    "subnetwork_indices",
    "low_rank",
    "curvature_dtype",
    "enable_backprop",
    "damping",
    "max_dense_factor",
    "factor_rank",
    "last_layer_name",
    "feature_reduction",
    "n_subset",
    "independent_outputs",
    "seed",
    "likelihood_hessian",
    "functional_approximation",
)
#: the options of hessian_structure="gp" alone
GP_OPTIONS = ("n_subset", "independent_outputs", "seed", "likelihood_hessian", "functional_approximation")
POSTERIORS = {
    ("all", "kron"): KronLaplace,
    ("all", "diag"): DiagLaplace,
    ("last_layer", "kron"): functools.partial(KronLaplace, last_layer_only=True),
    ("all", "ekfac"): EKFACLaplace,
    ("last_layer", "ekfac"): functools.partial(EKFACLaplace, last_layer_only=True),
    ("last_layer", "diag"): functools.partial(DiagLaplace, last_layer_only=True),
    ("all", "full"): FullLaplace,
    ("last_layer", "full"): functools.partial(FullLaplace, last_layer_only=True),
    ("subnetwork", "full"): FullLaplace,
    ("all", "lowrank"): LowRankLaplace,
    ("last_layer", "lowrank"): functools.partial(LowRankLaplace, last_layer_only=True),
    ("all", "gp"): FunctionalLaplace,
    ("last_layer", "gp"): functools.partial(FunctionalLaplace, last_layer_only=True),
}


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def Laplace(  # noqa: N802 (the name laplace-torch users call)
    model: nn.Module,
    likelihood: str,
    subset_of_weights: str = "last_layer",
    hessian_structure: str = "kron",
    **options,
) -> BaseLaplace:
    """A Laplace posterior of ``model`` with laplace-torch's arguments.

    Args:
        model: the trained network; its output must be ``(N, C)``.
        likelihood: ``"classification"``, ``"regression"``, ``"reward_modeling"`` or
            ``"heteroscedastic_regression"`` (the model outputs C means, then C log-variances).
        subset_of_weights: ``"all"``, ``"last_layer"`` or ``"subnetwork"`` (with
            ``hessian_structure="full"`` and ``subnetwork_indices``).
        hessian_structure: ``"kron"``, ``"ekfac"`` (Kron's eigenbasis with the exact curvature
            diagonal in it, :class:`~fastlaplace.posterior.EKFACLaplace`), ``"diag"``,
            ``"full"``, ``"lowrank"`` or ``"gp"`` (function space).
        **options: ``sigma_noise``, ``prior_precision`` (scalar or one per layer),
            ``prior_mean``, ``temperature``, ``curvature_mode`` (``"ggn"``, ``"mc"``, ``"ef"``),
            ``curvature_dtype`` (``torch.bfloat16`` / ``torch.float16``: the fit's matrix
            products in that precision, factors still accumulated in fp32; default exact),
            ``enable_backprop`` (predictive mean and (co)variance differentiable w.r.t. x),
            ``last_layer_name`` and ``feature_reduction`` (``"pick_first"``, ``"pick_last"``,
            ``"average"``) for a last layer inside the model (sequence models),
            ``dict_key_x`` / ``dict_key_y`` (the inputs' and targets' keys in dict batches,
            default ``"input_ids"`` / ``"labels"``; the whole dict goes to the model), for
            Kron and EKFAC ``kfac_approx`` (``"expand"`` or ``"reduce"``), ``max_dense_factor``
            (default 8192) and ``factor_rank`` (default 256: a factor of larger side is kept as
            its top eigenpairs, see :class:`~fastlaplace.posterior.KronLaplace`), for Kron alone
            ``damping`` (True: the prior added to each factor, laplace-torch's option), for a subnetwork
            ``subnetwork_indices`` (indices into the parameters in ``named_parameters()`` order),
            for low rank ``low_rank`` (eigenpairs kept, default 10), for ``"gp"``
            (:class:`~fastlaplace.posterior.FunctionalLaplace`) ``n_subset`` (required),
            ``independent_outputs``, ``seed``, ``likelihood_hessian`` and
            ``functional_approximation`` (``"sod"`` only).

    Returns:
        The posterior; call ``fit(loader)`` next.

    Raises:
        TypeError: for an unknown option (the closest valid one is named).
        ValueError: for an unknown or not yet available value.
    """
    for name in options:
        if name not in OPTIONS:
            known = ("subset_of_weights", "hessian_structure", *OPTIONS)
            raise TypeError(f"Laplace() got an unexpected argument {name!r}{_closest(name, known)}")
    if subset_of_weights not in SUBSETS_OF_WEIGHTS:
        raise ValueError(
            f"subset_of_weights must be one of {SUBSETS_OF_WEIGHTS}, got {subset_of_weights!r}"
            f"{_closest(subset_of_weights, SUBSETS_OF_WEIGHTS)}"
        )
    if hessian_structure not in HESSIAN_STRUCTURES:
        raise ValueError(
            f"hessian_structure must be one of {HESSIAN_STRUCTURES}, got {hessian_structure!r}"
            f"{_closest(hessian_structure, HESSIAN_STRUCTURES)}"
        )
    posterior = POSTERIORS.get((subset_of_weights, hessian_structure))
    if posterior is None:
        available = ", ".join(f"{s}/{h}" for s, h in POSTERIORS)
        raise ValueError(
            f"subset_of_weights={subset_of_weights!r} with hessian_structure={hessian_structure!r} "
            f"is not available yet; available: {available}"
        )
    if (subset_of_weights == "subnetwork") != ("subnetwork_indices" in options):
        raise TypeError("subnetwork_indices is needed with, and only with, subset_of_weights='subnetwork'")
    for kron_only in ("kfac_approx", "max_dense_factor", "factor_rank"):
        if kron_only in options and hessian_structure not in ("kron", "ekfac"):
            raise TypeError(f"{kron_only} applies to hessian_structure='kron' or 'ekfac' only")
    if "damping" in options and hessian_structure != "kron":
        raise TypeError("damping applies to hessian_structure='kron' only")
    if "low_rank" in options and hessian_structure != "lowrank":
        raise TypeError("low_rank applies to hessian_structure='lowrank' only")
    for gp_only in GP_OPTIONS:
        if gp_only in options and hessian_structure != "gp":
            raise TypeError(f"{gp_only} applies to hessian_structure='gp' only")
    if hessian_structure == "gp":
        if "n_subset" not in options:
            raise TypeError("hessian_structure='gp' needs n_subset (the number of training points of the GP)")
        if options.pop("functional_approximation", "sod") != "sod":
            raise ValueError("functional_approximation: only 'sod' (subset of data) is available")
    return posterior(model, likelihood, **options)
