"""Each fastlaplace operator side by side with the plain PyTorch code a user would write.

Run ``make bench`` (CPU), ``make gpu-check`` (CUDA) or directly
``python benchmarks/bench_ops.py [--device cuda] [--quick] [--threads 2] [--out DIR]``.
``--quick`` shrinks every size for a smoke run of a few seconds.

The last cases are at GPU sizes: covariances of 16 and of 17 classes (either side of the
CUDA kernel's switch from warp sums to tiles, to place it), then the CUDA issue's targets
(500 eigendecompositions of 100², 100 of 1024² with damped inverses, ResNet-18's factor
set, GPT-2 small's factor accumulation, a 2048 -> 1000 last-layer variance): timed with
``--device cuda``, and on the CPU only at ``--quick`` sizes, as a smoke run of their code.
On CUDA the GPT-2 case is also held against the SYRK flop bound: its time over the flops
of the factors' upper triangles at the bf16 GEMM rate measured in the same run (8192²
products, 512² with ``--quick``).

The operators are called through :mod:`fastlaplace.ops` of the checkout this file sits
in. Without the compiled extension those wrappers fall back to the slow pure-PyTorch
reference; the backend that served them is printed and recorded with every result.

Time: both sides get the same inputs in the same process. A first call of each side is
the warm-up: their results are compared (``max_rel_diff``, flagged above 1e-3) and their
durations only set the number of rounds (a time budget per case, at least 5). Then the
rounds alternate, fastlaplace first on even and the baseline first on odd rounds, so
machine noise hits both alike. Reported: the median of each side (all rounds are in the
JSON) and the speed-up, baseline time / fastlaplace time. On CUDA every call is bracketed
by ``torch.cuda.synchronize()``; CPU runs use ``--threads`` intra-op threads. The
1-minute load average as each case begins is recorded too: on a shared machine it tells
whether other work competed for the cores.

Peak memory (MiB above what was in use just before the call, outputs included):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  in the benchmark process after the timing.
* CPU: the resident set, in a fresh process per case and side, forked from a server
  that has only imported torch (``multiprocessing`` "forkserver": no second import of
  torch per process). The process fixes glibc's malloc thresholds so that freed blocks
  over 128 KiB go back to the OS at once, builds the inputs, calls the side once as a
  warm-up (thread pools, BLAS buffers and other one-time allocations are not the op's),
  resets the high-water mark ``VmHWM`` to the current resident set by writing 5 to
  ``/proc/self/clear_refs``, reads ``VmRSS``, calls the side once more and reports
  ``VmHWM - VmRSS`` (resolution about 0.5 MiB). Linux only. Unlike
  ``getrusage().ru_maxrss``, which cannot be reset, this is not hidden by a higher peak
  while the inputs were made; unlike ``torch.profiler``, it also sees memory that does
  not come from torch's allocator (BLAS, LAPACK, the kernels' own buffers).

Results: ``<out>/ops_<device>.json`` (one record per case) and ``<out>/ops_<device>.md``
(the table, also printed); ``ops_<device>_quick.*`` with ``--quick``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not another install
from memory import peak_mib, return_freed_memory  # noqa: E402

import fastlaplace  # noqa: E402
import fastlaplace.ops as ops  # noqa: E402

MIN_REPEATS, MAX_REPEATS = 5, 40
SECONDS_PER_CASE = {False: 6.0, True: 0.3}  # timing budget per case, by --quick
OUTPUT_GRAD_COLUMNS = 10  # K of the diagonal GGN
DELTA = (1.0, 0.5, 2.0)  # prior precision per MLP layer
LAST = slice(2, 3)  # the MLP's last layer
MAX_REL_DIFF = 1e-3  # fastlaplace and baseline results further apart than this are flagged


@dataclass
class Pair:
    """The two sides of one case, closed over the same inputs; each returns comparable results."""

    variant: str
    fast: Callable[[], object]
    baseline: Callable[[], object]
    #: bf16 flops the fast side cannot do without (set where a target compares it with the GEMM rate)
    bf16_flops: float | None = None


@dataclass(frozen=True)
class Bench:
    """One row of the table: an operator, what its baseline runs, and how to build both."""

    case: str
    baseline: str
    make: Callable[[str, bool], Pair]
    min_speedup: float | None = None
    max_peak_fraction: float | None = None
    max_seconds: float | None = None
    #: GPU sizes (a CUDA issue's target, or a question only a GPU answers): timed on CUDA, and on the CPU
    #: only with --quick (a smoke run)
    gpu_target: bool = False
    #: on CUDA, at most this multiple of bf16_flops at the GPU's measured bf16 GEMM rate
    max_flop_bound_ratio: float | None = None


# ----------------------------------------------------------------------------- inputs


def mlp(quick: bool) -> tuple[list[int], list[int], int]:
    """Input widths, output widths and batch size of the 784-512-512-10 MLP (a quarter with --quick)."""
    if quick:
        return [196, 128, 128], [128, 128, 10], 128
    return [784, 512, 512], [512, 512, 10], 1024


def cat_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1)


def spd(n: int, device: str) -> torch.Tensor:
    m = torch.randn(n, n + 8, device=device)
    return m @ m.T / n


@dataclass
class KronLayers:
    """Eigenpairs of the A and G factors of the MLP's layers, with per-layer scale and delta."""

    qa: list[torch.Tensor]
    la: list[torch.Tensor]
    qg: list[torch.Tensor]
    lg: list[torch.Tensor]
    scale: torch.Tensor
    delta: torch.Tensor

    def eigenpairs(self, layers: slice = slice(None)) -> list[list[torch.Tensor]]:
        """The arguments eigvecs_a, eigvals_a, eigvecs_g, eigvals_g of the ops, for some layers."""
        return [self.qa[layers], self.la[layers], self.qg[layers], self.lg[layers]]

    def damped(self, i: int) -> torch.Tensor:
        """The (d_G, d_A) eigenvalues of layer i's posterior precision, as a user computes them."""
        return torch.outer(self.lg[i], self.la[i]) * self.scale[i] + self.delta[i]


def kron_layers(device: str, quick: bool) -> KronLayers:
    d_in, d_out, _ = mlp(quick)
    return kron_layers_of(d_in, d_out, device)


def kron_layers_of(d_in: list[int], d_out: list[int], device: str) -> KronLayers:
    """Three layers of d_in inputs (and a bias) and d_out outputs, the MLP's priors."""
    a = [torch.linalg.eigh(spd(d + 1, device)) for d in d_in]
    g = [torch.linalg.eigh(spd(d, device)) for d in d_out]
    return KronLayers(
        qa=[e.eigenvectors for e in a],
        la=[e.eigenvalues for e in a],
        qg=[e.eigenvectors for e in g],
        lg=[e.eigenvalues for e in g],
        scale=torch.ones(3, device=device),
        delta=torch.tensor(DELTA, device=device),
    )


# ----------------------------------------------------------------------------- cases


def factor_accumulation(dtype: torch.dtype) -> Callable[[str, bool], Pair]:
    def make(device: str, quick: bool) -> Pair:
        d_in, d_out, n = mlp(quick)
        widths, bias = d_in + d_out, [True] * 3 + [False] * 3
        xs = [torch.randn(n, d, device=device, dtype=dtype) for d in widths]
        fast_factors = [torch.zeros(d + b, d + b, device=device) for d, b in zip(widths, bias, strict=True)]
        base_factors = [f.clone() for f in fast_factors]
        alpha, beta = 1.0, 1.0  # a fit step: sum over batches

        def fast():
            ops.factor_accumulate_(fast_factors, xs, bias, alpha=alpha, beta=beta)
            return fast_factors

        def baseline():
            for f, x, b in zip(base_factors, xs, bias, strict=True):
                x1 = cat_ones(x.float()) if b else x.float()
                f.mul_(beta).add_(x1.T @ x1, alpha=alpha)
            return base_factors

        dims = "-".join(map(str, d_in + d_out[-1:]))
        return Pair(f"MLP {dims} (6 factors), N={n}, {str(dtype)[6:]} in, β=α=1", fast, baseline)

    return make


def conv_input_factor(device: str, quick: bool) -> Pair:
    n, c, size = (8, 16, 16) if quick else (64, 32, 32)
    x = torch.randn(n, c, size, size, device=device)
    fast_factor = torch.zeros(c * 9 + 1, c * 9 + 1, device=device)
    base_factor = fast_factor.clone()

    def fast():
        ops.conv_input_factor_(fast_factor, x, 3, stride=1, padding=1, append_ones=True)
        return fast_factor

    def baseline():
        u = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, c * 9)
        u = cat_ones(u)
        return base_factor.add_(u.T @ u)

    return Pair(f"Conv2d input {n}x{c}x{size}x{size}, 3x3, stride 1, pad 1, bias", fast, baseline)


def diag_ggn_inputs(device: str, quick: bool, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    d_in, d_out, _ = mlp(quick)
    a = [torch.randn(n, d, device=device) for d in d_in]
    g = [torch.randn(n, OUTPUT_GRAD_COLUMNS, d, device=device) for d in d_out]
    return a, g


def diag_ggn(device: str, quick: bool) -> Pair:
    n = mlp(quick)[2]
    a, g = diag_ggn_inputs(device, quick, n)

    def baseline():
        return [(gi**2).sum(1).T @ cat_ones(ai) ** 2 for ai, gi in zip(a, g, strict=True)]

    return Pair(f"MLP's 3 layers, N={n}, K={OUTPUT_GRAD_COLUMNS}", lambda: ops.diag_ggn(a, g, [True] * 3), baseline)


def squared_per_sample_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nko,ni->nkoi", g, cat_ones(a)).square().sum((0, 1))


def diag_ggn_per_sample(device: str, quick: bool) -> Pair:
    # The per-sample gradients take N*K*d_out*(d_in+1) floats: 16 GiB at N=1024, hence a small N.
    n = 4 if quick else 32
    a, g = diag_ggn_inputs(device, quick, n)

    def baseline():
        return [squared_per_sample_gradients(ai, gi) for ai, gi in zip(a, g, strict=True)]

    variant = f"MLP's 3 layers, N={n} (per-sample tensors), K={OUTPUT_GRAD_COLUMNS}"
    return Pair(variant, lambda: ops.diag_ggn(a, g, [True] * 3), baseline)


def eigh_of(sizes: list[int], device: str) -> tuple[Callable[[], object], Callable[[], object]]:
    matrices = [spd(s, device) for s in sizes]
    return (
        lambda: ops.batched_eigh(matrices)[0],
        lambda: [torch.linalg.eigh(m).eigenvalues for m in matrices],
    )


def eigh_mlp(device: str, quick: bool) -> Pair:
    d_in, d_out, _ = mlp(quick)
    sizes = [d + 1 for d in d_in] + d_out
    return Pair(f"the MLP's 6 factors {sizes}", *eigh_of(sizes, device))


def eigh_many_small(device: str, quick: bool) -> Pair:
    small, large = (20, 2) if quick else (200, 20)
    return Pair(f"{small} of 64x64 + {large} of 200x200", *eigh_of([64] * small + [200] * large, device))


def kron_solve(device: str, quick: bool) -> Pair:
    k = kron_layers(device, quick)
    rhs = [torch.randn(g.shape[0], a.shape[0], device=device) for a, g in zip(k.qa, k.qg, strict=True)]

    def baseline():
        return [k.qg[i] @ ((k.qg[i].T @ v @ k.qa[i]) / k.damped(i)) @ k.qa[i].T for i, v in enumerate(rhs)]

    def fast():
        return ops.kron_solve(*k.eigenpairs(), rhs, k.scale, k.delta)

    shapes = ", ".join(f"{tuple(v.shape)}" for v in rhs)
    return Pair(f"MLP's 3 layers, V of {shapes}", fast, baseline)


def mlp_gradients(device: str, quick: bool) -> tuple[list[torch.Tensor], list[int]]:
    """The MLP's weight and bias gradients, in the layout of kron_precondition_'s blocks."""
    d_in, d_out, _ = mlp(quick)
    blocks = []
    for i, o in zip(d_in, d_out, strict=True):
        blocks += [torch.randn(o, i, device=device), torch.randn(o, device=device)]
    return blocks, [2] * len(d_in)


def precondition_pair(device: str, quick: bool, fast_solve, layer_solves) -> Pair:
    """K-FAC's preconditioning of the MLP's gradients in place, KL clip included, from fresh gradients."""
    pristine, blocks = mlp_gradients(device, quick)
    kl = torch.tensor([0.1, 0.2, 0.3], device=device)
    fast_grads, base_grads = [g.clone() for g in pristine], [g.clone() for g in pristine]

    def fast():
        torch._foreach_copy_(fast_grads, pristine)
        fast_solve(fast_grads, blocks, kl)
        return fast_grads

    def baseline():
        torch._foreach_copy_(base_grads, pristine)
        matrices = [torch.cat([w, b[:, None]], 1) for w, b in zip(base_grads[::2], base_grads[1::2], strict=True)]
        natural = [solve(v) for solve, v in zip(layer_solves, matrices, strict=True)]
        quadratic = sum(k * (v * n).sum() for k, v, n in zip(kl, matrices, natural, strict=True))
        nu = quadratic.rsqrt().clamp_max(1)
        for w, b, n in zip(base_grads[::2], base_grads[1::2], natural, strict=True):
            w.copy_(nu * n[:, :-1])
            b.copy_(nu * n[:, -1])
        return base_grads

    return Pair("MLP's 3 layers, weight and bias gradients", fast, baseline)


def kron_precondition(device: str, quick: bool) -> Pair:
    k = kron_layers(device, quick)
    spectra = [1.0 / k.damped(i) for i in range(3)]
    solves = [lambda v, i=i: k.qg[i] @ ((k.qg[i].T @ v @ k.qa[i]) * spectra[i]) @ k.qa[i].T for i in range(3)]
    return precondition_pair(
        device, quick, lambda grads, blocks, kl: ops.kron_precondition_(grads, blocks, k.qa, k.qg, spectra, kl), solves
    )


def damped_factors(device: str, quick: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The MLP's six factors and a shift for each."""
    d_in, d_out, _ = mlp(quick)
    factors = [spd(d + 1, device) for d in d_in] + [spd(d, device) for d in d_out]
    return factors, torch.tensor([0.1, 0.05, 0.2, 0.3, 0.1, 0.4], device=device)


def kron_inverse_precondition(device: str, quick: bool) -> Pair:
    factors, shifts = damped_factors(device, quick)
    inverses = ops.damped_inverses(factors, shifts)
    a, g = inverses[:3], inverses[3:]
    solves = [lambda v, i=i: g[i] @ v @ a[i] for i in range(3)]
    return precondition_pair(
        device, quick, lambda grads, blocks, kl: ops.kron_inverse_precondition_(grads, blocks, a, g, kl), solves
    )


def damped_inverses(device: str, quick: bool) -> Pair:
    factors, shifts = damped_factors(device, quick)

    def baseline():
        eyes = [torch.eye(f.shape[0], device=device) for f in factors]
        return [
            torch.cholesky_inverse(torch.linalg.cholesky(f + s * e))
            for f, s, e in zip(factors, shifts, eyes, strict=True)
        ]

    sizes = [f.shape[0] for f in factors]
    return Pair(f"the MLP's 6 factors {sizes}", lambda: ops.damped_inverses(factors, shifts), baseline)


def kron_logdet(device: str, quick: bool) -> Pair:
    k = kron_layers(device, quick)

    def baseline():
        return torch.stack([torch.log(k.damped(i)).sum() for i in range(3)])

    return Pair("MLP's 3 layers", lambda: ops.kron_logdet(k.la, k.lg, k.scale, k.delta), baseline)


def predictive_eigenbasis(
    k: KronLayers, layers: list[int], inputs: list, jacobians: list, full: bool = False
) -> torch.Tensor:
    """Σ_l J_l P_l⁻¹ J_lᵀ (its diagonal unless ``full``) in plain torch: rotate, square, divide, contract."""
    total = 0
    for i, a, jac in zip(layers, inputs, jacobians, strict=True):
        weights = (cat_ones(a) @ k.qa[i]).square() @ (1 / k.damped(i)).T  # (N, d_G)
        if jac is None:
            total = total + weights @ k.qg[i].square().T
        elif full:
            rotated = jac @ k.qg[i]  # (N, C, d_G)
            total = total + (rotated * weights.unsqueeze(1)) @ rotated.mT
        else:
            total = total + torch.einsum("ncj,nj->nc", (jac @ k.qg[i]).square(), weights)
    return total


def predictive_samples(quick: bool) -> int:
    return 64 if quick else 256


def predictive_last_layer(device: str, quick: bool) -> tuple[KronLayers, torch.Tensor, int]:
    k = kron_layers(device, quick)
    n = predictive_samples(quick)
    return k, torch.randn(n, k.qa[2].shape[0] - 1, device=device), n


def predictive_last_layer_eigenbasis(device: str, quick: bool) -> Pair:
    k, a, _ = predictive_last_layer(device, quick)

    def fast():
        return ops.kron_predictive_variance([a], [None], *k.eigenpairs(LAST), k.scale[LAST], k.delta[LAST], [True])

    variant = f"last layer, inputs {tuple(a.shape)}, C={k.qg[2].shape[0]}, bias"
    return Pair(variant, fast, lambda: predictive_eigenbasis(k, [2], [a], [None]))


def predictive_last_layer_dense(device: str, quick: bool) -> Pair:
    k, a, n = predictive_last_layer(device, quick)
    classes, d_a = k.qg[2].shape[0], k.qa[2].shape[0]

    def fast():
        return ops.kron_predictive_variance([a], [None], *k.eigenpairs(LAST), k.scale[LAST], k.delta[LAST], [True])

    def baseline():
        eye = torch.eye(classes, device=device)
        # Rows of J_n = I_C ⊗ [a_n, 1]ᵀ, each as a (C, d_A) matrix: (N*C, C, d_A).
        jac = torch.einsum("cj,ni->ncji", eye, cat_ones(a)).reshape(n * classes, classes, d_a)
        solved = k.qg[2] @ ((k.qg[2].T @ jac @ k.qa[2]) / k.damped(2)) @ k.qa[2].T  # P⁻¹ Jᵀ
        return (jac * solved).sum((1, 2)).reshape(n, classes)

    return Pair(f"last layer, J of {n * classes}x{classes * d_a}", fast, baseline)


def predictive_all_layers(device: str, quick: bool) -> Pair:
    k = kron_layers(device, quick)
    n, classes = predictive_samples(quick), k.qg[2].shape[0]
    inputs = [torch.randn(n, q.shape[0] - 1, device=device) for q in k.qa]
    jacobians = [torch.randn(n, classes, q.shape[0], device=device) for q in k.qg]

    def fast():
        return ops.kron_predictive_variance(inputs, jacobians, *k.eigenpairs(), k.scale, k.delta, [True] * 3)

    variant = f"MLP's 3 layers, N={n}, B of (N, {classes}, d_out) per layer"
    return Pair(variant, fast, lambda: predictive_eigenbasis(k, [0, 1, 2], inputs, jacobians))


def covariance_pair(k: KronLayers, n: int, description: str, device: str) -> Pair:
    """(N, C, C) covariances over k's three layers, B from a batched backward ((C, N, d_out) storage)."""
    classes = k.qg[2].shape[0]
    inputs = [torch.randn(n, q.shape[0] - 1, device=device) for q in k.qa]
    jacobians = [torch.randn(classes, n, q.shape[0], device=device).transpose(0, 1) for q in k.qg]

    def fast():
        return ops.kron_predictive_variance(
            inputs, jacobians, *k.eigenpairs(), k.scale, k.delta, [True] * 3, full_covariance=True
        )

    variant = f"{description}, N={n}, (N, {classes}, {classes}) covariances"
    return Pair(variant, fast, lambda: predictive_eigenbasis(k, [0, 1, 2], inputs, jacobians, full=True))


def predictive_all_layers_covariance(device: str, quick: bool) -> Pair:
    """The posterior's call: covariances over the MLP's layers."""
    return covariance_pair(kron_layers(device, quick), predictive_samples(quick), "MLP's 3 layers", device)


def predictive_covariance_of(classes: int) -> Callable[[str, bool], Pair]:
    """(N, C, C) covariances of a 784-512-512-C MLP for 1,024 inputs. On CUDA, C = 16 is the
    largest summed warp by warp per entry and C = 17 the smallest by 64 x 64 tiles per sample
    (variance::kMaxPairOutputs): their times side by side say where that threshold belongs."""

    def make(device: str, quick: bool) -> Pair:
        width, n = (16, 16) if quick else (512, 1024)
        d_in = [2 * width if quick else 784, width, width]
        k = kron_layers_of(d_in, [width, width, classes], device)
        return covariance_pair(k, n, f"{d_in[0]}-{width}-{width}-{classes} MLP", device)

    return make


# ----------------------------------------------------------------------------- the CUDA issue's targets


def eigh_500_of_100(device: str, quick: bool) -> Pair:
    count, size = (20, 20) if quick else (500, 100)
    return Pair(f"{count} of {size}x{size}, float32", *eigh_of([size] * count, device))


def eigh_damped_inverse_1024(device: str, quick: bool) -> Pair:
    """Eigendecompositions and exact damped inverses ``Q diag(1 / (λ + δ)) Qᵀ`` of equal-sized factors."""
    count, size = (4, 64) if quick else (100, 1024)
    matrices, delta = [spd(size, device) for _ in range(count)], 0.1

    def fast():
        values, vectors = ops.batched_eigh(matrices)
        q = torch.stack(vectors)
        return q * (1 / (torch.stack(values) + delta)).unsqueeze(1) @ q.mT

    def baseline():
        inverses = []
        for m in matrices:
            values, q = torch.linalg.eigh(m)
            inverses.append(q * (1 / (values + delta)) @ q.T)
        return torch.stack(inverses)

    return Pair(f"{count} of {size}x{size}, float32, eigh + damped inverse", fast, baseline)


def resnet18_factor_sizes(quick: bool) -> list[int]:
    """Edges of ResNet-18's K-FAC factors: per conv (bias-free) A = C_in k² and G = C_out; the fc's 513 and 1000."""
    convs = [(3, 64, 7)] + [(64, 64, 3)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        convs += [(c_in, c_out, 3), (c_out, c_out, 3), (c_out, c_out, 3), (c_out, c_out, 3), (c_in, c_out, 1)]
    sizes = [c_in * k * k for c_in, _, k in convs] + [c_out for _, c_out, _ in convs] + [513, 1000]
    return [max(2, d // 16) for d in sizes] if quick else sizes


def eigh_resnet18(device: str, quick: bool) -> Pair:
    sizes = resnet18_factor_sizes(quick)
    return Pair(f"ResNet-18's {len(sizes)} factors (up to {max(sizes)}), float32", *eigh_of(sizes, device))


def factor_accumulation_gpt2(device: str, quick: bool) -> Pair:
    """A and G factors (expand: every token a sample) of GPT-2 small's 12 blocks, bf16 activations, fp32 factors."""
    blocks, tokens, width = (2, 256, 96) if quick else (12, 4 * 1024, 768)
    # Per block: attention qkv (d -> 3d), attention projection (d -> d), MLP (d -> 4d), MLP projection (4d -> d).
    shapes = [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)] * blocks
    inputs = [torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16) for d_in, _ in shapes]
    grads = [torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16) for _, d_out in shapes]
    xs, bias = inputs + grads, [True] * len(inputs) + [False] * len(grads)
    fast_factors = [torch.zeros(x.shape[1] + b, x.shape[1] + b, device=device) for x, b in zip(xs, bias, strict=True)]
    base_factors = [f.clone() for f in fast_factors]

    def fast():
        ops.factor_accumulate_(fast_factors, xs, bias, alpha=1.0, beta=0.95)
        return fast_factors

    def baseline():
        for f, x, b in zip(base_factors, xs, bias, strict=True):
            x = x.float()
            f.mul_(0.95).add_((cat_ones(x) if b else x).T @ (cat_ones(x) if b else x))
        return base_factors

    # SYRK: the upper triangle of each factor, tokens multiply-adds per entry.
    flops = sum(tokens * (d + b) * (d + b + 1) for d, b in ((x.shape[1], b) for x, b in zip(xs, bias, strict=True)))
    return Pair(f"GPT-2 small, {blocks} blocks, {tokens} tokens, bf16 in, β=0.95", fast, baseline, flops)


def predictive_last_layer_1000_classes(device: str, quick: bool) -> Pair:
    """Last-layer Kron variance of a 2048 -> 1000 classifier for a batch of 128."""
    d_in, classes, n = (256, 100, 16) if quick else (2048, 1000, 128)
    a_factor, g_factor = spd(d_in + 1, device), spd(classes, device)
    la, qa = torch.linalg.eigh(a_factor)
    lg, qg = torch.linalg.eigh(g_factor)
    scale, delta = torch.ones(1, device=device), torch.ones(1, device=device)
    a = torch.randn(n, d_in, device=device)

    def fast():
        return ops.kron_predictive_variance([a], [None], [qa], [la], [qg], [lg], scale, delta, [True])

    def baseline():
        weights = (cat_ones(a) @ qa).square() @ (1 / (torch.outer(lg, la) + delta)).T
        return weights @ qg.square().T

    return Pair(f"last layer {d_in} -> {classes} classes, batch {n}", fast, baseline)


BENCHES = [
    Bench("factor_accumulate_", "loop: cat ones, F.mul_(β).add_(x1ᵀx1)", factor_accumulation(torch.float32), 1.5),
    Bench("factor_accumulate_", "loop: x.float(), then the same", factor_accumulation(torch.bfloat16), 1.5),
    Bench("conv_input_factor_", "F.unfold, cat ones, F.add_(uᵀu)", conv_input_factor, max_peak_fraction=0.25),
    Bench("diag_ggn", "(g²).sum(1)ᵀ @ [a, 1]² per layer", diag_ggn),
    Bench("diag_ggn", "per-sample gradients: einsum, square, sum", diag_ggn_per_sample),
    Bench("batched_eigh", "loop of torch.linalg.eigh", eigh_mlp),
    Bench("batched_eigh", "loop of torch.linalg.eigh", eigh_many_small),
    Bench("damped_inverses", "loop of cholesky_inverse(cholesky(F + sI))", damped_inverses),
    Bench("kron_solve", "Qg @ ((Qgᵀ V Qa) / (outer(lg, la) s + δ)) @ Qaᵀ per layer", kron_solve),
    Bench("kron_logdet", "log(outer(lg, la) s + δ).sum() per layer", kron_logdet),
    Bench("kron_precondition_", "per layer cat, 4 matmuls, ⊙ S; KL dot; copy back", kron_precondition),
    Bench("kron_inverse_precondition_", "per layer cat, G⁻¹ V A⁻¹; KL dot; copy back", kron_inverse_precondition),
    Bench("kron_predictive_variance", "eigenbasis in torch: rotate, square, divide", predictive_last_layer_eigenbasis),
    Bench("kron_predictive_variance", "dense J, then J (P⁻¹ Jᵀ) by the torch Kron solve", predictive_last_layer_dense),
    Bench("kron_predictive_variance", "eigenbasis in torch: rotate, square, divide, einsum", predictive_all_layers),
    Bench(
        "kron_predictive_variance",
        "eigenbasis in torch: rotate, divide, B diag(w) Bᵀ per layer",
        predictive_all_layers_covariance,
    ),
    Bench(
        "kron_predictive_variance",
        "eigenbasis in torch: rotate, divide, B diag(w) Bᵀ per layer",
        predictive_covariance_of(16),
        gpu_target=True,
    ),
    Bench(
        "kron_predictive_variance",
        "eigenbasis in torch: rotate, divide, B diag(w) Bᵀ per layer",
        predictive_covariance_of(17),
        gpu_target=True,
    ),
    Bench("batched_eigh", "loop of torch.linalg.eigh", eigh_500_of_100, max_seconds=0.010, gpu_target=True),
    Bench(
        "batched_eigh",
        "loop of torch.linalg.eigh, then Q diag(1/(λ+δ)) Qᵀ",
        eigh_damped_inverse_1024,
        min_speedup=10,
        gpu_target=True,
    ),
    Bench("batched_eigh", "loop of torch.linalg.eigh", eigh_resnet18, min_speedup=5, gpu_target=True),
    Bench(
        "factor_accumulate_",
        "loop: x.float(), cat ones, F.mul_(β).add_(xᵀx)",
        factor_accumulation_gpt2,
        min_speedup=2,
        gpu_target=True,
        max_flop_bound_ratio=1.15,
    ),
    Bench(
        "kron_predictive_variance",
        "eigenbasis in torch: rotate, square, divide",
        predictive_last_layer_1000_classes,
        max_seconds=0.001,
        gpu_target=True,
    ),
]


def make_pair(index: int, device: str, quick: bool) -> Pair:
    torch.manual_seed(index)
    return BENCHES[index].make(device, quick)


# ----------------------------------------------------------------------------- measurement


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in tensors(item)]


def max_rel_diff(result: object, expected: object) -> float:
    """Largest |difference| relative to the largest |expected| entry, over every tensor."""
    pairs = zip(tensors(result), tensors(expected), strict=True)
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max()).item() for x, y in pairs)


def time_pair(pair: Pair, device: str, budget: float) -> tuple[list[float], list[float], float]:
    """Seconds of each side per round, and how far their warm-up results differ."""
    (first_fast, result_fast), (first_base, result_base) = timed(pair.fast, device), timed(pair.baseline, device)
    diff = max_rel_diff(result_fast, result_base)
    rounds = min(MAX_REPEATS, max(MIN_REPEATS, int(budget / (first_fast + first_base))))
    times: dict[Callable, list[float]] = {pair.fast: [], pair.baseline: []}
    for r in range(rounds):
        for fn in (pair.fast, pair.baseline) if r % 2 == 0 else (pair.baseline, pair.fast):
            times[fn].append(timed(fn, device)[0])
    return times[pair.fast], times[pair.baseline], diff


def peak_in_child(index: int, side: str, quick: bool, threads: int, conn) -> None:
    """Body of the fresh process that measures one side of one CPU case."""
    return_freed_memory()
    torch.set_num_threads(threads)
    fn = getattr(make_pair(index, "cpu", quick), side)
    fn()
    gc.collect()
    conn.send(peak_mib(fn, "cpu"))


def cpu_peak_mib(index: int, side: str, quick: bool, threads: int) -> float:
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=peak_in_child, args=(index, side, quick, threads, sender))
    child.start()
    sender.close()
    try:
        peak = receiver.recv()
    except EOFError:
        peak = None
    child.join()
    if peak is None:
        raise RuntimeError(f"the memory probe of case {index} ({side}) died with exit code {child.exitcode}")
    return peak


def target_note(bench: Bench, speedup: float, peak_fraction: float, seconds: float) -> tuple[str | None, bool | None]:
    if bench.max_seconds is not None:
        return f"at most {duration(bench.max_seconds)}", seconds <= bench.max_seconds
    if bench.min_speedup is not None:
        return f"speed-up ≥ {bench.min_speedup}×", speedup >= bench.min_speedup
    if bench.max_peak_fraction is not None:
        return f"peak ≤ {bench.max_peak_fraction:g} of the baseline's", peak_fraction <= bench.max_peak_fraction
    return None, None


def bf16_gemm_flops_per_second(device: str, size: int) -> float:
    """The GPU's bf16 GEMM rate, measured: the median of 11 products of ``size``² matrices."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = statistics.median(timed(lambda: a @ b, device)[0] for _ in range(11))
    return 2 * size**3 / seconds


def flop_bound_note(bench: Bench, pair: Pair, seconds: float, device: str, quick: bool) -> dict:
    """The fast side's time over its bf16 flops at the measured GEMM rate (CUDA cases with that target)."""
    if bench.max_flop_bound_ratio is None or pair.bf16_flops is None or device != "cuda":
        return {}
    rate = bf16_gemm_flops_per_second(device, 512 if quick else 8192)
    ratio = seconds / (pair.bf16_flops / rate)
    return {
        "bf16_gemm_tflops": rate / 1e12,
        "flop_bound_ratio": ratio,
        "flop_bound_target": f"within {bench.max_flop_bound_ratio:g}× of the SYRK flop bound at the bf16 GEMM rate",
        "flop_bound_met": ratio <= bench.max_flop_bound_ratio,
    }


def machine_info(device: str) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def run_bench(index: int, args: argparse.Namespace, common: dict) -> dict:
    bench = BENCHES[index]
    load_average = os.getloadavg()[0]
    pair = make_pair(index, args.device, args.quick)
    times_fast, times_base, diff = time_pair(pair, args.device, SECONDS_PER_CASE[args.quick])
    seconds_fast, seconds_base = statistics.median(times_fast), statistics.median(times_base)
    variant = pair.variant
    bound = flop_bound_note(bench, pair, seconds_fast, args.device, args.quick)
    if args.device == "cuda":
        peaks = [peak_mib(pair.fast, "cuda"), peak_mib(pair.baseline, "cuda")]
    else:
        del pair
        peaks = [cpu_peak_mib(index, side, args.quick, args.threads) for side in ("fast", "baseline")]
    speedup = seconds_base / seconds_fast
    target, met = target_note(bench, speedup, peaks[0] / max(peaks[1], 1e-9), seconds_fast)
    return {
        "case": bench.case,
        "variant": variant,
        "baseline": bench.baseline,
        "seconds_fastlaplace": seconds_fast,
        "seconds_baseline": seconds_base,
        "speedup": speedup,
        "peak_mib_fastlaplace": peaks[0],
        "peak_mib_baseline": peaks[1],
        "max_rel_diff": diff,
        "target": target,
        "target_met": met,
        "times_fastlaplace": times_fast,
        "times_baseline": times_base,
        "load_average": load_average,
        **bound,
        **common,
    }


# ----------------------------------------------------------------------------- report


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def markdown(records: list[dict], command: str) -> str:
    meta, machine = records[0], records[0]["machine"]
    where = machine["gpu"] or f"{machine['processor']}, {machine['cpu_count']} cores, {meta['threads']} threads"
    loads = [r["load_average"] for r in records]
    lines = [
        f"fastlaplace operators vs plain PyTorch on {where}; torch {meta['torch']}; "
        f"operators served by **{meta['backend']}**; `{command}`",
        "",
        f"1-minute load average as each case began: {min(loads):.1f} to {max(loads):.1f} (this run's own "
        f"threads count; well above {meta['threads']} means other work competed for the cores).",
        "",
        "| case | fastlaplace | torch baseline | speed-up | peak MiB fastlaplace | peak MiB baseline |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['case']}: {r['variant']} — vs {r['baseline']} | {duration(r['seconds_fastlaplace'])} | "
            f"{duration(r['seconds_baseline'])} | {r['speedup']:.2f}× | {r['peak_mib_fastlaplace']:.1f} | "
            f"{r['peak_mib_baseline']:.1f} |"
        )
    lines.append("")
    for r in records:
        if r["target"] is not None:
            verdict = "met" if r["target_met"] else "NOT met"
            lines.append(f"- Target for {r['case']} ({r['variant']}): {r['target']}: {verdict}.")
        if "flop_bound_ratio" in r:
            verdict = "met" if r["flop_bound_met"] else "NOT met"
            rate = f"{r['bf16_gemm_tflops']:.0f} TFLOP/s measured"
            lines.append(
                f"- Target for {r['case']} ({r['variant']}): {r['flop_bound_target']} ({rate}): "
                f"{r['flop_bound_ratio']:.2f}×, {verdict}."
            )
        if r["max_rel_diff"] > MAX_REL_DIFF:
            difference = f"max relative difference {r['max_rel_diff']:.1e}"
            lines.append(f"- fastlaplace and baseline results differ: {r['case']} ({r['variant']}), {difference}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="much smaller sizes: a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Only torch: the server imports by name from its own sys.path, which could find another fastlaplace.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch"])
    # Each memory probe imports fastlaplace again: say once, here, which backend serves the ops.
    os.environ["PYTHONWARNINGS"] = "ignore:fastlaplace._C is not available:RuntimeWarning"
    backend = ops.build_info()
    print(f"fastlaplace from {Path(fastlaplace.__file__).parent}, operators served by: {backend}", flush=True)
    if not ops.extension_loaded():
        print("WARNING: the compiled extension is not loaded; timing the pure-PyTorch reference", flush=True)
    common = {
        "device": args.device,
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "backend": backend,
        "extension_loaded": ops.extension_loaded(),
        "machine": machine_info(args.device),
    }
    records = []
    for index, bench in enumerate(BENCHES):
        if bench.gpu_target and args.device == "cpu" and not args.quick:
            continue  # GPU sizes: hours on two cores
        record = run_bench(index, args, common)
        records.append(record)
        print(
            f"{record['case']:>24s} {record['speedup']:6.2f}x  {record['variant']}  "
            f"({duration(record['seconds_fastlaplace'])} vs {duration(record['seconds_baseline'])}, "
            f"{len(record['times_baseline'])} rounds, max rel diff {record['max_rel_diff']:.1e})",
            flush=True,
        )
    command = " ".join(["python benchmarks/bench_ops.py", *sys.argv[1:]])
    table = markdown(records, command)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{args.device}_quick" if args.quick else f"ops_{args.device}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    json_path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(table)
    print("\n" + table)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
