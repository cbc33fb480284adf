// CUDA kernel of fastlaplace::conv_input_factor_: the fused Gram kernel of
// csrc/engines/tile_gram.h reading the patches straight from the (N, C, H, W) input (implicit
// im2col: no unfolded tensor exists), rows split over the GPU when the factor is small.
#include <torch/library.h>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "conv_input_factor.h"

namespace fastlaplace {
namespace {

void conv_input_factor_cuda(const at::Tensor& factor, const at::Tensor& input,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool append_ones,
                            double alpha, double beta) {
  const ConvGeometry g = conv_input_geometry(factor, input, kernel_size, stride, padding,
                                             dilation, append_ones);
  const c10::cuda::CUDAGuard guard(factor.device());
  gram::accumulate_conv_factor(factor, input, g, append_ones, alpha, beta,
                               gram::target_blocks(factor), gram::DeviceRun{factor});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("conv_input_factor_", &fastlaplace::conv_input_factor_cuda);
}
