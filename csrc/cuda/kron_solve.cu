// CUDA kernel of fastlaplace::kron_solve: P^p V = Q_G [(Q_G^T V Q_A) * D^p] Q_A^T for every
// layer and every matrix of its batch as four launches of the fused tile kernel of
// csrc/engines/tile_gram.h (one per product, over all layers at once), the power of D applied as
// the second product is stored: no D, no transposed copies.
#include <torch/library.h>

#include <vector>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "kron_solve.h"

namespace fastlaplace {
namespace {

std::vector<at::Tensor> kron_solve_cuda(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                        at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                        at::TensorList rhs, const at::Tensor& scale,
                                        const at::Tensor& delta, double exponent) {
  check_kron_solve(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta);
  if (eigvecs_a.empty()) return {};
  const c10::cuda::CUDAGuard guard(eigvecs_a[0].device());
  return gram::kron_solve_tiles(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta,
                                exponent, gram::target_blocks(eigvecs_a[0]),
                                gram::DeviceRun{eigvecs_a[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("kron_solve", &fastlaplace::kron_solve_cuda); }
