// fastlaplace::_kron_inverse_precondition_emulated_: the CUDA kron_inverse_precondition kernel's
// launches (csrc/cuda/kron_inverse_precondition.h) run on the host by the tile emulation
// (tile_host_run.h), for the tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/kron_inverse_precondition.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostRun;

at::Tensor kron_inverse_precondition_emulated(at::TensorList gradients, at::IntArrayRef blocks,
                                              at::TensorList inverses_a,
                                              at::TensorList inverses_g,
                                              const std::optional<at::Tensor>& kl_weights,
                                              int64_t target_blocks, bool reverse_order) {
  const PreconditionLayout layout =
      check_kron_inverse_precondition(gradients, blocks, inverses_a, inverses_g, kl_weights);
  check_target_blocks(target_blocks);
  TORCH_CHECK(gram::tiles_take_gradients(gradients, blocks, inverses_a, layout),
              "_kron_inverse_precondition_emulated_ takes contiguous gradients in the inverses' "
              "dtype (the CUDA kernel's other cases go to the ATen path)");
  return gram::kron_inverse_precondition_tiles(gradients, blocks, inverses_a, inverses_g,
                                               kl_weights, layout, target_blocks,
                                               HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_kron_inverse_precondition_emulated_(Tensor(a!)[] gradients, int[] blocks, "
      "Tensor[] inverses_a, Tensor[] inverses_g, Tensor? kl_weights, int target_blocks, "
      "bool reverse_order=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_kron_inverse_precondition_emulated_", &fastlaplace::kron_inverse_precondition_emulated);
}
