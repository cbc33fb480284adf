"""factor_accumulate_: F <- beta F + alpha [X,1]ᵀ[X,1] for all layers, in place."""

import pytest
import torch
from conftest import DEVICES, INPUT_DTYPES, PRIME_SIZES, assert_matches_float64, random_spd, requires_extension
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def brute_force(factor, x, ones, alpha, beta):
    """Sum of per-sample outer products in float64, one sample at a time."""
    total = torch.zeros_like(factor, dtype=torch.float64)
    for row in x.double():
        u = torch.cat([row, row.new_ones(1)]) if ones else row
        total += torch.outer(u, u)
    old = torch.zeros_like(total) if beta == 0 else beta * factor.double()
    return old + alpha * total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_matches_brute_force_for_mixed_layers(device, dtype, generator):
    sizes = [(7, 1, True), (13, 5, False), (3, 300, True)]
    xs = [torch.randn(n, d, generator=generator).to(dtype) for n, d, _ in sizes]
    ones = [b for *_, b in sizes]
    factor_dtype = reference.accumulation_dtype(dtype)
    factors = [random_spd(d + b, generator=generator).to(factor_dtype) for (_, d, b) in sizes]
    exact = [brute_force(f, x, b, 0.3, 0.7) for f, x, b in zip(factors, xs, ones)]
    rounded = [f.clone() for f in factors]
    reference.factor_accumulate_(rounded, xs, ones, 0.3, 0.7)
    on_device = [f.to(device) for f in factors]
    ops.factor_accumulate_(on_device, [x.to(device) for x in xs], ones, 0.3, 0.7)
    for result, want, own in zip(on_device, exact, rounded):
        assert result.dtype == factor_dtype
        assert_matches_float64(result, want, own)
        assert torch.equal(result, result.T), "the accumulated factor must be exactly symmetric"


@pytest.mark.parametrize("device", DEVICES)
def test_beta_zero_ignores_nan_and_empty_batch_only_decays(device):
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    stale = torch.full((4, 4), float("nan"), dtype=torch.float64, device=device)
    ops.factor_accumulate_([stale], [x], [True], alpha=2.0, beta=0.0)
    ones = torch.cat([x, x.new_ones(4, 1)], 1)
    torch.testing.assert_close(stale, 2.0 * ones.T @ ones)
    decayed = random_spd(6).to(device)
    expected = 0.25 * decayed
    ops.factor_accumulate_([decayed], [torch.empty(0, 5, dtype=torch.float64, device=device)], [True], 1.0, 0.25)
    torch.testing.assert_close(decayed, expected)


@given(
    sizes=st.lists(
        st.tuples(st.sampled_from([0, *PRIME_SIZES]), st.sampled_from(PRIME_SIZES), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    layout=st.sampled_from(["contiguous", "transposed", "strided", "expanded"]),
    alpha=st.sampled_from([1.0, 0.5, 3.0]),
    beta=st.sampled_from([0.0, 1.0, 0.9]),
)
def test_property_odd_sizes_layouts_and_dtypes(sizes, dtype, layout, alpha, beta):
    xs = []
    for n, d, _ in sizes:
        if layout == "transposed":
            x = torch.randn(d, n).to(dtype).T
        elif layout == "strided":
            x = torch.randn(n, 2 * d).to(dtype)[:, ::2]
        elif layout == "expanded":
            x = torch.randn(1, d).to(dtype).expand(n, d)
        else:
            x = torch.randn(n, d).to(dtype)
        xs.append(x)
    ones = [b for *_, b in sizes]
    factor_dtype = reference.accumulation_dtype(dtype)
    factors = [random_spd(d + b).to(factor_dtype) for (_, d, b) in sizes]
    inputs_before = [x.clone() for x in xs]
    rounded = [f.clone() for f in factors]
    reference.factor_accumulate_(rounded, xs, ones, alpha, beta)
    exact = [brute_force(f, x, b, alpha, beta) for f, x, b in zip(factors, xs, ones)]
    ops.factor_accumulate_(factors, xs, ones, alpha, beta)
    for result, want, own in zip(factors, exact, rounded):
        assert_matches_float64(result, want, own)
    for x, before in zip(xs, inputs_before):
        assert torch.equal(x, before), "inputs must not be modified"


def test_opcheck():
    requires_extension()
    factors = [random_spd(4).float(), random_spd(3).float()]
    inputs = [torch.randn(5, 3), torch.randn(5, 3)]
    torch.library.opcheck(torch.ops.fastlaplace.factor_accumulate_.default, (factors, inputs, [True, False], 0.5, 0.5))


def test_traces_under_torch_compile():
    requires_extension()

    def step(factor, x):
        ops.factor_accumulate_([factor], [x], [True], 1.0, 0.5)
        return factor * 2

    x = torch.randn(6, 4)
    eager_factor, compiled_factor = random_spd(5).float(), None
    compiled_factor = eager_factor.clone()
    expected = step(eager_factor, x)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled_factor, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(compiled_factor, eager_factor)


@pytest.mark.parametrize(
    ("factors", "inputs", "ones", "error", "message"),
    [
        ([torch.zeros(4, 4)], [torch.randn(2, 3)], [True, False], ValueError, "one entry per layer"),
        ([torch.zeros(3, 3)], [torch.randn(2, 3)], [True], ValueError, r"factors\[0\] must have shape \(4, 4\)"),
        (
            [torch.zeros(4, 4, dtype=torch.bfloat16)],
            [torch.randn(2, 3)],
            [True],
            TypeError,
            r"factors\[0\] must be float32",
        ),
        ([torch.zeros(8, 8)[::2, ::2]], [torch.randn(2, 3)], [True], ValueError, "contiguous"),
        (
            [torch.zeros(4, 4)],
            [torch.ones(2, 3, dtype=torch.int64)],
            [True],
            TypeError,
            r"inputs\[0\] must be a floating",
        ),
        ([torch.zeros(4, 4)], [torch.randn(2, 3, 1)], [True], ValueError, r"inputs\[0\] must have 2 dimensions"),
    ],
)
def test_bad_inputs_name_the_argument(factors, inputs, ones, error, message):
    with pytest.raises(error, match=message):
        ops.factor_accumulate_(factors, inputs, ones)


def test_compiled_op_checks_shapes_itself():
    requires_extension()
    with pytest.raises(RuntimeError, match=r"factors\[0\] must be \(4, 4\)"):
        torch.ops.fastlaplace.factor_accumulate_([torch.zeros(3, 3)], [torch.randn(2, 3)], [True], 1.0, 1.0)


def test_bf16_rows_converted_in_several_chunks_add_up(generator):
    # 1500 bf16 columns are converted 699 rows at a time (4 MiB of float32): 2 chunks here.
    x = torch.randn(700, 1500, generator=generator).to(torch.bfloat16)
    old = random_spd(1501, generator=generator).float()
    result, expected = old.clone(), old.clone()
    ops.factor_accumulate_([result], [x], [True], 0.5, 0.25)
    reference.factor_accumulate_([expected], [x], [True], 0.5, 0.25)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-3)
