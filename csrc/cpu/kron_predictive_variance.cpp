// CPU kernel of fastlaplace::kron_predictive_variance: sum_l J_l P_l^-1 J_l^T with
// J_l = B_l (x) a^T never formed. Per layer and sample the weight of eigen-direction j
// is w_nj = sum_i (Q_A^T a_n)_i^2 / (s mu_j lambda_i + delta); then
// cov_n = (B_n Q_G) diag(w_n) (B_n Q_G)^T.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>

#include "../engines/kron_eigen.h"

namespace fastlaplace {
namespace {

// (N, C, d_G) Jacobians times Q_G as one GEMM. Jacobians from a batched backward are
// stored (C, N, d_G); a view in that order keeps the GEMM large instead of N small ones.
at::Tensor rotate_jacobian(const at::Tensor& jacobian, const at::Tensor& qg) {
  const int64_t n = jacobian.size(0), c = jacobian.size(1), d = jacobian.size(2);
  const at::Tensor by_column = jacobian.transpose(0, 1);
  if (!jacobian.is_contiguous() && by_column.is_contiguous()) {
    return at::mm(by_column.reshape({c * n, d}), qg).view({c, n, d}).transpose(0, 1);
  }
  return at::mm(jacobian.reshape({n * c, d}), qg).view({n, c, d});
}

at::Tensor layer_variance(const at::Tensor& a, const std::optional<at::Tensor>& jacobian,
                          const at::Tensor& qa, const at::Tensor& la, const at::Tensor& qg,
                          const at::Tensor& lg, const at::Tensor& scale,
                          const at::Tensor& delta, bool append_ones, bool full_covariance) {
  const int64_t d_in = a.size(1);
  const at::Tensor a_cast = a.to(qa.scalar_type());
  // (N, d_A): rotated inputs; the ones column contributes the last row of Q_A.
  const at::Tensor a_rot = append_ones
                               ? at::addmm(qa.select(0, d_in), a_cast, qa.slice(0, 0, d_in))
                               : at::mm(a_cast, qa);
  const at::Tensor inverse = damped_eigenvalues(la, lg, scale, delta).reciprocal_();
  const at::Tensor weights = at::mm(a_rot.square(), inverse.t());  // (N, d_G)
  if (!jacobian.has_value()) {  // last layer: B = I
    if (!full_covariance) return at::mm(weights, qg.square().t());
    // cov[n, c, e] = sum_j w[n, j] Q_G[c, j] Q_G[e, j]: one (N, d_G) x (d_G, C C) GEMM
    // with the products of Q_G's rows, instead of N small matrix products.
    const int64_t c = qg.size(0);
    const at::Tensor rows_t = qg.t();  // (d_G, C)
    const at::Tensor pairs = rows_t.unsqueeze(2).mul(rows_t.unsqueeze(1)).view({qg.size(1), c * c});
    return at::mm(weights, pairs).view({a.size(0), c, c});
  }
  const at::Tensor b_rot = rotate_jacobian(jacobian->to(qa.scalar_type()), qg);  // (N, C, d_G)
  if (!full_covariance) return at::bmm(b_rot.square(), weights.unsqueeze(2)).squeeze(2);
  return at::bmm(b_rot.mul(weights.unsqueeze(1)), b_rot.transpose(1, 2));
}

}  // namespace

VarianceShape check_kron_predictive_variance(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    const c10::List<bool>& append_ones) {
  const int64_t layers = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(layers > 0, "kron_predictive_variance needs at least one layer");
  TORCH_CHECK(static_cast<int64_t>(output_jacobians.size()) == layers &&
                  static_cast<int64_t>(eigvecs_a.size()) == layers &&
                  static_cast<int64_t>(eigvals_a.size()) == layers &&
                  static_cast<int64_t>(eigvecs_g.size()) == layers &&
                  static_cast<int64_t>(eigvals_g.size()) == layers &&
                  static_cast<int64_t>(append_ones.size()) == layers,
              "kron_predictive_variance: every list needs one entry per layer");
  check_per_layer(scale, layers, "scale");
  check_per_layer(delta, layers, "delta");
  const at::Tensor& like = eigvecs_a[0];
  check_same_device(scale, like, "scale");
  check_same_device(delta, like, "delta");
  VarianceShape shape{inputs[0].dim() > 0 ? inputs[0].size(0) : 0, 0};
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& a = inputs[i];
    const std::optional<at::Tensor> jacobian = output_jacobians.get(i);
    check_eigenpair(eigvecs_a[i], eigvals_a[i], "eigvecs_a", "eigvals_a", i);
    check_eigenpair(eigvecs_g[i], eigvals_g[i], "eigvecs_g", "eigvals_g", i);
    TORCH_CHECK(eigvecs_g[i].scalar_type() == eigvecs_a[i].scalar_type(), "eigvecs_g[", i,
                "] must have the dtype of eigvecs_a[", i, "]");
    check_floating(a, "inputs", i);
    check_same_device(a, like, argument_name("inputs", i).c_str());
    check_same_device(eigvecs_a[i], like, argument_name("eigvecs_a", i).c_str());
    check_same_device(eigvals_a[i], like, argument_name("eigvals_a", i).c_str());
    check_same_device(eigvecs_g[i], like, argument_name("eigvecs_g", i).c_str());
    check_same_device(eigvals_g[i], like, argument_name("eigvals_g", i).c_str());
    TORCH_CHECK(a.dim() == 2 && a.size(1) + (append_ones[i] ? 1 : 0) == eigvals_a[i].size(0),
                "inputs[", i, "] must be (N, ", eigvals_a[i].size(0) - (append_ones[i] ? 1 : 0),
                "), got ", a.sizes());
    int64_t outputs = eigvals_g[i].size(0);
    if (jacobian.has_value()) {
      check_floating(*jacobian, "output_jacobians", i);
      check_same_device(*jacobian, like, argument_name("output_jacobians", i).c_str());
      TORCH_CHECK(jacobian->dim() == 3 && jacobian->size(0) == a.size(0) &&
                      jacobian->size(2) == eigvals_g[i].size(0),
                  "output_jacobians[", i, "] must be (", a.size(0), ", C, ",
                  eigvals_g[i].size(0), "), got ", jacobian->sizes());
      outputs = jacobian->size(1);
    }
    if (i == 0) shape.outputs = outputs;
    TORCH_CHECK(a.size(0) == shape.samples && outputs == shape.outputs, "layer ", i, " gives ",
                a.size(0), " samples x ", outputs, " outputs but layer 0 gives ", shape.samples,
                " x ", shape.outputs);
  }
  return shape;
}

at::Tensor kron_predictive_variance_aten(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    c10::List<bool> append_ones, bool full_covariance) {
  check_kron_predictive_variance(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                 eigvals_g, scale, delta, append_ones);
  at::Tensor total;
  for (size_t i = 0; i < inputs.size(); ++i) {
    at::Tensor term = layer_variance(inputs[i], output_jacobians.get(i), eigvecs_a[i],
                                     eigvals_a[i], eigvecs_g[i], eigvals_g[i], scale[i],
                                     delta[i], append_ones[i], full_covariance);
    if (total.defined()) {
      total.add_(term);
    } else {
      total = term;
    }
  }
  return total;
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_predictive_variance", &fastlaplace::kron_predictive_variance_aten);
}
