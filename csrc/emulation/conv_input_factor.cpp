// fastlaplace::_conv_input_factor_emulated_: the CUDA conv_input_factor kernel's launches
// (csrc/cuda/conv_input_factor.h) run on the host by the tile emulation (tile_host_run.h), for the
// tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/conv_input_factor.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostRun;

void conv_input_factor_emulated(const at::Tensor& factor, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool append_ones, double alpha, double beta,
                                int64_t target_blocks, bool reverse_order) {
  const ConvGeometry g = conv_input_geometry(factor, input, kernel_size, stride, padding,
                                             dilation, append_ones);
  check_target_blocks(target_blocks);
  gram::accumulate_conv_factor(factor, input, g, append_ones, alpha, beta, target_blocks,
                               HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_conv_input_factor_emulated_(Tensor(a!) factor, Tensor input, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool append_ones, float alpha, "
      "float beta, int target_blocks, bool reverse_order=False) -> ()");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_conv_input_factor_emulated_", &fastlaplace::conv_input_factor_emulated);
}
