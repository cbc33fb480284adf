// CUDA kernel of fastlaplace::diag_ggn: the fused Gram kernel of csrc/engines/tile_gram.h on
// squared operands, (sum_k g_k o g_k)^T ([a, 1] o [a, 1]) for every layer of the call in
// one launch per input dtype, squaring the rows as they are staged (no squared copies).
#include <torch/library.h>

#include <vector>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "diag_ggn.h"

namespace fastlaplace {
namespace {

std::vector<at::Tensor> diag_ggn_cuda(at::TensorList inputs, at::TensorList output_grads,
                                      c10::List<bool> append_ones) {
  check_diag_ggn(inputs, output_grads, append_ones);
  if (inputs.empty()) return {};
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  return gram::diag_ggn_tiles(inputs, output_grads, append_ones,
                              gram::target_blocks(inputs[0]), gram::DeviceRun{inputs[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("diag_ggn", &fastlaplace::diag_ggn_cuda); }
