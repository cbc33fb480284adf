// CPU kernel of fastlaplace::conv_input_factor_: the Kronecker input factor of a
// Conv2d, F <- beta F + alpha sum over images and output positions of u u^T, u the
// patch (C*kh*kw, in weight.flatten(1) order) with an optional 1 for the bias.
#include <ATen/core/Tensor.h>
#include <ATen/ops/im2col.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "gram.h"

namespace fastlaplace {
namespace {

// Unfolded patches of this many bytes at most exist at a time: the full unfolded
// batch is kh*kw times the input.
constexpr int64_t kPatchBytes = 8 << 20;

}  // namespace

void conv_input_factor_aten(const at::Tensor& factor, const at::Tensor& input,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation,
                           bool append_ones, double alpha, double beta) {
  check_factor_dtype(factor, "factor");
  check_floating(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(factor.is_contiguous(), "factor must be contiguous");
  int64_t positions = 1;
  for (int64_t axis = 0; axis < 2; ++axis) {
    const int64_t span = dilation[axis] * (kernel_size[axis] - 1) + 1;
    const int64_t padded = input.size(2 + axis) + 2 * padding[axis];
    TORCH_CHECK(padded >= span, "input is smaller than the kernel's span along dimension ",
                2 + axis);
    positions *= (padded - span) / stride[axis] + 1;
  }
  const int64_t features = input.size(1) * kernel_size[0] * kernel_size[1];
  const int64_t size = features + (append_ones ? 1 : 0);
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == size && factor.size(1) == size,
              "factor must be (", size, ", ", size, "), got ", factor.sizes());

  const int64_t images = input.size(0);
  const int64_t bytes_per_image = positions * features * factor.element_size();
  const int64_t chunk = std::max<int64_t>(1, kPatchBytes / std::max<int64_t>(1, bytes_per_image));
  for (int64_t start = 0; start == 0 || start < images; start += chunk) {
    const int64_t count = std::min(chunk, images - start);
    const at::Tensor patches = at::im2col(
        input.narrow(0, start, count).to(factor.scalar_type()).contiguous(), kernel_size,
        dilation, padding, stride);  // (count, features, positions)
    const at::Tensor rows = patches.transpose(1, 2).reshape({count * positions, features});
    accumulate_grams({factor}, {rows}, {append_ones}, alpha, start == 0 ? beta : 1.0);
  }
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("conv_input_factor_", &fastlaplace::conv_input_factor_aten);
}
