"""The CUDA curvature ops' fused Gram kernel: its arithmetic and launch code through the host emulation, and on a GPU.

It serves factor_accumulate_ and conv_input_factor_ (symmetric Gram matrices) and diag_ggn
(a product of squared rows).

The emulation runs csrc/engines/tile_gram.h block by block and thread by thread on the host;
``target_blocks`` plays the GPU's size, so a small value keeps every layer whole and a
large one splits rows into chunks that a second launch adds up.
"""

import pytest
import torch
from conftest import (
    CUDA_REASON,
    INPUT_DTYPES,
    TILE,
    assert_matches_float64,
    emulated_op,
    random_spd,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference

MIN_CHUNK_ROWS = 512  # gram::kMinChunkRows
EDGE_SIZES = [1, 2, 5, TILE - 1, TILE, TILE + 1, 2 * TILE + 3]


def emulated_factor_accumulate(factors, inputs, ones, alpha, beta, target_blocks):
    emulated_op("_factor_accumulate_emulated_", target_blocks)(factors, inputs, ones, alpha, beta)


def emulated_conv_factor(factor, x, geometry, ones, alpha, beta, target_blocks):
    emulated_op("_conv_input_factor_emulated_", target_blocks)(factor, x, *geometry, ones, alpha, beta)


def emulated_diag_ggn(inputs, output_grads, ones, target_blocks):
    return emulated_op("_diag_ggn_emulated", target_blocks)(inputs, output_grads, ones)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout."""
    if kind == "transposed":
        return x.T.contiguous().T
    if kind == "strided":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def with_ones(x: torch.Tensor, ones: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], 1) if ones else x


def symmetric_start(size: int, dtype: torch.dtype) -> torch.Tensor:
    return random_spd(size).to(dtype)


def check_against_float64(results, starts, inputs, ones, alpha, beta):
    """Each result against the float64 sum and the reference's own error in the factor's dtype."""
    for result, start, x, b in zip(results, starts, inputs, ones, strict=True):
        rows = with_ones(x.double(), b)
        exact = (0 if beta == 0 else beta * start.double()) + alpha * rows.T @ rows
        rounded = start.clone()
        reference.factor_accumulate_([rounded], [x], [b], alpha, beta)
        assert result.dtype == start.dtype
        assert_matches_float64(result, exact, rounded)
        assert torch.equal(result, result.T), "the factor must be exactly symmetric"


@settings(deadline=None, max_examples=40)
@given(
    layers=st.lists(
        st.tuples(st.sampled_from([0, 1, 17, 40]), st.sampled_from(EDGE_SIZES), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    dtype=st.sampled_from(INPUT_DTYPES),
    kind=st.sampled_from(["contiguous", "transposed", "strided"]),
    beta=st.sampled_from([0.0, 1.0, 0.9]),
    target_blocks=st.sampled_from([1, 5, 10_000]),
)
def test_property_tile_edges_dtypes_layouts_and_launch_sizes(layers, dtype, kind, beta, target_blocks):
    inputs = [layout(torch.randn(n, d).to(dtype), kind) for n, d, _ in layers]
    ones = [b for *_, b in layers]
    factor_dtype = reference.accumulation_dtype(dtype)
    starts = [symmetric_start(d + b, factor_dtype) for _, d, b in layers]
    results = [s.clone() for s in starts]
    emulated_factor_accumulate(results, inputs, ones, 0.5, beta, target_blocks)
    check_against_float64(results, starts, inputs, ones, 0.5, beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_split_rows_are_added_in_chunk_order(dtype, generator):
    """Few tiles and many rows: the rows are split, and the chunk sums are added deterministically."""
    rows = 5 * MIN_CHUNK_ROWS + 7
    inputs = [torch.randn(rows, d, generator=generator).to(dtype) for d in (3, 70)]
    ones = [True, False]
    factor_dtype = reference.accumulation_dtype(dtype)
    starts = [symmetric_start(d + b, factor_dtype) for d, b in ((3, True), (70, False))]
    split, again, whole = ([s.clone() for s in starts] for _ in range(3))
    emulated_factor_accumulate(split, inputs, ones, 2.0, 0.5, 1000)
    emulated_factor_accumulate(again, inputs, ones, 2.0, 0.5, 1000)
    emulated_factor_accumulate(whole, inputs, ones, 2.0, 0.5, 1)
    check_against_float64(split, starts, inputs, ones, 2.0, 0.5)
    for a, b, c in zip(split, again, whole, strict=True):
        assert torch.equal(a, b), "split sums must not change from run to run"
        assert not torch.equal(a, c) or dtype == torch.float64, "the split path must have run"


def test_only_the_upper_triangle_is_read_and_nan_is_ignored_at_beta_zero(generator):
    x = torch.randn(30, 70, generator=generator)
    start = symmetric_start(71, torch.float32)
    garbage_below = start.triu() + torch.full_like(start, float("nan")).tril(-1)
    clean = start.clone()
    emulated_factor_accumulate([clean, garbage_below], [x, x], [True, True], 1.0, 0.9, 1)
    assert torch.equal(clean, garbage_below)
    stale = torch.full((71, 71), float("nan"))
    emulated_factor_accumulate([stale], [x], [True], 1.0, 0.0, 1)
    rows = with_ones(x.double(), True)
    assert_matches_float64(stale, rows.T @ rows)


def test_layers_without_tiles_or_rows_between_others(generator):
    """Zero-size and zero-row layers take no blocks (or only decay) and shift no other layer's blocks."""
    inputs = [
        torch.randn(9, 65, generator=generator),
        torch.randn(9, 0, generator=generator),
        torch.randn(0, 4, generator=generator),
        torch.randn(9, 0, generator=generator),
        torch.randn(9, 2, generator=generator),
    ]
    ones = [False, False, True, True, True]
    starts = [symmetric_start(x.shape[1] + b, torch.float32) for x, b in zip(inputs, ones, strict=True)]
    results = [s.clone() for s in starts]
    emulated_factor_accumulate(results, inputs, ones, 1.0, 0.5, 3)
    check_against_float64(results, starts, inputs, ones, 1.0, 0.5)
    assert results[2][-1, -1] == 0.5 * starts[2][-1, -1], "no rows: the ones corner only decays"


def test_target_blocks_must_be_positive():
    with pytest.raises(RuntimeError, match="target_blocks must be at least 1"):
        emulated_factor_accumulate([torch.zeros(2, 2)], [torch.zeros(3, 2)], [False], 1.0, 1.0, 0)


CONV_GEOMETRIES = [
    # kernel, stride, padding, dilation
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 3), (2, 1), (0, 2), (2, 1)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((5, 1), (3, 2), (2, 0), (1, 3)),
]


@settings(deadline=None, max_examples=30)
@given(
    geometry=st.sampled_from(CONV_GEOMETRIES),
    channels=st.sampled_from([1, 3, 8]),
    dtype=st.sampled_from(INPUT_DTYPES),
    channels_last=st.booleans(),
    ones=st.booleans(),
    beta=st.sampled_from([0.0, 0.7]),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_property_conv_patches_read_in_place(geometry, channels, dtype, channels_last, ones, beta, target_blocks):
    x = torch.randn(3, channels, 9, 7).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kernel, stride, padding, dilation = geometry
    size = channels * kernel[0] * kernel[1] + ones
    start = symmetric_start(size, reference.accumulation_dtype(dtype))
    result = start.clone()
    emulated_conv_factor(result, x, geometry, ones, 0.5, beta, target_blocks)
    patches = torch.nn.functional.unfold(x.double(), kernel, dilation=dilation, padding=padding, stride=stride)
    rows = with_ones(patches.transpose(1, 2).reshape(-1, patches.shape[1]), ones)
    exact = (0 if beta == 0 else beta * start.double()) + 0.5 * rows.T @ rows
    rounded = start.clone()
    reference.conv_input_factor_(rounded, x, list(kernel), list(stride), list(padding), list(dilation), ones, 0.5, beta)
    assert_matches_float64(result, exact, rounded)
    assert torch.equal(result, result.T)


def test_conv_many_patches_split_over_the_launch(generator):
    x = torch.randn(16, 3, 16, 16, generator=generator)  # 4,096 patches of 27 features
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    start = symmetric_start(28, torch.float32)
    split, whole = start.clone(), start.clone()
    emulated_conv_factor(split, x, geometry, True, 1.0, 1.0, 1000)
    emulated_conv_factor(whole, x, geometry, True, 1.0, 1.0, 1)
    rounded = start.clone()
    reference.conv_input_factor_(rounded, x, *geometry, True, 1.0, 1.0)
    patches = torch.nn.functional.unfold(x.double(), (3, 3), padding=1)
    rows = with_ones(patches.transpose(1, 2).reshape(-1, 27), True)
    for result in (split, whole):
        assert_matches_float64(result, start.double() + rows.T @ rows, rounded)
    assert not torch.equal(split, whole), "the split path must have run"


@settings(deadline=None, max_examples=30)
@given(
    samples=st.sampled_from([0, 1, 17, 2 * MIN_CHUNK_ROWS + 1]),
    d_in=st.sampled_from(EDGE_SIZES),
    d_out=st.sampled_from(EDGE_SIZES),
    columns=st.sampled_from([None, 1, 3]),
    ones=st.booleans(),
    dtype=st.sampled_from(INPUT_DTYPES),
    kind=st.sampled_from(["contiguous", "transposed", "strided"]),
    target_blocks=st.sampled_from([1, 10_000]),
)
def test_property_diag_ggn_squares_rows_as_staged(samples, d_in, d_out, columns, ones, dtype, kind, target_blocks):
    a = layout(torch.randn(samples, d_in).to(dtype), kind)
    g = torch.randn(samples, d_out).to(dtype) if columns is None else torch.randn(samples, columns, d_out).to(dtype)
    if kind == "transposed":
        g = g.transpose(-1, -2).contiguous().transpose(-1, -2)
    result = emulated_diag_ggn([a], [g], [ones], target_blocks)[0]
    exact = reference.diag_ggn([a.double()], [g.double()], [ones])[0]
    rounded = reference.diag_ggn([a], [g], [ones])[0]
    assert result.dtype == reference.accumulation_dtype(dtype)
    assert_matches_float64(result, exact, rounded)


def test_diag_ggn_layers_of_mixed_dtypes_in_one_call(generator):
    """Layers of several dtypes are grouped into launches; a layer whose gradients differ in dtype is
    computed in its accumulation dtype, not in the inputs' bf16."""
    a = [torch.randn(40, 70, generator=generator), torch.randn(40, 9, generator=generator).bfloat16()]
    g = [torch.randn(40, 2, 66, generator=generator).double(), torch.randn(40, 5, generator=generator)]
    ones = [True, False]
    result = emulated_diag_ggn(a, g, ones, 1)
    for got, x, y, b in zip(result, a, g, ones, strict=True):
        assert got.dtype == torch.float32
        exact = reference.diag_ggn([x.double()], [y.double()], [b])[0]
        assert_matches_float64(got, exact, reference.diag_ggn([x], [y], [b])[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_cuda_diag_ggn_agrees_with_the_emulation(dtype, generator):
    a = [torch.randn(n, d, generator=generator).to(dtype) for n, d in ((4096, 768), (3000, 5))]
    g = [torch.randn(4096, 3, 130, generator=generator).to(dtype), torch.randn(3000, 10, generator=generator).to(dtype)]
    ones = [True, False]
    emulated = emulated_diag_ggn(a, g, ones, 528)
    on_gpu = ops.diag_ggn([x.cuda() for x in a], [y.cuda() for y in g], ones)
    relative = 1e-12 if dtype == torch.float64 else 1e-5
    for got, host, x, y, b in zip(on_gpu, emulated, a, g, ones, strict=True):
        exact = reference.diag_ggn([x.double()], [y.double()], [b])[0]
        assert_matches_float64(got, exact, reference.diag_ggn([x], [y], [b])[0])
        torch.testing.assert_close(got.cpu(), host, rtol=0, atol=relative * host.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
def test_cuda_kernel_agrees_with_the_emulation(dtype, generator):
    inputs = [torch.randn(n, d, generator=generator).to(dtype) for n, d in ((4096, 769), (37, 130), (3000, 5))]
    ones = [True, False, True]
    factor_dtype = reference.accumulation_dtype(dtype)
    starts = [symmetric_start(x.shape[1] + b, factor_dtype) for x, b in zip(inputs, ones, strict=True)]
    emulated = [s.clone() for s in starts]
    emulated_factor_accumulate(emulated, inputs, ones, 1.0, 0.9, 528)
    on_gpu = [s.cuda() for s in starts]
    ops.factor_accumulate_(on_gpu, [x.cuda() for x in inputs], ones, 1.0, 0.9)
    check_against_float64([f.cpu() for f in on_gpu], starts, inputs, ones, 1.0, 0.9)
    relative = 1e-12 if dtype == torch.float64 else 1e-5
    for gpu, host in zip(on_gpu, emulated, strict=True):
        torch.testing.assert_close(gpu.cpu(), host, rtol=0, atol=relative * host.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_conv_factor_of_a_large_batch_in_one_call(generator):
    x = torch.randn(128, 3, 32, 32, generator=generator).cuda()  # 131,072 patches, split over the GPU
    factor = torch.zeros(28, 28, device="cuda")
    ops.conv_input_factor_(factor, x, [3, 3], [1, 1], [1, 1], [1, 1], True)
    patches = torch.nn.functional.unfold(x.double(), (3, 3), padding=1)
    rows = with_ones(patches.transpose(1, 2).reshape(-1, 27), True)
    rounded = torch.zeros(28, 28)
    reference.conv_input_factor_(rounded, x.cpu(), [3, 3], [1, 1], [1, 1], [1, 1], True)
    assert_matches_float64(factor, rows.T @ rows, rounded)
    assert torch.equal(factor, factor.T)
