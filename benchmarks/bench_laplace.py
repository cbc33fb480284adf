"""Laplace fits and predictives of a 784-512-512-10 MLP against plain PyTorch, in one run.

Run ``python benchmarks/bench_laplace.py [--quick]``. The reference points are what a
training loop costs on the same machine and data: one plain forward+backward+SGD epoch
over the 4,096 samples (batches of 256) for the fits, and one forward pass of the same
batch of 256 for the predictives. Times are the fastest of a few repetitions after a
warm-up, each case's repetitions alternated with its reference's, so that a ratio is
measured side by side on the same machine state. laplace-torch (the test-only dependency,
default backend) runs the same jobs on the same model and data in the same run, unless
``--no-laplace-torch``; its kron GLM predictive forms full Jacobians, so it is timed on
32 inputs and compared per input; its last-layer prior optimisation alternates with ours
(fastest of 5 each). Peak memory is the resident set above what was in use
before one more call of the same job, in a fresh process per case that returns freed
memory to the OS at once (benchmarks/memory.py; includes what the job allocates and
keeps, such as the factors of a fit). Results:
benchmarks/results/laplace_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from memory import fresh_process_peak, peak_mib, return_freed_memory
from torch import nn

import fastlaplace.ops as ops
from fastlaplace import Laplace


def fastest_side_by_side(
    fn: Callable[[], object], reference: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Fastest of ``repeats`` calls of fn and of its reference, alternated so that both see the same machine."""
    fn()
    reference()
    times: dict[Callable, list[float]] = {fn: [], reference: []}
    for _ in range(repeats):
        for f in (fn, reference):
            start = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - start)
    return min(times[fn]), min(times[reference])


def fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def laplace_torch_times(
    model: nn.Module, loader: list, batch: torch.Tensor
) -> tuple[dict[str, float], dict[str, Callable[[], object]]]:
    """The same jobs with laplace-torch's Laplace (its default backend): seconds, and jobs to time side by side."""
    import warnings

    from laplace import Laplace as ReferenceLaplace

    dataset_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])),
        batch_size=loader[0][0].shape[0],
    )
    times = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kron = ReferenceLaplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
        times["fit_ggn"] = fastest(lambda: kron.fit(dataset_loader), 1)
        times["glm_per_input"] = fastest(lambda: kron(batch[:32], link_approx="probit"), 1) / 32
        last = ReferenceLaplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
        last.fit(dataset_loader)
        times["last_layer_glm"] = fastest(lambda: last(batch, link_approx="probit"), 3)

    def optimise_prior():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            last.prior_precision = 1.0
            last.optimize_prior_precision(method="marglik")

    return times, {"last_layer_marglik": optimise_prior}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,024 samples instead of 4,096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-laplace-torch", action="store_true", help="skip the laplace-torch side")
    parser.add_argument("--peak-of", type=int, help=argparse.SUPPRESS)  # internal: one case's peak, in a fresh process
    args = parser.parse_args()
    if args.peak_of is not None:
        return_freed_memory()  # before anything is allocated, so that the warm-up's memory goes back too
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
    references = {"epoch": epoch, "forward": lambda: model(batch)}
    cases = []

    def record(case, fn, repeats, reference=None, theirs=None, per=1):
        """A case: fn timed side by side with its reference ("epoch", "forward" or none: seconds).

        ``theirs``: laplace-torch's seconds, or its job, then timed side by side with fn (alternated).
        Times are the fastest of ``repeats``, divided by ``per`` inputs.
        """
        cases.append((case, fn, repeats, reference, theirs, per))

    measure_peak = args.peak_of is not None
    theirs, their_jobs = (
        ({}, {}) if args.no_laplace_torch or measure_peak else laplace_torch_times(model, loader, batch)
    )
    for mode in ("ggn", "mc"):
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", curvature_mode=mode)
        record(f"kron fit, all layers, {mode}", lambda la=la: la.fit(loader), 3, "epoch", theirs.get(f"fit_{mode}"))
    fast = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="kron", curvature_dtype=torch.bfloat16
    )
    record("kron fit, all layers, ggn, curvature_dtype=bf16", lambda: fast.fit(loader), 3, "epoch")
    ekfac = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    record("ekfac fit, all layers, ggn (two passes)", lambda: ekfac.fit(loader), 3, "epoch")
    glm = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    glm.fit(loader)
    glm.eigendecomposition()
    record(
        "kron GLM probit predictive, per input (of 256)",
        lambda: glm(batch),
        5,
        "forward",
        theirs.get("glm_per_input"),
        per=256,
    )
    ekfac_glm = Laplace(model, "classification", subset_of_weights="all", hessian_structure="ekfac")
    ekfac_glm.fit(loader)
    record("ekfac GLM probit predictive, per input (of 32)", lambda: ekfac_glm(batch[:32]), 3, "forward", per=32)
    last = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    last.fit(loader)
    last.eigendecomposition()
    record(
        "last-layer kron GLM probit predictive, 256 inputs",
        lambda: last(batch),
        10,
        "forward",
        theirs.get("last_layer_glm"),
    )
    diag = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    record("diag fit, all layers, ggn", lambda: diag.fit(loader), 3, "epoch")
    lowrank = Laplace(model, "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=10)
    record("low-rank fit (10 eigenpairs), all layers, ggn", lambda: lowrank.fit(loader), 1, "epoch")

    def optimise_prior():
        last.prior_precision = 1.0
        last.optimize_prior_precision(method="marglik")

    record(
        "last-layer kron prior optimisation (marglik, 100 steps)",
        optimise_prior,
        5,
        theirs=their_jobs.get("last_layer_marglik"),
    )

    if measure_peak:
        job = cases[args.peak_of][1]
        job()
        gc.collect()
        print(json.dumps(peak_mib(job, "cpu")))
        return
    epoch_time = fastest(epoch, 3)
    forward_time = fastest(references["forward"], 10)
    rows = []
    for index, (case, fn, repeats, reference, theirs, per) in enumerate(cases):
        theirs_seconds = theirs
        if callable(theirs):  # their job, timed alternately with ours
            seconds, theirs_seconds = fastest_side_by_side(fn, theirs, repeats)
            reference_seconds = 1.0
        elif reference is None:
            seconds, reference_seconds = fastest(fn, repeats), 1.0
        else:
            seconds, reference_seconds = fastest_side_by_side(fn, references[reference], repeats)
        seconds, reference_seconds = seconds / per, reference_seconds / per
        name = reference or "s"
        peak = fresh_process_peak(
            __file__, index, ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        )
        rows.append(
            {
                "case": case,
                "seconds": seconds,
                "peak_mib": peak,
                "reference": name,
                "reference_seconds": reference_seconds,
                "ratio": seconds / reference_seconds,
                "laplace_torch_seconds": theirs_seconds,
            }
        )
        versus = "" if theirs_seconds is None else f"  laplace-torch {theirs_seconds * 1e3:10.1f} ms"
        print(
            f"{case:56s} {seconds * 1e3:9.2f} ms  = {seconds / reference_seconds:6.2f}x {name}  "
            f"peak {peak:7.1f} MiB{versus}",
            flush=True,
        )

    evidence = {}
    for structure, posterior in (("kron", glm), ("ekfac", ekfac_glm)):
        posterior.optimize_prior_precision(method="marglik")
        evidence[structure] = float(posterior.log_marginal_likelihood())
    print(f"log evidence after marglik prior tuning: kron {evidence['kron']:.1f}, ekfac {evidence['ekfac']:.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "samples": samples, "backend": ops.build_info()}
    meta["log_evidence_after_prior_tuning"] = evidence
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
        "| case | fastlaplace | ratio | peak memory | laplace-torch, same run | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        theirs_s = r["laplace_torch_seconds"]
        versus = "" if theirs_s is None else f"{theirs_s * 1e3:.1f} ms | {theirs_s / r['seconds']:.1f}×"
        lines.append(
            f"| {r['case']} | {r['seconds'] * 1e3:.2f} ms | {r['ratio']:.2f}× {r['reference']} "
            f"| {r['peak_mib']:.1f} MiB | {versus or '— | —'} |"
        )
    lines += [
        "",
        f"Log evidence after marglik prior tuning, same data: kron {evidence['kron']:.1f}, "
        f"ekfac {evidence['ekfac']:.1f}.",
    ]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
