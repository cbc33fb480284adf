"""Hostile inputs, grouped by API call: each is refused by name and leaves the posterior's answers unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastlaplace import Laplace
from fastlaplace.marglik import marglik_training

N, D, C = 12, 4, 3
STRUCTURES = ["diag", "kron", "ekfac", "full", "lowrank", "gp"]


def _data(likelihood: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, dtype=torch.float64, generator=generator)
    if likelihood == "classification":
        return x, torch.randint(0, C, (N,), generator=generator)
    return x, torch.randn(N, C, dtype=torch.float64, generator=generator)


def _posterior(structure: str, likelihood: str = "classification", **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    if structure == "gp":
        options.setdefault("n_subset", N)
    return Laplace(model, likelihood, "all", structure, **options)


def _fitted(structure: str, likelihood: str = "classification", **options):
    la = _posterior(structure, likelihood, **options)
    x, y = _data(likelihood)
    la.fit([(x[:6], y[:6]), (x[6:], y[6:])])
    return la


def _answers(la) -> tuple:
    """What the posterior answers: its evidence, a predictive and its prior precision."""
    x, _ = _data(la.likelihood, seed=1)
    predictive = la(x)
    predictive = predictive if isinstance(predictive, tuple) else (predictive,)
    return (float(la.log_marginal_likelihood()), *[p.clone() for p in predictive], la.prior_precision.clone())


def _assert_unchanged(la, before: tuple) -> None:
    after = _answers(la)
    assert after[0] == before[0]
    for a, b in zip(after[1:], before[1:], strict=True):
        assert torch.equal(a, b)


def _bad_batches(likelihood: str) -> dict[str, tuple[list, type, str]]:
    x, y = _data(likelihood, seed=2)
    nan_x = x.clone()
    nan_x[0, 0] = math.nan
    cases = {
        "nan input": ([(x, y), (nan_x, y)], ValueError, "inputs contain NaN"),
        "bare tensor": ([(x, y), x], ValueError, r"\(x, y\) pair"),
        "triple": ([(x, y, torch.arange(N))], ValueError, r"3-item tuple"),
        "empty batch": ([(x, y), (x[:0], y[:0])], ValueError, "empty batch"),
        "numpy inputs": ([(x.numpy(), y)], TypeError, "must be a torch.Tensor"),
        "numpy targets": ([(x, y.numpy())], TypeError, "targets y must be a torch.Tensor"),
        "no batch": ([], ValueError, "no batch|exceeds"),
    }
    if likelihood == "classification":
        bad = y.clone()
        bad[3] = 7
        cases["label 7 of 3"] = ([(x, y), (x, bad)], ValueError, r"class labels must lie in \[0, 3\)")
        cases["negative label"] = ([(x, y - 1)], ValueError, "class labels must lie in")
    else:
        nan_y = y.clone()
        nan_y[2, 1] = math.inf
        cases["inf target"] = ([(x, y), (x, nan_y)], ValueError, "targets contain NaN or Inf")
        cases["(N, 1) targets for 3 outputs"] = ([(x, y[:, :1])], ValueError, r"one column per output \(3\)")
    return cases


# ---------------------------------------------------------------------- fit


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_fit_refuses_bad_batches_and_keeps_the_earlier_fit(structure, likelihood):
    la = _fitted(structure, likelihood)
    before = _answers(la)
    for name, (loader, error, message) in _bad_batches(likelihood).items():
        with pytest.raises(error, match=message):
            la.fit(loader)
        _assert_unchanged(la, before)
        assert la.num_data == N, name


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("structure", ["diag", "kron", "gp"])
def test_class_labels_of_any_integer_dtype_fit_as_int64_labels(structure, dtype):
    expected = _answers(_fitted(structure))
    la = _posterior(structure)
    x, y = _data("classification")
    la.fit([(x[:6], y[:6].to(dtype)), (x[6:], y[6:].to(dtype))])
    _assert_unchanged(la, expected)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_failed_first_fit_leaves_the_posterior_unfitted(structure):
    la = _posterior(structure)
    x, y = _data("classification")
    bad = y.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="class labels"):
        la.fit([(x, y), (x, bad)])
    with pytest.raises(RuntimeError, match="call fit"):
        la(x)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_a_first_empirical_fisher_fit_names_an_out_of_range_label(structure, subset):
    # the empirical Fisher reads the labels before the class count is known from a batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    la = Laplace(model, "classification", subset, structure, curvature_mode="ef")
    x, y = _data("classification")
    bad = y.clone()
    bad[3] = 7
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\), got \[0, 7\]"):
        la.fit([(x, bad)])
    with pytest.raises(RuntimeError, match="call fit"):
        la(x)


@pytest.mark.parametrize("batches", [1, 2])
def test_gp_labels_past_the_subset_are_checked(batches):
    la = _posterior("gp", n_subset=N // 2)
    x, y = _data("classification")
    bad = y.clone()
    bad[-1] = 7  # never one of the subset's points
    loader = [(x, bad)] if batches == 1 else [(x[: N // 2], bad[: N // 2]), (x[N // 2 :], bad[N // 2 :])]
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        la.fit(loader)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_fit_on_an_exhausted_generator_keeps_the_earlier_fit(structure):
    la = _fitted(structure)
    before = _answers(la)
    x, y = _data("classification")
    batches = (b for b in [(x, y)])
    la.fit(batches)
    with pytest.raises(ValueError, match="no batch"):
        la.fit(batches)
    assert la.num_data == N
    with pytest.raises(ValueError, match="class labels"):
        la.fit([(x, torch.full_like(y, 9))], override=False)
    la.fit([(x[:6], y[:6]), (x[6:], y[6:])])
    _assert_unchanged(la, before)


# ---------------------------------------------------------------------- setters and the evidence


@pytest.mark.parametrize("structure", STRUCTURES)
def test_setters_refuse_out_of_range_values(structure):
    la = _fitted(structure, "regression")
    before = _answers(la)
    cases = [
        ("sigma_noise", math.inf, "sigma_noise must be positive and finite"),
        ("sigma_noise", 0.0, "sigma_noise must be positive and finite"),
        ("sigma_noise", -1.0, "sigma_noise must be positive and finite"),
        ("sigma_noise", math.nan, "sigma_noise must be positive and finite"),
        ("temperature", 0.0, "temperature must be a positive finite number"),
        ("temperature", math.nan, "temperature must be a positive finite number"),
        ("prior_mean", math.nan, "prior_mean must be a finite number"),
        ("prior_precision", -1.0, "prior_precision must be non-negative and finite"),
        ("prior_precision", math.nan, "prior_precision must be non-negative and finite"),
        ("prior_precision", torch.ones(7), "prior_precision must be a scalar or have"),
    ]
    for name, value, message in cases:
        with pytest.raises(ValueError, match=message):
            setattr(la, name, value)
        _assert_unchanged(la, before)


@pytest.mark.parametrize("structure", ["diag", "kron", "gp"])
def test_a_prior_or_noise_that_is_not_a_number_is_named(structure):
    la = _fitted(structure, "regression")
    before = _answers(la)
    for call, name in (
        (lambda: setattr(la, "prior_precision", "1.0"), "prior_precision"),
        (lambda: la.log_marginal_likelihood("a"), "prior_precision"),
        (lambda: setattr(la, "sigma_noise", "0.5"), "sigma_noise"),
        (lambda: la.log_marginal_likelihood(None, [0.5, "x"]), "sigma_noise"),
    ):
        with pytest.raises(TypeError, match=f"{name} must be a number or a tensor, got"):
            call()
        _assert_unchanged(la, before)
    with pytest.raises(TypeError, match="prior_precision must be a number or a tensor, got str"):
        _posterior("kron", prior_precision="1")


def test_a_zero_prior_that_makes_the_full_posterior_singular_is_refused():
    la = _posterior("full")
    x, y = _data("classification")
    la.fit([(x[:2], y[:2])])  # 2 points: a GGN of rank 4 at most over 43 weights
    before = _answers(la)
    with pytest.raises(ValueError, match="posterior precision is singular"):
        la.prior_precision = 0.0
    _assert_unchanged(la, before)


@pytest.mark.parametrize("option, value", [("temperature", math.nan), ("prior_mean", math.nan), ("sigma_noise", 0.0)])
def test_the_factory_refuses_out_of_range_options(option, value):
    with pytest.raises(ValueError, match=f"{option} must be"):
        _posterior("kron", "regression", **{option: value})


def test_the_factory_names_mistyped_indices_and_seeds():
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    with pytest.raises(TypeError, match="subnetwork_indices must be integers, got torch.float32"):
        Laplace(model, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([0.0, 3.0]))
    with pytest.raises(TypeError, match="seed must be an integer or None, got '7'"):
        Laplace(model, "classification", "all", "gp", n_subset=4, seed="7")


@pytest.mark.parametrize("structure", ["gp", "kron"])
def test_a_model_without_a_class_dimension_is_named(structure):
    model = nn.Sequential(nn.Linear(D, 1), nn.Flatten(0)).double()
    la = Laplace(model, "classification", "all", structure, **({"n_subset": N} if structure == "gp" else {}))
    with pytest.raises(ValueError, match=r"the model's output must be \(N, C\), got shape \(12,\)"):
        la.fit([_data("classification")])


def test_the_preconditioner_refuses_a_negative_bucket_size():
    from fastlaplace.optim import KFACPreconditioner

    with pytest.raises(ValueError, match="bucket_mb must be a positive number of megabytes, got -1"):
        KFACPreconditioner(_kfac_model(), bucket_mb=-1)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_a_prior_edited_in_place_is_checked_when_next_read(structure):
    la = _fitted(structure)
    la.prior_precision.mul_(2.0)  # a valid edit counts, as in laplace-torch
    doubled = float(la.log_marginal_likelihood())
    assert doubled == float(la.log_marginal_likelihood(torch.full_like(la.prior_precision, 2.0)))
    la.prior_precision[0] = -1.0
    for call in (la.log_marginal_likelihood, lambda: la(_data("classification")[0])):
        with pytest.raises(
            ValueError, match=r"prior_precision must be non-negative and finite \(it was edited in place\)"
        ):
            call()
    la.prior_precision = 2.0
    assert float(la.log_marginal_likelihood()) == doubled


def test_plain_floats_are_accepted_where_laplace_torch_takes_them():
    la = _fitted("kron", "regression")
    half, noise = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    expected = la.log_marginal_likelihood(half, noise)
    assert float(la.log_marginal_likelihood(0.5, 0.7)) == pytest.approx(float(expected), rel=1e-12)
    la.sigma_noise = 0.5
    assert la.sigma_noise.dtype == torch.float64 and float(la.sigma_noise) == 0.5


@pytest.mark.parametrize("structure", STRUCTURES)
def test_the_evidence_refuses_a_zero_prior_or_bad_noise(structure):
    la = _fitted(structure, "regression")
    before = _answers(la)
    with pytest.raises(ValueError, match="positive prior precision"):
        la.log_marginal_likelihood(0.0)
    with pytest.raises(ValueError, match="sigma_noise must be positive and finite"):
        la.log_marginal_likelihood(None, math.inf)
    _assert_unchanged(la, before)


# ---------------------------------------------------------------------- optimize_prior_precision


@pytest.mark.parametrize("structure", STRUCTURES)
def test_prior_tuning_refuses_bad_arguments_and_keeps_the_prior(structure):
    la = _fitted(structure)
    before = _answers(la)
    x, y = _data("classification", seed=3)
    bad = y.clone()
    bad[-1] = 5
    cases = [
        ({"method": "grid"}, "method must be 'marglik' or 'gridsearch'"),
        ({"method": "marglik", "n_steps": 0}, "n_steps must be a positive integer"),
        ({"method": "marglik", "lr": math.nan}, "lr must be positive and finite"),
        ({"method": "gridsearch"}, "needs a val_loader"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": []}, "grid is empty"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": [1.0, -1.0]}, "grid values must be positive"),
        ({"method": "gridsearch", "val_loader": iter([(x, y)])}, "not an iterator"),
        ({"method": "gridsearch", "val_loader": []}, "val_loader yielded no batch"),
        ({"method": "gridsearch", "val_loader": [(x, y), (x, bad)], "grid": [0.1, 1.0]}, "class labels"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "link_approx": "exact"}, "link_approx must be"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            la.optimize_prior_precision(**arguments)
        _assert_unchanged(la, before)


@pytest.mark.parametrize("structure", ["diag", "gp"])
def test_prior_tuning_names_a_mistyped_argument_for_any_likelihood(structure):
    la = _fitted(structure, "regression")
    before = _answers(la)
    x, y = _data("regression", seed=3)
    cases = [
        ({"method": "marglik", "lr": "0.1"}, ValueError, "lr must be positive and finite, got '0.1'"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": 3.0}, TypeError, "grid must be an iterable of"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": ["a"]}, TypeError, "grid must be an iterable of"),
        ({"method": "gridsearch", "val_loader": [(x, y)], "link_approx": "exact"}, ValueError, "link_approx must be"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            la.optimize_prior_precision(**arguments)
        _assert_unchanged(la, before)


def test_a_grid_without_a_finite_score_keeps_the_prior(monkeypatch):
    la = _fitted("kron")
    before = _answers(la)
    x, y = _data("classification", seed=3)
    monkeypatch.setattr(la, "_predictive_nll", lambda *args: math.nan)
    with pytest.raises(ValueError, match="not finite for any grid value"):
        la.optimize_prior_precision(method="gridsearch", val_loader=[(x, y)], grid=[0.1, 1.0, 10.0])
    _assert_unchanged(la, before)


# ---------------------------------------------------------------------- load_state_dict


def _tampered_states(state: dict) -> dict[str, tuple[dict, str]]:
    first = state["curvature"][0]
    nan, negative = first.clone(), first.clone()
    nan[(0,) * nan.dim()] = math.nan
    negative[(0,) * negative.dim()] = -1.0
    return {
        "missing key": ({k: v for k, v in state.items() if k != "loss"}, r"lacks the entries \['loss'\]"),
        "short curvature": ({**state, "curvature": state["curvature"][1:]}, "does not fit|must be"),
        "negative prior": ({**state, "prior_precision": -state["prior_precision"]}, "non-negative"),
        "nan curvature": ({**state, "curvature": [nan, *state["curvature"][1:]]}, "NaN or Inf"),
        "zero num_data": ({**state, "num_data": 0}, "num_data must be a positive integer"),
        "float num_outputs": ({**state, "num_outputs": 3.0}, "num_outputs must be a positive integer"),
        "another output width": (
            {**state, "num_outputs": 99},
            r"num_outputs is 99, but this model's output width is 3",
        ),
        "nan sigma": ({**state, "sigma_noise": torch.tensor(math.nan)}, "sigma_noise must be positive"),
        "other structure": ({**state, "structure": "Other"}, "the state is a Other"),
        "curvature not a list": ({**state, "curvature": first}, "the state's curvature must be a list of tensors"),
        "half-precision curvature": (
            {**state, "curvature": [t.half() if t.is_floating_point() else t for t in state["curvature"]]},
            r"the state's curvature must be float32 or float64 tensors, got torch.float16",
        ),
    } | (
        {"negative curvature": ({**state, "curvature": [negative, *state["curvature"][1:]]}, "non-negative")}
        if state["structure"] in ("DiagLaplace", "KronLaplace", "FullLaplace")
        else {}
    )


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "lowrank"])
def test_load_state_dict_refuses_tampered_states_and_keeps_the_old_posterior(structure):
    la = _fitted(structure, "regression")
    state = la.state_dict()
    saved = [t.clone() for t in state["curvature"]]
    la.fit([_data("regression", seed=4)])
    before = _answers(la)
    for tampered, message in _tampered_states(state).values():
        with pytest.raises(ValueError, match=message):
            la.load_state_dict(tampered)
        _assert_unchanged(la, before)
    assert all(torch.equal(a, b) for a, b in zip(state["curvature"], saved, strict=True))
    la.load_state_dict(state)
    assert float(la.log_marginal_likelihood()) != before[0]


# ---------------------------------------------------------------------- predictives and samples


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_predictives_refuse_bad_arguments(structure, likelihood):
    la = _fitted(structure, likelihood)
    before = _answers(la)
    x, _ = _data("classification")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        la(x, link_approx="mc", n_samples=0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        la.predict(x, n_samples=-3)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        la(x, link_approx="mc", generator=0)
    with pytest.raises(ValueError, match="x has no samples"):
        la(x[:0])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        la(x.numpy())
    with pytest.raises(ValueError, match="pred_type='exact' is not available"):
        la(x, pred_type="exact")
    with pytest.raises(
        ValueError, match="link_approx must be 'probit', 'bridge', 'bridge_norm' or 'mc', got 'probitt'"
    ):
        la(x, link_approx="probitt")
    if structure != "gp":
        with pytest.raises(ValueError, match="n_samples must be a positive integer"):
            la.sample(0)
        with pytest.raises(ValueError, match="x has no samples"):
            la(x[:0], pred_type="nn")
    _assert_unchanged(la, before)


# ---------------------------------------------------------------------- marglik_training


def test_marglik_training_refuses_one_shot_loaders_and_restores_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data("classification")
    with pytest.raises(ValueError, match="not an iterator"):
        marglik_training(model, (b for b in [(x, y)]), n_epochs=2)
    bad = y.clone()
    bad[0] = 7
    with pytest.raises(ValueError, match="class labels"):
        marglik_training(model, [(x, y), (x, bad)], n_epochs=2)
    with pytest.raises(ValueError, match="hessian_structure='gp'"):
        marglik_training(model, [(x, y)], hessian_structure="gp", n_epochs=1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lr_hyp", 0.0),
        ("lr_hyp", math.inf),
        ("prior_prec_init", 0.0),
        ("sigma_noise_init", -1.0),
        ("n_epochs_burnin", -1),
    ],
)
def test_marglik_training_refuses_bad_hyperparameter_settings(option, value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{option} must be a (positive finite number|non-negative integer)"):
        marglik_training(model, [_data("classification")], n_epochs=1, **{option: value})
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_marglik_training_names_a_per_parameter_prior_the_structure_cannot_take():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="prior_structure='diag' needs a structure with a prior per parameter"):
        marglik_training(model, [_data("classification")], n_epochs=1, prior_structure="diag")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_dense_factor_beyond_lapacks_32_bit_sizes_is_refused_by_name():
    from fastlaplace import ops

    wide = nn.Sequential(nn.Linear(32_766, 2))  # input factor 32,767 x 32,767 with the bias
    batch = (torch.randn(2, 32_766), torch.tensor([0, 1]))
    la = Laplace(wide, "classification", "all", "kron", max_dense_factor=None)
    with pytest.raises(ValueError, match=r"input factor of layer '0' is 32767 x 32767: LAPACK's eigensolver"):
        la.fit([batch])
    # the operators check it too, before LAPACK would see it (an expanded matrix costs no memory)
    for call in (ops.batched_eigh, lambda m: ops.damped_inverses(m, torch.ones(1))):
        with pytest.raises(ValueError, match=r"32767 x 32767: above 32766 a side overflows"):
            call([torch.zeros(1, 1).expand(32_767, 32_767)])


def test_numpy_is_not_silently_unpacked():
    la = _posterior("diag")
    x, y = _data("classification")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        la.fit([(np.asarray(x), np.asarray(y))])


def test_a_kron_eigendecomposition_failing_in_float32_is_retried_in_float64(monkeypatch):
    from fastlaplace import ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C))
    x, y = _data("classification")
    la = Laplace(model, "classification", "all", "kron")
    la.fit([(x.float(), y)])
    expected = la(x.float())
    la.fit([(x.float(), y)])  # a fresh eigendecomposition, now through the failing solver
    solve = ops.batched_eigh

    def fails_in_float32(matrices):
        if any(m.dtype == torch.float32 for m in matrices):
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return solve(matrices)

    monkeypatch.setattr(ops, "batched_eigh", fails_in_float32)
    probs = la(x.float())
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- models whose curvature would be silently wrong


class _ScaledHead(nn.Module):
    """The output is 3 × the last Linear's: its output Jacobian is not the identity."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(D, 5), nn.Linear(5, C)

    def forward(self, x):
        return 3 * self.head(torch.tanh(self.body(x)))


class _LastRegisteredRunsFirst(nn.Module):
    """``proj`` is registered last but runs before ``head``, which produces the output."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, C)
        self.proj = nn.Linear(D, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.inner(torch.tanh(self.inner(x))))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.down.weight = self.up.weight
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.up(x))))


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class _Idle(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.aux = nn.Linear(D, C), nn.Linear(D, C)

    def forward(self, x):
        return self.head(x)


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "gp"])
@pytest.mark.parametrize("model", [_ScaledHead, _LastRegisteredRunsFirst])
def test_a_last_layer_that_does_not_produce_the_output_is_refused(structure, model):
    options = {"n_subset": N} if structure == "gp" else {}
    la = Laplace(model().double(), "classification", "last_layer", structure, **options)
    x, y = _data("classification")
    with pytest.raises(ValueError, match="does not produce the model's output"):
        la.fit([(x, y)])
    with pytest.raises(RuntimeError, match="fit"):
        la(x)


@pytest.mark.parametrize("structure", ["kron", "diag", "full", "lowrank"])
@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_Reused, "layer 'inner' ran more than once in one forward"),
        (_Idle, r"layers \['aux'\] have trainable parameters but did not run"),
    ],
)
def test_layers_run_twice_or_never_are_refused_by_name(structure, model, message):
    la = Laplace(model().double(), "classification", "all", structure)
    x, y = _data("classification")
    with pytest.raises(ValueError, match=message):
        la.fit([(x, y)])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_Tied, r"layer 'up' shares a trainable parameter with \['down'\] \(tied weights\)"),
        (
            lambda: nn.Sequential(_DoubledLinear(D, 5), nn.Tanh(), nn.Linear(5, C)),
            "layer '0' \\(_DoubledLinear\\) subclasses Linear with a forward of its own",
        ),
    ],
)
def test_tied_weights_and_own_forward_subclasses_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        Laplace(make().double(), "classification", "all", "kron")


def test_a_frozen_last_layer_is_refused():
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double().requires_grad_(False)
    with pytest.raises(ValueError, match="the last module '2' has a frozen weight"):
        Laplace(model, "classification", "last_layer", "kron")


def test_the_same_models_are_refused_by_the_laplace_torch_backend():
    from laplace import Laplace as LaplaceTorch

    from fastlaplace.integrations import FastGGN

    x, y = _data("classification")
    for model, message in ((_Reused, "ran more than once"), (_Tied, "tied weights")):
        la = LaplaceTorch(
            model().double(), "classification", subset_of_weights="all", hessian_structure="diag", backend=FastGGN
        )
        with pytest.raises(ValueError, match=message):
            la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=N))


# ---------------------------------------------------------------------- KFACPreconditioner: step and load_state_dict


def _kfac_model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, C))


def _kfac_step(model, pre, x, y) -> list[torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    return [p.grad.clone() for p in model.parameters()]


def _kfac_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data("classification", seed)
    return x.float(), y


def test_a_kfac_step_on_a_nan_batch_is_refused_and_leaves_the_factors_unchanged():
    from fastlaplace.optim import KFACPreconditioner

    clean_model, model = _kfac_model(), _kfac_model()
    clean, pre = KFACPreconditioner(clean_model, inv_update_steps=1), KFACPreconditioner(model, inv_update_steps=1)
    for seed in range(2):
        _kfac_step(clean_model, clean, *_kfac_batch(seed))
        _kfac_step(model, pre, *_kfac_batch(seed))
    x, y = _kfac_batch(5)
    x[3, 1] = math.nan
    with pytest.raises(ValueError, match="layer '0': the batch's inputs contain NaN or Inf"):
        _kfac_step(model, pre, x, y)
    assert pre.steps == clean.steps
    expected, got = _kfac_step(clean_model, clean, *_kfac_batch(6)), _kfac_step(model, pre, *_kfac_batch(6))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_kfac_load_state_dict_refuses_other_models_states_and_keeps_its_own():
    from fastlaplace.optim import KFACPreconditioner

    model, wide_model = _kfac_model(), _kfac_model(width=11)
    pre, wide = KFACPreconditioner(model), KFACPreconditioner(wide_model)
    _kfac_step(model, pre, *_kfac_batch(0))
    _kfac_step(wide_model, wide, *_kfac_batch(0))
    state = pre.state_dict()
    fresh = _kfac_model()
    expected = _kfac_step(fresh, _loaded(fresh, state), *_kfac_batch(1))
    cases = {
        "a wider model's state": (
            wide.state_dict(),
            "layer '0': the saved output factor is \\(11, 11\\).*from another model",
        ),
        "a missing entry": ({k: v for k, v in state.items() if k != "num_data"}, "the state misses \\['num_data'\\]"),
        "NaN factors": (
            {**state, "output_factors": [f * math.nan for f in state["output_factors"]]},
            "layer '0': the saved output factor contains NaN",
        ),
        "negative steps": ({**state, "steps": -1}, "steps must be a non-negative integer"),
    }
    for bad, message in cases.values():
        with pytest.raises(ValueError, match=message):
            pre.load_state_dict(bad)
    got = _kfac_step(model, pre, *_kfac_batch(1))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _loaded(model: nn.Module, state: dict):
    from fastlaplace.optim import KFACPreconditioner

    pre = KFACPreconditioner(model)
    pre.load_state_dict(state)
    return pre


def test_a_layer_frozen_after_the_preconditioner_was_made_is_named():
    from fastlaplace.optim import KFACPreconditioner

    model = _kfac_model()
    pre = KFACPreconditioner(model)
    model[0].requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"layers \['0'\] were frozen \(requires_grad=False\) after"):
        _kfac_step(model, pre, *_kfac_batch(0))


def test_a_glm_variance_that_overflows_float32_is_refused_not_flattened():
    torch.manual_seed(0)
    la = Laplace(nn.Sequential(nn.Linear(2, 3)), "classification", "all", "kron")
    la.fit([(torch.randn(8, 2), torch.randint(0, 3, (8,)))])
    x = torch.tensor([[1e20, 0.0]])  # finite outputs (~1e20), a variance of ~1e40 that float32 cannot hold
    assert torch.isfinite(la.model(x)).all()
    for link in ("probit", "mc", "bridge"):
        with pytest.raises(ValueError, match="variance is not finite in torch.float32"):
            la(x, link_approx=link)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"damping": lambda: -1.0}, "damping must be positive"),
        ({"kl_clip": lambda: math.nan}, "kl_clip must be positive"),
        ({"factor_decay": lambda: 1.5}, r"factor_decay must lie in \[0, 1\)"),
        ({"lr": lambda: "0.1"}, "lr must return a number, got '0.1'"),
    ],
)
def test_a_kfac_step_with_a_bad_scheduled_setting_changes_nothing(options, message):
    from fastlaplace.optim import KFACPreconditioner

    clean_model, model = _kfac_model(), _kfac_model()
    clean, pre = KFACPreconditioner(clean_model), KFACPreconditioner(model)
    _kfac_step(clean_model, clean, *_kfac_batch(0))
    _kfac_step(model, pre, *_kfac_batch(0))
    good = {name: getattr(pre, name) for name in options}
    for name, value in options.items():
        setattr(pre, name, value)
    with pytest.raises(ValueError, match=message):
        _kfac_step(model, pre, *_kfac_batch(1))
    for name, value in good.items():
        setattr(pre, name, value)
    assert pre.steps == clean.steps
    pre.step()  # the same step again, on the gradients and captures it left as they were
    expected = _kfac_step(clean_model, clean, *_kfac_batch(1))
    for e, g in zip(expected, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _with_dropout(p: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Dropout(p), nn.Linear(5, C)).double()


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_dropout_in_training_mode_is_refused_by_name_at_fit(structure, subset):
    options = {"n_subset": N} if structure == "gp" else {}
    la = Laplace(_with_dropout().train(), "classification", subset, structure, **options)
    x, y = _data("classification")
    with pytest.raises(ValueError, match=r"module '2' \(Dropout, p=0.5\) is in training mode.*model.eval\(\)"):
        la.fit([(x, y)])
    with pytest.raises(RuntimeError, match="fit"):
        la(x)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dropout_switched_on_after_the_fit_is_refused_by_every_predictive(structure):
    model = _with_dropout().eval()
    options = {"n_subset": N} if structure == "gp" else {}
    la = Laplace(model, "classification", "all", structure, **options)
    x, y = _data("classification")
    la.fit([(x, y)])
    before = _answers(la)
    model.train()
    for predictive in ("probit", "mc", "bridge"):
        with pytest.raises(ValueError, match=r"module '2' \(Dropout, p=0.5\) is in training mode"):
            la(x, link_approx=predictive)
    if "nn" in la.pred_types:
        with pytest.raises(ValueError, match="Dropout"):
            la(x, pred_type="nn", n_samples=2)
    model.eval()
    _assert_unchanged(la, before)


def test_dropout_with_p_zero_is_deterministic_and_allowed():
    la = Laplace(_with_dropout(0.0).train(), "classification", "all", "kron")
    x, y = _data("classification")
    la.fit([(x, y)])
    assert torch.equal(la(x), la(x))
