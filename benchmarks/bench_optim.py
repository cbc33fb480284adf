"""K-FAC preconditioner on scikit-learn digits: cost per step and epochs to 97% test accuracy, in one run.

Run ``python benchmarks/bench_optim.py [--quick] [--threads N]``. Two measurements, both
on the digits CNN of examples/train_digits.py, and each checked against its target:

- overhead (target: at most +25% per step at ``inv_update_steps=10``): blocks of ten
  training steps (zero_grad, forward, backward, optimiser step) with the preconditioner
  between backward and the SGD step, against the same ten steps of plain SGD, alternated
  side by side; the overhead is the median over the repetitions of each K-FAC block's time
  over its neighbouring SGD block's (quartiles shown), in wall-clock time and in the
  process's CPU time: a shared machine's load drifts, and neighbours see the same. Ten steps
  make one full cycle at ``inv_update_steps=10``, so the eigendecompositions (or, with
  ``damping_mode="factored"``, the Cholesky inversions) are included. Rows for
  ``factor_update_steps`` 1 and 10, both damping modes, with batches of 64 (the example's)
  and 256.
- convergence (target: K-FAC at least 2x fewer epochs than Adam): epochs until the test
  accuracy reaches 97%, over the same seeds (median; a run that never gets there, or
  diverges, counts as the epoch limit + 1, shown as ">limit"), for every configuration
  of the grids: K-FAC (SGD underneath, factors and eigendecompositions every 10 steps, the
  overhead rows' schedule) over lr x damping x momentum for each damping mode, Adam over
  lr x beta1 (a grid of the same size). Each optimiser (and damping mode) is judged by its
  best configuration.
- recipes (target: SGD(lr=0.1, momentum=0.9) + K-FAC with default options and
  ``inv_update_steps=10`` at 97% within 8 epochs on 5 of 5 seeds; momentum 0 within 4): the
  MLP 64-128-128-10 at batch 64, epochs to 97% per seed for SGD + K-FAC with momentum 0.9 and 0
  (and 0.9 with ``conventions="fastlaplace-v0"``), AdamW alone and AdamW + K-FAC.

``--sections`` runs some of the three only (the results then hold those).

Results: benchmarks/results/optim_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fastlaplace.ops as ops
from fastlaplace.optim import KFACPreconditioner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_digits import KFAC_OPTIONS, digits, make_model, train  # noqa: E402

TARGET = 0.97
OVERHEAD_TARGET = 0.25
#: the grids, 8 configurations each (K-FAC's for each damping mode): K-FAC (lr, damping, SGD momentum),
#: Adam (lr, beta1)
KFAC_GRID = {"lr": (0.1, 0.3), "damping": (0.003, 0.01), "momentum": (0.5, 0.9)}
ADAM_GRID = {"lr": (3e-3, 1e-2, 3e-2, 1e-1), "momentum": (0.5, 0.9)}
#: K-FAC options besides the tuned ones: the schedule of the overhead target's row (factors and
#: eigendecompositions every 10 steps), with the running average's decay per update set to
#: 0.95^10 = 0.6, the memory (in steps) of 0.95 at every step
KFAC_FIXED = {"factor_update_steps": 10, "inv_update_steps": 10, "factor_decay": 0.6, "kl_clip": 1e-3}
DAMPING_MODES = ("eigen", "factored", "ekfac")
SECTIONS = ("overhead", "convergence", "recipes")
RECIPE_EPOCHS = 8
#: the recipes: (row name, optimiser, its options, K-FAC options or None)
RECIPES = (
    ("SGD m=0.9 + K-FAC", "sgd", {"lr": 0.1, "momentum": 0.9}, {}),
    ("SGD m=0 + K-FAC", "sgd", {"lr": 0.1, "momentum": 0.0}, {}),
    ("SGD m=0.9 + K-FAC v0", "sgd", {"lr": 0.1, "momentum": 0.9}, {"conventions": "fastlaplace-v0"}),
    ("AdamW", "adamw", {"lr": 3e-3}, None),
    ("AdamW + K-FAC", "adamw", {"lr": 3e-3}, {}),
    ("SGD m=0.9 + EKFAC", "sgd", {"lr": 0.1, "momentum": 0.9}, {"damping_mode": "ekfac"}),
    ("SGD m=0 + EKFAC", "sgd", {"lr": 0.1, "momentum": 0.0}, {"damping_mode": "ekfac"}),
    ("AdamW + EKFAC", "adamw", {"lr": 3e-3}, {"damping_mode": "ekfac"}),
)


def recipe_mlp() -> nn.Module:
    """The MLP 64-128-128-10 of the recipes."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def recipe_epochs(optimizer_name: str, options: dict, kfac: dict | None, seed: int, max_epochs: int) -> int | None:
    """Epochs until 97% test accuracy of the recipe MLP (None: not within max_epochs or diverged).

    K-FAC runs with its defaults, ``inv_update_steps=10`` and the optimiser as ``lr``, plus ``kfac``.
    """
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = recipe_mlp()
    optimizer_class = torch.optim.SGD if optimizer_name == "sgd" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), **options)
    preconditioner = None
    if kfac is not None:
        preconditioner = KFACPreconditioner(model, lr=optimizer, inv_update_steps=10, **kfac)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        for rows in torch.randperm(x_train.shape[0], generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
            if preconditioner is not None:
                try:
                    preconditioner.step()
                except (RuntimeError, ValueError):  # diverged: NaN factors or gradients
                    return None
            optimizer.step()
        with torch.no_grad():
            if (model(x_test).argmax(1) == y_test).float().mean().item() >= TARGET:
                return epoch + 1
    return None


def ten_steps(factor_update_steps: int | None, batch_size: int = 64, damping_mode: str = "eigen"):
    """A function running ten CNN training steps on digits, with K-FAC unless ``factor_update_steps`` is None."""
    x_train, y_train, _, _ = digits()
    torch.manual_seed(0)
    model = make_model("cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    preconditioner = None
    if factor_update_steps is not None:
        options = {
            **KFAC_OPTIONS,
            "factor_update_steps": factor_update_steps,
            "inv_update_steps": 10,
            "damping_mode": damping_mode,
        }
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


def side_by_side_medians(fn, reference, repeats: int) -> dict[str, float]:
    """Medians of ``repeats`` calls of fn and of its reference, alternated: seconds, and paired ratios.

    ``wall`` / ``cpu`` (and ``reference_*``) are median wall-clock and CPU seconds;
    ``ratio`` / ``ratio_cpu`` the median of each call's time over its neighbouring
    reference call's, with ``ratio_low`` / ``ratio_high`` their quartiles: the machine's load
    drifts over minutes, and a pair of neighbouring calls sees nearly the same load.
    """
    fn()
    reference()
    times = {name: [] for name in ("wall", "cpu", "reference_wall", "reference_cpu")}
    for _ in range(repeats):
        for f, prefix in ((fn, ""), (reference, "reference_")):
            wall, cpu = time.perf_counter(), time.process_time()
            f()
            times[prefix + "cpu"].append(time.process_time() - cpu)
            times[prefix + "wall"].append(time.perf_counter() - wall)
    ratios = sorted(a / b for a, b in zip(times["wall"], times["reference_wall"], strict=True))
    cpu_ratios = [a / b for a, b in zip(times["cpu"], times["reference_cpu"], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        **{name: statistics.median(values) for name, values in times.items()},
        "ratio": statistics.median(ratios),
        "ratio_low": quartiles[0],
        "ratio_high": quartiles[2],
        "ratio_cpu": statistics.median(cpu_ratios),
    }


def grid(axes: dict[str, tuple]) -> list[dict]:
    """Every combination of the axes' values."""
    configs = [{}]
    for name, values in axes.items():
        configs = [{**c, name: v} for c in configs for v in values]
    return configs


def epochs_to_target(optimizer: str, config: dict, seeds: int, max_epochs: int) -> dict:
    """Median (over seeds) epochs to TARGET test accuracy, with each seed's count and last accuracy."""
    counts, accuracies, seconds = [], [], []
    for seed in range(seeds):
        options = None
        if optimizer == "kfac":
            options = {**KFAC_FIXED, "damping": config["damping"], "damping_mode": config["damping_mode"]}
        try:
            run = train(
                "cnn",
                optimizer,
                max_epochs,
                lr=config["lr"],
                seed=seed,
                target=TARGET,
                kfac_options=options,
                momentum=config["momentum"],
            )
        except RuntimeError:  # diverged (NaN factors)
            counts.append(max_epochs + 1)
            accuracies.append(float("nan"))
            continue
        counts.append(run.epochs_to(TARGET) or max_epochs + 1)
        accuracies.append(run.accuracies[-1])
        seconds.append(run.seconds / len(run.accuracies))
    return {
        "optimizer": optimizer,
        **config,
        "epochs": counts,
        "median_epochs": statistics.median(counts),
        "final_accuracy": accuracies,
        "seconds_per_epoch": statistics.median(seconds) if seconds else float("nan"),
    }


def _setting(row: dict) -> str:
    if row["optimizer"] == "kfac":
        return f"{row['damping_mode']}, lr={row['lr']:g}, damping={row['damping']:g}, momentum={row['momentum']:g}"
    return f"lr={row['lr']:g}, beta1={row['momentum']:g}"


def _optimiser(row: dict) -> str:
    """The optimiser a result row is judged as: adam, or kfac with its damping mode."""
    return f"kfac {row['damping_mode']}" if row["optimizer"] == "kfac" else row["optimizer"]


def main() -> None:
    """Run both measurements and write the JSON and markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, seeds and epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--recipes", nargs="+", help="run only the recipes whose names contain one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, seeds, max_epochs = (5, 1, 10) if args.quick else (41, 5, 30)

    recipes = []
    chosen = [r for r in RECIPES if args.recipes is None or any(part in r[0] for part in args.recipes)]
    for name, optimizer_name, options, kfac in chosen if "recipes" in args.sections else ():
        counts = [recipe_epochs(optimizer_name, options, kfac, seed, RECIPE_EPOCHS) for seed in range(5)]
        recipes.append({"recipe": name, "optimizer": options, "kfac": kfac, "epochs": counts})
        print(f"{name}: epochs to {TARGET:.0%} per seed {counts}")

    overhead = []
    schedules = [(b, f, m) for b in (64, 256) for f in (1, 10) for m in DAMPING_MODES]
    if "overhead" not in args.sections:
        schedules = []
    for batch_size, factor_steps, mode in schedules:
        t = side_by_side_medians(ten_steps(factor_steps, batch_size, mode), ten_steps(None, batch_size), repeats)
        row = {
            "batch_size": batch_size,
            "damping_mode": mode,
            "factor_update_steps": factor_steps,
            "inv_update_steps": 10,
            "kfac_step_s": t["wall"] / 10,
            "sgd_step_s": t["reference_wall"] / 10,
            "overhead": t["ratio"] - 1,
            "overhead_quartiles": [t["ratio_low"] - 1, t["ratio_high"] - 1],
            "kfac_step_cpu_s": t["cpu"] / 10,
            "sgd_step_cpu_s": t["reference_cpu"] / 10,
            "overhead_cpu": t["ratio_cpu"] - 1,
        }
        row["met"] = row["overhead"] <= OVERHEAD_TARGET
        overhead.append(row)
        print(
            f"batch {batch_size}, {mode}, factor_update_steps={factor_steps}: {row['kfac_step_s'] * 1e3:.2f} ms vs "
            f"{row['sgd_step_s'] * 1e3:.2f} ms per step ({row['overhead']:+.0%}, quartiles "
            f"{row['overhead_quartiles'][0]:+.0%} to {row['overhead_quartiles'][1]:+.0%}; "
            f"CPU time {row['overhead_cpu']:+.0%})"
        )

    convergence = []
    if "convergence" in args.sections:
        convergence = [
            epochs_to_target("kfac", {"damping_mode": m, **c}, seeds, max_epochs)
            for m in DAMPING_MODES
            for c in grid(KFAC_GRID)
        ]
        convergence += [epochs_to_target("adam", c, seeds, max_epochs) for c in grid(ADAM_GRID)]
    for row in convergence:
        print(f"{row['optimizer']} {_setting(row)}: epochs to {TARGET:.0%} {row['epochs']}")
    names = [f"kfac {m}" for m in DAMPING_MODES] + ["adam"]
    best, ratios = {}, {}
    if convergence:
        best = {
            name: min((r for r in convergence if _optimiser(r) == name), key=lambda r: r["median_epochs"])
            for name in names
        }
        ratios = {m: best["adam"]["median_epochs"] / best[f"kfac {m}"]["median_epochs"] for m in DAMPING_MODES}
    momentum_row = next((r for r in recipes if r["recipe"] == "SGD m=0.9 + K-FAC"), None)
    plain_row = next((r for r in recipes if r["recipe"] == "SGD m=0 + K-FAC"), None)
    targets = {
        "overhead": {
            "target": f"SGD + K-FAC step at most {OVERHEAD_TARGET:+.0%} over an SGD step, inv_update_steps=10",
            "met_by": [
                f"batch {r['batch_size']}, {r['damping_mode']}, factor_update_steps={r['factor_update_steps']}"
                for r in overhead
                if r["met"]
            ],
        },
        "epochs": {
            "target": "K-FAC at least 2x fewer epochs to 97% than Adam",
            "ratio": ratios,
            "met": {m: r >= 2.0 for m, r in ratios.items()},
        },
        "recipes": {
            "target": f"SGD(0.1, momentum 0.9) + K-FAC at 97% within {RECIPE_EPOCHS} epochs on 5 of 5 seeds, "
            "momentum 0 within 4",
            "met": None
            if momentum_row is None or plain_row is None
            else all(e is not None for e in momentum_row["epochs"])
            and all(e is not None and e <= 4 for e in plain_row["epochs"]),
        },
    }

    args.out.mkdir(parents=True, exist_ok=True)
    partial = sorted(args.sections) != sorted(SECTIONS)
    command = (
        "python benchmarks/bench_optim.py"
        + (" --quick" if args.quick else "")
        + (f" --sections {' '.join(args.sections)}" if partial else "")
    )
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "backend": ops.build_info(),
        "command": command,
        "target_accuracy": TARGET,
        "seeds": seeds,
        "max_epochs": max_epochs,
        "repeats": repeats,
        "kfac_grid": KFAC_GRID,
        "kfac_fixed": KFAC_FIXED,
        "adam_grid": ADAM_GRID,
    }
    suffix = ("_quick" if args.quick else "") + ("_" + "_".join(args.sections) if partial else "")
    json_path = args.out / f"optim_cpu{suffix}.json"
    results = {"meta": meta, "targets": targets, "overhead": overhead, "convergence": convergence, "recipes": recipes}
    json_path.write_text(json.dumps(results, indent=2))
    models = []
    if {"overhead", "convergence"} & set(args.sections):
        models.append("the digits CNN (examples/train_digits.py)")
    if "recipes" in args.sections:
        models.append("the recipes' MLP 64-128-128-10")
    lines = [
        f"scikit-learn digits, {' and '.join(models)}; CPU {args.threads} threads "
        f"({meta['machine']}), torch {torch.__version__} (`{command}`).",
    ]
    overhead_lines = [
        "",
        f"Per-step cost: medians of {repeats} alternated repetitions of 10 steps (one eigendecomposition "
        "cycle); overhead: the median (and quartiles) of each K-FAC repetition's time over the SGD "
        "repetition next to it; target: overhead at most +25%.",
        "",
        "| batch | damping_mode | preconditioner schedule | SGD + K-FAC step | SGD step | overhead (quartiles) "
        "| overhead (CPU time) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in overhead:
        overhead_lines.append(
            f"| {r['batch_size']} | {r['damping_mode']} | factor_update_steps={r['factor_update_steps']}, "
            f"inv_update_steps={r['inv_update_steps']} "
            f"| {r['kfac_step_s'] * 1e3:.2f} ms | {r['sgd_step_s'] * 1e3:.2f} ms | {r['overhead']:+.0%} "
            f"({r['overhead_quartiles'][0]:+.0%} to {r['overhead_quartiles'][1]:+.0%}) "
            f"| {r['overhead_cpu']:+.0%} | {'met' if r['met'] else 'not met'} |"
        )
    overhead_lines += [
        "",
        "Overhead target (at most +25%, wall clock): "
        + (f"met for {', '.join(targets['overhead']['met_by'])}." if targets["overhead"]["met_by"] else "not met."),
    ]
    convergence_lines = [
        "",
        f"Epochs to {TARGET:.0%} test accuracy (median of {seeds} seeds, at most {max_epochs}), every "
        f"configuration of grids of {len(grid(KFAC_GRID))}: K-FAC {KFAC_GRID} for each damping mode, with SGD "
        f"underneath and {KFAC_FIXED}; Adam {ADAM_GRID} (momentum = beta1).",
        "",
        "| optimiser | setting | epochs per seed | median | final accuracy | time per epoch |",
        "|---|---|---|---|---|---|",
    ]
    for r in convergence:
        epochs = ", ".join(str(e) if e <= max_epochs else f">{max_epochs}" for e in r["epochs"])
        median = f"{r['median_epochs']:g}" if r["median_epochs"] <= max_epochs else f">{max_epochs}"
        convergence_lines.append(
            f"| {r['optimizer']} | {_setting(r)} | {epochs} | {median} "
            f"| {', '.join(f'{a:.3f}' for a in r['final_accuracy'])} | {r['seconds_per_epoch'] * 1e3:.0f} ms |"
        )
    convergence_lines.append("")
    for m in DAMPING_MODES if best else ():
        kfac = best[f"kfac {m}"]
        convergence_lines.append(
            f"Best K-FAC {m} ({_setting(kfac)}): median {kfac['median_epochs']:g} epochs; best Adam "
            f"({_setting(best['adam'])}): {best['adam']['median_epochs']:g}. K-FAC needs {ratios[m]:.1f}x fewer "
            f"epochs (target 2x: {'met' if targets['epochs']['met'][m] else 'not met'})."
        )
    recipe_lines = [
        "",
        f"Recipes: MLP 64-128-128-10, batch 64, K-FAC with default options, inv_update_steps=10 and the "
        f"optimiser as lr; epochs to {TARGET:.0%} test accuracy per seed (- : not within {RECIPE_EPOCHS}).",
        "",
        "| recipe | optimiser | K-FAC options | epochs per seed |",
        "|---|---|---|---|",
    ]
    for r in recipes:
        epochs = ", ".join("-" if e is None else str(e) for e in r["epochs"])
        recipe_lines.append(f"| {r['recipe']} | {r['optimizer']} | {r['kfac']} | {epochs} |")
    recipe_lines += ["", f"Recipes target ({targets['recipes']['target']}): {targets['recipes']['met']}."]
    for section, section_lines in (
        ("overhead", overhead_lines),
        ("convergence", convergence_lines),
        ("recipes", recipe_lines),
    ):
        if section in args.sections:  # a partial run's markdown holds only what it measured
            lines += section_lines
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
