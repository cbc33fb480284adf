"""The low-rank sketch over two gloo processes equals one process's sketch of all the data."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dense import targets, tiny_mlp

from fastlaplace import Laplace


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64, generator=generator)
    return x, targets("classification", 8, generator=generator)


def fit(rank: int = 0, world: int = 1) -> Laplace:
    x, y = data()
    shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
    la = Laplace(tiny_mlp(True), "classification", subset_of_weights="all", hessian_structure="lowrank", low_rank=4)
    la.fit([(x[shard][:2], y[shard][:2]), (x[shard][2:], y[shard][2:])])
    return la


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        la = fit(rank, world)
        result = {"state": la.state_dict(), "evidence": la.log_marginal_likelihood().detach()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = fit()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["state"]["num_data"] == 8
        assert abs(got["state"]["loss"] - expected.loss) < 1e-12 * abs(expected.loss)
        vectors, values = got["state"]["curvature"]
        torch.testing.assert_close(values, expected.eigenvalues)
        # The same subspace: compare the projectors, not the eigenvectors' signs.
        torch.testing.assert_close(vectors @ vectors.T, expected.eigenvectors @ expected.eigenvectors.T)
        torch.testing.assert_close(got["evidence"], expected.log_marginal_likelihood().detach())
