// The launch code of fastlaplace::kron_predictive_variance on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/kron_predictive_variance.cu) and its
// host emulation (emulation/kron_predictive_variance.cpp), so that the tests check it too.
#pragma once

#include "../engines/product_sums.h"
#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

// Whether kron_variance_tiles takes these checked layers (a layer's Q_A and Q_G share a
// dtype): every layer's eigenvectors of one dtype, and an output Jacobian for every layer
// or for none (a last layer's closed form).
inline bool tiles_take_variance(const c10::List<std::optional<at::Tensor>>& output_jacobians,
                                at::TensorList eigvecs_a) {
  const bool jacobians = output_jacobians.get(0).has_value();
  for (size_t i = 0; i < eigvecs_a.size(); ++i) {
    if (eigvecs_a[i].scalar_type() != eigvecs_a[0].scalar_type() ||
        output_jacobians.get(i).has_value() != jacobians) {
      return false;
    }
  }
  return true;
}

// The stride that steps through dims (outer, inner) of t flattened into one, if one does.
inline std::optional<int64_t> flattened_stride(const at::Tensor& t, int outer, int inner) {
  if (t.size(inner) == 1) return t.stride(outer);
  if (t.size(outer) == 1 || t.stride(outer) == t.size(inner) * t.stride(inner)) {
    return t.stride(inner);
  }
  return std::nullopt;
}

// kron_predictive_variance on checked arguments (check_kron_predictive_variance's shape)
// that tiles_take_variance, as four launches over all layers: the rotated inputs
// A~ = [a, 1] Q_A of every layer side by side in one (N, sum d_A) workspace; the weights
// w = A~^2 D^-1 (D = s lambda mu^T + delta, a SpectrumRows) in one (N, sum d_G); the
// rotated Jacobians B~ = B Q_G in one (N, C, sum d_G), in the storage order of the first
// Jacobian's (N, C) (a batched backward gives (C, N, d_G)); then per sample
// B~_n diag(w_n) B~_n^T: for more than variance::kMaxPairOutputs outputs as symmetric
// products of the tile kernel, else (and for variances, its diagonal) by sum_products's
// warp-per-entry sums. A last layer's B~ is its Q_G for every sample (the
// layers' Q_G side by side, with a sample stride of 0). The sum over layers is a sum
// over the concatenated eigen-directions of one product: no atomics.
template <typename Run, typename SumProducts>
at::Tensor kron_variance_tiles(at::TensorList inputs,
                               const c10::List<std::optional<at::Tensor>>& output_jacobians,
                               at::TensorList eigvecs_a, at::TensorList eigvals_a,
                               at::TensorList eigvecs_g, at::TensorList eigvals_g,
                               const at::Tensor& scale, const at::Tensor& delta,
                               const c10::List<bool>& append_ones, bool full_covariance,
                               const VarianceShape& shape, int64_t target_blocks,
                               const Run& run, const SumProducts& sum_products) {
  const size_t count = inputs.size();
  const at::Tensor& like = eigvecs_a[0];
  const int64_t n = shape.samples, c = shape.outputs;
  std::vector<int64_t> offsets_a(count + 1, 0), offsets_g(count + 1, 0);
  for (size_t i = 0; i < count; ++i) {
    offsets_a[i + 1] = offsets_a[i] + eigvecs_a[i].size(0);
    offsets_g[i + 1] = offsets_g[i] + eigvecs_g[i].size(0);
  }
  const int64_t width_a = offsets_a[count], width = offsets_g[count];
  const at::Tensor rotated_inputs = at::empty({n, width_a}, like.options());
  const at::Tensor weights = at::empty({n, width}, like.options());
  const at::Tensor scales = scale.to(at::kDouble).contiguous();
  const at::Tensor deltas = delta.to(at::kDouble).contiguous();
  const bool jacobians = output_jacobians.get(0).has_value();
  // B~ (samples, outputs, width) in order (N, C) or (C, N), or the Q_G side by side.
  bool classes_outer = false;
  at::Tensor rotated_jacobians;
  if (jacobians) {
    const at::Tensor first = *output_jacobians.get(0);  // get() returns a copy
    classes_outer = !flattened_stride(first, 0, 1) && flattened_stride(first, 1, 0);
    rotated_jacobians = at::empty({n * c, width}, like.options());
  } else {
    rotated_jacobians = at::cat(eigvecs_g, 1);
  }
  const int64_t sample_stride = !jacobians ? 0 : classes_outer ? width : c * width;
  const int64_t output_stride = jacobians && classes_outer ? n * width : width;
  at::Tensor result = full_covariance ? at::empty({n, c, c}, like.options())
                                      : at::empty({n, c}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "kron_variance_tiles", [&] {
    using Rows = DenseRows<scalar_t>;
    std::vector<Layer<RowsWithOnes<scalar_t>, Rows, scalar_t>> rotate_inputs;
    std::vector<Layer<ScaledRows<scalar_t>, SpectrumRows<scalar_t>, scalar_t>> weigh;
    std::vector<Layer<Rows, Rows, scalar_t>> rotate_jacobians;
    std::vector<at::Tensor> keep;  // alive until the launches are queued
    scalar_t* rotated = rotated_inputs.mutable_data_ptr<scalar_t>();
    scalar_t* w = weights.mutable_data_ptr<scalar_t>();
    scalar_t* b = rotated_jacobians.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor a = inputs[i].to(like.scalar_type());
      const at::Tensor& qa = eigvecs_a[i];
      const at::Tensor& qg = eigvecs_g[i];
      const int64_t d_a = qa.size(0), d_g = qg.size(0);
      const at::Tensor la = eigvals_a[i].contiguous(), lg = eigvals_g[i].contiguous();
      keep.insert(keep.end(), {a, la, lg});
      // X[k][m] = [a, 1][m][k]
      const RowsWithOnes<scalar_t> features{
          {a.const_data_ptr<scalar_t>(), d_a, n, a.stride(1), a.stride(0)}, append_ones[i]};
      rotate_inputs.push_back(
          product(features, matrix_rows<scalar_t>(qa, false), rotated + offsets_a[i], width_a));
      const Rows rotated_rows{rotated + offsets_a[i], d_a, n, 1, width_a};
      const Spectrum<scalar_t> inverse{la.const_data_ptr<scalar_t>(),
                                       lg.const_data_ptr<scalar_t>(),
                                       scales.const_data_ptr<double>() + i,
                                       deltas.const_data_ptr<double>() + i, -1.0};
      weigh.push_back(product(ScaledRows<scalar_t>{rotated_rows, rotated_rows.data, 1, width_a},
                              SpectrumRows<scalar_t>{inverse, d_a, d_g}, w + offsets_g[i], width));
      if (!jacobians) continue;
      at::Tensor jac = output_jacobians.get(i)->to(like.scalar_type());
      std::optional<int64_t> step =
          classes_outer ? flattened_stride(jac, 1, 0) : flattened_stride(jac, 0, 1);
      if (!step) {
        jac = classes_outer ? jac.transpose(0, 1).contiguous().transpose(0, 1) : jac.contiguous();
        step = classes_outer ? jac.stride(0) : jac.stride(1);
      }
      keep.push_back(jac);
      const Rows columns{jac.const_data_ptr<scalar_t>(), d_g, n * c, jac.stride(2), *step};
      rotate_jacobians.push_back(
          product(columns, matrix_rows<scalar_t>(qg, false), b + offsets_g[i], width));
    }
    run_layers(rotate_inputs, target_blocks, like, 1.0, 0.0, run);
    run_layers(weigh, target_blocks, like, 1.0, 0.0, run);
    run_layers(rotate_jacobians, target_blocks, like, 1.0, 0.0, run);
    scalar_t* out = result.mutable_data_ptr<scalar_t>();
    if (!full_covariance || c <= variance::kMaxPairOutputs) {
      sum_products(variance::ProductSums<scalar_t>{b, sample_stride, output_stride, 1, w, out, n,
                                                   c, width, full_covariance});
      return;
    }
    std::vector<Layer<ScaledRows<scalar_t>, Rows, scalar_t>> covariances;
    for (int64_t s = 0; s < n; ++s) {
      const Rows directions{b + s * sample_stride, width, c, 1, output_stride};
      covariances.push_back({ScaledRows<scalar_t>{directions, w + s * width, 1, 0}, directions,
                             false, false, true, out + s * c * c, c, c, c});
    }
    run_layers(covariances, target_blocks, like, 1.0, 0.0, run);
  });
  return result;
}

}  // namespace gram
}  // namespace fastlaplace
