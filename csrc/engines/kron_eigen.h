// Helpers shared by the Kronecker-eigenbasis kernels (solve, log det, predictive).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/outer.h>

#include "../ops.h"

namespace fastlaplace {

// (d_G, d_A) matrix s * mu_j * lambda_i + delta of one layer, spectra clamped at 0.
inline at::Tensor damped_eigenvalues(const at::Tensor& eigvals_a, const at::Tensor& eigvals_g,
                                     const at::Tensor& scale, const at::Tensor& delta) {
  const at::Tensor scaled_g = eigvals_g.clamp_min(0).mul_(scale.to(eigvals_g.scalar_type()));
  return at::outer(scaled_g, eigvals_a.clamp_min(0)).add_(delta.to(eigvals_a.scalar_type()));
}

inline void check_eigenpair(const at::Tensor& vecs, const at::Tensor& vals,
                            const char* vecs_name, const char* vals_name, int64_t i) {
  check_factor_dtype(vecs, vecs_name, i);
  TORCH_CHECK(vals.dim() == 1 && vecs.dim() == 2 && vecs.size(0) == vals.size(0) &&
                  vecs.size(1) == vals.size(0),
              argument_name(vecs_name, i), " must be (d, d) and ", argument_name(vals_name, i),
              " (d,), got ", vecs.sizes(), " and ", vals.sizes());
  TORCH_CHECK(vals.scalar_type() == vecs.scalar_type(), argument_name(vals_name, i),
              " must have the dtype of ", argument_name(vecs_name, i));
}

inline void check_per_layer(const at::Tensor& t, int64_t layers, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == layers, name, " must be (", layers,
              ",), one entry per layer, got ", t.sizes());
}

}  // namespace fastlaplace
