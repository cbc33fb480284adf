"""laplace-torch's own fit with fastlaplace as its curvature backend (``backend=FastGGN``) against its default backend.

Run ``python benchmarks/bench_backend.py [--quick] [--repeats R] [--threads T]``. The same
``laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure=...)``
fit (kron and diag) of an MLP 784-256-256-10 on 2,048 random inputs with 10 classes (512 with
``--quick``), batches of 128, with three backends: laplace-torch's default
(``CurvlinopsGGN``), ``BackPackGGN`` and fastlaplace's ``FastGGN``; fastest of R fits,
alternated. laplace-torch's default diag forms each batch's full Jacobian (128 x 10 x 270k)
with torch.func: it is timed on the first ``--slow-batches`` batches and scaled to the data
(marked in the table), once. The backend's own share is timed too: its ``kron`` / ``diag``
calls over the data, without laplace-torch's eigendecompositions. Every fit's curvature is
compared with BackPackGGN's (max relative difference). Results: benchmarks/results/backend_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

BATCH = 128
STRUCTURES = ("kron", "diag")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_loader(samples: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 784, generator=generator), torch.randint(0, 10, (samples,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def curvature(la, structure: str) -> list[torch.Tensor]:
    """The fitted curvature as a list of tensors (Kron factors, or the diagonal)."""
    if structure == "kron":
        return [f for block in la.H_facs.kfacs for f in block]
    return [la.H]


def relative_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 inputs instead of 2,048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-batches", type=int, default=1, help="batches the default backend's diag is timed on")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    from laplace import Laplace
    from laplace.curvature import BackPackGGN, CurvlinopsGGN

    from fastlaplace.integrations import FastGGN

    samples = 512 if args.quick else 2048
    loader = make_loader(samples)
    backends = {"default (CurvlinopsGGN)": CurvlinopsGGN, "BackPackGGN": BackPackGGN, "FastGGN": FastGGN}
    rows = []
    for structure in STRUCTURES:
        fits, scales = {}, {}
        for name, backend in backends.items():
            fit_loader = loader
            if structure == "diag" and backend is CurvlinopsGGN:
                # torch.func Jacobians of every batch: time a few batches, report per data set.
                subset = torch.utils.data.Subset(loader.dataset, range(min(samples, args.slow_batches * BATCH)))
                fit_loader = torch.utils.data.DataLoader(subset, batch_size=BATCH)
            scales[name] = len(loader) / len(fit_loader)
            la = Laplace(copy.deepcopy(make_model()), "classification", "all", structure, backend=backend)
            fits[name] = (la, fit_loader)
        times: dict[str, list[float]] = {name: [] for name in backends}
        calls: dict[str, list[float]] = {name: [] for name in backends}
        for name, (la, fit_loader) in fits.items():
            if scales[name] == 1:
                la.fit(fit_loader)  # warm-up (the slow, extrapolated fit is timed once, cold)
        for repeat in range(args.repeats):
            for name, (la, fit_loader) in fits.items():
                if scales[name] != 1 and repeat:
                    continue
                start = time.perf_counter()
                la.fit(fit_loader)
                times[name].append(time.perf_counter() - start)
                # The backend's share: its per-batch curvature calls alone (no eigendecomposition).
                start = time.perf_counter()
                for x, y in fit_loader:
                    getattr(la.backend, structure)(x, y, N=len(fit_loader.dataset))
                calls[name].append(time.perf_counter() - start)
        reference = curvature(fits["BackPackGGN"][0], structure)
        fast, fast_calls = min(times["FastGGN"]), min(calls["FastGGN"])
        for name in backends:
            seconds, call_seconds = min(times[name]) * scales[name], min(calls[name]) * scales[name]
            scaled = scales[name] != 1
            agreement = None if scaled else relative_difference(curvature(fits[name][0], structure), reference)
            rows.append(
                {
                    "structure": structure,
                    "backend": name,
                    "fit_s": seconds,
                    "extrapolated_from_batches": len(fits[name][1]) if scaled else None,
                    "speedup_of_fastggn": seconds / fast,
                    "curvature_calls_s": call_seconds,
                    "calls_speedup_of_fastggn": call_seconds / fast_calls,
                    "max_rel_diff_vs_backpack": agreement,
                }
            )
            print(json.dumps(rows[-1]))

    meta = {
        "model": "MLP 784-256-256-10",
        "samples": samples,
        "batch": BATCH,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backend_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"laplace-torch `Laplace(..., subset_of_weights='all').fit` of an {meta['model']}, {samples} inputs, batches "
        f"of {BATCH}, CPU {args.threads} threads, torch {torch.__version__} (`python benchmarks/bench_backend.py`). "
        "Fastest of "
        f"{args.repeats} fits. Backend calls alone: the backend's per-batch `kron` / `diag` calls over the data "
        "(the fit less laplace-torch's own work, e.g. the Kron eigendecompositions). Agreement: max relative "
        "difference of the fitted curvature to BackPackGGN's.",
        "",
        "| structure | backend | fit | FastGGN's speed-up | backend calls alone | FastGGN's speed-up | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fit = f"{1e3 * row['fit_s']:.1f} ms"
        if row["extrapolated_from_batches"]:
            fit += f" (from {row['extrapolated_from_batches']} batch(es), scaled)"
        agreement = "—" if row["max_rel_diff_vs_backpack"] is None else f"{row['max_rel_diff_vs_backpack']:.1e}"
        lines.append(
            f"| {row['structure']} | {row['backend']} | {fit} | {row['speedup_of_fastggn']:.1f}× | "
            f"{1e3 * row['curvature_calls_s']:.1f} ms | {row['calls_speedup_of_fastggn']:.1f}× | {agreement} |"
        )
    (args.out / "backend_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
