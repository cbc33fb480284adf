// fastlaplace::_kron_predictive_variance_emulated: the CUDA kron_predictive_variance kernel's
// launches (csrc/cuda/kron_predictive_variance.h) run on the host by the tile emulation
// (tile_host_run.h), for the tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/kron_predictive_variance.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostProductSums;
using emulation::HostRun;

at::Tensor kron_predictive_variance_emulated(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    c10::List<bool> append_ones, bool full_covariance, int64_t target_blocks,
    bool reverse_order) {
  const VarianceShape shape =
      check_kron_predictive_variance(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                     eigvals_g, scale, delta, append_ones);
  check_target_blocks(target_blocks);
  TORCH_CHECK(gram::tiles_take_variance(output_jacobians, eigvecs_a),
              "_kron_predictive_variance_emulated takes eigenvectors of one dtype and an output "
              "Jacobian for every layer or for none (the CUDA kernel's other cases go to the "
              "ATen path)");
  return gram::kron_variance_tiles(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                   eigvals_g, scale, delta, append_ones, full_covariance, shape,
                                   target_blocks, HostRun{reverse_order},
                                   HostProductSums{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_kron_predictive_variance_emulated(Tensor[] inputs, Tensor?[] output_jacobians, "
      "Tensor[] eigvecs_a, Tensor[] eigvals_a, Tensor[] eigvecs_g, Tensor[] eigvals_g, "
      "Tensor scale, Tensor delta, bool[] append_ones, bool full_covariance, "
      "int target_blocks, bool reverse_order=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_kron_predictive_variance_emulated", &fastlaplace::kron_predictive_variance_emulated);
}
