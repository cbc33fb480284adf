"""fastlaplace and laplace-torch side by side on an MLP and a CNN, every structure and subset, one run.

Run ``python benchmarks/bench_models.py [--quick] [--no-laplace-torch]``. Models: an MLP
784-256-256-10 on flattened 28x28 inputs and a CNN (conv 16, conv 32, both 3x3 with 2x2
max-pooling, then a Linear layer) on 3x32x32 images; 2,048 random inputs with 10 classes
(512 with ``--quick``), batches of 128. Posteriors: kron and diag over all layers and the
last layer, full over the last layer. Jobs per posterior: the fit over the data, the GLM
probit predictive of 128 inputs and one log marginal likelihood evaluation (after a first
one, as during prior tuning). laplace-torch 0.3 (its default backends) runs the same jobs
on the same model and data in the same process, alternating repetitions with ours; its
all-layer GLM predictives form full Jacobians and are timed on 16 inputs and reported per
128. Peak memory: fastlaplace's jobs, each in a fresh process (benchmarks/memory.py).
Row resnet18 (``--models resnet18``): CIFAR ResNet-18 (BatchNorm, eval mode) on 512 images, kron over
all weights; its fit is also given in plain epochs (forward, backward, SGD step on the same data) and
its GLM predictive of 64 inputs in forwards of them (both units measured before and after the jobs, the
faster kept), each beside the backprop it cannot skip, in the same unit and the same parts of a batch:
the forward and C - 1 column backwards (fit), C (predictive), with no curvature work. A laplace-torch
job that fails is recorded with its error.
Results: benchmarks/results/models_cpu.json and .md (models_cpu_<models>.* for a run of some ``--models``).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from bench_laplace import fastest
from memory import fresh_process_peak, peak_mib, return_freed_memory
from torch import nn

import fastlaplace.ops as ops
from fastlaplace import Laplace
from fastlaplace.posterior.kron import PREDICTIVE_CHUNK

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from resnets import cifar_resnet18, max_pooling_cnn  # noqa: E402  (the tests' models, not copies)

POSTERIORS = [("kron", "all"), ("diag", "all"), ("kron", "last_layer"), ("diag", "last_layer"), ("full", "last_layer")]
BATCH = 128
REFERENCE_INPUTS = 16  # laplace-torch's all-layer GLM predictive forms full Jacobians: fewer inputs, scaled up
#: jobs laplace-torch cannot finish here, with the reason shown in the table
REFERENCE_SKIPPED = {
    ("cnn", "diag", "all"): "killed: its exact diagonal GGN of the CNN ran this 24 GiB machine out of memory",
}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return cifar_resnet18()
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return max_pooling_cnn()


def make_data(name: str, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    shape = (samples, 784) if name == "mlp" else (samples, 3, 32, 32)
    x, y = torch.randn(shape, generator=generator), torch.randint(0, 10, (samples,), generator=generator)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, samples, BATCH)]


def jobs(
    model: nn.Module, loader: list, structure: str, subset: str, reference: bool, predictive_inputs: int = BATCH
) -> tuple[dict[str, Callable], float]:
    """fit / predictive / marglik closures of one posterior (laplace-torch's with ``reference``).

    Returns the closures and the factor that scales a predictive time to 128 inputs.
    """
    batch = loader[0][0]
    if reference:
        from laplace import Laplace as ReferenceLaplace

        data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader]))
        fit_loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
        la = ReferenceLaplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    else:
        fit_loader = loader
        la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)
    la.fit(fit_loader)
    inputs = batch[: REFERENCE_INPUTS if reference and subset == "all" else predictive_inputs]
    delta = torch.tensor(1.0)
    closures = {
        "fit": lambda: la.fit(fit_loader),
        "predictive": lambda: la(inputs, pred_type="glm", link_approx="probit"),
        "marglik": lambda: la.log_marginal_likelihood(delta),
    }
    return closures, BATCH / inputs.shape[0]


#: every (model, structure, subset) in a fixed order; job k of case i is --peak-of 3 i + k
CASES = [(name, structure, subset) for name in ("mlp", "cnn") for structure, subset in POSTERIORS]
CASES.append(("resnet18", "kron", "all"))  # CIFAR ResNet-18, BatchNorm in eval mode: always 512 images
#: GLM predictive inputs of the ResNet-18 row (the others predict one batch of 128)
RESNET_PREDICTIVE_INPUTS = 64


def plain_epoch_seconds(model: nn.Module, loader: list) -> float:
    """One epoch of forward, backward and SGD step (learning rate 0: the model is unchanged) over the loader."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.0)

    def epoch() -> None:
        for x, y in loader:
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()

    return fastest(epoch, 1)


def column_backward_seconds(model: nn.Module, batches: list[torch.Tensor], columns: int) -> float:
    """Forward each batch and backpropagate ``columns`` output vectors to every Conv2d, BatchNorm and Linear output.

    The backprop an exact method cannot skip: ``C − 1`` columns per batch for a GGN fit, ``C``
    (the output Jacobian) for a GLM predictive; no curvature work at all. Pass the batches in
    the parts the measured job takes: the same backprop in whole 128-image batches ran slower
    than a whole fit in its 27-image parts (4.1 against 4.2 plain epochs, one run).
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]

    def run() -> None:
        for x in batches:
            outputs: list[torch.Tensor] = []
            handles = [m.register_forward_hook(lambda _m, _i, out, kept=outputs: kept.append(out)) for m in layers]
            try:
                output = model(x)
            finally:
                for handle in handles:
                    handle.remove()
            for k in range(columns):
                torch.autograd.grad(output, outputs, torch.randn_like(output), retain_graph=k + 1 < columns)

    return fastest(run, 1)


def resnet_baseline(model: nn.Module, loader: list) -> dict[str, float]:
    """The ResNet row's units, per job: a plain epoch (fit) and the forward of the predictive's inputs, per 128
    (predictive); and with ``_floor`` the backprop each job cannot skip (:func:`column_backward_seconds`)."""
    inputs = loader[0][0][:RESNET_PREDICTIVE_INPUTS]
    with torch.no_grad():
        forward = fastest(lambda: model(inputs), 3) * BATCH / inputs.shape[0]
        classes = model(inputs[:1]).shape[1]
    # The fit's own parts of a batch (bounded by the memory of a pass), the predictive's chunks
    fit_part = Laplace(model, "classification", "all", "kron")._samples_per_pass(loader[0][0], True)
    fit_parts = [part for x, _ in loader for part in x.split(fit_part)]
    predictive_parts = list(inputs.split(PREDICTIVE_CHUNK))
    return {
        "fit": plain_epoch_seconds(model, loader),
        "predictive": forward,
        "fit_floor": column_backward_seconds(model, fit_parts, classes - 1),
        "predictive_floor": column_backward_seconds(model, predictive_parts, classes) * BATCH / inputs.shape[0],
    }


def in_units(row: dict) -> str:
    """A ResNet row's time in its unit (plain epochs, forwards), with its backprop floor in the same unit."""
    unit = "epochs" if row["job"] == "fit" else "forwards"
    text = f"{row['seconds'] / row['baseline_seconds']:.1f} {unit}"
    if row["floor_seconds"] is not None:
        text += f"; its column backprop alone {row['floor_seconds'] / row['baseline_seconds']:.1f}"
    return text


JOBS = ("fit", "predictive", "marglik")
MODELS = ["mlp", "cnn", "resnet18"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 inputs instead of 2,048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-laplace-torch", action="store_true", help="skip the laplace-torch side")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="the models whose rows run")
    parser.add_argument("--peak-of", type=int, help=argparse.SUPPRESS)  # internal: job 3*case+k's peak, fresh process
    args = parser.parse_args()
    if args.peak_of is not None:
        return_freed_memory()
    torch.set_num_threads(args.threads)
    samples = 512 if args.quick else 2048
    if args.peak_of is not None:
        name, structure, subset = CASES[args.peak_of // 3]
        model = make_model(name)
        data = make_data(name, 512 if name == "resnet18" else samples)
        predictive_inputs = RESNET_PREDICTIVE_INPUTS if name == "resnet18" else BATCH
        job = jobs(model, data, structure, subset, reference=False, predictive_inputs=predictive_inputs)[0][
            JOBS[args.peak_of % 3]
        ]
        job()
        gc.collect()
        print(json.dumps(peak_mib(job, "cpu")))
        return
    rows = []
    forward_arguments = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    for index, (name, structure, subset) in enumerate(CASES):
        if name not in args.models:
            continue
        model = make_model(name)
        loader = make_data(name, 512 if name == "resnet18" else samples)
        predictive_inputs = RESNET_PREDICTIVE_INPUTS if name == "resnet18" else BATCH
        ours, our_scale = jobs(model, loader, structure, subset, reference=False, predictive_inputs=predictive_inputs)
        theirs, their_scale = None, 1.0
        skipped = REFERENCE_SKIPPED.get((name, structure, subset))
        if not args.no_laplace_torch and skipped is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    theirs, their_scale = jobs(model, loader, structure, subset, reference=True)
                except Exception as error:  # noqa: BLE001  (laplace-torch's failure is a result of the row)
                    skipped = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        baseline = resnet_baseline(model, loader) if name == "resnet18" else None
        case_rows = []
        for k, job in enumerate(JOBS):
            repeats = 1 if job == "fit" else 3
            scale = (our_scale, their_scale) if job == "predictive" else (1.0, 1.0)
            seconds = fastest(ours[job], repeats) * scale[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = None if theirs is None else fastest(theirs[job], repeats) * scale[1]
            peak = fresh_process_peak(__file__, 3 * index + k, forward_arguments)
            case_rows.append(
                {
                    "model": name,
                    "structure": structure,
                    "subset": subset,
                    "job": job,
                    "seconds": seconds,
                    "peak_mib": peak,
                    "laplace_torch_seconds": reference,
                    "laplace_torch_note": skipped,
                    "baseline_seconds": None if baseline is None else baseline.get(job),
                    "floor_seconds": None if baseline is None else baseline.get(f"{job}_floor"),
                }
            )
        if baseline is not None:  # measured again after the jobs, the faster kept: a busy moment inflates one
            again = resnet_baseline(model, loader)
            for row in case_rows:
                for key, unit in (("baseline_seconds", row["job"]), ("floor_seconds", f"{row['job']}_floor")):
                    if row[key] is not None:
                        row[key] = min(row[key], again[unit])
        for row in case_rows:
            seconds, reference, peak = row["seconds"], row["laplace_torch_seconds"], row["peak_mib"]
            versus = (
                ""
                if reference is None
                else f"  laplace-torch {reference * 1e3:10.1f} ms  ({reference / seconds:6.1f}x)"
            )
            if row["baseline_seconds"] is not None:
                versus += f"  ({in_units(row)})"
            print(
                f"{name} {structure:4s} {subset:10s} {row['job']:10s} {seconds * 1e3:9.2f} ms  "
                f"peak {peak:6.1f} MiB{versus}"
            )
        rows += case_rows
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "samples": samples,
        "machine": platform.processor() or platform.machine(),
        "backend": ops.build_info(),
        "date": time.strftime("%Y-%m-%d"),
    }
    subset = "" if args.models == MODELS else "_" + "_".join(args.models)  # a partial run keeps the full one's file
    json_path = args.out / f"models_cpu{subset}{'_quick' if args.quick else ''}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    described = {
        "mlp": f"MLP 784-256-256-10 on {samples} inputs",
        "cnn": f"CNN (conv16-conv32-fc, max-pooling) on {samples} inputs",
        "resnet18": f"CIFAR ResNet-18 (BatchNorm, eval mode) on 512 images, predictive of {RESNET_PREDICTIVE_INPUTS}",
    }
    command = "python benchmarks/bench_models.py" + ("" if not subset else " --models " + " ".join(args.models))
    lines = [
        f"{'; '.join(described[name] for name in args.models)}; batches of {BATCH}, CPU {args.threads} threads, "
        f"torch {torch.__version__} (`{command}`). Predictive: GLM probit, times per {BATCH} inputs. "
        "Peak: fastlaplace's job in a fresh process.",
        "",
        "| model | posterior | job | fastlaplace | peak | laplace-torch | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        theirs_s = r["laplace_torch_seconds"]
        versus = "— | —" if theirs_s is None else f"{theirs_s * 1e3:.1f} ms | {theirs_s / r['seconds']:.1f}×"
        if r["laplace_torch_note"]:
            versus = f"{r['laplace_torch_note']} | —"
        if r["baseline_seconds"]:
            versus += f" ({in_units(r)})"
        lines.append(
            f"| {r['model']} | {r['structure']}, {r['subset']} | {r['job']} | {r['seconds'] * 1e3:.2f} ms "
            f"| {r['peak_mib']:.1f} MiB | {versus} |"
        )
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
