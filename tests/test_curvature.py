"""Layer statistics and their accumulation against the dense GGN / Fisher of tiny networks."""

import pytest
import torch
from dense import dense_ggn, layer_sizes, output_hessians, targets, tiny_cnn, tiny_mlp
from torch import nn

from fastlaplace.curvature import DiagCurvature, KronCurvature, accumulate, layer_statistics, output_gradient_columns


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_curvature_columns_square_to_the_loss_hessian(likelihood):
    model = tiny_mlp(True)
    x = torch.randn(5, 3, dtype=torch.float64)
    columns = output_gradient_columns(model(x), targets(likelihood, 5), likelihood, "ggn")
    torch.testing.assert_close(columns @ columns.transpose(1, 2), output_hessians(model, x, likelihood))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("bias", [False, True])
def test_diagonal_equals_dense_ggn_diagonal_over_batches(likelihood, bias, generator):
    model = tiny_mlp(bias)
    x = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    y = targets(likelihood, 7, generator=generator)
    diag = DiagCurvature()
    for rows in (slice(0, 4), slice(4, 7)):
        diag.update(layer_statistics(model, x[rows], y[rows], likelihood)[1])
    assert diag.num_data == 7
    got = torch.cat([d.flatten() for d in diag.diagonals])
    torch.testing.assert_close(got, dense_ggn(model, x, likelihood).diagonal())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("bias", [False, True])
def test_kron_is_exact_for_one_datum(likelihood, bias, generator):
    model = tiny_mlp(bias)
    x = torch.randn(1, 3, dtype=torch.float64, generator=generator)
    kron = KronCurvature()
    kron.update(layer_statistics(model, x, targets(likelihood, 1, generator=generator), likelihood)[1])
    dense = dense_ggn(model, x, likelihood)
    start = 0
    for a, g, size in zip(kron.input_factors, kron.output_factors, layer_sizes(model)):
        block = dense[start : start + size, start : start + size]
        torch.testing.assert_close(torch.kron(g, a) / kron.num_data, block)
        start += size


def test_kron_factors_add_up_over_batches(generator):
    model = tiny_mlp(True)
    x = torch.randn(9, 3, dtype=torch.float64, generator=generator)
    y = targets("classification", 9, generator=generator)
    whole, split = KronCurvature(), KronCurvature()
    whole.update(layer_statistics(model, x, y, "classification")[1])
    for rows in (slice(0, 2), slice(2, 9)):
        split.update(layer_statistics(model, x[rows], y[rows], "classification")[1])
    for a, b in zip(whole.input_factors + whole.output_factors, split.input_factors + split.output_factors):
        torch.testing.assert_close(a, b)
    assert whole.num_data == split.num_data == 9


def test_gathered_rows_give_the_factors_of_every_batch(monkeypatch, generator):
    """Rows gathered over batches (buffers of 8 here) are all counted: full buffers, a batch
    too large for its buffer, a read in the middle of a fit, and factors replaced by assignment."""
    model = tiny_mlp(True)
    sizes = (3, 3, 3, 5, 2, 4)
    x = torch.randn(sum(sizes), 3, dtype=torch.float64, generator=generator)
    y = targets("classification", sum(sizes), generator=generator)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    batches = [
        layer_statistics(model, x[s : s + n], y[s : s + n], "classification", "ef")[1] for s, n in zip(starts, sizes)
    ]
    monkeypatch.setattr(accumulate, "GATHERED_ROWS", 0)  # no gathering: every batch multiplied at once
    direct = KronCurvature()
    for stats in batches:
        direct.update(stats)
    expected = [f.clone() for f in direct.input_factors + direct.output_factors]
    monkeypatch.setattr(accumulate, "GATHERED_ROWS", 8)
    gathered = KronCurvature()
    for k, stats in enumerate(batches):
        gathered.update(stats)
        if k == 3:  # a read flushes the buffers; later batches gather again
            assert len(gathered.output_factors) == 2
            assert gathered._filled and not any(gathered._filled.values())
    assert any(gathered._filled.values())  # rows are waiting for the next read
    for got, want in zip(gathered.input_factors + gathered.output_factors, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert gathered.num_data == direct.num_data == sum(sizes)
    gathered.update(batches[0])
    gathered.input_factors = [torch.zeros_like(f) for f in expected[:2]]  # replacing the factors drops the rows
    assert not gathered._filled
    torch.testing.assert_close(gathered.input_factors[0], torch.zeros_like(expected[0]))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_empirical_fisher_is_the_outer_product_of_the_loss_gradient(likelihood, generator):
    model = tiny_mlp(True)
    x = torch.randn(1, 3, dtype=torch.float64, generator=generator)
    y = targets(likelihood, 1, generator=generator)
    kron = KronCurvature()
    kron.update(layer_statistics(model, x, y, likelihood, mode="ef")[1])
    out = model(x)
    if likelihood == "classification":
        loss = nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        loss = 0.5 * (out - y).square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for i, (a, g) in enumerate(zip(kron.input_factors, kron.output_factors)):
        flat = torch.cat([grads[2 * i], grads[2 * i + 1].unsqueeze(-1)], dim=-1).flatten()  # row-major [W | b]
        torch.testing.assert_close(torch.kron(g, a), torch.outer(flat, flat))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_monte_carlo_fisher_is_unbiased_for_the_ggn(likelihood):
    model = tiny_mlp(True)
    generator = torch.Generator().manual_seed(7)
    datum = torch.randn(1, 3, dtype=torch.float64, generator=generator)
    draws = 20000
    diag = DiagCurvature()
    x = datum.expand(draws, -1)
    diag.update(layer_statistics(model, x, targets(likelihood, draws), likelihood, "mc", generator)[1])
    estimate = torch.cat([d.flatten() for d in diag.diagonals]) / draws
    exact = dense_ggn(model, datum, likelihood).diagonal()
    torch.testing.assert_close(estimate, exact, rtol=0.05, atol=1e-3 * exact.abs().max().item())


def test_unsupported_layer_with_parameters_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).double()
    with pytest.raises(
        ValueError, match=r"layer '1' \(PReLU\) has trainable parameters \['weight'\] but is not supported"
    ):
        layer_statistics(
            model, torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long), "classification"
        )


def test_frozen_unsupported_layer_is_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    model[1].requires_grad_(False)
    _, stats = layer_statistics(
        model, torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.long), "classification"
    )
    assert [s.name for s in stats] == ["0", "2"]


def test_model_without_supported_layer_is_refused():
    with pytest.raises(ValueError, match="no trainable layer of a supported type"):
        layer_statistics(
            nn.Sequential(nn.Tanh()), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), "classification"
        )


def test_non_finite_output_is_refused():
    model = tiny_mlp(True)
    x = torch.randn(2, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="output contains NaN or Inf"):
        layer_statistics(model, x, torch.zeros(2, dtype=torch.long), "classification")


class SqrtOfZero(nn.Module):
    def forward(self, z):
        return (z * 0.0).sqrt() + z.tanh()  # finite output, but d sqrt(0 z)/dz = inf * 0 = NaN


def test_non_finite_gradient_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 4), SqrtOfZero(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="output gradients of layer '0' contain NaN or Inf"):
        layer_statistics(
            model, torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), "classification"
        )


@pytest.mark.parametrize(
    ("likelihood", "mode", "message"),
    [("classifcation", "ggn", "likelihood must be one of"), ("regression", "fisher", "mode must be one of")],
)
def test_options_are_validated(likelihood, mode, message):
    with pytest.raises(ValueError, match=message):
        output_gradient_columns(torch.zeros(2, 3), torch.zeros(2, 3), likelihood, mode)


def test_inputs_of_more_than_four_dimensions_are_refused_with_the_layer_name():
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten()).double()  # (N, H, W, d): tokens; one more: refused
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\) got an input of shape \(2, 4, 5, 1, 3\); it accepts"):
        layer_statistics(
            model, torch.randn(2, 4, 5, 1, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), "classification"
        )


@pytest.mark.parametrize("likelihood", ["classification", "regression", "heteroscedastic_regression"])
def test_mc_samples_average_to_the_exact_output_curvature(likelihood):
    output = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    many = output_gradient_columns(output, None, likelihood, "mc", torch.Generator().manual_seed(1), mc_samples=50_000)
    assert many.shape == (3, 4, 50_000)
    exact = output_gradient_columns(output, None, likelihood, "ggn")
    torch.testing.assert_close(many @ many.mT, exact @ exact.mT, atol=0.05, rtol=0.05)
    one = output_gradient_columns(output, None, likelihood, "mc", torch.Generator().manual_seed(1))
    assert one.shape == (3, 4, 1)
    with pytest.raises(ValueError, match="mc_samples"):
        output_gradient_columns(output, None, likelihood, "ggn", mc_samples=2)


@pytest.mark.parametrize("column_major", [True, False])  # a stacked batch of columns, or any (N, K, d, H, W)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_channel_gram_equals_the_gram_of_the_location_rows(column_major, dtype, monkeypatch, generator):
    monkeypatch.setattr(accumulate, "CHANNEL_GRAM_BYTES", 5 * 5 * 4 * 3)  # chunks of 3 blocks: 4 parts of 10
    shape = (2, 5, 5, 3, 4) if column_major else (5, 2, 5, 3, 4)
    grads = torch.randn(shape, generator=generator).to(dtype)
    grads = grads.transpose(0, 1) if column_major else grads
    rows = grads.to(torch.float32).movedim(2, -1).reshape(-1, 5)  # (N K H W, d)
    got = accumulate.channel_gram(grads, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rows.T @ rows)


def test_gathered_conv_inputs_give_the_factors_of_every_batch(monkeypatch, generator):
    """Conv2d inputs gathered over batches (flushed at 3 images' bytes here) count every batch once:
    a full gather, one left waiting until the factors are read, and a read in the middle of a fit."""
    model = tiny_cnn(5)
    x = torch.randn(9, 2, 5, 5, dtype=torch.float64, generator=generator)
    y = targets("classification", 9, generator=generator)
    batches = [layer_statistics(model, x[s : s + 1], y[s : s + 1], "classification")[1] for s in range(9)]
    whole = KronCurvature()
    whole.update(layer_statistics(model, x, y, "classification")[1])
    monkeypatch.setattr(accumulate, "GATHERED_CONV_BYTES", 3 * x[0].nbytes)
    gathered = KronCurvature()
    for k, stats in enumerate(batches):
        gathered.update(stats)
        if k == 3:  # three images multiplied, one waits; the read adds it
            assert len(gathered._conv_inputs[0][2]) == 1
            first = KronCurvature()
            first.update(layer_statistics(model, x[:4], y[:4], "classification")[1])
            torch.testing.assert_close(gathered.input_factors[0], first.input_factors[0])
    assert gathered._conv_inputs  # the last image waits for the next read
    for got, want in zip(gathered.input_factors, whole.input_factors, strict=True):
        torch.testing.assert_close(got, want)


def test_zero_output_gradient_rows_are_dropped_before_the_gram_and_the_factor_is_unchanged():
    # Right-padded tokens that no output reads back: their rows of every column are exactly 0.
    grads = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    grads[:, :, 4:] = 0.0
    grads[1, 0, 2] = 0.0
    rows = grads.reshape(-1, 5)
    kept = accumulate._nonzero_rows(rows)
    assert kept.shape == (4 * 2 * 4 - 1, 5)
    torch.testing.assert_close(kept.T @ kept, rows.T @ rows, rtol=1e-14, atol=1e-14)
    dense_rows = torch.randn(7, 5)
    assert accumulate._nonzero_rows(dense_rows) is dense_rows  # nothing to drop: no copy
    channels_first = torch.zeros(5, 7).T  # a convolution's transposed rows are left as they are
    assert accumulate._nonzero_rows(channels_first) is channels_first
