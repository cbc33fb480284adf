// CUDA dispatch of fastlaplace::kron_predictive_variance: four launches of the fused tile
// kernel of csrc/engines/tile_gram.h over all layers (rotated inputs, their weights, rotated
// Jacobians, and per sample the covariance) or, for variances and covariances of few
// outputs, three and one of csrc/engines/product_sums.h's sums, instead of ~10 launches per
// layer. Calls that mix layers with and without an output Jacobian, or eigenvector
// dtypes, use the ATen-composed implementation of csrc/cpu/kron_predictive_variance.cpp
// (cuBLAS calls on the current stream).
#include <torch/library.h>

#include <optional>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "kron_predictive_variance.h"

namespace fastlaplace {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(variance::kThreads)
    product_sums_kernel(variance::ProductSums<scalar_t> sums) {
  __shared__ scalar_t lane_sums[variance::kThreads];
  sums.block_sums(DeviceThreads{}, lane_sums, blockIdx.x);
}

struct DeviceProductSums {
  template <typename scalar_t>
  void operator()(const variance::ProductSums<scalar_t>& sums) const {
    if (sums.entries() == 0) return;
    product_sums_kernel<scalar_t>
        <<<static_cast<unsigned>(sums.blocks()), variance::kThreads, 0,
           c10::cuda::getCurrentCUDAStream()>>>(sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor kron_predictive_variance_cuda(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    c10::List<bool> append_ones, bool full_covariance) {
  const VarianceShape shape =
      check_kron_predictive_variance(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                     eigvals_g, scale, delta, append_ones);
  if (!gram::tiles_take_variance(output_jacobians, eigvecs_a)) {
    return kron_predictive_variance_aten(inputs, output_jacobians, eigvecs_a, eigvals_a,
                                         eigvecs_g, eigvals_g, scale, delta, append_ones,
                                         full_covariance);
  }
  const at::Tensor& like = eigvecs_a[0];
  const c10::cuda::CUDAGuard guard(like.device());
  return gram::kron_variance_tiles(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                   eigvals_g, scale, delta, append_ones, full_covariance, shape,
                                   gram::target_blocks(like), gram::DeviceRun{like},
                                   DeviceProductSums{});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_predictive_variance", &fastlaplace::kron_predictive_variance_cuda);
}
