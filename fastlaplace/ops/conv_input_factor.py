"""``torch.ops.fastlaplace.conv_input_factor_``: its typed wrapper, and its fake kernel (torch.compile)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastlaplace import reference
from fastlaplace.ops._checks import check_accumulator, check_device, check_square, check_tensor
from fastlaplace.ops._extension import EXTENSION


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or two ints, got {value!r}")
    return pair


def conv_input_factor_(
    factor: Tensor,
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    append_ones: bool = False,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> None:
    """In place: ``F <- beta F + alpha Σ_{n,p} u_{n,p} u_{n,p}ᵀ`` over Conv2d patches.

    The patches (implicit im2col) are unfolded a few images at a time, never for the
    whole batch. As in :func:`factor_accumulate_`, only the upper triangle of the
    (symmetric) factor is read.

    Args:
        factor: contiguous float32/float64 ``(C*kh*kw + append_ones,)*2``.
        input: ``(N, C, H, W)`` images.
        kernel_size: kernel height and width (an int for both), as for ``torch.nn.Conv2d``.
        stride: as for ``torch.nn.Conv2d``.
        padding: zero padding, as for ``torch.nn.Conv2d`` (groups=1 only).
        dilation: as for ``torch.nn.Conv2d``.
        append_ones: whether the convolution has a bias.
        alpha: scale of the new patch Gram matrix.
        beta: decay of the old factor; 0 ignores its old content.
    """
    check_tensor(factor, "factor", 2)
    check_tensor(input, "input", 4)
    check_accumulator(factor, "factor")
    if not factor.is_contiguous():
        raise ValueError("factor must be contiguous (it is written in place)")
    check_device([factor, input], lambda: ["factor", "input"])
    kernel, strides, pads, dils = (
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(kernel + strides + dils) < 1 or min(pads) < 0:
        raise ValueError(
            f"kernel_size, stride and dilation must be >= 1 and padding >= 0, got "
            f"kernel_size={kernel}, stride={strides}, padding={pads}, dilation={dils}"
        )
    for axis in range(2):
        span = dils[axis] * (kernel[axis] - 1) + 1
        if input.shape[2 + axis] + 2 * pads[axis] < span:
            raise ValueError(
                f"input of spatial size {tuple(input.shape[2:])} is smaller than the "
                f"kernel's span {span} along dimension {2 + axis} (padding {pads[axis]})"
            )
    check_square(factor, input.shape[1] * kernel[0] * kernel[1] + bool(append_ones), "factor")
    impl = torch.ops.fastlaplace.conv_input_factor_ if EXTENSION else reference.conv_input_factor_
    impl(factor, input, kernel, strides, pads, dils, bool(append_ones), float(alpha), float(beta))


if EXTENSION:

    @torch.library.register_fake("fastlaplace::conv_input_factor_")
    def _conv_input_factor_fake(
        factor, input, kernel_size, stride, padding, dilation, append_ones, alpha=1.0, beta=1.0
    ):
        return None
