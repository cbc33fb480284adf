"""conv_input_factor_: the Kronecker input factor of a Conv2d over all patches."""

import pytest
import torch
from conftest import DEVICES, INPUT_DTYPES, assert_matches_float64, random_spd, requires_extension
from hypothesis import given
from hypothesis import strategies as st

import fastlaplace.ops as ops
import fastlaplace.reference as reference


def explicit_patches(x, kernel, stride, padding, dilation):
    """(N * positions, C*kh*kw) patches by plain loops over output positions."""
    padded = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, _, height, width = padded.shape
    rows = []
    for image in range(n):
        for top in range(0, height - dilation[0] * (kernel[0] - 1), stride[0]):
            for left in range(0, width - dilation[1] * (kernel[1] - 1), stride[1]):
                window = padded[
                    image,
                    :,
                    top : top + dilation[0] * (kernel[0] - 1) + 1 : dilation[0],
                    left : left + dilation[1] * (kernel[1] - 1) + 1 : dilation[1],
                ]
                rows.append(window.reshape(-1))
    return torch.stack(rows)


def test_patch_order_is_the_order_of_conv_weights(generator):
    conv = torch.nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), dtype=torch.float64)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=generator)
    patches = explicit_patches(x, (3, 2), (2, 1), (1, 0), (1, 2))
    out = conv(x)
    from_patches = patches @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(from_patches, out.permute(0, 2, 3, 1).reshape(-1, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_explicit_patches(device, dtype, bias, generator):
    kernel, stride, padding, dilation = (3, 2), (2, 1), (1, 0), (1, 2)
    x = torch.randn(3, 2, 7, 6, generator=generator).to(dtype)
    factor_dtype = reference.accumulation_dtype(dtype)
    old = random_spd(2 * 3 * 2 + bias, generator=generator).to(factor_dtype)
    u = explicit_patches(x.double(), kernel, stride, padding, dilation)
    if bias:
        u = torch.cat([u, u.new_ones(u.shape[0], 1)], 1)
    exact = 0.5 * old.double() + 2.0 * u.T @ u
    rounded = old.clone()
    reference.conv_input_factor_(rounded, x, kernel, stride, padding, dilation, bias, 2.0, 0.5)
    result = old.to(device)
    ops.conv_input_factor_(result, x.to(device), kernel, stride, padding, dilation, bias, 2.0, 0.5)
    assert_matches_float64(result, exact, rounded)


def test_large_batch_is_unfolded_in_chunks_and_still_exact(generator):
    # 40 images of 16x32x32 with a 3x3 kernel unfold to 40 * 4.7 MB: several chunks.
    x = torch.randn(40, 16, 32, 32, dtype=torch.float64, generator=generator)
    result = torch.zeros(16 * 9 + 1, 16 * 9 + 1, dtype=torch.float64)
    ops.conv_input_factor_(result, x, 3, 1, 1, 1, True)
    expected = torch.zeros_like(result)
    reference.conv_input_factor_(expected, x, [3, 3], [1, 1], [1, 1], [1, 1], True)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-9)


@given(
    channels=st.sampled_from([1, 2, 3]),
    size=st.tuples(st.sampled_from([1, 3, 5, 7]), st.sampled_from([2, 5])),
    kernel=st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 3])),
    stride=st.sampled_from([1, 2, 3]),
    padding=st.sampled_from([0, 1, 2]),
    dilation=st.sampled_from([1, 2]),
    bias=st.booleans(),
    beta=st.sampled_from([0.0, 1.0]),
    channels_last=st.booleans(),
)
def test_property_odd_shapes(channels, size, kernel, stride, padding, dilation, bias, beta, channels_last):
    span = [dilation * (k - 1) + 1 for k in kernel]
    if any(s + 2 * padding < w for s, w in zip(size, span)):
        return
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    before = x.clone()
    features = channels * kernel[0] * kernel[1] + bias
    result = random_spd(features) if beta else torch.full((features, features), float("nan"), dtype=torch.float64)
    expected = result.clone()
    reference.conv_input_factor_(
        expected, x, list(kernel), [stride] * 2, [padding] * 2, [dilation] * 2, bias, 1.0, beta
    )
    ops.conv_input_factor_(result, x, kernel, stride, padding, dilation, bias, 1.0, beta)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)


def test_opcheck():
    requires_extension()
    factor = random_spd(2 * 4 + 1).float()
    x = torch.randn(2, 2, 5, 4)
    torch.library.opcheck(
        torch.ops.fastlaplace.conv_input_factor_.default, (factor, x, [2, 2], [1, 1], [0, 0], [1, 1], True, 1.0, 0.5)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kernel_size": 9}, ValueError, "smaller than the kernel's span"),
        ({"kernel_size": (3, 3, 3)}, ValueError, "kernel_size must be an int or two ints"),
        ({"kernel_size": 3, "stride": 0}, ValueError, "stride and dilation must be >= 1"),
        ({"kernel_size": 3, "padding": -1}, ValueError, "padding >= 0"),
        ({"kernel_size": 2}, ValueError, r"factor must have shape \(9, 9\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    factor = torch.zeros(2 * 9 + 1, 2 * 9 + 1)
    with pytest.raises(error, match=message):
        ops.conv_input_factor_(factor, torch.randn(1, 2, 5, 5), append_ones=True, **kwargs)


def test_input_must_be_images():
    with pytest.raises(ValueError, match="input must have 4 dimensions"):
        ops.conv_input_factor_(torch.zeros(9, 9), torch.randn(2, 5, 5), 3)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((64, 16, 4, 4), (3, 3), (1, 1), (1, 1), (1, 1)),  # the digits CNN's second convolution
        ((64, 1, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),  # and its first
        ((64, 8, 5, 5), (3, 3), (2, 2), (1, 1), (1, 1)),
        ((64, 8, 5, 5), (3, 3), (1, 1), (2, 2), (2, 2)),
        ((64, 6, 4, 5), (3, 3), (1, 2), (1, 1), (1, 1)),
        ((48, 3, 5, 6), (3, 2), (2, 1), (1, 0), (1, 2)),  # fewer channels: unfolded patches are cheaper
        ((3, 2, 32, 32), (3, 3), (2, 1), (1, 1), (1, 1)),  # large images, vertical stride 2: unfolded patches
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_conv_input_factor_of_small_and_large_images_matches_the_reference(
    shape, kernel, stride, padding, dilation, bias, beta
):
    # Many small images take the pixel-Gram path of the CPU kernel, the large ones the patch path
    # (the cells path, stride 1 on large images, has tests of its own below).
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    size = shape[1] * kernel[0] * kernel[1] + bias
    old = torch.randn(size, size, dtype=torch.float64, generator=generator)
    old = old + old.T if beta else torch.full((size, size), float("nan"), dtype=torch.float64)
    expected = old.clone()
    reference.conv_input_factor_(
        expected, x, list(kernel), list(stride), list(padding), list(dilation), bias, 0.3, beta
    )
    result = old.clone()
    with torch.profiler.profile() as profile:
        ops.conv_input_factor_(result, x, kernel, stride, padding, dilation, bias, 0.3, beta)
    unfolded = any(event.name == "aten::im2col" for event in profile.events())
    assert unfolded == (shape[0] < 64 or ops.build_info() == "python")
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-10)
    assert torch.equal(result, result.T)
    single = old.float()
    ops.conv_input_factor_(single, x.float(), kernel, stride, padding, dilation, bias, 0.3, beta)
    torch.testing.assert_close(single.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_channels_last_small_images_give_the_same_factor():
    x = torch.randn(64, 4, 4, 4, dtype=torch.float64)
    result, expected = torch.zeros(37, 37, dtype=torch.float64), torch.zeros(37, 37, dtype=torch.float64)
    ops.conv_input_factor_(result, x.to(memory_format=torch.channels_last), 3, 1, 1, 1, True)
    reference.conv_input_factor_(expected, x, [3, 3], [1, 1], [1, 1], [1, 1], True)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-10)


def cells_path_taken(factor, x, kernel, stride, padding, dilation, bias, alpha, beta) -> bool:
    """Run the operator and say whether it took the cells path (pixel pairs per shift, no im2col)."""
    with torch.profiler.profile() as profile:
        ops.conv_input_factor_(factor, x, kernel, stride, padding, dilation, bias, alpha, beta)
    names = {event.name for event in profile.events()}
    return "fastlaplace::conv_input_factor_cells" in names and "aten::im2col" not in names


@pytest.mark.parametrize(
    "shape, kernel, padding, dilation",
    [
        ((3, 4, 16, 16), (3, 3), (1, 1), (1, 1)),  # a ResNet's 3x3 "same" convolution
        ((4, 16, 4, 4), (3, 3), (1, 1), (1, 1)),  # its last stage: every row and column a border one
        ((2, 3, 15, 11), (3, 3), (0, 0), (1, 1)),  # no padding, odd sizes
        ((2, 3, 17, 9), (3, 2), (2, 0), (2, 1)),  # padding wider than needed, dilation
        ((2, 4, 25, 7), (5, 3), (3, 1), (2, 2)),  # tall kernel: border rows on both sides
        ((2, 6, 12, 5), (2, 1), (1, 0), (3, 1)),  # dilated rows beyond the image at both ends
        ((2, 6, 9, 1), (3, 1), (1, 0), (1, 1)),  # one column
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_cells_path_matches_the_reference(shape, kernel, padding, dilation, bias, beta):
    generator = torch.Generator().manual_seed(sum(shape) + bias)
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous: columns first
    size = shape[1] * kernel[0] * kernel[1] + bias
    old = torch.randn(size, size, dtype=torch.float64, generator=generator)
    # Only the upper triangle is read: the lower one holds garbage (NaN everywhere for beta = 0).
    old = old.triu() + 7.0 * old.tril(-1) if beta else torch.full((size, size), float("nan"), dtype=torch.float64)
    expected = old.triu() + old.triu(1).T if beta else old.clone()
    assert_cells_path_matches(expected, old, x, kernel, padding, dilation, bias, 0.3, beta, atol=1e-10)


def assert_cells_path_matches(expected, old, x, kernel, padding, dilation, bias, alpha, beta, atol) -> None:
    """The operator on ``old`` takes the cells path and gives ``expected`` as the reference updates it, symmetric."""
    reference.conv_input_factor_(expected, x, list(kernel), [1, 1], list(padding), list(dilation), bias, alpha, beta)
    result = old.clone()
    taken = cells_path_taken(result, x, kernel, 1, padding, dilation, bias, alpha, beta)
    assert taken == (ops.build_info() != "python")
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=atol)
    assert torch.equal(result, result.T)


def test_cells_path_in_float32_and_in_several_chunks():
    # 200 images of 8x32x32 give 13 MB in float64: two chunks of at most 8 MB.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(200, 8, 32, 32, dtype=torch.float64, generator=generator)
    expected = torch.zeros(8 * 9 + 1, 8 * 9 + 1, dtype=torch.float64)
    reference.conv_input_factor_(expected, x, [3, 3], [1, 1], [1, 1], [1, 1], True)
    result = torch.zeros_like(expected)
    assert cells_path_taken(result, x, 3, 1, 1, 1, True, 1.0, 1.0) == (ops.build_info() != "python")
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-9)
    single = torch.zeros_like(expected).float()
    ops.conv_input_factor_(single, x.float(), 3, 1, 1, 1, True)
    torch.testing.assert_close(single.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_strided_convolutions_stay_off_the_cells_path():
    factor = torch.zeros(16 * 9, 16 * 9)
    assert not cells_path_taken(factor, torch.randn(4, 16, 16, 16), 3, 2, 1, 1, False, 1.0, 1.0)


@given(
    channels=st.integers(1, 3),
    size=st.tuples(st.integers(9, 14), st.integers(9, 14)),
    kernel=st.sampled_from([(2, 2), (3, 3), (3, 1), (1, 3), (2, 3), (5, 3)]),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    images=st.integers(1, 3),
    bias=st.booleans(),
    beta=st.sampled_from([0.0, 0.7]),
)
def test_property_cells_path_over_odd_geometries(channels, size, kernel, padding, dilation, images, bias, beta):
    # Images of 81 to 196 pixels and a few channels: the cells path is the cheapest for every
    # such stride-1 geometry, whatever windows its padding and dilation cut.
    x = torch.randn(images, channels, *size, dtype=torch.float64)
    features = channels * kernel[0] * kernel[1] + bias
    old = random_spd(features) if beta else torch.full((features, features), float("nan"), dtype=torch.float64)
    assert_cells_path_matches(old.clone(), old, x, kernel, padding, dilation, bias, 0.5, beta, atol=1e-12)
