// CUDA dispatch of fastlaplace::kron_precondition_ and kron_inverse_precondition_, both on
// the fused tile kernel of csrc/gram_tiles.h with nu staying on the device:
// kron_precondition_ in six launches over all layers (Q_G^T V per gradient block, then
// Q_A, the KL dots, the spectrum and Q_G, the result per block times nu) instead of ~10 per
// layer; kron_inverse_precondition_ in two (G^-1 V per block, then A^-1 per block), with
// KL clipping one more for the dots and two foreach calls for nu U. Gradients they do not
// take (another dtype than the matrices', not contiguous) use the ATen-composed
// implementations of csrc/cpu/kron_precondition.cpp (cuBLAS calls on the current stream).
#include <torch/library.h>

#include <optional>

#include "../ops.h"
#include "gram_tiles.cuh"

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
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_cuda);
  m.impl("kron_inverse_precondition_", &fastlaplace::kron_inverse_precondition_cuda);
}
