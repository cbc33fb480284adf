// Kernels of fastlaplace::kron_precondition_ and kron_inverse_precondition_ (CPU; on CUDA
// they serve kron_inverse_precondition_ and the gradients the fused kernel does not take):
// in place, per layer,
//   eigen:    V <- nu Q_G [(Q_G^T V Q_A) * S] Q_A^T, S a damped inverse spectrum;
//   inverse:  V <- nu G^-1 V A^-1, G^-1 and A^-1 damped inverses of the factors;
// with V = [block_1 | block_2 | ...] the layer's gradient blocks side by side (a weight and
// its bias), and nu = min(1, 1 / sqrt(sum_l k_l <V_l, result_l>)) when kl_weights k are
// given (K-FAC's KL clipping). They run at every training step on small matrices, so the
// ATen calls are few: four (eigen) or two (inverse) GEMMs per layer into one workspace,
// and on the CPU plain loops for the copies in and out, the scaling by S, the dots, and nu
// (on the host); the layers share the host threads.
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

#include "../ops.h"
#include "balance.h"

namespace fastlaplace {
namespace {

// Block rows (d_G, width) of a gradient block of d_G * width entries, as a matrix.
int64_t block_width(const at::Tensor& block, int64_t rows, int64_t index) {
  check_floating(block, "gradients", index);
  TORCH_CHECK(block.dim() >= 1 && block.size(0) == rows, "gradients[", index,
              "] must have ", rows, " rows (the layer's d_G), got shape ", block.sizes());
  return block.numel() / rows;
}

// Whether the plain loops serve this block: contiguous (d_G, width) rows in the work's
// dtype, on the CPU. Other blocks (transposed, bf16, on a GPU) take ATen copies.
bool plain_block(const at::Tensor& block, const at::Tensor& work) {
  return block.is_cpu() && block.is_contiguous() && block.scalar_type() == work.scalar_type();
}

// work[:, offset : offset + width] <- the block as (d_G, width) rows.
void copy_in(const at::Tensor& work, const at::Tensor& block, int64_t offset, int64_t width) {
  const int64_t rows = work.size(0), d_a = work.size(1);
  if (!plain_block(block, work)) {
    work.narrow(1, offset, width).copy_(block.reshape({rows, width}));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(work.scalar_type(), "kron_precondition_", [&] {
    const scalar_t* from = block.const_data_ptr<scalar_t>();
    scalar_t* to = work.mutable_data_ptr<scalar_t>() + offset;
    for (int64_t r = 0; r < rows; ++r) std::copy_n(from + r * width, width, to + r * d_a);
  });
}

// The block <- nu * result[:, offset : offset + width]: nu is host_nu, or the 0-d device
// tensor device_nu where that is defined.
void copy_out(const at::Tensor& block, const at::Tensor& result, int64_t offset, int64_t width,
              double host_nu, const at::Tensor& device_nu) {
  const int64_t rows = result.size(0), d_a = result.size(1);
  if (!plain_block(block, result)) {
    at::Tensor part = result.narrow(1, offset, width);
    if (device_nu.defined()) {
      part = part.mul(device_nu);
    } else if (host_nu != 1.0) {
      part = part.mul(host_nu);
    }
    block.copy_(part.reshape(block.sizes()));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(result.scalar_type(), "kron_precondition_", [&] {
    const scalar_t* from = result.const_data_ptr<scalar_t>() + offset;
    scalar_t* to = block.mutable_data_ptr<scalar_t>();
    const auto nu = static_cast<scalar_t>(host_nu);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) to[r * width + c] = nu * from[r * d_a + c];
    }
  });
}

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

// Checks the arguments both ops share: per layer a square (d_A, d_A) matrix of mats_a, a
// square (d_G, d_G) one of mats_g, both float32 or float64 of one dtype, and its blocks of
// d_G rows and d_A columns in all.
PreconditionLayout check_layers(const char* op, at::TensorList gradients,
                                at::IntArrayRef blocks, at::TensorList mats_a,
                                at::TensorList mats_g, const char* name_a, const char* name_g,
                                const std::optional<at::Tensor>& kl_weights) {
  const int64_t layers = static_cast<int64_t>(mats_a.size());
  TORCH_CHECK(layers > 0, op, " needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(blocks.size()) == layers &&
                  static_cast<int64_t>(mats_g.size()) == layers,
              op, ": blocks, ", name_a, " and ", name_g, " need one entry per layer");
  int64_t block_count = 0;
  for (int64_t b : blocks) {
    TORCH_CHECK(b >= 1, op, ": every layer needs at least one gradient block");
    block_count += b;
  }
  TORCH_CHECK(static_cast<int64_t>(gradients.size()) == block_count, op, ": ", block_count,
              " gradient blocks announced by blocks, got ", gradients.size());
  if (kl_weights.has_value()) {
    TORCH_CHECK(kl_weights->dim() == 1 && kl_weights->size(0) == layers,
                "kl_weights must be (", layers, ",), one entry per layer, got ",
                kl_weights->sizes());
    check_same_device(*kl_weights, mats_a[0], "kl_weights");
  }
  const at::ScalarType dtype = mats_a[0].scalar_type();
  PreconditionLayout plan{std::vector<int64_t>(gradients.size()), std::vector<int64_t>(layers),
                          std::vector<double>(layers)};
  for (int64_t i = 0, first = 0; i < layers; first += blocks[i], ++i) {
    const at::Tensor& a = mats_a[i];
    const at::Tensor& g = mats_g[i];
    check_factor_dtype(a, name_a, i);
    TORCH_CHECK(a.dim() == 2 && a.size(0) == a.size(1) && g.dim() == 2 && g.size(0) == g.size(1),
                name_a, "[", i, "] and ", name_g, "[", i, "] must be square, got ", a.sizes(),
                " and ", g.sizes());
    TORCH_CHECK(a.scalar_type() == dtype && g.scalar_type() == dtype, "layer ", i, ": ",
                name_a, " and ", name_g, " must all be ", dtype);
    const int64_t d_a = a.size(0), d_g = g.size(0);
    int64_t columns = 0;
    for (int64_t b = first; b < first + blocks[i]; ++b) {
      plan.widths[b] = block_width(gradients[b], d_g, b);
      columns += plan.widths[b];
    }
    TORCH_CHECK(columns == d_a, "layer ", i, ": its gradient blocks have ", columns,
                " columns, its ", name_a, " ", d_a);
    plan.firsts[i] = first;
    plan.costs[i] = double(d_g) * d_a * (d_a + d_g);
  }
  return plan;
}

// nu = min(1, 1 / sqrt(sum_l k_l dot_l)), 1 without kl_weights; 1 / sqrt(0) = inf (and
// rounding below 0) give nu = 1. A CPU caller waits for the result anyway: there nu is
// computed on the host, in double, from host_dots; a GPU's stays on the device (from
// device_dots, no synchronisation).
struct Clip {
  double host = 1.0;
  at::Tensor device;
};

Clip kl_clip(const std::optional<at::Tensor>& kl_weights, bool on_host,
             const std::vector<double>& host_dots, const std::vector<at::Tensor>& device_dots) {
  Clip clip;
  if (!kl_weights.has_value()) return clip;
  if (on_host) {
    const at::Tensor weights = kl_weights->to(at::kDouble).contiguous();
    const double* k = weights.const_data_ptr<double>();
    double ratio = 0.0;
    for (size_t i = 0; i < host_dots.size(); ++i) ratio += k[i] * host_dots[i];
    clip.host = ratio > 1.0 ? 1.0 / std::sqrt(ratio) : 1.0;
  } else {
    const at::Tensor dots = at::stack(device_dots);
    clip.device = device_kl_clip(at::vdot(dots, kl_weights->to(dots.scalar_type())));
  }
  return clip;
}

// The op's result: nu as a 0-d tensor in the matrices' dtype.
at::Tensor clip_result(const Clip& clip, const at::Tensor& like) {
  if (clip.device.defined()) return clip.device;
  return like.is_cpu() ? at::scalar_tensor(clip.host, like.options())
                       : at::ones({}, like.options());
}

}  // namespace

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

PreconditionLayout check_kron_inverse_precondition(at::TensorList gradients,
                                                   at::IntArrayRef blocks,
                                                   at::TensorList inverses_a,
                                                   at::TensorList inverses_g,
                                                   const std::optional<at::Tensor>& kl_weights) {
  return check_layers("kron_inverse_precondition_", gradients, blocks, inverses_a, inverses_g,
                      "inverses_a", "inverses_g", kl_weights);
}

at::Tensor device_kl_clip(const at::Tensor& ratio) {
  return ratio.clamp_min(0).rsqrt().clamp_max(1);
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
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
  m.impl("kron_inverse_precondition_", &fastlaplace::kron_inverse_precondition_aten);
}
