// fastlaplace::_diag_ggn_emulated: the CUDA diag_ggn kernel's launches (csrc/cuda/diag_ggn.h) run
// on the host by the tile emulation (tile_host_run.h), for the tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/diag_ggn.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostRun;

std::vector<at::Tensor> diag_ggn_emulated(at::TensorList inputs, at::TensorList output_grads,
                                          c10::List<bool> append_ones, int64_t target_blocks,
                                          bool reverse_order) {
  check_diag_ggn(inputs, output_grads, append_ones);
  check_target_blocks(target_blocks);
  return gram::diag_ggn_tiles(inputs, output_grads, append_ones, target_blocks,
                              HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_diag_ggn_emulated(Tensor[] inputs, Tensor[] output_grads, bool[] append_ones, "
      "int target_blocks, bool reverse_order=False) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_diag_ggn_emulated", &fastlaplace::diag_ggn_emulated);
}
