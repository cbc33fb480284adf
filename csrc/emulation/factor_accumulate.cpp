// fastlaplace::_factor_accumulate_emulated_: the CUDA factor_accumulate kernel's launches
// (csrc/cuda/factor_accumulate.h) run on the host by the tile emulation (tile_host_run.h), for the
// tests. Not a fast path.
#include <torch/library.h>

#include "../cuda/factor_accumulate.h"
#include "../ops.h"
#include "tile_host_run.h"

namespace fastlaplace {
namespace {

using emulation::check_target_blocks;
using emulation::HostRun;

void factor_accumulate_emulated(at::TensorList factors, at::TensorList inputs,
                                c10::List<bool> append_ones, double alpha, double beta,
                                int64_t target_blocks, bool reverse_order) {
  check_factor_accumulate(factors, inputs, append_ones);
  check_target_blocks(target_blocks);
  gram::accumulate_input_factors(factors, inputs, append_ones, alpha, beta, target_blocks,
                                 HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_factor_accumulate_emulated_(Tensor(a!)[] factors, Tensor[] inputs, bool[] append_ones, "
      "float alpha, float beta, int target_blocks, bool reverse_order=False) -> ()");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_factor_accumulate_emulated_", &fastlaplace::factor_accumulate_emulated);
}
