// CUDA kernel of fastlaplace::factor_accumulate_: the fused Gram kernel of
// csrc/engines/tile_gram.h, every layer of the call in one launch per dtype pair, reading bf16 /
// fp16 / fp32 / fp64 inputs where they lie (strided, expanded) and accumulating in the
// factor's dtype, with the ones column implicit.
#include <torch/library.h>

#include "../engines/tile_launch_cuda.cuh"
#include "../ops.h"
#include "factor_accumulate.h"

namespace fastlaplace {
namespace {

void factor_accumulate_cuda(at::TensorList factors, at::TensorList inputs,
                            c10::List<bool> append_ones, double alpha, double beta) {
  check_factor_accumulate(factors, inputs, append_ones);
  if (factors.empty()) return;
  const c10::cuda::CUDAGuard guard(factors[0].device());
  gram::accumulate_input_factors(factors, inputs, append_ones, alpha, beta,
                                 gram::target_blocks(factors[0]), gram::DeviceRun{factors[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("factor_accumulate_", &fastlaplace::factor_accumulate_cuda);
}
