"""A sweep of hostile inputs against fastlaplace's public API, on tiny models (issue 19).

Each case calls the API as a careless or hostile user would and classifies the outcome:

- ``ok``: a right answer (finite, and equal to an oracle where one is given: the same call
  on a clean object or a brute-force computation), or an error naming the problem;
- ``silent-wrong``: an answer where none is right, or one that is not finite or differs
  from the oracle;
- ``corrupted``: a state-changing call raised and the object's answers (evidence, a
  predictive, the prior; or the K-FAC preconditioner's next preconditioned gradient) differ
  from before the call;
- ``confusing-error``: an error whose message holds none of the case's keywords (the
  argument, layer or value at fault), or an error for an input that has a right answer.

Run from the repository root: ``PYTHONPATH=$PWD python tools/hostile_sweep.py [-v]``.
It prints the counts and every case that is not ok; ``-v`` prints every case.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastlaplace import Laplace
from fastlaplace.marglik import marglik_training
from fastlaplace.optim import KFACPreconditioner

N, D, H, C = 10, 3, 4, 3
STRUCTURES = ("diag", "kron", "full", "lowrank", "gp")
#: (subset_of_weights, hessian_structure, likelihood) combinations the sweep fits
POSTERIORS = [
    *[("all", s, lik) for s in STRUCTURES for lik in ("classification", "regression")],
    *[("last_layer", s, "classification") for s in ("diag", "kron", "full", "lowrank", "gp")],
    ("all", "kron", "heteroscedastic_regression"),
    ("all", "diag", "heteroscedastic_regression"),
]
Answer = object


@dataclass
class Result:
    """One case's outcome."""

    group: str
    name: str
    status: str
    detail: str


RESULTS: list[Result] = []


def record(group: str, name: str, status: str, detail: str) -> None:
    """Keep one case's outcome."""
    RESULTS.append(Result(group, name, status, detail))


# ---------------------------------------------------------------------- models and data


def model(dtype: torch.dtype, outputs: int = C, width: int = H, seed: int = 0) -> nn.Module:
    """The tiny ``D → H → outputs`` tanh MLP, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, outputs)).to(dtype)


def with_dropout(dtype: torch.dtype, p: float) -> nn.Module:
    """:func:`model`'s layers with a Dropout(p) before the last."""
    net = model(dtype)
    return nn.Sequential(*net[:-1], nn.Dropout(p), net[-1])


def data(likelihood: str, dtype: torch.dtype, seed: int = 0, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, D)`` inputs and class labels or ``(n, C)`` regression targets, seeded."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=generator).to(dtype)
    if likelihood == "classification":
        return x, torch.randint(0, C, (n,), generator=generator)
    return x, torch.randn(n, C, generator=generator).to(dtype)


def outputs_of(likelihood: str) -> int:
    """The model's output count for a likelihood (means and log-variances for heteroscedastic)."""
    return 2 * C if likelihood == "heteroscedastic_regression" else C


class DictNet(nn.Module):
    """``model()`` reading its inputs from a dict batch's ``"input_ids"`` (or a plain tensor)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, batch):  # noqa: D102
        return self.net(batch["input_ids"] if isinstance(batch, dict) else batch)


def make(subset: str, structure: str, likelihood: str, dtype: torch.dtype, dict_inputs: bool = False, **options):
    """An unfitted posterior of the tiny model."""
    if structure == "gp":
        options.setdefault("n_subset", N)
    net = model(dtype, outputs_of(likelihood))
    return Laplace(DictNet(net) if dict_inputs else net, likelihood, subset, structure, **options)


def target_kind(likelihood: str) -> str:
    """The kind of targets a likelihood's batches hold."""
    return "classification" if likelihood == "classification" else "regression"


def fitted(subset: str, structure: str, likelihood: str, dtype: torch.dtype, dict_inputs: bool = False, **options):
    """A posterior of the tiny model fitted on two batches of ``data``."""
    la = make(subset, structure, likelihood, dtype, dict_inputs, **options)
    x, y = data(target_kind(likelihood), dtype)
    la.fit([(x[:5], y[:5]), (x[5:], y[5:])])
    return la


def answers(la) -> tuple:
    """What a posterior answers: its evidence, a predictive and its prior (an exception's repr if one raises)."""
    x, _ = data(target_kind(la.likelihood), la.dtype, seed=1)
    out = []
    for call in (lambda: la.log_marginal_likelihood(), lambda: la(x), lambda: la.prior_precision):
        try:
            value = call()
        except Exception as error:  # noqa: BLE001 (an answer that raises is compared like any other)
            value = repr(error)
        out.append(value)
    return tuple(out)


def same(a, b, rtol: float = 0.0) -> bool:
    """Whether two answers are equal (exactly with ``rtol=0``; NaN equals NaN there)."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(same(u, v, rtol) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if rtol == 0:
            return torch.equal(a, b) or bool(
                torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        return torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=rtol * 1e-3, equal_nan=False)
    return a == b


def finite(value) -> bool:
    """Whether every floating-point tensor or float in an answer is finite."""
    if isinstance(value, tuple | list):
        return all(finite(v) for v in value)
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    if isinstance(value, float):
        return math.isfinite(value)
    return True


# ---------------------------------------------------------------------- the case runner

RAISES = "raises"  # the input has no right answer: it must be refused by name


def case(
    group: str,
    name: str,
    call: Callable[[], Answer],
    keywords: tuple[str, ...] = (),
    *,
    expect: str = RAISES,
    oracle: Callable[[], Answer] | None = None,
    rtol: float = 0.0,
    check: Callable[[Answer], bool] | None = None,
    state: Callable[[], Answer] | None = None,
) -> None:
    """Run one hostile call and record its class.

    Args:
        group: the API call the case belongs to.
        name: the case.
        call: the call; ``state`` (if given) is read before and after it when it raises.
        keywords: any of them (case-insensitive) in the message names the problem.
        expect: ``RAISES`` (no right answer) or ``"answer"`` (a right answer exists).
        oracle: the right answer, compared with ``rtol`` (0: exact).
        rtol: the relative tolerance of the comparison with the oracle.
        state: what the object answers, compared before and after a call that raised.
        check: a further test of the answer.
    """
    before = state() if state is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = call()
    except Exception as error:  # noqa: BLE001 (the sweep classifies every exception)
        message = f"{type(error).__name__}: {error}"
        short = message.splitlines()[0][:220]
        if state is not None and not same(state(), before):
            record(group, name, "corrupted", f"{short}; answers changed after the error")
        elif expect != RAISES:
            record(group, name, "confusing-error", f"refused an input that has a right answer: {short}")
        elif not any(k.lower() in message.lower() for k in keywords):
            record(group, name, "confusing-error", f"{short} (keywords {keywords})")
        else:
            record(group, name, "ok", short)
        return
    if expect == RAISES:
        record(group, name, "silent-wrong", f"accepted; returned {summary(value)}")
    elif not finite(value):
        record(group, name, "silent-wrong", f"not finite: {summary(value)}")
    elif oracle is not None and not same(value, oracle(), rtol):
        record(group, name, "silent-wrong", f"{summary(value)} differs from the oracle {summary(oracle())}")
    elif check is not None and not _passes(check, value):
        record(group, name, "silent-wrong", f"failed its check: {summary(value)}")
    else:
        record(group, name, "ok", f"answered {summary(value)}")


def _passes(check: Callable[[Answer], bool], value: Answer) -> bool:
    try:
        return bool(check(value))
    except Exception:  # noqa: BLE001 (an answer the check cannot read fails it)
        return False


def summary(value) -> str:
    """A short text of an answer."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.flatten()[:3].tolist()}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(summary(v) for v in value[:3]) + ")"
    return repr(value)[:80]


# ---------------------------------------------------------------------- Laplace(...)


def sweep_factory() -> None:
    """``Laplace(...)`` with bad and with laplace-torch-style arguments."""
    g = "Laplace()"
    m = model(torch.float64)
    cases = [
        ("likelihood typo", lambda: Laplace(m, "clasification"), ("likelihood",)),
        ("subset typo", lambda: Laplace(m, "classification", "lastlayer"), ("subset_of_weights",)),
        ("structure typo", lambda: Laplace(m, "classification", "all", "kfac"), ("hessian_structure",)),
        ("unknown option", lambda: Laplace(m, "classification", prior_prec=1.0), ("prior_prec",)),
        ("subnetwork without indices", lambda: Laplace(m, "classification", "subnetwork", "full"), ("subnetwork",)),
        (
            "subnetwork with diag",
            lambda: Laplace(m, "classification", "subnetwork", "diag", subnetwork_indices=torch.tensor([0])),
            ("subnetwork",),
        ),
        (
            "indices out of range",
            lambda: Laplace(m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([0, 999])),
            ("subnetwork_indices", "999", "range"),
        ),
        (
            "negative indices",
            lambda: Laplace(m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([-1])),
            ("subnetwork_indices", "-1"),
        ),
        (
            "float indices",
            lambda: Laplace(m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([0.5])),
            ("subnetwork_indices",),
        ),
        (
            "empty indices",
            lambda: Laplace(
                m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([], dtype=torch.long)
            ),
            ("subnetwork_indices", "empty"),
        ),
        (
            "duplicate indices",
            lambda: Laplace(m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([1, 1])),
            ("subnetwork_indices", "duplicate", "repeat"),
        ),
        (
            "2-d indices",
            lambda: Laplace(m, "classification", "subnetwork", "full", subnetwork_indices=torch.tensor([[1, 2]])),
            ("subnetwork_indices",),
        ),
        ("gp without n_subset", lambda: Laplace(m, "classification", "all", "gp"), ("n_subset",)),
        ("gp n_subset 0", lambda: Laplace(m, "classification", "all", "gp", n_subset=0), ("n_subset",)),
        ("gp n_subset float", lambda: Laplace(m, "classification", "all", "gp", n_subset=2.5), ("n_subset",)),
        (
            "gp other approximation",
            lambda: Laplace(m, "classification", "all", "gp", n_subset=4, functional_approximation="nystrom"),
            ("functional_approximation",),
        ),
        (
            "kfac_approx with diag",
            lambda: Laplace(m, "classification", "all", "diag", kfac_approx="reduce"),
            ("kfac_approx",),
        ),
        (
            "kfac_approx typo",
            lambda: Laplace(m, "classification", "all", "kron", kfac_approx="expnad"),
            ("kfac_approx",),
        ),
        ("low_rank 0", lambda: Laplace(m, "classification", "all", "lowrank", low_rank=0), ("low_rank",)),
        ("low_rank -2", lambda: Laplace(m, "classification", "all", "lowrank", low_rank=-2), ("low_rank",)),
        ("low_rank 2.5", lambda: Laplace(m, "classification", "all", "lowrank", low_rank=2.5), ("low_rank",)),
        ("curvature_mode typo", lambda: Laplace(m, "classification", curvature_mode="gnn"), ("curvature_mode",)),
        (
            "curvature_dtype float64",
            lambda: Laplace(m, "classification", curvature_dtype=torch.float64),
            ("curvature_dtype",),
        ),
        ("prior -1", lambda: Laplace(m, "classification", prior_precision=-1.0), ("prior_precision",)),
        ("prior nan", lambda: Laplace(m, "classification", prior_precision=math.nan), ("prior_precision",)),
        ("prior string", lambda: Laplace(m, "classification", prior_precision="1"), ("prior_precision",)),
        (
            "prior wrong length",
            lambda: Laplace(m, "classification", prior_precision=torch.ones(5)),
            ("prior_precision",),
        ),
        ("sigma for classification", lambda: Laplace(m, "classification", sigma_noise=0.5), ("sigma_noise",)),
        ("sigma -1", lambda: Laplace(m, "regression", sigma_noise=-1.0), ("sigma_noise",)),
        ("sigma string", lambda: Laplace(m, "regression", sigma_noise="1"), ("sigma_noise",)),
        ("sigma (2, 2)", lambda: Laplace(m, "regression", sigma_noise=torch.ones(2, 2)), ("sigma_noise",)),
        ("temperature 0", lambda: Laplace(m, "classification", temperature=0), ("temperature",)),
        ("temperature -1", lambda: Laplace(m, "classification", temperature=-1.0), ("temperature",)),
        ("temperature string", lambda: Laplace(m, "classification", temperature="1"), ("temperature",)),
        ("prior_mean inf", lambda: Laplace(m, "classification", prior_mean=math.inf), ("prior_mean",)),
        ("no supported layer", lambda: Laplace(nn.Sequential(nn.Tanh()), "classification"), ("layer", "Linear")),
        ("not a module", lambda: Laplace(lambda x: x, "classification"), ("model", "Module")),
        ("a model with no parameters", lambda: Laplace(nn.Identity(), "classification"), ("layer", "parameter")),
        (
            "last_layer_name missing",
            lambda: Laplace(m, "classification", last_layer_name="head"),
            ("head", "last_layer_name"),
        ),
        (
            "feature_reduction alone",
            lambda: Laplace(m, "classification", feature_reduction="average"),
            ("feature_reduction",),
        ),
        (
            "feature_reduction typo",
            lambda: Laplace(m, "classification", last_layer_name="2", feature_reduction="avg"),
            ("feature_reduction",),
        ),
        (
            "frozen model, all",
            lambda: Laplace(model(torch.float64).requires_grad_(False), "classification", "all", "diag"),
            ("frozen", "trainable", "requires_grad"),
        ),
        (
            "unsupported layer only (GRU)",
            lambda: Laplace(nn.GRU(3, 3), "regression", "all", "kron"),
            ("layer", "GRU", "supported"),
        ),
        ("gp seed string", lambda: Laplace(m, "classification", "all", "gp", n_subset=4, seed="a"), ("seed",)),
        (
            "max_dense_factor 0",
            lambda: Laplace(m, "classification", "all", "kron", max_dense_factor=0),
            ("max_dense_factor",),
        ),
        ("factor_rank 0", lambda: Laplace(m, "classification", "all", "kron", factor_rank=0), ("factor_rank",)),
    ]
    for name, call, keywords in cases:
        case(g, name, call, keywords)
    for dtype in (torch.float32, torch.float64):
        # accepted values a laplace-torch user passes
        ok = [
            (
                "prior int 2",
                lambda dtype=dtype: Laplace(model(dtype), "classification", prior_precision=2).prior_precision,
            ),
            (
                "prior tensor scalar",
                lambda dtype=dtype: (
                    Laplace(
                        model(dtype), "classification", "all", "diag", prior_precision=torch.tensor(2.0)
                    ).prior_precision
                ),
            ),
            (
                "temperature int 1",
                lambda dtype=dtype: Laplace(model(dtype), "classification", temperature=1).temperature,
            ),
            ("sigma int 2", lambda dtype=dtype: Laplace(model(dtype), "regression", sigma_noise=2).sigma_noise),
        ]
        for name, call in ok:
            case(g, f"{name} {dtype}", call, expect="answer")


# ---------------------------------------------------------------------- fit


def bad_loaders(likelihood: str, dtype: torch.dtype) -> list[tuple[str, object, tuple[str, ...]]]:
    """``(name, loader, keywords)`` of loaders ``fit`` must refuse, naming a keyword."""
    kind = target_kind(likelihood)
    x, y = data(kind, dtype, seed=2)
    nan_x, inf_x = x.clone(), x.clone()
    nan_x[0, 0], inf_x[1, 1] = math.nan, math.inf
    other = torch.float32 if dtype == torch.float64 else torch.float64
    cases = [
        ("nan input", [(x, y), (nan_x, y)], ("NaN",)),
        ("inf input", [(x, y), (inf_x, y)], ("Inf",)),
        ("bare tensor", [(x, y), x], ("(x, y)", "pair")),
        ("triple", [(x, y, torch.arange(N))], ("3-item", "pair")),
        ("empty batch", [(x, y), (x[:0], y[:0])], ("empty",)),
        ("numpy inputs", [(x.numpy(), y)], ("torch.Tensor", "numpy")),
        ("numpy targets", [(x, y.numpy())], ("torch.Tensor", "numpy")),
        ("list targets", [(x, y.tolist())], ("torch.Tensor", "list")),
        ("no batch", [], ("no batch", "0 points")),
        ("None loader", None, ("loader", "NoneType", "iterable")),
        ("a tensor as the loader", x, ("batch", "pair")),
        ("one (x, y) pair as the loader", (x, y), ("batch", "pair", "loader")),
        ("dict batch without targets", [{"input_ids": x}], ("dict_key_y", "labels")),
        ("dict batch without inputs", [{"x": x, "labels": y}], ("dict_key_x", "input_ids")),
        ("wrong feature count", [(torch.randn(N, D + 1, dtype=dtype), y)], ("shape", "mat1", "features", str(D + 1))),
        ("x of another dtype", [(x.to(other), y)], ("dtype", "Double", "Float")),
        ("fewer targets than inputs", [(x, y[:-1])], ("targets", "shape")),
        ("1-d inputs", [(x[:, 0], y)], ("shape", "mat1", "input")),
    ]
    if kind == "classification":
        bad, neg = y.clone(), y.clone()
        bad[3], neg[0] = 7, -1
        cases += [
            ("label 7 of 3", [(x, y), (x, bad)], ("class labels",)),
            ("negative label", [(x, neg)], ("class labels",)),
            ("float labels", [(x, y.to(dtype))], ("class indices", "dtype", "float")),
            ("(N, 1) labels", [(x, y[:, None])], ("class indices", "shape")),
            ("one-hot labels", [(x, nn.functional.one_hot(y, C))], ("class indices", "shape")),
            ("bool labels", [(x, y > 0)], ("class indices", "bool")),
        ]
    else:
        inf_y = y.clone()
        y = y.round()
        inf_y[2, 1] = math.inf
        cases += [
            ("inf target", [(x, y), (x, inf_y)], ("NaN or Inf",)),
            ("nan target", [(x, y * math.nan)], ("NaN or Inf",)),
            ("(N, 1) targets", [(x, y[:, :1])], ("one column per output", "shape")),
            ("(N,) targets", [(x, y[:, 0])], ("targets", "shape")),
        ]
    return cases


def sweep_fit(subset: str, structure: str, likelihood: str, dtype: torch.dtype) -> None:
    """``fit`` with bad loaders (state checked), and odd but valid loaders against a clean fit."""
    g = "fit"
    tag = f"{subset}/{structure}/{likelihood[:4]}/{str(dtype)[6:]}"
    la = fitted(subset, structure, likelihood, dtype)
    for name, loader, keywords in bad_loaders(likelihood, dtype):
        case(g, f"{tag}: {name}", lambda loader=loader: la.fit(loader), keywords, state=lambda: answers(la))
    kind = target_kind(likelihood)
    x, y = data(kind, dtype)
    split = [(x[:5], y[:5]), (x[5:], y[5:])]

    def refit_then(loader, override=True, dict_inputs=False):
        other = fitted(subset, structure, likelihood, dtype, dict_inputs)
        other.fit(loader, override=override)
        return answers(other)

    clean = answers(fitted(subset, structure, likelihood, dtype))
    if structure == "lowrank":  # it reads the data several times
        case(g, f"{tag}: generator", lambda: refit_then(b for b in split), ("iterator",))
    else:
        case(
            g,
            f"{tag}: generator",
            lambda: refit_then(b for b in split),
            expect="answer",
            oracle=lambda: clean,
            rtol=1e-12,
        )
    dicts = [{"input_ids": a, "labels": b} for a, b in split]
    case(
        g,
        f"{tag}: dict batches",
        lambda: refit_then(dicts, dict_inputs=True),
        expect="answer",
        oracle=lambda: clean,
        rtol=1e-9,
    )
    if kind == "classification":
        case(
            g,
            f"{tag}: int32 labels",
            lambda: refit_then([(a, b.int()) for a, b in split]),
            expect="answer",
            oracle=lambda: clean,
            rtol=1e-12,
        )
        case(
            g,
            f"{tag}: uint8 labels",
            lambda: refit_then([(a, b.to(torch.uint8)) for a, b in split]),
            expect="answer",
            oracle=lambda: clean,
            rtol=1e-12,
        )
    # the same data again with override=False doubles the data: compare with a fit on it twice
    if kind == "regression":
        rounded = [(a, b.round()) for a, b in split]
        case(
            g,
            f"{tag}: integer targets",
            lambda: refit_then([(a, b.long()) for a, b in rounded]),
            expect="answer",
            oracle=lambda: refit_then(rounded),
            rtol=1e-12,
        )
    if structure in ("diag", "full"):
        tolerance = 1e-9 if dtype == torch.float64 else 1e-4
        case(
            g,
            f"{tag}: override=False twice",
            lambda: refit_then(split, override=False),
            expect="answer",
            oracle=lambda: refit_then(split + split),
            rtol=tolerance,
        )
    if structure != "gp":
        wrong = la.fit  # state check with an exhausted generator
        gen = (b for b in split)
        list(gen)
        case(g, f"{tag}: exhausted generator", lambda: wrong(gen), ("no batch", "iterator"), state=lambda: answers(la))
        case(
            g,
            f"{tag}: override=False, labels out of range",
            lambda: la.fit([(x, torch.full_like(y, 9) if kind == "classification" else y[:, :1])], override=False),
            ("class labels", "column", "cannot add data"),
            state=lambda: answers(la),
        )
    first = make(subset, structure, likelihood, dtype)
    bad_first = [(x, y), (x * math.nan, y)]

    def first_fit_then_predict():
        try:
            first.fit(bad_first)
        except ValueError:
            pass
        return first(x)

    case(g, f"{tag}: predict after a failed first fit", first_fit_then_predict, ("fit",))


# ---------------------------------------------------------------------- setters and the evidence


def sweep_setters(subset: str, structure: str, likelihood: str, dtype: torch.dtype) -> None:
    """The setters and the evidence's arguments."""
    g = "setters"
    tag = f"{subset}/{structure}/{likelihood[:4]}/{str(dtype)[6:]}"
    la = fitted(subset, structure, likelihood, dtype)
    layers = len(la.layers)
    bad = [
        ("prior_precision", -1.0, ("prior_precision",)),
        ("prior_precision", math.nan, ("prior_precision",)),
        ("prior_precision", math.inf, ("prior_precision",)),
        ("prior_precision", torch.ones(layers + 5), ("prior_precision",)),
        ("prior_precision", torch.ones(2, layers), ("prior_precision",)),
        ("prior_precision", "1.0", ("prior_precision",)),
        ("prior_precision", [-2.0] * layers, ("prior_precision",)),
        ("temperature", 0.0, ("temperature",)),
        ("temperature", math.inf, ("temperature",)),
        ("temperature", "1", ("temperature",)),
        ("prior_mean", math.nan, ("prior_mean",)),
        ("prior_mean", "0", ("prior_mean",)),
        ("sigma_noise", 0.0, ("sigma_noise",)),
        ("sigma_noise", math.inf, ("sigma_noise",)),
        ("sigma_noise", -0.5, ("sigma_noise",)),
    ]
    if likelihood == "regression":
        bad += [
            ("sigma_noise", torch.ones(C + 1), ("sigma_noise",)),
            ("sigma_noise", torch.full((C,), 0.5), ("sigma_noise", "refit")),
        ]
    for attribute, value, keywords in bad:
        case(
            g,
            f"{tag}: {attribute}={value!r:.30}",
            lambda a=attribute, v=value: setattr(la, a, v),
            keywords,
            state=lambda: answers(la),
        )

    def set_then_evidence(attribute, value):
        other = fitted(subset, structure, likelihood, dtype)
        setattr(other, attribute, value)
        return other.log_marginal_likelihood()

    def oracle_two():
        return fitted(subset, structure, likelihood, dtype).log_marginal_likelihood(torch.tensor(2.0, dtype=dtype))

    case(
        g,
        f"{tag}: prior_precision=2 (int)",
        lambda: set_then_evidence("prior_precision", 2),
        expect="answer",
        oracle=oracle_two,
        rtol=1e-10,
    )
    case(
        g,
        f"{tag}: prior_precision=numpy 2.0",
        lambda: set_then_evidence("prior_precision", np.float64(2.0)),
        expect="answer",
        oracle=oracle_two,
        rtol=1e-10,
    )
    case(
        g,
        f"{tag}: prior_precision=[2.0] * L list",
        lambda: set_then_evidence("prior_precision", [2.0] * layers),
        expect="answer",
        oracle=oracle_two,
        rtol=1e-10,
    )
    if la.supports_prior_per_parameter:
        sizes = sum(la.layer_sizes())
        case(
            g,
            f"{tag}: prior per parameter",
            lambda: set_then_evidence("prior_precision", torch.full((sizes,), 2.0)),
            expect="answer",
            oracle=oracle_two,
            rtol=1e-6,
        )
    if likelihood == "regression":
        case(
            g,
            f"{tag}: sigma_noise=2 (int)",
            lambda: set_then_evidence("sigma_noise", 2),
            expect="answer",
            oracle=lambda: fitted(subset, structure, likelihood, dtype).log_marginal_likelihood(None, 2.0),
            rtol=1e-10,
        )

    def in_place(value):
        other = fitted(subset, structure, likelihood, dtype)
        other.prior_precision[0] = value
        return other.log_marginal_likelihood()

    case(g, f"{tag}: in-place prior -1", lambda: in_place(-1.0), ("prior_precision", "in place"))
    case(g, f"{tag}: in-place prior nan", lambda: in_place(math.nan), ("prior_precision", "in place"))

    # the evidence's own arguments
    for name, args, keywords in [
        ("lml(-1.0)", (-1.0,), ("prior_precision",)),
        ("lml(0.0)", (0.0,), ("prior precision",)),
        ("lml(nan)", (math.nan,), ("prior_precision",)),
        ("lml(wrong shape)", (torch.ones(layers + 3),), ("prior_precision",)),
        ("lml(None, 0.0)", (None, 0.0), ("sigma_noise",)),
        ("lml(None, nan)", (None, math.nan), ("sigma_noise",)),
        ("lml('a')", ("a",), ("prior_precision",)),
    ]:
        case(g, f"{tag}: {name}", lambda a=args: la.log_marginal_likelihood(*a), keywords, state=lambda: answers(la))
    case(
        g,
        f"{tag}: lml(0.5) float",
        lambda: la.log_marginal_likelihood(0.5),
        expect="answer",
        oracle=lambda: la.log_marginal_likelihood(torch.tensor(0.5, dtype=dtype)),
        rtol=1e-12,
    )
    if likelihood != "regression":
        case(
            g, f"{tag}: lml(None, 0.5) not regression", lambda: la.log_marginal_likelihood(None, 0.5), ("sigma_noise",)
        )

    # differentiable in the prior
    def gradient():
        delta = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        la.log_marginal_likelihood(delta).backward()
        return delta.grad

    case(g, f"{tag}: lml gradient", gradient, expect="answer")


# ---------------------------------------------------------------------- optimize_prior_precision


def sweep_prior_tuning(subset: str, structure: str, likelihood: str, dtype: torch.dtype) -> None:
    """``optimize_prior_precision`` with bad arguments (state checked) and valid grids against a scored oracle."""
    g = "optimize_prior_precision"
    tag = f"{subset}/{structure}/{likelihood[:4]}/{str(dtype)[6:]}"
    la = fitted(subset, structure, likelihood, dtype)
    kind = target_kind(likelihood)
    x, y = data(kind, dtype, seed=3)
    bad_y = y.clone()
    if kind == "classification":
        bad_y[-1] = 5
    else:
        bad_y[-1, 0] = math.nan
    cases = [
        ({"method": "grid"}, ("method",)),
        ({"method": "marglik", "n_steps": 0}, ("n_steps",)),
        ({"method": "marglik", "n_steps": 2.5}, ("n_steps",)),
        ({"method": "marglik", "lr": -0.1}, ("lr",)),
        ({"method": "marglik", "lr": "0.1"}, ("lr",)),
        ({"method": "gridsearch"}, ("val_loader",)),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": []}, ("grid",)),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": [1.0, math.nan]}, ("grid",)),
        ({"method": "gridsearch", "val_loader": [(x, y)], "grid": 3.0}, ("grid",)),
        ({"method": "gridsearch", "val_loader": iter([(x, y)])}, ("iterator",)),
        ({"method": "gridsearch", "val_loader": []}, ("val_loader",)),
        ({"method": "gridsearch", "val_loader": [(x, y), (x, bad_y)], "grid": [0.1, 1.0]}, ("class labels", "NaN")),
        ({"method": "gridsearch", "val_loader": [(x, y)], "link_approx": "exact"}, ("link_approx",)),
        ({"method": "gridsearch", "val_loader": [(x, y)], "pred_type": "nonsense"}, ("pred_type",)),
        ({"method": "gridsearch", "val_loader": [x]}, ("batch", "pair")),
        ({"method": "gridsearch", "val_loader": [(x[:, :2], y)], "grid": [0.1, 1.0]}, ("shape", "mat1")),
    ]
    for arguments, keywords in cases:
        name = ", ".join(f"{k}={v!r:.20}" for k, v in arguments.items())
        case(
            g,
            f"{tag}: {name}",
            lambda a=arguments: la.optimize_prior_precision(**a),
            keywords,
            state=lambda: answers(la),
        )

    def tuned(**arguments):
        other = fitted(subset, structure, likelihood, dtype)
        other.optimize_prior_precision(**arguments)
        return other.prior_precision

    def grid_oracle(grid):
        # the grid value with the lowest validation negative log-likelihood, scored one by one on a clean posterior
        other = fitted(subset, structure, likelihood, dtype)
        scores = []
        for value in grid:
            other.prior_precision = value
            scores.append(other._predictive_nll([(x, y)], "glm", "probit"))
        return torch.full_like(other.prior_precision, float(grid[int(np.argmin(scores))]))

    grid = [0.01, 1.0, 100.0]
    case(
        g,
        f"{tag}: gridsearch",
        lambda: tuned(method="gridsearch", val_loader=[(x, y)], grid=grid),
        expect="answer",
        oracle=lambda: grid_oracle(grid),
    )
    case(
        g,
        f"{tag}: gridsearch int grid",
        lambda: tuned(method="gridsearch", val_loader=[(x, y)], grid=[1, 100]),
        expect="answer",
        oracle=lambda: grid_oracle([1, 100]),
    )
    case(
        g,
        f"{tag}: gridsearch tensor grid",
        lambda: tuned(method="gridsearch", val_loader=[(x, y)], grid=torch.tensor(grid)),
        expect="answer",
        oracle=lambda: grid_oracle(grid),
        rtol=1e-6,
    )
    case(
        g,
        f"{tag}: gridsearch generator grid",
        lambda: tuned(method="gridsearch", val_loader=[(x, y)], grid=(v for v in grid)),
        expect="answer",
        oracle=lambda: grid_oracle(grid),
    )
    case(
        g,
        f"{tag}: marglik lr=1 (int)",
        lambda: tuned(method="marglik", n_steps=3, lr=1),
        expect="answer",
        oracle=lambda: tuned(method="marglik", n_steps=3, lr=1.0),
    )


# ---------------------------------------------------------------------- predictives


def sweep_predictive(subset: str, structure: str, likelihood: str, dtype: torch.dtype) -> None:
    """The predictives, ``predict``, ``predictive_entropy`` and ``sample``."""
    g = "predictive"
    tag = f"{subset}/{structure}/{likelihood[:4]}/{str(dtype)[6:]}"
    la = fitted(subset, structure, likelihood, dtype)
    kind = target_kind(likelihood)
    x, _ = data(kind, dtype, seed=4)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    st = lambda: answers(la)  # noqa: E731
    bad = [
        ("n_samples=0 mc", lambda: la(x, link_approx="mc", n_samples=0), ("n_samples",)),
        ("n_samples=2.5", lambda: la(x, link_approx="mc", n_samples=2.5), ("n_samples",)),
        ("n_samples='10'", lambda: la.predict(x, n_samples="10"), ("n_samples",)),
        ("generator=0", lambda: la(x, link_approx="mc", generator=0), ("generator",)),
        ("empty x", lambda: la(x[:0]), ("no samples", "empty")),
        ("numpy x", lambda: la(x.numpy()), ("torch.Tensor",)),
        ("list x", lambda: la(x.tolist()), ("torch.Tensor",)),
        ("pred_type typo", lambda: la(x, pred_type="glmm"), ("pred_type",)),
        ("link_approx typo", lambda: la(x, link_approx="probitt"), ("link_approx",)),
        ("wrong features", lambda: la(x[:, :2]), ("shape", "mat1")),
        ("x of another dtype", lambda: la(x.to(other)), ("dtype", "Float", "Double")),
        ("integer x", lambda: la(x.long()), ("dtype", "Long")),
    ]
    if kind == "classification":
        case(
            g,
            f"{tag}: joint=True for classification (ignored, as in laplace-torch)",
            lambda: la(x, joint=True),
            expect="answer",
            oracle=lambda: la(x),
        )
    else:
        bad.append(("predictive_entropy on regression", lambda: la.predictive_entropy(x), ("classification",)))
    if structure != "gp":
        bad += [
            ("sample(0)", lambda: la.sample(0), ("n_samples",)),
            ("sample(-1)", lambda: la.sample(-1), ("n_samples",)),
            ("sample(2.0)", lambda: la.sample(2.0), ("n_samples",)),
            ("nn n_samples=0", lambda: la(x, pred_type="nn", n_samples=0), ("n_samples",)),
        ]
    for name, call, keywords in bad:
        case(g, f"{tag}: {name}", call, keywords, state=st)
    clean = la(x)

    def under_inference_mode():
        fresh = fitted(subset, structure, likelihood, dtype)
        with torch.inference_mode():
            first = fresh(x.clone())  # caches made here
        if structure != "gp":
            fresh.optimize_prior_precision(method="marglik", n_steps=2)  # must differentiate through them
        return first

    case(g, f"{tag}: under torch.inference_mode", under_inference_mode, expect="answer", oracle=lambda: clean)
    nan_x = x.clone()
    nan_x[2, 0] = math.nan

    def nan_row():
        out = la(nan_x)
        out = out if isinstance(out, tuple) else (out,)
        ref = clean if isinstance(clean, tuple) else (clean,)
        rows = torch.ones(N, dtype=torch.bool)
        rows[2] = False
        if not all(torch.equal(o[rows], r[rows]) for o, r in zip(out, ref, strict=True)):
            raise AssertionError("the other rows changed")
        return out

    # a NaN input row must be refused or give NaN in that row alone
    try:
        nan_row()
        record(g, f"{tag}: NaN input row", "ok", "NaN in that row alone")
    except AssertionError as error:
        record(g, f"{tag}: NaN input row", "silent-wrong", str(error))
    except Exception as error:  # noqa: BLE001
        status = "ok" if "nan" in str(error).lower() else "confusing-error"
        record(g, f"{tag}: NaN input row", status, f"{type(error).__name__}: {error}"[:200])

    def rows_sum_to_one(p):
        return bool(torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-4)) and bool(
            (p >= 0).all()
        )

    if kind == "classification":
        for link in ("probit", "bridge", "bridge_norm", "mc"):
            case(
                g,
                f"{tag}: link {link}",
                lambda link=link: la(x, link_approx=link, n_samples=20, generator=torch.Generator().manual_seed(0)),
                expect="answer",
                check=rows_sum_to_one,
            )
        case(
            g,
            f"{tag}: single sample equals its row",
            lambda: la(x[3:4]),
            expect="answer",
            oracle=lambda: clean[3:4],
            rtol=1e-5,
        )
        case(
            g,
            f"{tag}: predictive_entropy",
            lambda: la.predictive_entropy(x),
            expect="answer",
            check=lambda e: bool((e >= 0).all()),
        )
        big = torch.zeros(2, D, dtype=dtype)
        big[:, 0] = 1e20 if dtype == torch.float64 else 1e15
        case(
            g,
            f"{tag}: huge logits",
            lambda: la(big),
            ("not finite", "variance", "overflow"),
            expect="answer",
            check=rows_sum_to_one,
        )
        if structure != "gp":
            case(
                g,
                f"{tag}: pred_type nn",
                lambda: la(x, pred_type="nn", n_samples=5, generator=torch.Generator().manual_seed(0)),
                expect="answer",
                check=rows_sum_to_one,
            )
    else:
        case(g, f"{tag}: predict", lambda: la.predict(x), expect="answer", check=lambda ms: bool((ms[1] > 0).all()))
        case(
            g,
            f"{tag}: diagonal_output",
            lambda: la(x, diagonal_output=True),
            expect="answer",
            oracle=lambda: (clean[0], clean[1].diagonal(dim1=1, dim2=2)),
            rtol=1e-10 if dtype == torch.float64 else 1e-5,  # the variances alone: another float32 summation order
        )
        case(
            g,
            f"{tag}: joint",
            lambda: la(x, joint=True),
            expect="answer",
            check=lambda mc: bool(
                torch.allclose(mc[1].diagonal(), clean[1].diagonal(dim1=1, dim2=2).flatten(), rtol=1e-5)
            ),
        )
    if structure != "gp":
        case(
            g,
            f"{tag}: sample seeded twice",
            lambda: la.sample(4, generator=torch.Generator().manual_seed(1)),
            expect="answer",
            oracle=lambda: la.sample(4, generator=torch.Generator().manual_seed(1)),
        )


# ---------------------------------------------------------------------- state_dict / load_state_dict


def sweep_state(subset: str, structure: str, likelihood: str, dtype: torch.dtype) -> None:
    """``load_state_dict`` of tampered states (state checked), and round trips against the source's answers."""
    g = "state_dict"
    tag = f"{subset}/{structure}/{likelihood[:4]}/{str(dtype)[6:]}"
    source = fitted(subset, structure, likelihood, dtype)
    state = source.state_dict()
    la = fitted(subset, structure, likelihood, dtype)
    la.fit([data(target_kind(likelihood), dtype, seed=5)])
    st = lambda: answers(la)  # noqa: E731
    at = next(i for i, t in enumerate(state["curvature"]) if t.is_floating_point())
    first = state["curvature"][at]
    nan, negative = first.clone(), first.clone()
    nan[(0,) * nan.dim()], negative[(0,) * negative.dim()] = math.nan, -1.0

    def replaced(tensor):
        return [*state["curvature"][:at], tensor, *state["curvature"][at + 1 :]]

    tampered = [
        ("missing loss", {k: v for k, v in state.items() if k != "loss"}, ("loss",)),
        ("short curvature", {**state, "curvature": state["curvature"][1:]}, ("curvature",)),
        ("curvature not a list", {**state, "curvature": first}, ("curvature",)),
        ("negative prior", {**state, "prior_precision": -state["prior_precision"]}, ("prior_precision",)),
        ("prior wrong shape", {**state, "prior_precision": torch.ones(7, dtype=dtype)}, ("prior_precision",)),
        ("nan curvature", {**state, "curvature": replaced(nan)}, ("NaN",)),
        ("num_data 0", {**state, "num_data": 0}, ("num_data",)),
        ("num_data 2.5", {**state, "num_data": 2.5}, ("num_data",)),
        ("nan sigma", {**state, "sigma_noise": torch.tensor(math.nan)}, ("sigma_noise",)),
        ("temperature 0", {**state, "temperature": 0.0}, ("temperature",)),
        ("other structure", {**state, "structure": "Other"}, ("structure", "Other")),
        (
            "other likelihood",
            {**state, "likelihood": "regression" if likelihood != "regression" else "classification"},
            ("likelihood", "for regression", "for classification"),
        ),
        ("other layers", {**state, "layers": [("x", (1, 1))]}, ("layers",)),
        ("nan loss", {**state, "loss": math.nan}, ("loss",)),
        ("num_outputs 99", {**state, "num_outputs": 99}, ("num_outputs",)),
        ("None", None, ("state", "NoneType", "Mapping", "dict")),
        (
            "curvature of another dtype",
            {**state, "curvature": [t.to(torch.float16) for t in state["curvature"]]},
            ("dtype", "float16"),
        ),
    ]
    if structure in ("diag", "kron", "full"):
        tampered.append(
            ("negative curvature", {**state, "curvature": replaced(negative)}, ("non-negative", "negative"))
        )
    wide = Laplace(
        model(dtype, outputs_of(likelihood), width=H + 2),
        likelihood,
        subset,
        structure,
        **({"n_subset": N} if structure == "gp" else {}),
    )
    x, y = data(target_kind(likelihood), dtype)
    wide.fit([(x, y)])
    tampered.append(("a wider model's state", wide.state_dict(), ("shape", "layers", "another")))
    for name, bad, keywords in tampered:
        case(g, f"{tag}: {name}", lambda bad=bad: la.load_state_dict(bad), keywords, state=st)
    clean = answers(source)

    def loaded(transform):
        fresh = make(subset, structure, likelihood, dtype)
        fresh.load_state_dict(transform(state))
        return answers(fresh)

    def via_torch_save(s):
        buffer = io.BytesIO()
        torch.save(s, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    case(g, f"{tag}: load into a fresh posterior", lambda: loaded(lambda s: s), expect="answer", oracle=lambda: clean)
    case(g, f"{tag}: torch.save round trip", lambda: loaded(via_torch_save), expect="answer", oracle=lambda: clean)
    case(
        g, f"{tag}: pickle", lambda: answers(pickle.loads(pickle.dumps(source))), expect="answer", oracle=lambda: clean
    )
    case(g, f"{tag}: deepcopy", lambda: answers(copy.deepcopy(source)), expect="answer", oracle=lambda: clean)
    case(g, f"{tag}: state_dict before fit", lambda: make(subset, structure, likelihood, dtype).state_dict(), ("fit",))


# ---------------------------------------------------------------------- odd models


class Wrapped(nn.Module):
    """``model()``, its output wrapped: ``"tuple"``, ``"dict"``, ``"scaled"`` (3 × logits, or in place), ``"1d"``."""

    def __init__(self, kind: str, dtype: torch.dtype, outputs: int = C):
        super().__init__()
        self.kind, self.net = kind, model(dtype, outputs)

    def forward(self, x):  # noqa: D102
        out = self.net(x)
        if self.kind == "scaled in place":
            return out.mul_(3)
        return {
            "tuple": (out, x),
            "dict": {"logits": out, "x": x},
            "scaled": 3 * out,
            "1d": out[:, 0],
            "3d": out[:, :, None],
        }[self.kind]


class Reused(nn.Module):
    """A Linear run twice in one forward."""

    def __init__(self, dtype):
        super().__init__()
        self.inner, self.head = nn.Linear(D, D).to(dtype), nn.Linear(D, C).to(dtype)

    def forward(self, x):  # noqa: D102
        return self.head(self.inner(torch.tanh(self.inner(x))))


class Tied(nn.Module):
    """Two Linears sharing one weight."""

    def __init__(self, dtype):
        super().__init__()
        self.up, self.down = nn.Linear(D, D, bias=False).to(dtype), nn.Linear(D, D, bias=False).to(dtype)
        self.down.weight = self.up.weight
        self.head = nn.Linear(D, C).to(dtype)

    def forward(self, x):  # noqa: D102
        return self.head(self.down(torch.tanh(self.up(x))))


class Idle(nn.Module):
    """A registered Linear the forward never runs."""

    def __init__(self, dtype):
        super().__init__()
        self.head, self.aux = nn.Linear(D, C).to(dtype), nn.Linear(D, C).to(dtype)

    def forward(self, x):  # noqa: D102
        return self.head(x)


class DoubledLinear(nn.Linear):
    """A Linear subclass whose forward uses 2 W."""

    def forward(self, x):  # noqa: D102
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class InputChangedInPlace(nn.Module):
    """``model()`` whose first layer's input is doubled in place after that layer ran."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.net = model(dtype)

    def forward(self, x):  # noqa: D102
        hidden = self.net[1](self.net[0](x))
        out = self.net[2](hidden)
        hidden.mul_(2)
        return out


class DropPath(nn.Module):
    """Stochastic depth: in training mode each sample's input kept with probability 0.9 (no Dropout module)."""

    def forward(self, x):  # noqa: D102
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, dtype=x.dtype) > 0.1).to(x.dtype) / 0.9


class OffsetRMSNorm(nn.Module):
    """Named as Hugging Face names its RMSNorms, but Gemma's ``(1 + weight) * x / rms(x)``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.variance_epsilon = 1e-6

    def forward(self, x):  # noqa: D102
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class ComposedTanhGelu(nn.Module):
    """GPT-2's ``gelu_new`` written as Hugging Face writes it (eight elementwise nodes)."""

    def forward(self, x):  # noqa: D102
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def with_layers(dtype: torch.dtype, norm: nn.Module | None = None, activation: nn.Module | None = None) -> nn.Module:
    """:func:`model`'s weights with a norm after the first layer and another activation."""
    net = model(dtype)
    layers = [net[0], *([norm.to(dtype)] if norm is not None else []), activation or net[1], net[2]]
    return nn.Sequential(*layers)


def sweep_models(structure: str, dtype: torch.dtype) -> None:
    """Models whose outputs or layers are odd."""
    g = "models"
    tag = f"{structure}/{str(dtype)[6:]}"
    x, y = data("classification", dtype)
    options = {"n_subset": N} if structure == "gp" else {}

    def fit_answers(net, subset="all", likelihood="classification", targets=y):
        la = Laplace(net, likelihood, subset, structure, **options)
        la.fit([(x, targets)])
        return answers(la)

    clean = fit_answers(model(dtype))
    for kind in ("tuple", "dict"):
        case(
            g,
            f"{tag}: a model returning a {kind}",
            lambda kind=kind: fit_answers(Wrapped(kind, dtype)),
            expect="answer",
            oracle=lambda: clean,
        )
    case(
        g,
        f"{tag}: last layer of a scaled output",
        lambda: fit_answers(Wrapped("scaled", dtype), "last_layer"),
        ("does not produce the model's output",),
    )
    case(
        g,
        f"{tag}: last layer of an output scaled in place",
        lambda: fit_answers(Wrapped("scaled in place", dtype), "last_layer"),
        ("does not produce the model's output", "in place"),
    )
    case(
        g,
        f"{tag}: all weights, output scaled in place",
        lambda: fit_answers(Wrapped("scaled in place", dtype)),
        expect="answer",
        oracle=lambda: fit_answers(Wrapped("scaled", dtype)),
    )
    case(
        g,
        f"{tag}: a layer input changed in place after the layer",
        lambda: fit_answers(InputChangedInPlace(dtype)),
        ("net.2", "changed in place", "out of place"),
    )
    case(
        g,
        f"{tag}: an in-place ReLU after a LayerNorm",
        lambda: fit_answers(with_layers(dtype, nn.LayerNorm(H), nn.ReLU(inplace=True))),
        expect="answer",
        oracle=lambda: fit_answers(with_layers(dtype, nn.LayerNorm(H), nn.ReLU())),
    )
    case(g, f"{tag}: (N,) output", lambda: fit_answers(Wrapped("1d", dtype)), ("(N, C)", "output", "shape"))
    case(g, f"{tag}: (N, C, 1) output", lambda: fit_answers(Wrapped("3d", dtype)), ("(N, C)", "output", "shape"))
    case(g, f"{tag}: a layer run twice", lambda: fit_answers(Reused(dtype)), ("more than once",))
    case(g, f"{tag}: tied weights", lambda: fit_answers(Tied(dtype)), ("tied",))
    case(g, f"{tag}: a layer never run", lambda: fit_answers(Idle(dtype)), ("did not run", "aux"))
    case(
        g,
        f"{tag}: a Linear subclass with its own forward",
        lambda: fit_answers(nn.Sequential(DoubledLinear(D, C).to(dtype))),
        ("forward of its own",),
    )
    for subset in ("all", "last_layer"):
        case(
            g,
            f"{tag}: dropout in training mode, {subset}",
            lambda subset=subset: fit_answers(with_dropout(dtype, 0.5).train(), subset),
            ("Dropout", "training mode", "model.eval()"),
        )
    case(
        g,
        f"{tag}: BatchNorm in training mode",
        lambda: fit_answers(with_layers(dtype, nn.BatchNorm1d(H)).train()),
        ("BatchNorm1d", "training mode", "model.eval()"),
    )
    case(
        g,
        f"{tag}: a drop-path in training mode",
        lambda: fit_answers(with_layers(dtype, DropPath()).train()),
        ("draws random numbers", "model.eval()"),
    )
    case(
        g,
        f"{tag}: dropout p=0 in training mode",
        lambda: fit_answers(with_dropout(dtype, 0.0).train()),
        expect="answer",
        oracle=lambda: clean,
    )
    case(
        g,
        f"{tag}: an RMSNorm",
        lambda: fit_answers(with_layers(dtype, nn.RMSNorm(H))),
        expect="answer",
    )
    case(
        g,
        f"{tag}: a layer named RMSNorm with Gemma's (1 + weight)",
        lambda: fit_answers(with_layers(dtype, OffsetRMSNorm(H))),
        ("OffsetRMSNorm", "weight * x / rms(x)", "freeze"),
    )
    case(
        g,
        f"{tag}: an RMSNorm over two dimensions",
        lambda: fit_answers(
            nn.Sequential(
                nn.Linear(D, 2 * H), nn.Unflatten(1, (2, H)), nn.RMSNorm((2, H)), nn.Flatten(), nn.Linear(2 * H, C)
            ).to(dtype)
        ),  # fmt: skip
        ("last dimension",),
    )
    case(
        g,
        f"{tag}: gelu_new as elementwise ops (collapsed in the backward)",
        lambda: fit_answers(with_layers(dtype, activation=ComposedTanhGelu())),
        expect="answer",
        oracle=lambda: fit_answers(with_layers(dtype, activation=nn.GELU(approximate="tanh"))),
        rtol=1e-4 if dtype == torch.float32 else 1e-9,
    )
    frozen = model(dtype)
    frozen[0].requires_grad_(False)
    case(g, f"{tag}: first layer frozen, all weights", lambda: fit_answers(frozen), expect="answer")
    if structure != "gp":
        frozen_head = model(dtype)
        frozen_head[2].requires_grad_(False)
        case(g, f"{tag}: last layer frozen, last_layer", lambda: fit_answers(frozen_head, "last_layer"), ("frozen",))
    ry = data("regression", dtype)[1]
    case(
        g,
        f"{tag}: heteroscedastic with an odd output count",
        lambda: fit_answers(model(dtype), likelihood="heteroscedastic_regression", targets=ry),
        ("heteroscedastic", "even", "2 C", "2C", "column"),
    )


# ---------------------------------------------------------------------- marglik_training


def sweep_marglik() -> None:
    """``marglik_training`` with bad arguments (the model's weights checked after an error)."""
    g = "marglik_training"
    x, y = data("classification", torch.float64)
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    bad_y = y.clone()
    bad_y[0] = 9
    cases = [
        ("generator loader", {"train_loader": (b for b in loader)}, ("iterator",)),
        ("empty loader", {"train_loader": []}, ("no batch", "empty", "no data")),
        ("label 9", {"train_loader": [(x, bad_y)]}, ("class labels",)),
        ("nan inputs", {"train_loader": [(x * math.nan, y)]}, ("NaN",)),
        ("gp", {"hessian_structure": "gp"}, ("gp",)),
        ("structure typo", {"hessian_structure": "kfac"}, ("hessian_structure",)),
        ("likelihood typo", {"likelihood": "clasification"}, ("likelihood",)),
        ("prior_structure typo", {"prior_structure": "layer"}, ("prior_structure",)),
        ("n_epochs 0", {"n_epochs": 0}, ("n_epochs",)),
        ("n_epochs 1.5", {"n_epochs": 1.5}, ("n_epochs",)),
        ("n_hypersteps 0", {"n_hypersteps": 0}, ("n_hypersteps",)),
        ("marglik_frequency -1", {"marglik_frequency": -1}, ("marglik_frequency",)),
        ("lr_hyp nan", {"lr_hyp": math.nan}, ("lr_hyp",)),
        ("prior_prec_init -1", {"prior_prec_init": -1.0}, ("prior_prec_init",)),
        ("sigma_noise_init 0", {"sigma_noise_init": 0.0}, ("sigma_noise_init",)),
        ("temperature 0", {"temperature": 0.0}, ("temperature",)),
        ("optimizer_kwargs typo", {"optimizer_kwargs": {"learning_rate": 0.1}}, ("learning_rate",)),
        ("diag prior with kron", {"prior_structure": "diag"}, ("diag", "kron")),
        ("unknown laplace option", {"prior_prec": 1.0}, ("prior_prec",)),
        ("a numpy batch", {"train_loader": [(x.numpy(), y)]}, ("torch.Tensor",)),
    ]
    for name, arguments, keywords in cases:
        net = model(torch.float64)
        weights = {k: v.clone() for k, v in net.state_dict().items()}

        def weights_state(net=net, weights=weights):
            return all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())

        arguments = {"train_loader": loader, "n_epochs": 1, **arguments}
        case(g, name, lambda net=net, a=arguments: marglik_training(net, **a), keywords, state=weights_state)

    def trained(**arguments):
        la, _, margliks, losses = marglik_training(model(torch.float64), loader, n_epochs=2, **arguments)
        return la.prior_precision, torch.tensor(margliks), torch.tensor(losses)

    case(
        g,
        "prior_prec_init=1 (int)",
        lambda: trained(prior_prec_init=1),
        expect="answer",
        oracle=lambda: trained(prior_prec_init=1.0),
    )
    case(
        g,
        "regression",
        lambda: (
            marglik_training(model(torch.float64), [data("regression", torch.float64)], "regression", n_epochs=2)[
                0
            ].sigma_noise
        ),
        expect="answer",
    )


# ---------------------------------------------------------------------- KFACPreconditioner


def kfac_step(net: nn.Module, pre: KFACPreconditioner, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Forward, backward and a preconditioner step on one batch; the preconditioned gradients."""
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    pre.step()
    return [p.grad.clone() for p in net.parameters()]


def sweep_kfac() -> None:
    """``KFACPreconditioner``: options, steps with bad batches or settings, ``load_state_dict``."""
    g = "KFACPreconditioner"
    x, y = data("classification", torch.float32)
    x2, y2 = data("classification", torch.float32, seed=7)
    options = [
        ("damping 0", {"damping": 0.0}, ("damping",)),
        ("damping nan", {"damping": math.nan}, ("damping",)),
        ("damping string", {"damping": "0.1"}, ("damping",)),
        ("factor_decay 1", {"factor_decay": 1.0}, ("factor_decay",)),
        ("factor_decay -0.1", {"factor_decay": -0.1}, ("factor_decay",)),
        ("kl_clip 0", {"kl_clip": 0.0}, ("kl_clip",)),
        ("lr -1", {"lr": -1.0}, ("lr",)),
        ("factor_update_steps 0", {"factor_update_steps": 0}, ("factor_update_steps",)),
        ("inv_update_steps 1.5", {"inv_update_steps": 1.5}, ("inv_update_steps",)),
        ("damping_mode typo", {"damping_mode": "eigne"}, ("damping_mode",)),
        ("loss_reduction typo", {"loss_reduction": "avg"}, ("loss_reduction",)),
        ("kfac_approx typo", {"kfac_approx": "expnad"}, ("kfac_approx",)),
        ("broadcast typo", {"broadcast": "all"}, ("broadcast",)),
        ("conventions typo", {"conventions": "kfac_pytorch"}, ("conventions",)),
        ("skip_layers unknown name", {"skip_layers": ["nonexistent"]}, ("skip_layers", "nonexistent")),
        ("skip every layer", {"skip_layers": [nn.Linear]}, ("layer", "skip")),
        ("bucket_mb -1", {"bucket_mb": -1.0}, ("bucket_mb",)),
    ]
    for name, arguments, keywords in options:
        case(g, name, lambda a=arguments: KFACPreconditioner(model(torch.float32), **a), keywords)
    case(g, "a model without layers", lambda: KFACPreconditioner(nn.Sequential(nn.Tanh())), ("layer",))

    def pair():
        net = model(torch.float32)
        pre = KFACPreconditioner(net, inv_update_steps=1)
        kfac_step(net, pre, x, y)
        return net, pre

    def next_grads(net, pre):
        def read():
            saved = {k: v.clone() for k, v in net.state_dict().items()}
            state = copy.deepcopy(pre.state_dict())
            steps = pre.steps
            grads = kfac_step(net, pre, x2, y2)
            pre.load_state_dict(state)
            pre.steps = steps
            net.load_state_dict(saved)
            return grads

        return read

    nan_x = x.clone()
    nan_x[0, 0] = math.nan
    net, pre = pair()
    case(g, "step on a NaN batch", lambda: kfac_step(net, pre, nan_x, y), ("NaN",), state=next_grads(net, pre))
    net, pre = pair()

    def inf_grad_step():
        net.zero_grad()
        (net(x).sum() * math.inf).backward()
        pre.step()

    case(g, "step with Inf gradients", inf_grad_step, ("Inf", "gradient", "NaN"), state=next_grads(net, pre))
    net, pre = pair()

    def step_without_forward():
        net.zero_grad()
        pre.step()

    case(g, "step without a forward", step_without_forward, ("forward", "backward", "ran"), state=next_grads(net, pre))
    net, pre = pair()

    def step_without_grads():
        with torch.no_grad():
            net(x)
        pre.step()

    case(
        g,
        "step after a no_grad forward",
        step_without_grads,
        ("forward", "backward", "gradient", "ran"),
        state=next_grads(net, pre),
    )
    for name, setting, value, keywords in [
        ("damping set to -1", "damping", -1.0, ("damping",)),
        ("damping callable nan", "damping", lambda: math.nan, ("damping",)),
        ("lr callable 'x'", "lr", lambda: "x", ("lr",)),
        ("factor_decay set to 2", "factor_decay", 2.0, ("factor_decay",)),
        ("kl_clip set to -1", "kl_clip", -1.0, ("kl_clip",)),
    ]:
        # a step refused for its settings keeps the batch's captures: retried with good settings it is the clean step
        net, pre = pair()
        clean_net, clean = pair()
        expected = kfac_step(clean_net, clean, x2, y2)
        good = getattr(pre, setting)
        setattr(pre, setting, value)
        try:
            kfac_step(net, pre, x2, y2)
        except Exception as error:  # noqa: BLE001
            setattr(pre, setting, good)
            pre.step()
            message = f"{type(error).__name__}: {error}"[:200]
            if not same([p.grad for p in net.parameters()], expected):
                record(g, f"step with {name}", "corrupted", f"{message}; the retried step differs from a clean one")
            elif not any(k.lower() in message.lower() for k in keywords):
                record(g, f"step with {name}", "confusing-error", message)
            else:
                record(g, f"step with {name}", "ok", message)
        else:
            record(g, f"step with {name}", "silent-wrong", "accepted")
    net, pre = pair()
    state = pre.state_dict()
    wide_net = model(torch.float32, width=H + 3)
    wide = KFACPreconditioner(wide_net)
    kfac_step(wide_net, wide, x, y)
    tampered = [
        ("a wider model's state", wide.state_dict(), ("layer", "shape", "another model")),
        ("missing num_data", {k: v for k, v in state.items() if k != "num_data"}, ("num_data",)),
        ("NaN factors", {**state, "output_factors": [f * math.nan for f in state["output_factors"]]}, ("NaN",)),
        ("negative steps", {**state, "steps": -1}, ("steps",)),
        ("steps 1.5", {**state, "steps": 1.5}, ("steps",)),
        ("None", None, ("state", "NoneType", "dict", "Mapping")),
        ("short factor list", {**state, "input_factors": state["input_factors"][:1]}, ("factor", "layer")),
    ]
    for name, bad, keywords in tampered:
        case(
            g,
            f"load_state_dict: {name}",
            lambda bad=bad: pre.load_state_dict(bad),
            keywords,
            state=next_grads(net, pre),
        )

    def round_trip():
        fresh_net = model(torch.float32)
        fresh = KFACPreconditioner(fresh_net, inv_update_steps=1)
        fresh.load_state_dict(copy.deepcopy(state))
        fresh_net.load_state_dict(net.state_dict())
        return kfac_step(fresh_net, fresh, x2, y2)

    case(g, "state_dict round trip", round_trip, expect="answer", oracle=next_grads(net, pre))
    case(g, "deepcopy", lambda: copy.deepcopy(pre).state_dict()["steps"], expect="answer", oracle=lambda: pre.steps)


# ---------------------------------------------------------------------- main


def main() -> int:
    """Run every group, print the non-ok cases (all with ``-v``) and the counts."""
    torch.set_num_threads(1)
    verbose = "-v" in sys.argv
    sweep_factory()
    for dtype in (torch.float64, torch.float32):
        for subset, structure, likelihood in POSTERIORS:
            sweep_fit(subset, structure, likelihood, dtype)
            sweep_setters(subset, structure, likelihood, dtype)
            sweep_predictive(subset, structure, likelihood, dtype)
            if dtype == torch.float64:
                sweep_prior_tuning(subset, structure, likelihood, dtype)
                sweep_state(subset, structure, likelihood, dtype)
        for structure in STRUCTURES:
            sweep_models(structure, dtype)
    sweep_marglik()
    sweep_kfac()
    counts = {s: sum(r.status == s for r in RESULTS) for s in ("ok", "silent-wrong", "corrupted", "confusing-error")}
    for r in RESULTS:
        if verbose or r.status != "ok":
            print(f"[{r.status}] {r.group}: {r.name}: {r.detail}")
    print(f"{len(RESULTS)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
