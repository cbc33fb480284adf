// CUDA dispatch of fastlaplace::kron_inverse_precondition_ on the fused tile kernel
// (csrc/engines/tile_gram.h): two launches (G^-1 V per block, then A^-1 per block), with KL
// clipping one more for the dots and two foreach calls for nu U. Gradients it does not take
// (another dtype than the matrices', not contiguous) use the ATen-composed implementation of
// csrc/cpu/kron_inverse_precondition.cpp (cuBLAS calls on the current stream).
#include <torch/library.h>

#include <optional>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "kron_inverse_precondition.h"

namespace fastlaplace {
namespace {

at::Tensor kron_inverse_precondition_cuda(at::TensorList gradients, at::IntArrayRef blocks,
                                          at::TensorList inverses_a, at::TensorList inverses_g,
                                          const std::optional<at::Tensor>& kl_weights) {
  const PreconditionLayout layout =
      check_kron_inverse_precondition(gradients, blocks, inverses_a, inverses_g, kl_weights);
  if (!gram::tiles_take_gradients(gradients, blocks, inverses_a, layout)) {
    return kron_inverse_precondition_aten(gradients, blocks, inverses_a, inverses_g, kl_weights);
  }
  const c10::cuda::CUDAGuard guard(inverses_a[0].device());
  return gram::kron_inverse_precondition_tiles(gradients, blocks, inverses_a, inverses_g,
                                               kl_weights, layout,
                                               gram::target_blocks(inverses_a[0]),
                                               gram::DeviceRun{inverses_a[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_inverse_precondition_", &fastlaplace::kron_inverse_precondition_cuda);
}
