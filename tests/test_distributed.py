"""Two gloo processes on loopback give what one process gives on all the data: K-FAC and Laplace fits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastlaplace import Laplace, distributed
from fastlaplace.optim import KFACPreconditioner
from fastlaplace.optim.kfac import BROADCASTS, DAMPING_MODES

WORLD = 2
STEPS = 3
BATCH = 8
STRUCTURES = ("kron", "ekfac", "diag", "full")


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.Flatten(), nn.Linear(16, 3)
    ).double()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(step: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, *shape, generator=generator, dtype=torch.float64), torch.randint(
        0, 3, (BATCH,), generator=generator
    )


def shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = tensor.shape[0] // world
    return tensor[rank * size : (rank + 1) * size]


#: (broadcast, damping_mode) pairs; EKFAC measures its scales in every layer's basis on every rank ("eigen")
KFAC_RUNS = [(b, m) for b in BROADCASTS for m in DAMPING_MODES if (b, m) != ("gradient", "ekfac")]


def kfac_run(broadcast: str, damping_mode: str = "eigen", rank: int = 0, world: int = 1) -> dict:
    """STEPS steps of SGD + K-FAC on this rank's shard of each batch (DDP averages the gradients).

    EKFAC runs on the MLP: its scales depend on the basis chosen inside a repeated eigenvalue
    of a factor (the CNN's Linear sees 8 inputs of 17 dimensions and dead ReLUs), which the
    rounding of the rank sums decides.
    """
    model, shape = (mlp(), (4,)) if damping_mode == "ekfac" else (cnn(), (2, 4, 4))
    trained = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        trained,
        damping=0.01,
        inv_update_steps=2,
        factor_decay=0.8,
        lr=optimizer,
        broadcast=broadcast,
        damping_mode=damping_mode,
    )
    gradients = []
    for step in range(STEPS):
        x, y = batch(step, shape)
        optimizer.zero_grad()
        nn.functional.cross_entropy(trained(shard(x, rank, world)), shard(y, rank, world)).backward()
        pre.step()
        gradients.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return {
        "gradients": gradients,
        "input_factors": pre.curvature.input_factors,
        "output_factors": pre.curvature.output_factors,
        "in_use": pre.damped_inverses() if damping_mode == "factored" else pre.eigendecomposition(),
    }


def laplace_run(structure: str, rank: int = 0, world: int = 1, split: bool = False) -> dict:
    """A classification Laplace fit on this rank's shard of two batches (with ``split``: one fit per batch)."""
    model = mlp()
    batches = [tuple(shard(t, rank, world) for t in batch(step, (4,))) for step in range(2)]
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure)
    if split:
        la.fit(batches[:1])
        la.fit(batches[1:], override=False)
    else:
        la.fit(batches)
    result = {
        "curvature": [t.clone() for t in la._curvature_tensors()],
        "loss": la.loss,
        "num_data": la.num_data,
        "log_marginal_likelihood": la.log_marginal_likelihood().detach(),
    }
    if structure not in ("kron", "ekfac"):
        result["posterior_precision"] = la.posterior_precision()
    return result


def collectives_run(rank: int, world: int) -> dict:
    """all_reduce_ over several buckets and dtypes, and broadcasts from owners."""
    tensors = [
        torch.full((300,), float(rank + 1), dtype=torch.float32),
        torch.arange(6, dtype=torch.float64).view(2, 3) * (rank + 1),
        torch.full((2,), rank + 1, dtype=torch.int64),
        torch.full((500,), float(rank + 1), dtype=torch.float32),
    ]
    distributed.all_reduce_(tensors, bucket_mb=1e-3)  # 1 kB buckets: several calls per dtype
    averaged = [torch.full((3,), float(rank))]
    distributed.all_reduce_(averaged, average=True)
    owned = [torch.full((4,), float(rank)) for _ in range(5)]
    owners = [0, 1, 1, 0, 1]
    distributed.broadcast_from_owners_(owned, owners, bucket_mb=1e-5)
    return {"sums": tensors, "average": averaged[0], "owned": owned}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {
            "collectives": collectives_run(rank, world),
            "kfac": {(b, m): kfac_run(b, m, rank, world) for b, m in KFAC_RUNS},
            "laplace": {s: laplace_run(s, rank, world) for s in STRUCTURES},
            "laplace_split": {s: laplace_run(s, rank, world, split=True) for s in ("kron", "diag")},
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_collectives(ranks):
    for result in (r["collectives"] for r in ranks):
        sums = result["sums"]
        assert torch.equal(sums[0], torch.full((300,), 3.0))
        assert torch.equal(sums[1], torch.arange(6, dtype=torch.float64).view(2, 3) * 3)
        assert torch.equal(sums[2], torch.full((2,), 3))
        assert torch.equal(sums[3], torch.full((500,), 3.0))
        assert torch.equal(result["average"], torch.full((3,), 0.5))
        assert [float(t[0]) for t in result["owned"]] == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_assign_owners_balances_cost_largest_first():
    assert distributed.assign_owners([1, 8, 27, 64, 125], 2) == [1, 1, 1, 1, 0]  # loads 125 and 64 + 27 + 8 + 1
    assert distributed.assign_owners([5, 5, 5], 1) == [0, 0, 0]
    with pytest.raises(ValueError, match="world_size"):
        distributed.assign_owners([1.0], 0)


def test_one_process_is_a_no_op():
    tensors = [torch.ones(3)]
    distributed.all_reduce_(tensors, average=True)
    distributed.broadcast_from_owners_(tensors, [0])
    assert torch.equal(tensors[0], torch.ones(3)) and not distributed.is_distributed()
    assert distributed.rank_and_size() == (0, 1)


@pytest.mark.parametrize(("broadcast", "damping_mode"), KFAC_RUNS)
def test_kfac_over_two_ranks_equals_one_process_on_all_data(ranks, broadcast, damping_mode):
    expected = kfac_run(broadcast, damping_mode)
    for rank, result in enumerate(ranks):
        got = result["kfac"][broadcast, damping_mode]
        for name in ("input_factors", "output_factors"):
            for f, e in zip(got[name], expected[name], strict=True):
                torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-14)
        for step_got, step_expected in zip(got["gradients"], expected["gradients"], strict=True):
            for g, e in zip(step_got, step_expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
        factors = zip(expected["input_factors"], expected["output_factors"], strict=True)
        held = 0
        for in_use, expected_in_use, (a, g) in zip(got["in_use"], expected["in_use"], factors, strict=True):
            if in_use is None:
                continue
            held += 1
            if damping_mode == "factored":  # the damped inverses of the averaged factors
                for t, e in zip(in_use, expected_in_use, strict=True):
                    torch.testing.assert_close(t, e, rtol=1e-10, atol=1e-12)
                continue
            qa, la, qg, lg = in_use[:4]
            if damping_mode == "ekfac":  # the scales measured on each rank's shard, averaged
                torch.testing.assert_close(in_use.scales, expected_in_use.scales, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(qa @ torch.diag(la) @ qa.T, a, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(qg @ torch.diag(lg) @ qg.T, g, rtol=1e-10, atol=1e-12)
        # "eigen": every rank holds all layers' eigenpairs or inverses; "gradient": each layer's only on its owner
        layers = 2 if damping_mode == "ekfac" else 3
        assert held == layers if broadcast == "eigen" else 0 < held < layers, (rank, held)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_laplace_fit_on_shards_equals_one_fit_on_all_data(ranks, structure):
    expected = laplace_run(structure)
    for result in ranks:
        got = result["laplace"][structure]
        assert got["num_data"] == expected["num_data"] == 2 * BATCH
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-12)
        for t, e in zip(got["curvature"], expected["curvature"], strict=True):
            torch.testing.assert_close(t, e, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got["log_marginal_likelihood"], expected["log_marginal_likelihood"])
        if structure not in ("kron", "ekfac"):
            torch.testing.assert_close(got["posterior_precision"], expected["posterior_precision"])


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_fit_without_override_adds_the_new_shards_once(ranks, structure):
    expected = laplace_run(structure)
    for result in ranks:
        got = result["laplace_split"][structure]
        assert got["num_data"] == 2 * BATCH
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-12)
        for t, e in zip(got["curvature"], expected["curvature"], strict=True):
            torch.testing.assert_close(t, e, rtol=1e-12, atol=1e-14)


def test_digits_example_under_torchrun(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "train_digits.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), "--epochs", "1", "--model", "mlp", "--optimizer", "kfac"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    if result.returncode != 0 and "EADDRINUSE" in result.stderr + result.stdout:
        # --standalone takes a free port and frees it before the agent binds it: another process can take it
        result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("mlp kfac")]
    assert len(lines) == 1, result.stdout + result.stderr  # printed by rank 0 only
