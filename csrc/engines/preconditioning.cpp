// The shared parts of the preconditioners' CPU kernels (see preconditioning.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/vdot.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "preconditioning.h"

namespace fastlaplace {
namespace preconditioning {

int64_t block_width(const at::Tensor& block, int64_t rows, int64_t index) {
  check_floating(block, "gradients", index);
  TORCH_CHECK(block.dim() >= 1 && block.size(0) == rows, "gradients[", index,
              "] must have ", rows, " rows (the layer's d_G), got shape ", block.sizes());
  return block.numel() / rows;
}

bool plain_block(const at::Tensor& block, const at::Tensor& work) {
  return block.is_cpu() && block.is_contiguous() && block.scalar_type() == work.scalar_type();
}

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

at::Tensor clip_result(const Clip& clip, const at::Tensor& like) {
  if (clip.device.defined()) return clip.device;
  return like.is_cpu() ? at::scalar_tensor(clip.host, like.options())
                       : at::ones({}, like.options());
}

}  // namespace preconditioning

at::Tensor device_kl_clip(const at::Tensor& ratio) {
  return ratio.clamp_min(0).rsqrt().clamp_max(1);
}

}  // namespace fastlaplace
