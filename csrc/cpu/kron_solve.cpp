// CPU kernel of fastlaplace::kron_solve: P^p V = Q_G [(Q_G^T V Q_A) * D^p] Q_A^T per
// layer, D = s mu lambda^T + delta, exactly (no per-factor damping shortcut).
#include <ATen/core/Tensor.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include <vector>

#include "../engines/kron_eigen.h"

namespace fastlaplace {

void check_kron_solve(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                      at::TensorList eigvecs_g, at::TensorList eigvals_g, at::TensorList rhs,
                      const at::Tensor& scale, const at::Tensor& delta) {
  const int64_t layers = static_cast<int64_t>(eigvecs_a.size());
  TORCH_CHECK(static_cast<int64_t>(eigvals_a.size()) == layers &&
                  static_cast<int64_t>(eigvecs_g.size()) == layers &&
                  static_cast<int64_t>(eigvals_g.size()) == layers &&
                  static_cast<int64_t>(rhs.size()) == layers,
              "kron_solve: every list needs one entry per layer");
  check_per_layer(scale, layers, "scale");
  check_per_layer(delta, layers, "delta");
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& qa = eigvecs_a[i];
    const at::Tensor& qg = eigvecs_g[i];
    check_eigenpair(qa, eigvals_a[i], "eigvecs_a", "eigvals_a", i);
    check_eigenpair(qg, eigvals_g[i], "eigvecs_g", "eigvals_g", i);
    check_floating(rhs[i], "rhs", i);
    for (const at::Tensor& t : {qa, eigvals_a[i], qg, eigvals_g[i], rhs[i]}) {
      check_same_device(t, scale, "eigenpairs and rhs");
    }
    TORCH_CHECK(qg.scalar_type() == qa.scalar_type(), "eigvecs_g[", i,
                "] must have the dtype of eigvecs_a[", i, "]");
    TORCH_CHECK(rhs[i].dim() >= 2 && rhs[i].size(-2) == qg.size(0) &&
                    rhs[i].size(-1) == qa.size(0),
                "rhs[", i, "] must be (*, ", qg.size(0), ", ", qa.size(0), "), got ",
                rhs[i].sizes());
  }
  check_same_device(delta, scale, "delta");
}

std::vector<at::Tensor> kron_solve_aten(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                       at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                       at::TensorList rhs, const at::Tensor& scale,
                                       const at::Tensor& delta, double exponent) {
  check_kron_solve(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta);
  std::vector<at::Tensor> result;
  for (int64_t i = 0; i < static_cast<int64_t>(eigvecs_a.size()); ++i) {
    const at::Tensor& qa = eigvecs_a[i];
    const at::Tensor& qg = eigvecs_g[i];
    const at::Tensor weights =
        damped_eigenvalues(eigvals_a[i], eigvals_g[i], scale[i], delta[i]).pow_(exponent);
    const at::Tensor rotated = at::matmul(at::matmul(qg.t(), rhs[i].to(qa.scalar_type())), qa);
    result.push_back(at::matmul(at::matmul(qg, rotated.mul_(weights)), qa.t()));
  }
  return result;
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("kron_solve", &fastlaplace::kron_solve_aten); }
