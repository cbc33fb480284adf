// CPU kernel of fastlaplace::kron_logdet: log det P_l = sum_ij log(s mu_j lambda_i + delta)
// per layer, a few rows of the (d_G, d_A) grid at a time (no full-size temporary).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/log.h>
#include <torch/library.h>

#include <algorithm>

#include "kron_eigen.h"

namespace fastlaplace {
namespace {

// Grid entries per chunk: small enough to stay in cache.
constexpr int64_t kChunkEntries = 1 << 15;

at::Tensor kron_logdet_cpu(at::TensorList eigvals_a, at::TensorList eigvals_g,
                           const at::Tensor& scale, const at::Tensor& delta) {
  const int64_t layers = static_cast<int64_t>(eigvals_a.size());
  TORCH_CHECK(static_cast<int64_t>(eigvals_g.size()) == layers,
              "kron_logdet: eigvals_a and eigvals_g need one entry per layer");
  TORCH_CHECK(layers > 0, "kron_logdet needs at least one layer");
  check_per_layer(scale, layers, "scale");
  check_per_layer(delta, layers, "delta");
  at::Tensor result = at::empty({layers}, eigvals_a[0].options());
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& la = eigvals_a[i];
    const at::Tensor& lg = eigvals_g[i];
    check_factor_dtype(la, "eigvals_a", i);
    TORCH_CHECK(la.dim() == 1 && lg.dim() == 1 && lg.scalar_type() == la.scalar_type(),
                "eigvals_a[", i, "] and eigvals_g[", i, "] must be 1-D of one dtype");
    const int64_t rows = std::max<int64_t>(1, kChunkEntries / std::max<int64_t>(1, la.size(0)));
    at::Tensor total = at::zeros({}, la.options().dtype(at::kDouble));
    for (int64_t start = 0; start < lg.size(0); start += rows) {
      const int64_t count = std::min(rows, lg.size(0) - start);
      total.add_(at::log(damped_eigenvalues(la, lg.narrow(0, start, count), scale[i], delta[i]))
                     .sum(at::kDouble));
    }
    result[i].copy_(total);
  }
  return result;
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("kron_logdet", &fastlaplace::kron_logdet_cpu); }
