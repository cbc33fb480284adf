// CUDA dispatch of fastlaplace::kron_precondition_ on the fused tile kernel
// (csrc/engines/tile_gram.h) with nu staying on the device: six launches over all layers
// (Q_G^T V per gradient block, then Q_A, the KL dots, the spectrum and Q_G, the result per
// block times nu). Gradients it does not take (another dtype than the matrices', not
// contiguous) use the ATen-composed implementation of csrc/cpu/kron_precondition.cpp
// (cuBLAS calls on the current stream).
#include <torch/library.h>

#include <optional>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "kron_precondition.h"

namespace fastlaplace {
namespace {

at::Tensor kron_precondition_cuda(at::TensorList gradients, at::IntArrayRef blocks,
                                  at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                  at::TensorList inverse_spectra,
                                  const std::optional<at::Tensor>& kl_weights) {
  const PreconditionLayout layout = check_kron_precondition(gradients, blocks, eigvecs_a,
                                                            eigvecs_g, inverse_spectra, kl_weights);
  if (!gram::tiles_take_gradients(gradients, blocks, eigvecs_a, layout)) {
    return kron_precondition_aten(gradients, blocks, eigvecs_a, eigvecs_g, inverse_spectra,
                                  kl_weights);
  }
  const c10::cuda::CUDAGuard guard(eigvecs_a[0].device());
  return gram::kron_precondition_tiles(gradients, blocks, eigvecs_a, eigvecs_g,
                                       inverse_spectra, kl_weights, layout,
                                       gram::target_blocks(eigvecs_a[0]),
                                       gram::DeviceRun{eigvecs_a[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_cuda);
}
