// Kernel of fastlaplace::kron_precondition_ (CPU; on CUDA it serves the gradients the fused
// kernel does not take): in place, per layer, V <- nu Q_G [(Q_G^T V Q_A) * S] Q_A^T, S a
// damped inverse spectrum, with V = [block_1 | block_2 | ...] the layer's gradient blocks
// side by side (a weight and its bias), and nu = min(1, 1 / sqrt(sum_l k_l <V_l, result_l>))
// when kl_weights k are given (K-FAC's KL clipping). It runs at every training step on small
// matrices, so the ATen calls are few: four GEMMs per layer into one workspace, and on the
// CPU plain loops for the copies in and out, the scaling by S, the dots, and nu (on the
// host); the layers share the host threads.
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

// On the CPU, R <- R * S in one pass that also returns <R_old, R_new> = sum R^2 S:
// one loop instead of a product, a copy and a dot (this op runs at every training step).
double scale_and_dot_cpu(const at::Tensor& rotated, const at::Tensor& spectrum) {
  double dot = 0.0;
  AT_DISPATCH_FLOATING_TYPES(rotated.scalar_type(), "kron_precondition_", [&] {
    scalar_t* r = rotated.mutable_data_ptr<scalar_t>();
    const scalar_t* w = spectrum.const_data_ptr<scalar_t>();
    for (int64_t j = 0, n = rotated.numel(); j < n; ++j) {
      const scalar_t scaled = r[j] * w[j];
      dot += static_cast<double>(r[j]) * scaled;
      r[j] = scaled;
    }
  });
  return dot;
}

}  // namespace

using namespace preconditioning;

PreconditionLayout check_kron_precondition(at::TensorList gradients, at::IntArrayRef blocks,
                                           at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                           at::TensorList inverse_spectra,
                                           const std::optional<at::Tensor>& kl_weights) {
  PreconditionLayout plan = check_layers("kron_precondition_", gradients, blocks, eigvecs_a,
                                         eigvecs_g, "eigvecs_a", "eigvecs_g", kl_weights);
  const int64_t layers = static_cast<int64_t>(eigvecs_a.size());
  TORCH_CHECK(static_cast<int64_t>(inverse_spectra.size()) == layers,
              "kron_precondition_: inverse_spectra needs one entry per layer");
  const at::ScalarType dtype = eigvecs_a[0].scalar_type();
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t d_a = eigvecs_a[i].size(0), d_g = eigvecs_g[i].size(0);
    TORCH_CHECK(inverse_spectra[i].scalar_type() == dtype, "layer ", i,
                ": eigenvectors and inverse spectra must all be ", dtype);
    TORCH_CHECK(inverse_spectra[i].dim() == 2 && inverse_spectra[i].size(0) == d_g &&
                    inverse_spectra[i].size(1) == d_a,
                "inverse_spectra[", i, "] must be (", d_g, ", ", d_a, "), got ",
                inverse_spectra[i].sizes());
  }
  return plan;
}

at::Tensor kron_precondition_aten(at::TensorList gradients, at::IntArrayRef blocks,
                                  at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                  at::TensorList inverse_spectra,
                                  const std::optional<at::Tensor>& kl_weights) {
  const PreconditionLayout plan = check_kron_precondition(gradients, blocks, eigvecs_a,
                                                          eigvecs_g, inverse_spectra, kl_weights);
  const int64_t layers = static_cast<int64_t>(eigvecs_a.size());
  const bool on_host = eigvecs_a[0].is_cpu();
  // Per layer a (3, d_G, d_A) workspace, allocated here, outside the parallel region:
  // V; V Q_A, later the result; R = Q_G^T V Q_A. R * S and Q_G (R * S) take whichever of
  // V and R is free.
  std::vector<at::Tensor> works(layers), updates(layers), lefts(layers), device_dots(layers);
  std::vector<double> host_dots(layers, 0.0);
  for (int64_t i = 0; i < layers; ++i) {
    works[i] = at::empty({3, eigvecs_g[i].size(0), eigvecs_a[i].size(0)}, eigvecs_a[i].options());
  }
  // The layers' GEMMs are small: the layers share the host threads, each GEMM on one.
  const int64_t threads = host_threads(eigvecs_a[0]);
  run_balanced(plan.costs, threads, [&](int64_t i) {
    at::Tensor v = works[i][0], product = works[i][1], rotated = works[i][2];
    for (int64_t b = plan.firsts[i], offset = 0; b < plan.firsts[i] + blocks[i];
         offset += plan.widths[b], ++b) {
      copy_in(v, gradients[b], offset, plan.widths[b]);
    }
    at::mm_out(product, v, eigvecs_a[i]);
    at::mm_out(rotated, eigvecs_g[i].t(), product);
    // <V, result> = <R, R * S> in the eigenbasis (Q_A and Q_G are orthogonal).
    if (on_host && inverse_spectra[i].is_contiguous()) {
      host_dots[i] = scale_and_dot_cpu(rotated, inverse_spectra[i]);
      updates[i] = rotated;
      lefts[i] = v;
      return;
    }
    at::mul_out(v, rotated, inverse_spectra[i]);
    if (kl_weights.has_value()) {
      const at::Tensor dot = at::vdot(rotated.view(-1), v.view(-1));
      if (on_host) {
        host_dots[i] = dot.item<double>();
      } else {
        device_dots[i] = dot;
      }
    }
    updates[i] = v;
    lefts[i] = rotated;
  });
  const Clip clip = kl_clip(kl_weights, on_host, host_dots, device_dots);
  run_balanced(plan.costs, threads, [&](int64_t i) {
    at::Tensor result = works[i][1];
    at::mm_out(lefts[i], eigvecs_g[i], updates[i]);
    at::mm_out(result, lefts[i], eigvecs_a[i].t());
    for (int64_t b = plan.firsts[i], offset = 0; b < plan.firsts[i] + blocks[i];
         offset += plan.widths[b], ++b) {
      copy_out(gradients[b], result, offset, plan.widths[b], clip.host, clip.device);
    }
  });
  return clip_result(clip, eigvecs_a[0]);
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
}
