"""Laplace fits and predictives of a 784-512-512-10 MLP against plain PyTorch, in one run.

Run ``python benchmarks/bench_laplace.py [--quick]``. The reference points are what a
training loop costs on the same machine and data: one plain forward+backward+SGD epoch
over the 4,096 samples (batches of 256) for the fits, and one forward pass of the same
batch of 256 for the predictives. Times are the fastest of a few repetitions after a
warm-up; the ratios are measured side by side. laplace-torch is not installed by this
script: its figures from the issue (kron fit 12.9 epochs, kron GLM probit predictive
18.5 s for 32 inputs, last-layer 88x the forward, marglik 1.6 s) are quoted next to ours.
Results: benchmarks/results/laplace_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fastlaplace.ops as ops
from fastlaplace import Laplace


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 samples instead of 4,096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    samples = 1024 if args.quick else 4096
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(samples, 784), torch.randint(0, 10, (samples,))
    loader = [(x[i : i + 256], y[i : i + 256]) for i in range(0, samples, 256)]
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)

    def epoch():
        for xb, yb in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimiser.step()

    batch = x[:256]
    epoch_time = fastest(epoch, 3)
    forward_time = fastest(lambda: model(batch), 10)
    rows = []

    def record(case, seconds, reference, reference_name, laplace_torch=""):
        rows.append(
            {
                "case": case,
                "seconds": seconds,
                "reference": reference_name,
                "ratio": seconds / reference,
                "laplace_torch": laplace_torch,
            }
        )
        print(f"{case:52s} {seconds * 1e3:9.2f} ms  = {seconds / reference:6.2f}x {reference_name}", flush=True)

    for mode, quoted in (("ggn", "12.9x epoch"), ("mc", "")):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", curvature_mode=mode)
        record(f"kron fit, all layers, {mode}", fastest(lambda la=la: la.fit(loader), 2), epoch_time, "epoch", quoted)
    la.eigendecomposition()
    record(
        "kron GLM probit predictive, 256 inputs",
        fastest(lambda: la(batch), 3),
        forward_time,
        "forward",
        "18.5 s / 32 inputs",
    )
    last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    last.fit(loader)
    last.eigendecomposition()
    record(
        "last-layer kron GLM probit predictive, 256 inputs",
        fastest(lambda: last(batch), 10),
        forward_time,
        "forward",
        "88x forward",
    )
    diag = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    record("diag fit, all layers, ggn", fastest(lambda: diag.fit(loader), 2), epoch_time, "epoch")
    start = time.perf_counter()
    last.optimize_prior_precision(method="marglik")
    record("last-layer kron prior optimisation (marglik, 100 steps)", time.perf_counter() - start, 1.0, "s", "1.6 s")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "samples": samples, "backend": ops.build_info()}
    json_path = args.out / f"laplace_cpu{'_quick' if args.quick else ''}.json"
    json_path.write_text(
        json.dumps({"meta": meta, "epoch_s": epoch_time, "forward_s": forward_time, "rows": rows}, indent=2)
    )
    lines = [
        f"784-512-512-10 MLP, {samples} samples, batches of 256, CPU {args.threads} threads, "
        f"torch {torch.__version__}; "
        f"plain epoch {epoch_time * 1e3:.1f} ms, forward of 256 {forward_time * 1e3:.2f} ms "
        f"(`python benchmarks/bench_laplace.py`).",
        "",
        "| case | fastlaplace | ratio | laplace-torch (issue's figure) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['seconds'] * 1e3:.1f} ms | {r['ratio']:.2f}× {r['reference']} | {r['laplace_torch']} |"
        for r in rows
    ]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
