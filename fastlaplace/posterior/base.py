"""What every Laplace posterior shares: fitting, marginal likelihood, predictives."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fastlaplace.curvature import (
    LIKELIHOODS,
    MODES,
    LastLayerModel,
    last_layer,
    memory,
    output_jacobians,
    split_heteroscedastic,
    summed_negative_log_likelihood,
    supported_layers,
    trainable_bias,
    weight_matrix,
)
from fastlaplace.curvature.loss import check_class_labels
from fastlaplace.curvature.memory import check_allocation
from fastlaplace.curvature.statistics import all_finite
from fastlaplace.posterior.inference_mode import shield_public_methods
from fastlaplace.predictive import laplace_bridge, probit, sampled_softmax


def _own_parameters(module: nn.Module) -> list[Tensor]:
    bias = trainable_bias(module)
    return [module.weight] if bias is None else [module.weight, bias]


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside fastlaplace."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1  # the caller of this function is warnings.warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has bf16 / fp16 matrix units (AVX-512 BF16, AMX); without them torch emulates the type."""
    names = (
        ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        if dtype == torch.bfloat16
        else ("_is_amx_fp16_supported",)
    )
    return any(getattr(torch.cpu, name, lambda: False)() for name in names)


#: laplace-torch's likelihoods (reward models are fitted as classifiers, predict as regressors)
#: and heteroscedastic regression (the model outputs means and log-variances)
POSTERIOR_LIKELIHOODS = (*LIKELIHOODS, "reward_modeling")
#: likelihoods whose predictive is a Gaussian over the outputs f
GAUSSIAN_OUTPUTS = ("regression", "heteroscedastic_regression")
#: the ``link_approx`` values of a classification GLM predictive
LINK_APPROXES = ("probit", "bridge", "bridge_norm", "mc")
#: integer label dtypes read as int64 class indices
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.uint8)


def _numeric(value: float | Tensor, name: str, **to) -> Tensor:
    """``torch.as_tensor(value, **to)``, or a TypeError naming ``name`` for a value that is not numeric."""
    try:
        return torch.as_tensor(value, **to)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__} {value!r:.60}") from error


def _finite_moments(mean: Tensor, spread: Tensor) -> tuple[Tensor, Tensor]:
    """The GLM's mean and (co)variance, refused when the (co)variance overflowed its dtype."""
    if not all_finite(spread):
        raise ValueError(
            f"the GLM predictive's variance is not finite in {spread.dtype} (the largest |output| is "
            f"{float(mean.abs().max()):.3g}): the linearised predictive overflows; use a float64 model"
        )
    return mean, spread


class BaseLaplace(ABC):
    """What every Laplace posterior over a model's supported layers shares: the GLM predictive and the evidence.

    Weight-space posteriors (a Gaussian ``N(θ*, P⁻¹)`` over the weights) derive from
    :class:`~fastlaplace.posterior.parametric.ParametricLaplace`; the function-space (GP)
    one from this class directly.

    With ``last_layer_only`` the posterior covers the last layer alone (the model's last
    module must be the nn.Linear that produces the output, or ``last_layer_name`` names
    it: the model is then seen as that layer applied to its input features, reduced over
    tokens by ``feature_reduction``; see :class:`LastLayerModel`); the rest stays at θ*.

    ``P = H / (σ² T) + δ`` with H the curvature (GGN or Fisher) of the summed loss over
    the data (cross-entropy, or ½‖f − y‖² for regression), σ the observation noise
    (regression only), T the temperature and δ the prior precision (a scalar, one per
    layer or one per parameter). Subclasses define the structure of H.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        shield_public_methods(cls)  # every posterior's own methods run outside torch.inference_mode

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        sigma_noise: float | Tensor = 1.0,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float = 0.0,
        temperature: float = 1.0,
        curvature_mode: str = "ggn",
        last_layer_only: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        curvature_dtype: torch.dtype | None = None,
        enable_backprop: bool = False,
        last_layer_name: str | None = None,
        feature_reduction: str | None = None,
    ) -> None:
        if likelihood not in POSTERIOR_LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {POSTERIOR_LIKELIHOODS}, got {likelihood!r}")
        if curvature_mode not in MODES:
            raise ValueError(f"curvature_mode must be one of {MODES}, got {curvature_mode!r}")
        if curvature_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"curvature_dtype must be None, torch.bfloat16 or torch.float16, got {curvature_dtype!r}")
        if (last_layer_name is not None or feature_reduction is not None) and not last_layer_only:
            raise ValueError("last_layer_name and feature_reduction apply to subset_of_weights='last_layer'")
        if feature_reduction is not None and last_layer_name is None:
            raise ValueError("feature_reduction needs last_layer_name (the layer whose input features are reduced)")
        self.model = model if last_layer_name is None else LastLayerModel(model, last_layer_name, feature_reduction)
        self.likelihood = likelihood
        self.curvature_dtype = curvature_dtype
        self.enable_backprop = enable_backprop
        self.curvature_mode = curvature_mode
        self.last_layer_only = last_layer_only
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        if isinstance(self.model, LastLayerModel):
            self.layers = [next((n, m) for n, m in self.model.named_modules() if m is self.model.layer)]
        else:
            self.layers = last_layer(model) if last_layer_only else supported_layers(model)
        reference = self.layers[0][1].weight
        self.dtype, self.device = reference.dtype, reference.device
        if curvature_dtype is not None and self.device.type == "cpu" and not cpu_multiplies_natively(curvature_dtype):
            warnings.warn(
                f"curvature_dtype={curvature_dtype} on a CPU without {curvature_dtype} matrix units (AVX-512 BF16 / "
                "AMX): torch emulates the products and the fit is much slower than in float32 (about 30x on an "
                "AVX2 machine); leave curvature_dtype=None here",
                stacklevel=_user_stacklevel(),
            )
        self._fitted = False
        self.sigma_noise = sigma_noise
        self.temperature = temperature
        self.prior_mean = prior_mean
        self.prior_precision = prior_precision
        self.loss = 0.0
        self.num_data = 0
        self.num_outputs = 0
        self._mean: list[Tensor] = []
        self._prior_terms_cache: tuple | None = None
        self._reset_curvature()

    # ------------------------------------------------------------------ parameters

    #: whether this posterior takes a prior precision per parameter (weight-space structures but Kron)
    supports_prior_per_parameter = False
    #: the ``pred_type`` values of :meth:`__call__`
    pred_types: tuple[str, ...] = ("glm",)
    #: whether :meth:`functional_variance_diagonal` (the probit link, ``diagonal_output``) skips the covariance
    variances_without_covariance = False

    @property
    def sigma_noise(self) -> Tensor:
        """σ: a scalar, or ``(C,)`` per output for regression (a float is accepted, as in laplace-torch)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        sigma = self._checked_sigma(value).detach().clone()
        if self._fitted and (sigma.dim() == 1 or self.noise_per_output) and not torch.equal(sigma, self.sigma_noise):
            raise ValueError("a per-output sigma_noise is part of the fitted curvature: refit to change it")
        self._sigma_noise = sigma

    def _checked_sigma(self, value: float | Tensor) -> Tensor:
        """σ as a tensor of the posterior's dtype, checked: positive, finite, a scalar or ``(C,)`` for regression."""
        # float64 first: a Python float must not be rounded to float32 on its way to a float64 model
        sigma = _numeric(value, "sigma_noise", dtype=torch.float64 if not isinstance(value, Tensor) else None)
        sigma = sigma.to(dtype=self.dtype, device=self.device)
        if sigma.dim() > 1 or (sigma.dim() == 1 and self.likelihood != "regression"):
            raise ValueError(
                f"sigma_noise must be a scalar, or (C,) per output for regression; got {tuple(sigma.shape)}"
            )
        if self.likelihood != "regression" and float(sigma) != 1.0:
            raise ValueError(f"sigma_noise must be 1 for {self.likelihood}")
        if not bool(((sigma.detach() > 0) & torch.isfinite(sigma.detach())).all()):
            raise ValueError(f"sigma_noise must be positive and finite, got {sigma.detach().tolist()}")
        return sigma

    @property
    def temperature(self) -> float:
        """T, a positive finite float."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"temperature must be a positive finite number, got {value!r}")
        self._temperature = float(value)

    @property
    def prior_mean(self) -> float:
        """μ_0, a finite float (the same for every weight)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"prior_mean must be a finite number, got {value!r}")
        self._prior_mean = float(value)

    @property
    def prior_precision(self) -> Tensor:
        """``(L,)`` prior precision per layer (a scalar is broadcast), or ``(P,)`` per parameter.

        Editing the returned tensor in place is allowed (as in laplace-torch); the edit is
        checked like an assignment when the prior is next read, so a negative or non-finite
        entry raises then, naming it, instead of giving NaN answers.
        """
        prior = self._prior_precision
        if prior._version != self._prior_version:
            self._checked_prior(prior, edited=True)
            self._prior_version = prior._version
        return prior

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        prior = self._checked_prior(value)
        self._prior_precision, self._prior_version = prior, prior._version

    def _checked_prior(self, value: float | Tensor, edited: bool = False) -> Tensor:
        value = _numeric(value, "prior_precision", dtype=self.dtype, device=self.device)
        layers, parameters = len(self.layers), sum(self.layer_sizes())
        value = value.expand(layers) if value.dim() == 0 else value
        allowed = [(layers,)] + ([(parameters,)] if self.supports_prior_per_parameter else [])
        if tuple(value.shape) not in allowed:
            what = "one entry per layer" + (
                f" ({layers}) or per parameter ({parameters})" if len(allowed) > 1 else f" ({layers})"
            )
            raise ValueError(f"prior_precision must be a scalar or have {what}, got shape {tuple(value.shape)}")
        if not torch.compiler.is_compiling() and not bool(((value.detach() >= 0) & (value.detach() < math.inf)).all()):
            edit = " (it was edited in place)" if edited else ""
            raise ValueError(f"prior_precision must be non-negative and finite{edit}, got {value.detach().tolist()}")
        return value.clone() if not value.requires_grad else value

    def _is_per_layer(self, delta: Tensor) -> bool:
        """Whether a checked ``(L,)`` or ``(P,)`` prior precision has one value per layer."""
        return delta.shape[0] == len(self.layers) and delta.shape[0] != sum(self.layer_sizes())

    def _prior_per_layer(self, delta: Tensor) -> list[Tensor]:
        """Each layer's prior precision, broadcastable to its ``(d_out, d_A)`` ``[W | b]`` matrix."""
        return list(delta.unbind())

    def _prior_terms(self) -> tuple[Tensor, Tensor]:
        """``(L,)`` parameter counts and ``‖θ_l − μ_0‖²`` of each layer.

        With one δ per layer the prior's log det and scatter are dot products with them: two
        operations per evidence evaluation instead of a few per layer. Cached for the
        weights and prior mean they were computed from (the cache holds the weights' list,
        so a refit's new list cannot take its identity).
        """
        weights = self.layer_weights()
        cache = self._prior_terms_cache
        if cache is None or cache[0] is not weights or cache[1] != self.prior_mean:
            counts = torch.tensor([w.numel() for w in weights], dtype=self.dtype, device=self.device)
            squares = torch.stack([(w - self.prior_mean).square().sum() for w in weights])
            self._prior_terms_cache = cache = (weights, self.prior_mean, counts, squares)
        return cache[2], cache[3]

    def layer_weights(self) -> list[Tensor]:
        """Each layer's ``[W | b]`` as a ``(d_out, d_in + bias)`` matrix (detached; d_in = C*kh*kw for Conv2d).

        After fit() these are the weights the posterior was fitted at (θ*), kept as they were.
        """
        if self._fitted:
            return self._mean
        return self._current_weights()

    def _current_weights(self) -> list[Tensor]:
        return [weight_matrix(module) for _, module in self.layers]

    def layer_sizes(self) -> list[int]:
        """Number of parameters of each layer."""
        return [sum(p.numel() for p in _own_parameters(m)) for _, m in self.layers]

    # ------------------------------------------------------------------ fitting

    @abstractmethod
    def fit(self, loader: Iterable, override: bool = True, progress_bar: bool | None = None) -> None:
        """Fit the posterior to a loader of ``(x, y)`` (or dict) batches."""

    @contextlib.contextmanager
    def _unchanged_on_failure(self) -> Iterator[None]:
        """Run a state change all-or-nothing: on any exception the posterior gets back every attribute it had.

        The snapshot holds the attributes' references, so the change must replace them (as
        ``_reset_curvature`` does), never modify in place an object the posterior held before.
        """
        saved = dict(vars(self))
        try:
            yield
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            raise

    def _prediction_inputs(self, x: Tensor | Mapping) -> Tensor | Mapping:
        """``(N, ...)`` inputs to predict at, checked (a tensor or a dict, N ≥ 1) and on the posterior's device."""
        if not isinstance(x, (Tensor, Mapping)):
            raise TypeError(f"x must be a torch.Tensor or a dict, got {type(x).__name__}")
        if self._batch_size(x) == 0:
            raise ValueError("x has no samples: nothing to predict")
        return self._to_device(x)

    @staticmethod
    def _check_link_approx(link_approx: str) -> None:
        """Refuse an unknown ``link_approx`` for every likelihood (regression ignores a valid one, as laplace-torch)."""
        if link_approx not in LINK_APPROXES:
            raise ValueError(f"link_approx must be 'probit', 'bridge', 'bridge_norm' or 'mc', got {link_approx!r}")

    @staticmethod
    def _check_sampling(n_samples: int, generator: torch.Generator | None) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    def _to_device(self, x: Tensor | Mapping) -> Tensor | Mapping:
        """Inputs on the posterior's device, as ordinary tensors (one made under inference mode is copied)."""

        def moved(t: Tensor) -> Tensor:
            t = t.to(self.device)
            return t.clone() if t.is_inference() else t  # an inference tensor cannot be saved for a backward

        if isinstance(x, Mapping):
            # the targets are the posterior's to read, not the model's (an HF model would compute a loss)
            return {k: moved(v) if isinstance(v, Tensor) else v for k, v in x.items() if k != self.dict_key_y}
        return moved(x)

    def _batch_size(self, x: Tensor | Mapping) -> int:
        """N of a batch's inputs; a dict batch's inputs are under ``dict_key_x`` (laplace-torch's rule)."""
        if not isinstance(x, Mapping):
            return x.shape[0]
        if self.dict_key_x not in x:
            raise ValueError(f"a dict batch needs its inputs under dict_key_x={self.dict_key_x!r}; keys: {list(x)}")
        return x[self.dict_key_x].shape[0]

    def _split_batch(self, batch) -> tuple[Tensor | Mapping, Tensor]:
        """``(x, y)`` of a batch: a pair of tensors, or a dict (HuggingFace style) passed whole to the model.

        Raises:
            ValueError: for any other batch (a bare tensor, an ``(x, y, idx)`` triple), an
                empty batch, or inputs that are not finite.
            TypeError: for inputs or targets that are not tensors (numpy arrays, lists).
        """
        if isinstance(batch, Mapping):
            if self.dict_key_y not in batch:
                raise ValueError(
                    f"a dict batch needs the targets under dict_key_y={self.dict_key_y!r}; keys: {list(batch)}"
                )
            x, y = batch, batch[self.dict_key_y]
            inputs = [v for v in batch.values() if isinstance(v, Tensor)]
        else:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                got = f"a {len(batch)}-item {type(batch).__name__}" if isinstance(batch, (tuple, list)) else None
                raise ValueError(
                    "a batch must be an (x, y) pair or a dict with the targets under dict_key_y; "
                    f"got {got or 'a ' + type(batch).__name__}"
                )
            x, y = batch
            if not isinstance(x, (Tensor, Mapping)):
                raise TypeError(f"a batch's inputs x must be a torch.Tensor or a dict, got {type(x).__name__}")
            inputs = [v for v in x.values() if isinstance(v, Tensor)] if isinstance(x, Mapping) else [x]
        if not isinstance(y, Tensor):
            raise TypeError(f"a batch's targets y must be a torch.Tensor, got {type(y).__name__}")
        if self._batch_size(x) == 0:
            raise ValueError("a batch has no samples: the loader yielded an empty batch")
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in inputs):
            raise ValueError("a batch's inputs contain NaN or Inf")
        if self._likelihood(True) == "classification" and y.dtype in _NARROW_INTEGERS:
            y = y.long()  # torch's losses read int64 class indices; int32 labels are common
        return self._to_device(x), y.to(self.device)

    def _check_targets(self, y: Tensor, n: int) -> None:
        """The targets' shape and values, before any use (the class count once known from the outputs)."""
        if self._likelihood(True) == "classification":
            if y.dim() != 1 or y.shape[0] != n or y.is_floating_point():
                raise ValueError(f"classification targets must be ({n},) class indices, got {tuple(y.shape)} {y.dtype}")
            if int(y.min()) < 0 or (self.num_outputs and int(y.max()) >= self.num_outputs):
                bound = self.num_outputs or "C"
                raise ValueError(f"class labels must lie in [0, {bound}), got [{int(y.min())}, {int(y.max())}]")
        else:
            if y.dim() != 2 or y.shape[0] != n:
                raise ValueError(f"{self.likelihood} targets must be ({n}, C), got shape {tuple(y.shape)}")
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"{self.likelihood} targets contain NaN or Inf")

    def _check_outputs(self, output: Tensor, y: Tensor) -> None:
        """That the targets match the model's ``(N, C)`` outputs: labels in ``[0, C)``, or C target columns."""
        likelihood = self._likelihood(True)
        width = output.shape[1]
        if likelihood == "classification":
            check_class_labels(y, width)
        columns = width // 2 if likelihood == "heteroscedastic_regression" else width
        if likelihood != "classification" and y.shape[1] != columns:
            raise ValueError(
                f"{self.likelihood} targets must have one column per output ({columns}), got shape {tuple(y.shape)}"
            )

    def _summed_loss(self, output: Tensor, y: Tensor) -> Tensor:
        # A per-output σ is part of the loss (its shape was checked by the curvature pass).
        noise = self.sigma_noise if self.noise_per_output else None
        return summed_negative_log_likelihood(output, y, self._likelihood(True), noise)

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError("call fit(loader) before using the posterior")

    # ------------------------------------------------------------------ marginal likelihood

    @property
    def noise_per_output(self) -> bool:
        """Whether σ is a ``(C,)`` vector: it is then part of the fitted H and of the summed loss."""
        return self.sigma_noise.dim() == 1

    def _curvature_scale(self, sigma_noise: Tensor) -> Tensor:
        """The factor 1 / (σ² T) in front of H (1 / T when a per-output σ is inside H)."""
        if self.noise_per_output:
            if sigma_noise is not self.sigma_noise and not torch.equal(sigma_noise.detach(), self.sigma_noise):
                raise ValueError("a per-output sigma_noise is part of the fitted curvature: refit to change it")
            return torch.ones((), dtype=self.dtype, device=self.device) / self.temperature
        return 1.0 / (sigma_noise.square() * self.temperature)

    def log_likelihood(self, sigma_noise: Tensor | None = None) -> Tensor:
        """The log-likelihood log p(D | θ*) at the fitted weights, tempered by T."""
        self._require_fit()
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        value = -self._curvature_scale(sigma) * self.loss
        if self._likelihood(True) == "regression":
            normaliser = torch.log(sigma * math.sqrt(2 * math.pi)).expand(self.num_outputs).sum()
            value = value - self.num_data * normaliser
        elif self._likelihood(True) == "heteroscedastic_regression":  # log σ(x) is inside the loss
            value = value - self.num_data * (self.num_outputs // 2) * 0.5 * math.log(2 * math.pi)
        return value

    def scatter(self, prior_precision: Tensor) -> Tensor:
        """``(θ* − μ_0)ᵀ P_0 (θ* − μ_0)`` for a per-layer or per-parameter prior precision."""
        if self._is_per_layer(prior_precision):
            return (prior_precision * self._prior_terms()[1]).sum()
        deltas = self._prior_per_layer(prior_precision)
        return sum(
            (d * (w - self.prior_mean).square()).sum() for d, w in zip(deltas, self.layer_weights(), strict=True)
        )

    def log_det_prior(self, prior_precision: Tensor) -> Tensor:
        """The log-determinant of the prior precision."""
        if self._is_per_layer(prior_precision):
            return (prior_precision.log() * self._prior_terms()[0]).sum()
        deltas = self._prior_per_layer(prior_precision)
        return sum(d.log().expand_as(w).sum() for d, w in zip(deltas, self.layer_weights(), strict=True))

    def log_marginal_likelihood(
        self, prior_precision: float | Tensor | None = None, sigma_noise: float | Tensor | None = None
    ) -> Tensor:
        """Laplace evidence ``log p(D|θ*) − ½ (log det P − log det P0 + (θ*−μ0)ᵀP0(θ*−μ0))``.

        Differentiable in ``prior_precision`` (a float, scalar, ``(L,)`` or, for the
        structures that allow it, ``(P,)`` in ``named_parameters()`` order) and ``sigma_noise``
        (a float or a tensor). Nothing is stored: the posterior keeps its own values.

        Raises:
            ValueError: for a prior precision or noise out of range, or an evidence that is
                not finite (a zero prior precision makes ``log det P0 = −∞``).
        """
        self._require_fit()
        delta = self.prior_precision if prior_precision is None else self._checked_prior(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else self._checked_sigma(sigma_noise)
        value = self._evidence(delta, sigma)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(value.detach())):
            raise ValueError(
                f"the log marginal likelihood is {float(value)}: it needs a positive prior precision "
                f"(got {delta.detach().tolist()}) and a non-singular posterior precision"
            )
        return value

    def _evidence(self, delta: Tensor, sigma: Tensor) -> Tensor:
        """The evidence for a prior precision already checked (or positive by construction)."""
        log_det_ratio = self.log_det_posterior(delta, sigma) - self.log_det_prior(delta)
        return self.log_likelihood(sigma) - 0.5 * (log_det_ratio + self.scatter(delta))

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        n_steps: int = 100,
        lr: float = 0.1,
        val_loader: Iterable | None = None,
        grid: Sequence[float] | None = None,
        pred_type: str = "glm",
        link_approx: str = "probit",
    ) -> None:
        """Tune the prior precision.

        Args:
            method: ``"marglik"`` (Adam on log δ maximising the evidence; δ keeps its
                shape, one value per layer) or ``"gridsearch"`` (the scalar δ of ``grid``
                with the lowest predictive negative log-likelihood on ``val_loader``).
            n_steps: Adam steps of ``"marglik"``.
            lr: Adam's learning rate.
            val_loader: ``(x, y)`` batches for ``"gridsearch"``.
            grid: candidate values for ``"gridsearch"``; 21 from 1e-4 to 1e4 by default.
            pred_type: predictive used by ``"gridsearch"``.
            link_approx: link used by ``"gridsearch"`` for classification.
        """
        self._require_fit()
        if method not in ("marglik", "gridsearch"):
            raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}")
        if method == "marglik":
            if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
                raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
                raise ValueError(f"lr must be positive and finite, got {lr!r}")
            self.prior_precision = self._evidence_maximiser(n_steps, lr)
            return
        self._check_link_approx(link_approx)
        candidates = self._checked_grid(val_loader, grid)
        with self._unchanged_on_failure():
            losses = []
            for delta in candidates:
                self.prior_precision = delta
                losses.append(self._predictive_nll(val_loader, pred_type, link_approx))
            finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
            if not finite:
                raise ValueError(f"the predictive negative log-likelihood is not finite for any grid value: {losses}")
            self.prior_precision = candidates[min(finite, key=losses.__getitem__)]

    def _evidence_maximiser(self, n_steps: int, lr: float) -> Tensor:
        """The prior precision after ``n_steps`` Adam steps on log δ maximising the evidence (δ keeps its shape)."""
        log_delta = self.prior_precision.clamp_min(1e-12).log().clone().requires_grad_(True)
        # the fused step is one kernel instead of a dozen small ops for this one small tensor
        optimiser = torch.optim.Adam([log_delta], lr=lr, fused=log_delta.device.type in ("cpu", "cuda"))
        for _ in range(n_steps):
            optimiser.zero_grad()
            # exp(log δ) has the checked prior's shape and is positive: no check per step
            (-self._evidence(log_delta.exp(), self.sigma_noise)).backward()
            optimiser.step()
        delta = log_delta.detach().exp()
        if not bool(torch.isfinite(delta).all() & (delta > 0).all()):
            raise ValueError(
                f"the evidence maximisation diverged (prior precision {delta.tolist()}); "
                "try a smaller lr or fewer n_steps"
            )
        return delta

    @staticmethod
    def _checked_grid(val_loader: Iterable | None, grid: Sequence[float] | None) -> list[float]:
        """The gridsearch's candidates, after checking them and the validation loader."""
        if val_loader is None:
            raise ValueError("method='gridsearch' needs a val_loader of (x, y) batches")
        if iter(val_loader) is val_loader:
            raise ValueError(
                "method='gridsearch' reads val_loader once per grid value: pass a DataLoader or a list, not an iterator"
            )
        try:
            candidates = torch.logspace(-4, 4, 21).tolist() if grid is None else [float(v) for v in grid]
        except (TypeError, ValueError) as error:
            raise TypeError(f"grid must be an iterable of prior precisions (floats), got {grid!r:.60}") from error
        if not candidates:
            raise ValueError("grid is empty: give at least one prior precision")
        if not all(0 < v < math.inf for v in candidates):
            raise ValueError(f"grid values must be positive and finite, got {candidates}")
        return candidates

    def _predictive_nll(self, loader: Iterable, pred_type: str, link_approx: str) -> float:
        """Summed negative log-likelihood of a loader's targets under the predictive."""
        total, batches = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                x, y = self._split_batch(batch)
                self._check_targets(y, self._batch_size(x))
                if self._likelihood(True) == "classification":
                    probs = self(x, pred_type=pred_type, link_approx=link_approx, fitting=True)
                    self._check_outputs(probs, y)
                    total -= probs.gather(1, y.long().unsqueeze(1)).clamp_min(1e-30).log().sum().item()
                else:
                    mean, variance = self._target_moments(x, pred_type)
                    if y.shape != mean.shape:
                        raise ValueError(
                            f"val_loader targets must have shape {tuple(mean.shape)}, got {tuple(y.shape)}"
                        )
                    total += (
                        0.5 * ((y - mean).square() / variance + variance.log() + math.log(2 * math.pi)).sum().item()
                    )
                batches += 1
        if batches == 0:
            raise ValueError("val_loader yielded no batch")
        return total

    # ------------------------------------------------------------------ predictive

    def _output_jacobians(self, x: Tensor) -> tuple[Tensor, list]:
        """The model's ``(N, C)`` output at checked inputs, and each layer's statistics with its output Jacobian."""
        return output_jacobians(
            self.model, self._prediction_inputs(x), self.layers, self.enable_backprop, self.last_layer_only
        )

    def functional_variance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x; θ*), J P⁻¹ Jᵀ)``: the ``(N, C)`` mean and ``(N, C, C)`` covariance of the GLM."""
        self._require_fit()
        x = self._prediction_inputs(x)
        check_allocation(
            "the (N, C, C) output Jacobians and GLM covariance",
            (self._batch_size(x), self.num_outputs, self.num_outputs),
            self.dtype,
            self._covariance_remedy(),
        )
        output, stats = self._output_jacobians(x)
        return output, self._jacobian_covariance(stats)

    def _covariance_remedy(self) -> str:
        """What avoids an ``(N, C, C)`` covariance too large to hold, for this structure."""
        alone = "link_approx='probit' or diagonal_output=True (regression), which need the (N, C) variances alone"
        if self.variances_without_covariance:
            remedy = f"use {alone}, or pred_type='nn' (the sampling predictive)"
        else:
            remedy = f"use pred_type='nn' (the sampling predictive), or hessian_structure='kron' with {alone}"
        one_input = (self.num_outputs, self.num_outputs)
        return remedy + (", or fewer inputs per call" if memory.fits(one_input, self.dtype) else "")

    def functional_variance_diagonal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The ``(N, C)`` mean and ``(N, C)`` variances of the GLM (structures may skip the covariance)."""
        mean, covariance = self.functional_variance(x)
        return mean, covariance.diagonal(dim1=1, dim2=2)

    def functional_covariance(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The joint GLM over a batch: ``(N C,)`` mean and ``(N C, N C)`` covariance ``J P⁻¹ Jᵀ``.

        Outputs are ordered sample by sample (``f(x_1)``, then ``f(x_2)``, ...), as laplace-torch's.
        """
        self._require_fit()
        output, stats = self._output_jacobians(x)
        cross = self._jacobian_cross_covariance(stats)  # (N, C, N, C)
        return output.flatten(), cross.flatten(0, 1).flatten(1, 2)

    def _likelihood(self, fitting: bool) -> str:
        """The likelihood of fitting (True) or of predicting (False).

        Reward models are fitted as classifiers and predict as regressors (laplace-torch's rule).
        """
        if self.likelihood == "reward_modeling":
            return "classification" if fitting else "regression"
        return self.likelihood

    def __call__(
        self,
        x: Tensor,
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
    ):
        """The predictive, with laplace-torch's arguments and meanings.

        Args:
            x: ``(N, ...)`` inputs.
            pred_type: ``"glm"`` (linearised network), or one of the structure's further
                :attr:`pred_types` (weight space: ``"nn"``, the network with sampled weights, averaged).
            joint: regression GLM only: the joint predictive over the batch (see
                :meth:`functional_covariance`).
            link_approx: for a classification GLM, ``"probit"``, ``"bridge"`` /
                ``"bridge_norm"`` (Laplace bridge, plain or variance-normalised) or ``"mc"``
                (sampled logits).
            n_samples: samples of ``"mc"`` and ``"nn"``.
            diagonal_output: regression: return the ``(N, C)`` variances instead of the
                covariances; ``"mc"``: sample each output independently.
            generator: random source of the samples.
            fitting: for ``likelihood="reward_modeling"``, predict as the classifier it was
                fitted as (True) or as a regressor (False).

        Returns:
            Classification: ``(N, C)`` class probabilities. Regression: ``(N, C)`` mean and
            ``(N, C, C)`` covariance of f (σ² not included, as in laplace-torch; see
            :meth:`predict`), ``(N, C)`` variances with ``diagonal_output`` or for
            ``"nn"``, ``(N C,)`` mean and ``(N C, N C)`` covariance with ``joint``.
            Heteroscedastic regression: the same for all ``2 C`` outputs (means and
            log-variances); :meth:`predict` gives the targets' mean and std.
        """
        self._check_sampling(n_samples, generator)
        self._check_link_approx(link_approx)
        if pred_type not in self.pred_types:
            raise ValueError(
                f"pred_type={pred_type!r} is not available for {type(self).__name__}; choose one of {self.pred_types}"
            )
        likelihood = self._likelihood(fitting)
        if likelihood in GAUSSIAN_OUTPUTS and joint:
            return _finite_moments(*self.functional_covariance(x))
        if likelihood in GAUSSIAN_OUTPUTS and diagonal_output:
            return _finite_moments(*self.functional_variance_diagonal(x))
        if likelihood not in GAUSSIAN_OUTPUTS and link_approx == "probit":
            return probit(*_finite_moments(*self.functional_variance_diagonal(x)))
        mean, cov = _finite_moments(*self.functional_variance(x))
        if likelihood in GAUSSIAN_OUTPUTS:
            return mean, cov
        if link_approx in ("bridge", "bridge_norm"):
            return laplace_bridge(mean, cov, normalise=link_approx == "bridge_norm")
        if diagonal_output:  # link_approx == "mc"
            cov = torch.diag_embed(cov.diagonal(dim1=1, dim2=2))
        return sampled_softmax(mean, cov, n_samples, generator).mean(0)

    def _target_moments(
        self, x: Tensor, pred_type: str = "glm", n_samples: int = 100, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(N, C_y)`` mean and variance of a regression's targets y under the predictive.

        Homoscedastic: f's mean, and its variance plus σ². Heteroscedastic (outputs μ, s):
        E[μ], and Var[μ] + E[e^s], with ``E[e^s] = exp(E s + ½ Var s)`` under the GLM.
        """
        if self._likelihood(fitting=False) == "regression":
            mean, variance = self(
                x, pred_type=pred_type, diagonal_output=True, n_samples=n_samples, generator=generator
            )
            return mean, variance + self.sigma_noise.square()
        output, variance = self(x, pred_type=pred_type, diagonal_output=True)
        (mean, log_var), (mean_variance, log_var_variance) = split_heteroscedastic(output), variance.chunk(2, dim=-1)
        return mean, mean_variance + (log_var + 0.5 * log_var_variance).exp()

    def predict(
        self, x: Tensor, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Predictive mean and standard deviation, ``(N, C)`` each.

        Regression (and reward models): the GLM's mean and the standard deviation of y,
        σ included. Heteroscedastic regression: the mean and standard deviation of the
        ``(N, C)`` targets, the noise e^s (s ~ GLM) included. Classification: the probit
        class probabilities, and the standard deviation of the softmax over ``n_samples``
        logits drawn from the GLM.
        """
        self._check_sampling(n_samples, generator)
        if self._likelihood(fitting=False) in GAUSSIAN_OUTPUTS:
            mean, variance = self._target_moments(x)
            return mean, variance.sqrt()
        mean, cov = self.functional_variance(x)
        return self(x), sampled_softmax(mean, cov, n_samples, generator).std(0)

    def predictive_entropy(self, x: Tensor) -> Tensor:
        """``(N,)`` entropy of the probit predictive (an out-of-distribution score)."""
        if self.likelihood != "classification":
            raise ValueError("predictive_entropy is defined for classification")
        probs = self(x)
        return -(probs * probs.clamp_min(1e-30).log()).sum(-1)

    # ------------------------------------------------------------------ saving

    def state_dict(self) -> dict:
        """Everything fit() and the prior tuning produced, to restore on the same model."""
        self._require_fit()
        return {
            "likelihood": self.likelihood,
            "structure": type(self).__name__,
            "layers": [(name, tuple(w.shape)) for (name, _), w in zip(self.layers, self.layer_weights(), strict=True)],
            "num_data": self.num_data,
            "num_outputs": self.num_outputs,
            "loss": self.loss,
            "prior_precision": self.prior_precision.clone(),
            "sigma_noise": self.sigma_noise.clone(),
            "temperature": self.temperature,
            "curvature": [t.clone() for t in self._curvature_tensors()],
        }

    #: the entries of a :meth:`state_dict`
    STATE_KEYS = (
        "likelihood",
        "structure",
        "layers",
        "num_data",
        "num_outputs",
        "loss",
        "prior_precision",
        "sigma_noise",
        "temperature",
        "curvature",
    )

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a state_dict(), all-or-nothing; it must come from the same structure and layers.

        Raises:
            ValueError: for a state with missing entries, of another structure, likelihood or
                layers, with values out of range (a negative prior, NaN or negative curvature),
                or whose curvature does not fit this posterior; the posterior is then as before.
        """
        missing = [key for key in self.STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"the state lacks the entries {missing}")
        layers = [(name, tuple(w.shape)) for (name, _), w in zip(self.layers, self.layer_weights(), strict=True)]
        if state["structure"] != type(self).__name__ or state["likelihood"] != self.likelihood:
            raise ValueError(
                f"the state is a {state['structure']} for {state['likelihood']}, "
                f"not a {type(self).__name__} for {self.likelihood}"
            )
        if [(n, tuple(s)) for n, s in state["layers"]] != layers:
            raise ValueError(f"the state was saved for layers {state['layers']}, this model has {layers}")
        num_data = state["num_data"]
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"the state's num_data must be a positive integer, got {num_data!r}")
        if not math.isfinite(state["loss"]):
            raise ValueError(f"the state's loss must be finite, got {state['loss']!r}")
        num_outputs = state["num_outputs"]
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"the state's num_outputs must be a positive integer, got {num_outputs!r}")
        if self._fitted and num_outputs != self.num_outputs:  # the same model: its output width cannot change
            raise ValueError(
                f"the state's num_outputs is {num_outputs}, but this model's output width is {self.num_outputs}"
            )
        if not isinstance(state["curvature"], (list, tuple)) or not all(
            isinstance(t, Tensor) for t in state["curvature"]
        ):
            raise ValueError(
                f"the state's curvature must be a list of tensors, got {type(state['curvature']).__name__}"
            )
        half = [
            t.dtype
            for t in state["curvature"]
            if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)
        ]
        if half:
            raise ValueError(f"the state's curvature must be float32 or float64 tensors, got {half[0]}")
        curvature = [t.to(self.device, copy=True) for t in state["curvature"]]
        self._check_curvature_values(curvature)
        prior = self._checked_prior(state["prior_precision"])
        with self._unchanged_on_failure():
            self._fitted = False  # σ of another shape may be set before the curvature that goes with it
            self.sigma_noise = state["sigma_noise"]
            self.temperature = state["temperature"]
            self._reset_curvature()
            try:
                self._restore_curvature(curvature, num_data)
                self.num_data, self.num_outputs, self.loss = num_data, num_outputs, state["loss"]
                self.prior_precision = prior
                self._mean = self._current_weights()
                self._fitted = True
                evidence = self._evidence(self.prior_precision, self.sigma_noise)
            except (RuntimeError, IndexError, StopIteration, TypeError, ValueError) as error:
                raise ValueError(f"the state's curvature does not fit this {type(self).__name__}: {error}") from error
            if not bool(torch.isfinite(evidence)):
                raise ValueError(f"the state gives a log marginal likelihood of {float(evidence)}: it is not valid")

    def _check_curvature_values(self, tensors: list[Tensor]) -> None:
        """Refuse a state's curvature tensors with NaN or Inf (structures add their sign rules)."""
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError("the state's curvature contains NaN or Inf")

    # ------------------------------------------------------------------ structure-specific

    @abstractmethod
    def _curvature_tensors(self) -> list[Tensor]:
        """The accumulated curvature, as a list of tensors."""

    @abstractmethod
    def _restore_curvature(self, tensors: list[Tensor], num_data: int) -> None:
        """Inverse of ``_curvature_tensors``."""

    @abstractmethod
    def _reset_curvature(self) -> None: ...

    @abstractmethod
    def _update_curvature(self, stats, new_batch: bool = True) -> None:
        """Add a batch's statistics; ``new_batch=False`` for a later part of the last batch's columns.

        Such a part adds its columns' share of the curvature (sums over the columns are sums
        over the parts); what depends on the inputs alone and the data count came with the
        batch's first part (:func:`~fastlaplace.curvature.statistics.layer_statistic_parts`).
        """

    @abstractmethod
    def log_det_posterior(self, prior_precision: Tensor, sigma_noise: Tensor) -> Tensor:
        """The log-determinant of P for a prior precision ``(L,)`` and a noise."""

    @abstractmethod
    def _jacobian_covariance(self, stats) -> Tensor:
        """``(N, C, C)`` ``Σ_l J_l P_l⁻¹ J_lᵀ`` from each layer's inputs and output Jacobians."""

    @abstractmethod
    def _jacobian_cross_covariance(self, stats) -> Tensor:
        """``(N, C, N, C)``: ``J P⁻¹ Jᵀ`` between every pair of samples."""


shield_public_methods(BaseLaplace)
