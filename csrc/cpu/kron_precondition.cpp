// CPU kernel of fastlaplace::kron_precondition_: in place, per layer,
// V <- nu Q_G [(Q_G^T V Q_A) * S] Q_A^T with V = [block_1 | block_2 | ...] the layer's
// gradient blocks side by side (a weight and its bias), S a damped inverse spectrum kept
// by the caller, and nu = min(1, 1 / sqrt(sum_l k_l <V_l, result_l>)) when kl_weights k are
// given (K-FAC's KL clipping). The blocks are multiplied where they lie: no concatenated
// copy on the way in, and the products are written straight into them on the way out.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/vdot.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../ops.h"

namespace fastlaplace {
namespace {

// Block rows (d_G, width) of a gradient block of d_G * width entries, as a matrix.
int64_t block_width(const at::Tensor& block, int64_t rows, int64_t index) {
  check_floating(block, "gradients", index);
  TORCH_CHECK(block.dim() >= 1 && block.size(0) == rows, "gradients[", index,
              "] must have ", rows, " rows (the layer's d_G), got shape ", block.sizes());
  return block.numel() / rows;
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
  // A CPU caller waits for the result anyway: there nu is computed on the host, in double,
  // and a GPU's stays on the device (no synchronisation).
  const bool on_host = kl_weights.has_value() && eigvecs_a[0].is_cpu();
  std::vector<double> kl_factors;
  if (on_host) {
    const at::Tensor weights = kl_weights->to(at::kDouble).contiguous();
    kl_factors.assign(weights.const_data_ptr<double>(), weights.const_data_ptr<double>() + layers);
  }
  double host_ratio = 0.0;
  std::vector<at::Tensor> updates(layers), dots;
  int64_t first = 0;
  for (int64_t i = 0; i < layers; ++i) {
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
    // V Q_A as a sum over the blocks' rows of Q_A.
    at::Tensor product;
    int64_t offset = 0;
    for (int64_t b = first; b < first + blocks[i]; ++b) {
      const int64_t width = block_width(gradients[b], d_g, b);
      TORCH_CHECK(offset + width <= d_a, "layer ", i, ": its gradient blocks have more than d_A = ",
                  d_a, " columns");
      const at::Tensor rows = gradients[b].reshape({d_g, width}).to(dtype);
      const at::Tensor part = qa.narrow(0, offset, width);
      product = product.defined() ? product.addmm_(rows, part) : at::mm(rows, part);
      offset += width;
    }
    TORCH_CHECK(offset == d_a, "layer ", i, ": its gradient blocks have ", offset,
                " columns, its eigvecs_a ", d_a);
    const at::Tensor rotated = at::mm(qg.t(), product);
    // <V, result> = <R, R * S> in the eigenbasis (Q_A and Q_G are orthogonal).
    if (rotated.is_cpu() && inverse_spectra[i].is_contiguous()) {
      const double dot = scale_and_dot_cpu(rotated, inverse_spectra[i]);
      if (on_host) host_ratio += kl_factors[i] * dot;
      updates[i] = rotated;
    } else {
      updates[i] = rotated.mul(inverse_spectra[i]);
      if (kl_weights.has_value()) {
        const at::Tensor dot = at::vdot(rotated.view(-1), updates[i].view(-1));
        if (on_host) {
          host_ratio += kl_factors[i] * dot.item<double>();
        } else {
          dots.push_back(dot);
        }
      }
    }
    first += blocks[i];
  }
  // nu = min(1, 1 / sqrt(ratio)): 1 / sqrt(0) = inf (and rounding below 0) give nu = 1.
  at::Tensor scale;
  bool unscaled = !kl_weights.has_value();
  if (on_host) {
    const double nu = host_ratio > 1.0 ? 1.0 / std::sqrt(host_ratio) : 1.0;
    unscaled = nu == 1.0;
    scale = at::scalar_tensor(nu, eigvecs_a[0].options());
  } else if (kl_weights.has_value()) {
    const at::Tensor ratio = at::vdot(at::stack(dots), kl_weights->to(dtype));
    scale = ratio.clamp_min(0).rsqrt().clamp_max(1);
  } else {
    scale = at::ones({}, eigvecs_a[0].options());
  }
  first = 0;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& qa = eigvecs_a[i];
    const int64_t d_g = eigvecs_g[i].size(0);
    at::Tensor left = at::mm(eigvecs_g[i], updates[i]);
    if (!unscaled) left.mul_(scale);
    int64_t offset = 0;
    for (int64_t b = first; b < first + blocks[i]; ++b) {
      const at::Tensor& block = gradients[b];
      const int64_t width = block.numel() / d_g;
      const at::Tensor part_t = qa.narrow(0, offset, width).t();
      if (block.is_contiguous() && block.scalar_type() == dtype) {
        at::Tensor rows = block.view({d_g, width});
        at::mm_out(rows, left, part_t);
      } else {
        block.copy_(at::mm(left, part_t).view(block.sizes()));
      }
      offset += width;
    }
    first += blocks[i];
  }
  return scale;
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
}
