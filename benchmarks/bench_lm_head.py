"""A GPT-2-sized LM head (Linear 768 → 50,257) as a last-layer Kron posterior: fit, GLM predictive, evidence.

Run ``python benchmarks/bench_lm_head.py [--tokens 256] [--batch 64] [--threads T]``. The
model is a small random feature network (Linear 64 → 768, tanh) under a random head
Linear(768, 50257), float32; the posterior is ``Laplace(model, "classification",
subset_of_weights="last_layer", hessian_structure="kron")`` with its defaults
(``max_dense_factor=8192``, ``factor_rank=256``): the exact GGN's output factor
``G = Σ_n diag(p_n) − p_n p_nᵀ`` comes in closed form from the probabilities into a
streaming sketch, and is kept as its top 256 eigenpairs; the input factor (769²) is dense.

Reported (fastest of ``--repeats``): a plain epoch (forward, cross-entropy, backward and an
SGD step of the head over the same tokens and batches), the fit (one pass) and the first
evidence (which computes the eigenpairs), both also in plain epochs; the GLM probit
predictive for 8 inputs against the model's forward on them; the log marginal likelihood;
the share of trace(G) the kept eigenpairs hold; and the process's peak resident set
(VmHWM). Results: benchmarks/results/lm_head_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from bench_laplace import fastest
from torch import nn

from fastlaplace import Laplace

VOCABULARY, WIDTH = 50_257, 768


def peak_rss_gib() -> float:
    """The process's peak resident set so far (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("VmHWM is not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "lm_head_cpu.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, WIDTH), nn.Tanh(), nn.Linear(WIDTH, VOCABULARY))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, 64, generator=generator)
    y = torch.randint(VOCABULARY, (args.tokens,), generator=generator)
    loader = list(zip(x.split(args.batch), y.split(args.batch), strict=True))

    head = model[2]
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0)  # lr 0: the same weights for the posterior

    def plain_epoch() -> None:
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()

    epoch = fastest(plain_epoch, args.repeats)
    optimizer.zero_grad(set_to_none=True)

    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")

    def fit_and_evidence() -> tuple[float, float]:
        start = time.perf_counter()
        la.fit(loader)
        fitted = time.perf_counter()
        la.log_marginal_likelihood()
        return fitted - start, time.perf_counter() - fitted

    fit, evidence_first = min(fit_and_evidence() for _ in range(args.repeats))
    evidence = float(la.log_marginal_likelihood())
    evidence_time = fastest(la.log_marginal_likelihood, args.repeats)

    test = torch.randn(8, 64, generator=generator)
    with torch.no_grad():
        forward = fastest(lambda: model(test), 5 * args.repeats)
    probit = fastest(lambda: la(test), 5 * args.repeats)
    probabilities = la(test)

    _, values, _, _ = la.eigendecomposition()
    (mu,) = la.eigendecomposition()[3]
    with torch.no_grad():
        p = model(x).double().softmax(-1)
    trace = float((1 - p.square().sum(1)).sum())
    results = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "tokens": args.tokens,
        "batch": args.batch,
        "head": [WIDTH, VOCABULARY],
        "factor_rank": la.factor_rank,
        "plain_epoch_s": epoch,
        "fit_s": fit,
        "fit_epochs": fit / epoch,
        "first_evidence_s": evidence_first,
        "fit_and_first_evidence_epochs": (fit + evidence_first) / epoch,
        "evidence_s": evidence_time,
        "log_marginal_likelihood": evidence,
        "forward_8_s": forward,
        "glm_probit_8_s": probit,
        "glm_probit_over_forward": probit / forward,
        "probabilities_sum_to_1": float((probabilities.sum(-1) - 1).abs().max()),
        "kept_trace_share_of_G": float(mu.double().sum()) / trace,
        "peak_rss_gib": peak_rss_gib(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")


if __name__ == "__main__":
    main()
