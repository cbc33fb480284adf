// fastlaplace::_kron_logdet_emulated: the CUDA kron_logdet's blocks
// (csrc/engines/kron_logdet_blocks.h) run on the host, every block in turn and each phase for
// every thread id in turn, so that the tests check the kernel's arithmetic and block
// layout where there is no GPU. Not a fast path.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../engines/kron_logdet_blocks.h"

namespace fastlaplace {
namespace {

struct HostRun {
  bool reversed;  // blocks and threads from the last (see HostThreads)
  template <typename scalar_t>
  void operator()(const std::vector<logdet::Layer<scalar_t>>& layers, int64_t blocks,
                  double* partial, scalar_t* out) const {
    const HostThreads threads{logdet::kThreads, reversed};
    std::vector<double> slots(logdet::kThreads);
    const int64_t count = static_cast<int64_t>(layers.size());
    host_blocks(blocks, reversed, [&](int64_t block) {
      logdet::block_log_sum(threads, slots.data(), layers.data(), count, block, partial);
    });
    for (int64_t l = 0; l < count; ++l) logdet::layer_log_sum(layers.data(), l, partial, out);
  }
};

at::Tensor kron_logdet_emulated(at::TensorList eigvals_a, at::TensorList eigvals_g,
                                const at::Tensor& scale, const at::Tensor& delta,
                                bool reverse_order) {
  TORCH_CHECK(!eigvals_a.empty(), "kron_logdet needs at least one layer");
  TORCH_CHECK(eigvals_a[0].is_cpu(), "_kron_logdet_emulated runs on the CPU");
  return logdet::kron_logdet_blocks(eigvals_a, eigvals_g, scale, delta, HostRun{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_kron_logdet_emulated(Tensor[] eigvals_a, Tensor[] eigvals_g, Tensor scale, "
      "Tensor delta, bool reverse_order=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_kron_logdet_emulated", &fastlaplace::kron_logdet_emulated);
}
