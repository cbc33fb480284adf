"""K-FAC preconditioner on scikit-learn digits: cost per step and epochs to 97% test accuracy, in one run.

Run ``python benchmarks/bench_optim.py [--quick]``. Two measurements, both on the
digits CNN of examples/train_digits.py (batches of 64):

- overhead: ten training steps (zero_grad, forward, backward, optimiser step) with the
  preconditioner between backward and the SGD step, against the same ten steps of
  plain SGD, alternated side by side (fastest of several repetitions). Ten steps make
  one full cycle at ``inv_update_steps=10``, so the eigendecompositions are included.
  Rows for ``factor_update_steps`` 1 and 10, with batches of 64 (the example's) and
  256: the preconditioner's per-step work beyond the factors is independent of the
  batch, so its share shrinks as the step grows.
- convergence: epochs until the test accuracy reaches 97%, for K-FAC (SGD with
  momentum underneath, the example's settings, not tuned) and for Adam at each
  learning rate of a small grid, over a few seeds (median; a run that never gets
  there counts as the epoch limit + 1, shown as ">limit").

Results: benchmarks/results/optim_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from bench_laplace import fastest_side_by_side
from torch import nn

import fastlaplace.ops as ops
from fastlaplace.optim import KFACPreconditioner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_digits import KFAC_OPTIONS, digits, make_model, train  # noqa: E402

TARGET = 0.97
ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def ten_steps(factor_update_steps: int | None, batch_size: int = 64):
    """A function running ten CNN training steps on digits, with K-FAC unless ``factor_update_steps`` is None."""
    x_train, y_train, _, _ = digits()
    torch.manual_seed(0)
    model = make_model("cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    preconditioner = None
    if factor_update_steps is not None:
        options = {**KFAC_OPTIONS, "factor_update_steps": factor_update_steps, "inv_update_steps": 10}
        preconditioner = KFACPreconditioner(model, lr=optimizer, **options)
    rows = [torch.arange(i, i + batch_size) % x_train.shape[0] for i in range(0, 10 * batch_size, batch_size)]
    batches = [(x_train[r], y_train[r]) for r in rows]

    def run() -> None:
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if preconditioner is not None:
                preconditioner.step()
            optimizer.step()

    return run


def cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def epochs_to_target(optimizer: str, lr: float | None, seeds: int, max_epochs: int) -> dict:
    """Median (over seeds) epochs to TARGET test accuracy, with each seed's count and best accuracy."""
    runs = [train("cnn", optimizer, max_epochs, lr=lr, seed=seed, target=TARGET) for seed in range(seeds)]
    counts = [run.epochs_to(TARGET) or max_epochs + 1 for run in runs]
    return {
        "optimizer": optimizer,
        "lr": runs[0].lr,
        "epochs": counts,
        "median_epochs": statistics.median(counts),
        "final_accuracy": [run.accuracies[-1] for run in runs],
        "seconds_per_epoch": statistics.median(run.seconds / len(run.accuracies) for run in runs),
    }


def main() -> None:
    """Run both measurements and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, seeds and epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, seeds, max_epochs = (3, 1, 10) if args.quick else (15, 5, 30)

    overhead = []
    for batch_size, factor_steps in [(64, 1), (64, 10), (256, 1), (256, 10)]:
        kfac_s, plain_s = fastest_side_by_side(
            ten_steps(factor_steps, batch_size), ten_steps(None, batch_size), repeats
        )
        overhead.append(
            {
                "batch_size": batch_size,
                "factor_update_steps": factor_steps,
                "inv_update_steps": 10,
                "kfac_step_s": kfac_s / 10,
                "sgd_step_s": plain_s / 10,
                "overhead": kfac_s / plain_s - 1,
            }
        )
        print(
            f"batch {batch_size}, factor_update_steps={factor_steps}: "
            f"{kfac_s / 10 * 1e3:.2f} ms vs {plain_s / 10 * 1e3:.2f} ms per step"
        )

    convergence = [epochs_to_target("kfac", None, seeds, max_epochs)]
    convergence += [epochs_to_target("adam", lr, seeds, max_epochs) for lr in ADAM_LRS]
    for row in convergence:
        print(f"{row['optimizer']} lr={row['lr']:g}: epochs to {TARGET:.0%} {row['epochs']}")
    best_adam = min((r for r in convergence if r["optimizer"] == "adam"), key=lambda r: r["median_epochs"])
    kfac = convergence[0]

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_optim.py" + (" --quick" if args.quick else "")
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "backend": ops.build_info(),
        "command": command,
        "target_accuracy": TARGET,
        "seeds": seeds,
        "max_epochs": max_epochs,
    }
    json_path = args.out / f"optim_cpu{'_quick' if args.quick else ''}.json"
    json_path.write_text(json.dumps({"meta": meta, "overhead": overhead, "convergence": convergence}, indent=2))
    lines = [
        f"Digits CNN (examples/train_digits.py), CPU {args.threads} threads "
        f"({meta['machine']}), torch {torch.__version__} (`{command}`).",
        "",
        "| batch | preconditioner schedule | SGD + K-FAC step | SGD step | overhead |",
        "|---|---|---|---|---|",
    ]
    for r in overhead:
        lines.append(
            f"| {r['batch_size']} | factor_update_steps={r['factor_update_steps']}, "
            f"inv_update_steps={r['inv_update_steps']} "
            f"| {r['kfac_step_s'] * 1e3:.2f} ms | {r['sgd_step_s'] * 1e3:.2f} ms | {r['overhead']:+.0%} |"
        )
    lines += [
        "",
        f"Epochs to {TARGET:.0%} test accuracy (median of {seeds} seeds, at most {max_epochs}; "
        f"K-FAC: SGD momentum 0.9, {KFAC_OPTIONS}):",
        "",
        "| optimiser | lr | epochs per seed | median | final accuracy | time per epoch |",
        "|---|---|---|---|---|---|",
    ]
    for r in convergence:
        epochs = ", ".join(str(e) if e <= max_epochs else f">{max_epochs}" for e in r["epochs"])
        median = f"{r['median_epochs']:g}" if r["median_epochs"] <= max_epochs else f">{max_epochs}"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {epochs} | {median} "
            f"| {', '.join(f'{a:.3f}' for a in r['final_accuracy'])} | {r['seconds_per_epoch'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        f"K-FAC needs {best_adam['median_epochs'] / kfac['median_epochs']:.1f}× fewer epochs than the best "
        f"Adam (lr={best_adam['lr']:g}).",
    ]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
