// Kernel of fastlaplace::kron_precondition_ (CPU, and the CUDA dispatch until a fused
// kernel replaces it): in place, per layer,
// V <- nu Q_G [(Q_G^T V Q_A) * S] Q_A^T with V = [block_1 | block_2 | ...] the layer's
// gradient blocks side by side (a weight and its bias), S a damped inverse spectrum kept
// by the caller, and nu = min(1, 1 / sqrt(sum_l k_l <V_l, result_l>)) when kl_weights k are
// given (K-FAC's KL clipping). It runs at every training step on small matrices, so the
// ATen calls are few: four GEMMs per layer into one workspace, and on the CPU plain loops
// for the copies in and out, the scaling by S with its dot, and nu (on the host); the
// layers share the host threads.
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

}  // namespace

at::Tensor kron_precondition_aten(at::TensorList gradients, at::IntArrayRef blocks,
                                  at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                  at::TensorList inverse_spectra,
                                  const std::optional<at::Tensor>& kl_weights) {
  const int64_t layers = static_cast<int64_t>(eigvecs_a.size());
  TORCH_CHECK(layers > 0, "kron_precondition_ needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(blocks.size()) == layers &&
                  static_cast<int64_t>(eigvecs_g.size()) == layers &&
                  static_cast<int64_t>(inverse_spectra.size()) == layers,
              "kron_precondition_: blocks, eigvecs_a, eigvecs_g and inverse_spectra need one "
              "entry per layer");
  int64_t block_count = 0;
  for (int64_t b : blocks) {
    TORCH_CHECK(b >= 1, "kron_precondition_: every layer needs at least one gradient block");
    block_count += b;
  }
  TORCH_CHECK(static_cast<int64_t>(gradients.size()) == block_count, "kron_precondition_: ",
              block_count, " gradient blocks announced by blocks, got ", gradients.size());
  const at::ScalarType dtype = eigvecs_a[0].scalar_type();
  if (kl_weights.has_value()) {
    TORCH_CHECK(kl_weights->dim() == 1 && kl_weights->size(0) == layers,
                "kl_weights must be (", layers, ",), one entry per layer, got ", kl_weights->sizes());
  }
  // Checks first; each block's width, each layer's first block and its multiply-adds.
  std::vector<int64_t> widths(gradients.size()), firsts(layers);
  std::vector<double> costs(layers);
  for (int64_t i = 0, first = 0; i < layers; first += blocks[i], ++i) {
    const at::Tensor& qa = eigvecs_a[i];
    const at::Tensor& qg = eigvecs_g[i];
    check_factor_dtype(qa, "eigvecs_a", i);
    TORCH_CHECK(qa.dim() == 2 && qa.size(0) == qa.size(1) && qg.dim() == 2 &&
                    qg.size(0) == qg.size(1),
                "eigvecs_a[", i, "] and eigvecs_g[", i, "] must be square, got ", qa.sizes(),
                " and ", qg.sizes());
    TORCH_CHECK(qa.scalar_type() == dtype && qg.scalar_type() == dtype &&
                    inverse_spectra[i].scalar_type() == dtype,
                "layer ", i, ": eigenvectors and inverse spectra must all be ", dtype);
    const int64_t d_a = qa.size(0), d_g = qg.size(0);
    TORCH_CHECK(inverse_spectra[i].dim() == 2 && inverse_spectra[i].size(0) == d_g &&
                    inverse_spectra[i].size(1) == d_a,
                "inverse_spectra[", i, "] must be (", d_g, ", ", d_a, "), got ",
                inverse_spectra[i].sizes());
    int64_t columns = 0;
    for (int64_t b = first; b < first + blocks[i]; ++b) {
      widths[b] = block_width(gradients[b], d_g, b);
      columns += widths[b];
    }
    TORCH_CHECK(columns == d_a, "layer ", i, ": its gradient blocks have ", columns,
                " columns, its eigvecs_a ", d_a);
    firsts[i] = first;
    costs[i] = double(d_g) * d_a * (d_a + d_g);
  }
  // A CPU caller waits for the result anyway: there nu is computed on the host, in double,
  // and a GPU's stays on the device (no synchronisation).
  const bool on_host = eigvecs_a[0].is_cpu();
  std::vector<double> kl_factors;
  if (on_host && kl_weights.has_value()) {
    const at::Tensor weights = kl_weights->to(at::kDouble).contiguous();
    kl_factors.assign(weights.const_data_ptr<double>(), weights.const_data_ptr<double>() + layers);
  }
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
  run_balanced(costs, threads, [&](int64_t i) {
    at::Tensor v = works[i][0], product = works[i][1], rotated = works[i][2];
    for (int64_t b = firsts[i], offset = 0; b < firsts[i] + blocks[i]; offset += widths[b], ++b) {
      copy_in(v, gradients[b], offset, widths[b]);
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
  // nu = min(1, 1 / sqrt(ratio)): 1 / sqrt(0) = inf (and rounding below 0) give nu = 1.
  double host_nu = 1.0;
  at::Tensor device_nu;
  if (on_host && kl_weights.has_value()) {
    double ratio = 0.0;
    for (int64_t i = 0; i < layers; ++i) ratio += kl_factors[i] * host_dots[i];
    host_nu = ratio > 1.0 ? 1.0 / std::sqrt(ratio) : 1.0;
  } else if (kl_weights.has_value()) {
    const at::Tensor ratio = at::vdot(at::stack(device_dots), kl_weights->to(dtype));
    device_nu = ratio.clamp_min(0).rsqrt().clamp_max(1);
  }
  run_balanced(costs, threads, [&](int64_t i) {
    at::Tensor result = works[i][1];
    at::mm_out(lefts[i], eigvecs_g[i], updates[i]);
    at::mm_out(result, lefts[i], eigvecs_a[i].t());
    for (int64_t b = firsts[i], offset = 0; b < firsts[i] + blocks[i]; offset += widths[b], ++b) {
      copy_out(gradients[b], result, offset, widths[b], host_nu, device_nu);
    }
  });
  if (device_nu.defined()) return device_nu;
  return on_host ? at::scalar_tensor(host_nu, eigvecs_a[0].options())
                 : at::ones({}, eigvecs_a[0].options());
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
}
