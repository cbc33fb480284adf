// fastlaplace::_kron_solve_emulated: the CUDA kron_solve kernel's launches (csrc/cuda/kron_solve.h)
// run on the host by the tile emulation (tile_host_run.h), for the tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/kron_solve.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostRun;

std::vector<at::Tensor> kron_solve_emulated(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                            at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                            at::TensorList rhs, const at::Tensor& scale,
                                            const at::Tensor& delta, double exponent,
                                            int64_t target_blocks, bool reverse_order) {
  check_kron_solve(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta);
  check_target_blocks(target_blocks);
  return gram::kron_solve_tiles(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta,
                                exponent, target_blocks, HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_kron_solve_emulated(Tensor[] eigvecs_a, Tensor[] eigvals_a, Tensor[] eigvecs_g, "
      "Tensor[] eigvals_g, Tensor[] rhs, Tensor scale, Tensor delta, float exponent, "
      "int target_blocks, bool reverse_order=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_kron_solve_emulated", &fastlaplace::kron_solve_emulated);
}
