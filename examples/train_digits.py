"""Train an MLP and a small CNN on scikit-learn's digits with SGD, Adam and K-FAC.

Run ``python examples/train_digits.py`` (all models and optimisers, 10 epochs) or, for
instance, ``python examples/train_digits.py --model cnn --optimizer kfac --epochs 5``.
The same loop runs on several processes unchanged:
``torchrun --nproc_per_node 2 examples/train_digits.py`` initialises the process group
from the environment, shards the training set with a DistributedSampler and wraps the
model in DistributedDataParallel; the preconditioner then averages its factors over the
ranks (fastlaplace.distributed).

The data are the 1,797 8x8 digit images of ``sklearn.datasets.load_digits`` (no
download), scaled to [0, 1] and split 80/20 (stratified, fixed seed).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastlaplace import distributed
from fastlaplace.optim import DAMPING_MODES, KFACPreconditioner

OPTIMIZERS = ("sgd", "adam", "kfac")
MODELS = ("mlp", "cnn")
#: learning rates used when none is given (the benchmark tunes Adam's on a grid)
DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3, "kfac": 0.1}
#: K-FAC options of this example (SGD with momentum 0.9 underneath)
KFAC_OPTIONS = {"damping": 0.01, "factor_update_steps": 1, "inv_update_steps": 10, "factor_decay": 0.95}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train (1437, 1, 8, 8), y_train (1437,), x_test (360, 1, 8, 8), y_test (360,))``, pixels in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def make_model(name: str) -> nn.Module:
    """An MLP 64-128-64-10 or a CNN (two 3x3 convolutions with pooling, 16 and 32 channels, then a Linear)."""
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


@dataclass
class Run:
    """What one training run produced: test accuracy after each epoch and the training time."""

    model: str
    optimizer: str
    lr: float
    accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def epochs_to(self, target: float) -> int | None:
        """The first epoch (1-based) whose test accuracy reached ``target``, or None."""
        return next((e + 1 for e, a in enumerate(self.accuracies) if a >= target), None)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``(N, 1, 8, 8)`` images classified as their ``(N,)`` labels."""
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def train(
    model_name: str,
    optimizer_name: str,
    epochs: int,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    target: float | None = None,
    kfac_options: dict | None = None,
    momentum: float = 0.9,
) -> Run:
    """Train from a seeded initialisation; stop early once the test accuracy reaches ``target``.

    ``kfac_options`` replace :data:`KFAC_OPTIONS` for K-FAC; ``momentum`` is that of SGD
    (under K-FAC too), or Adam's β₁.

    Under torch.distributed (the process group initialised, e.g. by :func:`main` under
    torchrun) each rank trains on its DistributedSampler shard with DDP; every rank
    evaluates the whole (small) test set.
    """
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer_name!r}")
    lr = DEFAULT_LR[optimizer_name] if lr is None else lr
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(seed)
    model = make_model(model_name)
    rank, world = distributed.rank_and_size()
    trained = DistributedDataParallel(model) if world > 1 else model
    dataset = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(dataset, world, rank, seed=seed) if world > 1 else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
    )
    if optimizer_name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(momentum, 0.999))
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    options = KFAC_OPTIONS if kfac_options is None else kfac_options
    preconditioner = KFACPreconditioner(trained, lr=optimizer, **options) if optimizer_name == "kfac" else None
    run = Run(model_name, optimizer_name, lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(trained(x), y).backward()
            if preconditioner is not None:
                preconditioner.step()
            optimizer.step()
        run.accuracies.append(accuracy(model, x_test, y_test))
        if target is not None and run.accuracies[-1] >= target:
            break
    run.seconds = time.perf_counter() - start
    return run


def main() -> None:
    """Command line: train the chosen models with the chosen optimisers and print the test accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "all"), default="all")
    parser.add_argument("--optimizer", choices=(*OPTIMIZERS, "all"), default="all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="default: per optimiser, see DEFAULT_LR")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument(
        "--damping-mode",
        choices=DAMPING_MODES,
        default="eigen",
        help="K-FAC's damping: exact in the eigenbasis, or factored (Cholesky inverses, cheaper per step)",
    )
    args = parser.parse_args()
    kfac_options = {**KFAC_OPTIONS, "damping_mode": args.damping_mode}
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")  # the example trains on the CPU
    try:
        rank = distributed.rank_and_size()[0]
        for model_name in MODELS if args.model == "all" else (args.model,):
            for optimizer_name in OPTIMIZERS if args.optimizer == "all" else (args.optimizer,):
                run = train(
                    model_name, optimizer_name, args.epochs, args.lr, args.batch_size, kfac_options=kfac_options
                )
                if rank == 0:
                    curve = " ".join(f"{a:.3f}" for a in run.accuracies)
                    print(
                        f"{model_name} {optimizer_name:4s} lr={run.lr:g}: test accuracy per epoch {curve} "
                        f"({run.seconds:.1f} s)"
                    )
        if dist.is_initialized():
            # Every rank past its last collective before any tears the group down: a rank that left
            # first made gloo abort the other at exit ("terminate called without an active exception").
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
