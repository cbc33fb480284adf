"""``python -m fastlaplace.demo``: Laplace approximations end to end on small, shipped data.

1. Regression of a noisy sine with a gap in the training inputs: the predictive band of a
   last-layer and an all-layer Kron Laplace widens away from the data (``regression.png``).
2. Classification of scikit-learn's 8×8 digits: the MAP network against diagonal and Kron
   Laplace posteriors on accuracy, NLL, ECE (15 bins, ``reliability.png``) and the AUROC of
   the predictive entropy at telling test digits from noised and from rotated ones.
3. Every posterior's prior precision tuned by the marginal likelihood (evidence before and
   after), and for comparison by grid search on a validation split's predictive NLL.

Options: ``--out DIR`` (default ``demo_output``), ``--seed``, ``--quick`` (shorter training).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy
import torch
from torch import Tensor, nn

from fastlaplace import Laplace, metrics

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.datasets import load_digits
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fastlaplace.demo needs matplotlib and scikit-learn: pip install 'fastlaplace[demo]'") from error

Batches = list[tuple[Tensor, Tensor]]
#: the classification posteriors compared: (label, subset_of_weights, hessian_structure)
CLASSIFIERS = (
    ("diag, all layers", "all", "diag"),
    ("kron, all layers", "all", "kron"),
    ("kron, last layer", "last_layer", "kron"),
)
#: the regression posteriors: (label, subset_of_weights)
REGRESSORS = (("kron, last layer", "last_layer"), ("kron, all layers", "all"))
#: training inputs of the regression lie in ±[GAP, EDGE]; "far" is beyond ±FAR
GAP, EDGE, FAR, PLOT_EDGE = 0.75, 2.5, 3.5, 5.0


def batches(x: Tensor, y: Tensor, size: int, generator: torch.Generator | None = None) -> Batches:
    """``(x, y)`` split into batches of ``size`` rows (shuffled when a generator is given)."""
    order = torch.randperm(x.shape[0], generator=generator) if generator is not None else torch.arange(x.shape[0])
    return [(x[i], y[i]) for i in order.split(size)]


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> None:
    """Adam on the mean loss over shuffled mini-batches (weight decay 1e-4), in place."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(x, y, batch_size, generator):
            optimiser.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimiser.step()
    model.eval()


def mlp(sizes: Sequence[int], activation: type[nn.Module]) -> nn.Sequential:
    """Linear layers of the given widths with an activation between them."""
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(d_in, d_out), activation()]
    return nn.Sequential(*layers[:-1])


def tune_prior(la) -> dict:
    """Optimise the prior precision by the evidence; its value and the evidence before and after."""
    before = la.log_marginal_likelihood().item()
    la.optimize_prior_precision(method="marglik")
    return {
        "log_marglik_before": before,
        "log_marglik_after": la.log_marginal_likelihood().item(),
        "prior_precision": la.prior_precision.tolist(),
    }


# ---------------------------------------------------------------------- regression


def sine_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(n, 1)`` inputs uniform on ±[GAP, EDGE] and ``(n, 1)`` targets sin(2x) + 0.1 ε."""
    magnitude = GAP + (EDGE - GAP) * torch.rand(n, 1, generator=generator)
    sign = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    x = sign * magnitude
    return x, torch.sin(2 * x) + 0.1 * torch.randn(n, 1, generator=generator)


def regression(generator: torch.Generator, quick: bool) -> tuple[dict, Tensor, Tensor, Tensor, dict]:
    """Train an MLP on the sine, fit the two Kron posteriors, predict on a grid over ±PLOT_EDGE.

    Returns:
        ``(results, x, y, grid, predictions)``: per posterior the mean predictive std
        (σ included) in the data, in the gap and far from the data, with the evidence
        before/after tuning; the data; the ``(G, 1)`` grid; per posterior its ``(G, 1)``
        mean and std on the grid.
    """
    x, y = sine_data(120, generator)
    model = mlp([1, 32, 32, 1], nn.Tanh)
    train(model, x, y, nn.functional.mse_loss, 300 if quick else 1500, x.shape[0], 1e-2, generator)
    with torch.no_grad():
        sigma = (model(x) - y).square().mean().sqrt().item()  # the MAP residuals' scale as σ
    grid = torch.linspace(-PLOT_EDGE, PLOT_EDGE, 401).unsqueeze(1)
    regions = {
        "std_data": (grid.abs() >= GAP) & (grid.abs() <= EDGE),
        "std_gap": grid.abs() < GAP,
        "std_far": grid.abs() > FAR,
    }
    results, predictions = {}, {}
    for label, subset in REGRESSORS:
        la = Laplace(model, "regression", subset_of_weights=subset, hessian_structure="kron", sigma_noise=sigma)
        la.fit(batches(x, y, 40))
        results[label] = {"sigma_noise": sigma, **tune_prior(la)}
        mean, std = la.predict(grid)
        predictions[label] = (mean, std)
        results[label].update({name: std[mask].mean().item() for name, mask in regions.items()})
    return results, x, y, grid, predictions


def plot_regression(x: Tensor, y: Tensor, grid: Tensor, predictions: dict, path: Path) -> None:
    """One panel per posterior: data, predictive mean and the ±2σ band."""
    figure = Figure(figsize=(5 * len(predictions), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(predictions), sharey=True, squeeze=False)[0]
    g = grid.squeeze(1)
    for ax, (label, (mean, std)) in zip(axes, predictions.items(), strict=True):
        m, s = mean.detach().squeeze(1), std.detach().squeeze(1)
        ax.fill_between(
            g.numpy(), (m - 2 * s).numpy(), (m + 2 * s).numpy(), color="tab:blue", alpha=0.25, label="±2σ predictive"
        )
        ax.plot(g.numpy(), m.numpy(), color="tab:blue", label="predictive mean")
        ax.plot(g.numpy(), torch.sin(2 * g).numpy(), color="gray", linestyle="--", linewidth=1, label="sin(2x)")
        ax.scatter(x.squeeze(1).numpy(), y.squeeze(1).numpy(), s=8, color="black", label="training data")
        ax.set_title(f"Laplace, {label}")
        ax.set_xlabel("x")
        ax.set_ylim(-3, 3)
    axes[0].legend(loc="lower left", fontsize="small")
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------- classification


def digits_data(generator: torch.Generator) -> dict[str, Tensor]:
    """scikit-learn's digits in [0, 1]: 60/10/30 train/validation/test split, and two shifted test sets.

    Returns:
        ``x_train`` ``(N, 64)``, ``y_train`` ``(N,)``, ``x_val``, ``y_val``, ``x_test``,
        ``y_test``, and the test images noised (Gaussian noise of std 0.5, clipped to
        [0, 1]) and rotated by 90 degrees, ``x_noised`` and ``x_rotated``.
    """
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(x.shape[0], generator=generator)
    n_train, n_val = int(0.6 * x.shape[0]), int(0.1 * x.shape[0])
    train_idx, val_idx, test_idx = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    x_test = x[test_idx]
    noise = 0.5 * torch.randn(x_test.shape, generator=generator)
    return {
        "x_train": x[train_idx],
        "y_train": y[train_idx],
        "x_val": x[val_idx],
        "y_val": y[val_idx],
        "x_test": x_test,
        "y_test": y[test_idx],
        "x_noised": (x_test + noise).clamp(0, 1),
        "x_rotated": torch.rot90(x_test.view(-1, 8, 8), 1, dims=(1, 2)).reshape(-1, 64),
    }


def evaluate(predict: Callable[[Tensor], Tensor], data: dict[str, Tensor]) -> tuple[dict, Tensor]:
    """Test accuracy, NLL, ECE and the entropy AUROCs of one predictive; also its test probabilities."""
    probs = predict(data["x_test"])
    scores = metrics.entropy(probs)
    return {
        "accuracy": metrics.accuracy(probs, data["y_test"]),
        "nll": metrics.negative_log_likelihood(probs, data["y_test"]),
        "ece": metrics.expected_calibration_error(probs, data["y_test"], n_bins=15),
        "auroc_noised": metrics.auroc(scores, metrics.entropy(predict(data["x_noised"]))),
        "auroc_rotated": metrics.auroc(scores, metrics.entropy(predict(data["x_rotated"]))),
    }, probs


def classification(generator: torch.Generator, quick: bool) -> tuple[dict, dict[str, Tensor], Tensor]:
    """Train an MLP on the digits and compare the MAP predictive with the Laplace ones.

    Each posterior appears twice: with its prior precision tuned by the evidence
    (:func:`tune_prior`), and with a scalar prior precision chosen by grid search on the
    validation split's predictive NLL (label suffix ``", δ by val NLL"``).

    Returns:
        ``(results, test_probs, y_test)``: per method its metrics (and for the Laplace
        posteriors the prior precision, and the evidence before/after for the evidence-tuned
        ones), its ``(N, 10)`` test probabilities, and the test labels.
    """
    data = digits_data(generator)
    model = mlp([64, 64, 64, 10], nn.ReLU)
    train(
        model, data["x_train"], data["y_train"], nn.functional.cross_entropy, 10 if quick else 40, 32, 3e-3, generator
    )

    def map_predictive(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x).softmax(-1)

    results, probs = {}, {}
    results["MAP"], probs["MAP"] = evaluate(map_predictive, data)
    loader = batches(data["x_train"], data["y_train"], 256)
    for label, subset, structure in CLASSIFIERS:
        la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
        la.fit(loader)
        evidence = tune_prior(la)
        results[label], probs[label] = evaluate(lambda x, la=la: la(x, pred_type="glm", link_approx="probit"), data)
        results[label].update(evidence)
    validation = [(data["x_val"], data["y_val"])]
    for label, subset, structure in CLASSIFIERS:
        la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
        la.fit(loader)
        la.optimize_prior_precision(method="gridsearch", val_loader=validation)
        label = f"{label}, δ by val NLL"
        results[label], probs[label] = evaluate(lambda x, la=la: la(x, pred_type="glm", link_approx="probit"), data)
        results[label]["prior_precision"] = la.prior_precision.tolist()
    return results, probs, data["y_test"]


def plot_reliability(probs: dict[str, Tensor], targets: Tensor, path: Path, n_bins: int = 15) -> None:
    """One reliability diagram per method: accuracy against confidence per bin, with its ECE."""
    columns = math.ceil(len(probs) / 2)
    figure = Figure(figsize=(3.0 * columns, 6.4), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, columns, sharex=True, sharey=True, squeeze=False)
    axes = grid.flatten()
    for ax in axes[len(probs) :]:
        ax.set_visible(False)
    centres = ((torch.arange(n_bins) + 0.5) / n_bins).numpy()
    for ax, (label, p) in zip(axes, probs.items(), strict=False):
        confidence, accuracy, counts = (t.numpy() for t in metrics.reliability_bins(p, targets, n_bins))
        filled = counts > 0
        ax.bar(centres[filled], accuracy[filled], width=1 / n_bins, edgecolor="black", label="accuracy")
        # The gap spans from the accuracy to the mean confidence, above (over-) or below (underconfident).
        ax.bar(
            centres[filled],
            abs(confidence - accuracy)[filled],
            bottom=numpy.minimum(confidence, accuracy)[filled],
            width=1 / n_bins,
            facecolor="none",
            edgecolor="tab:red",
            hatch="///",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--")
        ece = metrics.expected_calibration_error(p, targets, n_bins)
        ax.set_title(f"{label}\nECE {100 * ece:.2f}%", fontsize="medium")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in grid[-1]:
        ax.set_xlabel("confidence")
    for ax in grid[:, 0]:
        ax.set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize="small")
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------- report


def _prior(values: Sequence[float]) -> str:
    return "/".join(f"{v:.3g}" for v in values)


def format_tables(regression_results: dict, classification_results: dict) -> str:
    """The demo's results as two fixed-width text tables."""
    lines = [
        "Regression, sin(2x) + noise, training x in ±[0.75, 2.5] (predictive std, σ included)",
        f"{'posterior':<18} {'std data':>9} {'std gap':>9} {'std |x|>3.5':>12} "
        f"{'log ML δ=1':>11} {'tuned':>9}  tuned δ per layer",
    ]
    for label, r in regression_results.items():
        lines.append(
            f"{label:<18} {r['std_data']:>9.3f} {r['std_gap']:>9.3f} {r['std_far']:>12.3f} "
            f"{r['log_marglik_before']:>11.1f} {r['log_marglik_after']:>9.1f}  {_prior(r['prior_precision'])}"
        )
    lines += [
        "",
        "Digits (sklearn), test set; OOD AUROC of the predictive entropy vs noised / rotated digits",
        f"{'method':<32} {'acc':>6} {'NLL':>7} {'ECE':>6} {'AUROC noise':>12} {'AUROC rot':>10} "
        f"{'log ML δ=1':>11} {'tuned':>9}  tuned δ per layer",
    ]
    for label, r in classification_results.items():
        evidence = ""
        if "log_marglik_before" in r:
            evidence = f"{r['log_marglik_before']:>11.1f} {r['log_marglik_after']:>9.1f}  "
        elif "prior_precision" in r:
            evidence = f"{'':>11} {'':>9}  "
        if "prior_precision" in r:
            evidence += _prior(r["prior_precision"])
        lines.append(
            f"{label:<32} {r['accuracy']:>6.3f} {r['nll']:>7.4f} {r['ece']:>6.4f} {r['auroc_noised']:>12.3f} "
            f"{r['auroc_rotated']:>10.3f} {evidence}".rstrip()
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the demo, print its tables and write its figures.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` by default).

    Returns:
        ``{"regression": ..., "classification": ..., "figures": [paths], "seconds": float}``:
        per posterior (and the MAP classifier) its numbers, keyed as in the printed tables.
    """
    parser = argparse.ArgumentParser(prog="python -m fastlaplace.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="folder of the figures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and training")
    parser.add_argument("--quick", action="store_true", help="shorter training (for tests)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    regression_results, x, y, grid, predictions = regression(generator, args.quick)
    regression_png = args.out / "regression.png"
    plot_regression(x, y, grid, predictions, regression_png)
    classification_results, probs, y_test = classification(generator, args.quick)
    reliability_png = args.out / "reliability.png"
    plot_reliability(probs, y_test, reliability_png)

    seconds = time.perf_counter() - start
    print(format_tables(regression_results, classification_results))
    print(f"\nfigures: {regression_png}  {reliability_png}")
    print(f"done in {seconds:.1f} s")
    for result in (*regression_results.values(), *classification_results.values()):
        for key, value in result.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                raise RuntimeError(f"the demo produced a non-finite {key}: {value}")
    return {
        "regression": regression_results,
        "classification": classification_results,
        "figures": [regression_png, reliability_png],
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
