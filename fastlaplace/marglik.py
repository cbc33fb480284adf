"""Training with the prior precision (and noise) tuned online by the Laplace evidence.

The network is trained on its negative log joint, and every ``marglik_frequency`` epochs
a Laplace posterior is fitted and the hyperparameters take ``n_hypersteps`` Adam steps on
the negative log marginal likelihood (Immer et al. 2021, laplace-torch's
``marglik_training``). The weights of the epoch with the best evidence are kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import trange

from fastlaplace.curvature import summed_negative_log_likelihood
from fastlaplace.curvature.model_io import call_model
from fastlaplace.laplace import Laplace
from fastlaplace.posterior import ParametricLaplace

PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")


def marglik_training(
    model: nn.Module,
    train_loader: Iterable,
    likelihood: str = "classification",
    hessian_structure: str = "kron",
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict | None = None,
    scheduler_cls: type | None = None,
    scheduler_kwargs: dict | None = None,
    n_epochs: int = 300,
    lr_hyp: float = 0.1,
    prior_structure: str = "layerwise",
    n_epochs_burnin: int = 0,
    n_hypersteps: int = 10,
    marglik_frequency: int = 1,
    prior_prec_init: float = 1.0,
    sigma_noise_init: float = 1.0,
    temperature: float = 1.0,
    fix_sigma_noise: bool = False,
    progress_bar: bool = False,
    **laplace_options,
) -> tuple[ParametricLaplace, nn.Module, list[float], list[float]]:
    """Train ``model`` while tuning its prior precision (and σ for regression) by the evidence.

    The per-datum training loss is ``(Σ_n ℓ_n / T + ½ Σ_l δ_l ‖θ_l‖²) / N`` with ℓ the
    cross-entropy or ``‖f − y‖² / (2σ²)``, θ_l the ``[W | b]`` of the posterior's layer l.
    The epochs train in the mode the model is given in (dropout on in training mode); the
    posteriors are fitted with it in eval mode, as laplace-torch's, and the model is handed
    back in its given mode (in training mode, call ``model.eval()`` before predicting).

    Args:
        model: the network; trained in place.
        train_loader: re-iterable ``(x, y)`` (or dict) batches.
        likelihood: ``"classification"``, ``"regression"`` or ``"heteroscedastic_regression"``
            (σ is then the model's own output, and not tuned).
        hessian_structure: of the posteriors fitted on the way (over all layers).
        optimizer_cls: the weights' optimiser class.
        optimizer_kwargs: its arguments (``lr``, ...).
        scheduler_cls: optional learning-rate scheduler class, stepped per batch.
        scheduler_kwargs: its arguments.
        n_epochs: training epochs.
        lr_hyp: Adam's learning rate on the log hyperparameters.
        prior_structure: ``"scalar"``, ``"layerwise"`` (one δ per layer, ``[W | b]``
            together; laplace-torch has one per parameter tensor) or ``"diag"`` (one per
            parameter; not with Kron).
        n_epochs_burnin: epochs before the first hyperparameter update.
        n_hypersteps: Adam steps per update.
        marglik_frequency: epochs between updates.
        prior_prec_init: initial δ.
        sigma_noise_init: initial σ (regression).
        temperature: T of the posterior and the loss.
        fix_sigma_noise: keep σ at its initial value.
        progress_bar: show a tqdm bar over the epochs.
        **laplace_options: further ``Laplace(...)`` options (``curvature_mode``, ...).

    Returns:
        ``(la, model, margliks, losses)``: a posterior fitted with the best hyperparameters at
        the best weights, the model (holding those weights), the negative log marginal
        likelihood after every hyperparameter step and the training loss per epoch.

    Raises:
        ValueError: for an unknown ``prior_structure``, ``hessian_structure="gp"``, a
            one-shot iterator, non-positive counts, a non-positive or non-finite ``lr_hyp``,
            ``prior_prec_init`` or ``sigma_noise_init``, an empty loader or invalid batches; the
            model then keeps the weights it was given.
    """
    if prior_structure not in PRIOR_STRUCTURES:
        raise ValueError(f"prior_structure must be one of {PRIOR_STRUCTURES}, got {prior_structure!r}")
    if hessian_structure == "gp":
        raise ValueError("marglik_training needs a weight-space posterior: hessian_structure='gp' is not supported")
    if iter(train_loader) is train_loader:
        raise ValueError(
            "marglik_training reads train_loader once per epoch: pass a DataLoader or a list, not an iterator"
        )
    for name, value in (
        ("n_epochs", n_epochs),
        ("n_hypersteps", n_hypersteps),
        ("marglik_frequency", marglik_frequency),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(n_epochs_burnin, bool) or not isinstance(n_epochs_burnin, int) or n_epochs_burnin < 0:
        raise ValueError(f"n_epochs_burnin must be a non-negative integer, got {n_epochs_burnin!r}")
    # the hyperparameters are optimised as logarithms: their starting values must be positive
    for name, value in (
        ("lr_hyp", lr_hyp),
        ("prior_prec_init", prior_prec_init),
        ("sigma_noise_init", sigma_noise_init),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    initial_weights = copy.deepcopy(model.state_dict())
    try:
        regression = likelihood == "regression"

        def posterior(prior: Tensor, sigma: Tensor) -> ParametricLaplace:
            options = {"sigma_noise": float(sigma.detach())} if regression else {}
            return Laplace(
                model,
                likelihood,
                subset_of_weights="all",
                hessian_structure=hessian_structure,
                prior_precision=_expand(prior.detach()),
                temperature=temperature,
                **options,
                **laplace_options,
            )

        probe = posterior(torch.tensor(prior_prec_init), torch.tensor(sigma_noise_init))
        if prior_structure == "diag" and not probe.supports_prior_per_parameter:
            raise ValueError(
                f"prior_structure='diag' needs a structure with a prior per parameter; "
                f"hessian_structure={hessian_structure!r} takes one per layer: use 'layerwise' or 'scalar'"
            )
        sizes = {"scalar": 1, "layerwise": len(probe.layers), "diag": sum(probe.layer_sizes())}[prior_structure]
        options = {"dtype": probe.dtype, "device": probe.device}
        log_prior = torch.full((sizes,), float(prior_prec_init), **options).log().requires_grad_(True)
        log_sigma = (
            torch.tensor(float(sigma_noise_init), **options).log().requires_grad_(regression and not fix_sigma_noise)
        )
        hyper_optimiser = torch.optim.Adam([log_prior] + ([log_sigma] if log_sigma.requires_grad else []), lr=lr_hyp)
        optimiser = optimizer_cls(model.parameters(), **(optimizer_kwargs or {}))
        scheduler = None if scheduler_cls is None else scheduler_cls(optimiser, **(scheduler_kwargs or {}))

        size = _data_size(train_loader, probe)
        margliks: list[float] = []
        losses: list[float] = []
        best = (float("inf"), copy.deepcopy(model.state_dict()), log_prior.detach().exp(), log_sigma.detach().exp())
        for epoch in trange(1, n_epochs + 1, disable=not progress_bar, desc="marglik training"):
            losses.append(
                _train_epoch(model, train_loader, size, probe, optimiser, scheduler, log_prior, log_sigma, temperature)
            )
            if epoch % marglik_frequency != 0 or epoch <= n_epochs_burnin:
                continue
            la = posterior(log_prior.exp(), log_sigma.exp())
            with _in_eval_mode(model):
                la.fit(train_loader)
            for _ in range(n_hypersteps):
                hyper_optimiser.zero_grad()
                sigma = log_sigma.exp() if log_sigma.requires_grad else None
                negative = -la.log_marginal_likelihood(_expand(log_prior.exp()), sigma)
                negative.backward()
                hyper_optimiser.step()
                margliks.append(negative.item())
            if margliks[-1] < best[0]:
                best = (
                    margliks[-1],
                    copy.deepcopy(model.state_dict()),
                    log_prior.detach().exp(),
                    log_sigma.detach().exp(),
                )
        model.load_state_dict(best[1])
        la = posterior(best[2], best[3])
        with _in_eval_mode(model):
            la.fit(train_loader)
        return la, model, margliks, losses
    except BaseException:
        model.load_state_dict(initial_weights)  # a failed training leaves the model as it was given
        raise


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) for the duration; every module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _expand(prior: Tensor) -> Tensor:
    """A one-entry prior as a scalar (broadcast over the layers), others as they are."""
    return prior.reshape(()) if prior.numel() == 1 else prior


def _data_size(loader: Iterable, probe: ParametricLaplace) -> int:
    """N: the loader's dataset size, or its batches counted once."""
    if hasattr(loader, "dataset"):
        size = len(loader.dataset)
    else:
        size = sum(len(b[probe.dict_key_y]) if isinstance(b, Mapping) else len(b[1]) for b in loader)
    if size == 0:
        raise ValueError("the loader yielded no data")
    return size


def _train_epoch(model, loader, size, probe, optimiser, scheduler, log_prior, log_sigma, temperature) -> float:
    """One epoch on the per-datum negative log joint; returns its mean over the data."""
    total, count = 0.0, 0
    deltas = probe._prior_per_layer(probe._checked_prior(_expand(log_prior.detach().exp())))
    precision = probe._to_parameter_order([d.expand_as(w) for d, w in zip(deltas, probe.layer_weights(), strict=True)])
    sigma = log_sigma.detach().exp()
    for batch in loader:
        x, y = probe._split_batch(batch)
        probe._check_targets(y, probe._batch_size(x))
        optimiser.zero_grad()
        output = call_model(model, x, training=True)
        probe._check_outputs(output, y)
        noise = sigma if probe.likelihood == "regression" else None
        data_term = summed_negative_log_likelihood(output, y, probe._likelihood(True), noise)
        theta = torch.cat([p.flatten() for p in probe._layer_parameters()])
        prior_term = 0.5 * (precision * theta.square()).sum()
        loss = (data_term / temperature + prior_term * len(y) / size) / len(y)
        loss.backward()
        optimiser.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
    if count == 0:
        raise ValueError("train_loader yielded no batch in an epoch")
    return total / count
