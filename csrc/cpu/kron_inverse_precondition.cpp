// Kernel of fastlaplace::kron_inverse_precondition_ (CPU; on CUDA it serves the gradients the
// fused kernel does not take): in place, per layer, V <- nu G^-1 V A^-1, G^-1 and A^-1 damped
// inverses of the factors, with V = [block_1 | block_2 | ...] the layer's gradient blocks
// side by side, and nu K-FAC's KL clip as in kron_precondition_. Two GEMMs per layer into one
// workspace, plain loops for the copies and the dots on the CPU; the layers share the host
// threads.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/vdot.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../engines/balance.h"
#include "../engines/preconditioning.h"
#include "../ops.h"

namespace fastlaplace {
namespace {

// <a, b> in double, on the CPU.
double dot_cpu(const at::Tensor& a, const at::Tensor& b) {
  double dot = 0.0;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kron_inverse_precondition_", [&] {
    const scalar_t* x = a.const_data_ptr<scalar_t>();
    const scalar_t* y = b.const_data_ptr<scalar_t>();
    for (int64_t j = 0, n = a.numel(); j < n; ++j) dot += static_cast<double>(x[j]) * y[j];
  });
  return dot;
}

}  // namespace

using namespace preconditioning;

PreconditionLayout check_kron_inverse_precondition(at::TensorList gradients,
                                                   at::IntArrayRef blocks,
                                                   at::TensorList inverses_a,
                                                   at::TensorList inverses_g,
                                                   const std::optional<at::Tensor>& kl_weights) {
  return check_layers("kron_inverse_precondition_", gradients, blocks, inverses_a, inverses_g,
                      "inverses_a", "inverses_g", kl_weights);
}

at::Tensor kron_inverse_precondition_aten(at::TensorList gradients, at::IntArrayRef blocks,
                                          at::TensorList inverses_a, at::TensorList inverses_g,
                                          const std::optional<at::Tensor>& kl_weights) {
  const PreconditionLayout plan =
      check_kron_inverse_precondition(gradients, blocks, inverses_a, inverses_g, kl_weights);
  const int64_t layers = static_cast<int64_t>(inverses_a.size());
  const bool on_host = inverses_a[0].is_cpu();
  // Per layer a (3, d_G, d_A) workspace, allocated outside the parallel region: V, G^-1 V,
  // and the result G^-1 V A^-1; V stays until the dot <V, result> is taken.
  std::vector<at::Tensor> works(layers), device_dots(layers);
  std::vector<double> host_dots(layers, 0.0);
  for (int64_t i = 0; i < layers; ++i) {
    works[i] =
        at::empty({3, inverses_g[i].size(0), inverses_a[i].size(0)}, inverses_a[i].options());
  }
  run_balanced(plan.costs, host_threads(inverses_a[0]), [&](int64_t i) {
    at::Tensor v = works[i][0], left = works[i][1], result = works[i][2];
    for (int64_t b = plan.firsts[i], offset = 0; b < plan.firsts[i] + blocks[i];
         offset += plan.widths[b], ++b) {
      copy_in(v, gradients[b], offset, plan.widths[b]);
    }
    at::mm_out(left, inverses_g[i], v);
    at::mm_out(result, left, inverses_a[i]);
    if (!kl_weights.has_value()) return;
    if (on_host) {
      host_dots[i] = dot_cpu(v, result);
    } else {
      device_dots[i] = at::vdot(v.view(-1), result.view(-1));
    }
  });
  const Clip clip = kl_clip(kl_weights, on_host, host_dots, device_dots);
  for (int64_t i = 0; i < layers; ++i) {
    for (int64_t b = plan.firsts[i], offset = 0; b < plan.firsts[i] + blocks[i];
         offset += plan.widths[b], ++b) {
      copy_out(gradients[b], works[i][2], offset, plan.widths[b], clip.host, clip.device);
    }
  }
  return clip_result(clip, inverses_a[0]);
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_inverse_precondition_", &fastlaplace::kron_inverse_precondition_aten);
}
