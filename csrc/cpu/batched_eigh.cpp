// CPU kernel of fastlaplace::batched_eigh: eigenpairs of a list of symmetric matrices
// of mixed sizes. Small matrices are spread over the threads (one single-threaded
// LAPACK call each); large ones run one after another with LAPACK's own threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_eigh.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ops.h"

namespace fastlaplace {
namespace {

// Measured on 2 cores: below this size two single-threaded decompositions side by side
// beat one after the other with LAPACK's own threads; above it, the reverse.
constexpr int64_t kThreadedEighSize = 600;

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_eigh_aten(
    at::TensorList matrices) {
  const int64_t count = static_cast<int64_t>(matrices.size());
  std::vector<int64_t> small, large;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& m = matrices[i];
    check_factor_dtype(m, "matrices", i);
    TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1), "matrices[", i,
                "] must be square, got ", m.sizes());
    // LAPACK may loop or return garbage on NaN / Inf: refuse them up front.
    TORCH_CHECK(at::isfinite(m).all().item<bool>(), "matrices[", i,
                "] contains NaN or Inf; its eigendecomposition is undefined");
    (m.size(0) >= kThreadedEighSize ? large : small).push_back(i);
  }
  std::vector<at::Tensor> values(count), vectors(count);
  auto decompose = [&](int64_t i) {
    std::tie(values[i], vectors[i]) = at::linalg_eigh(matrices[i]);
  };
  for (int64_t i : large) decompose(i);
  // Largest first, dealt round-robin: each thread gets a similar share of the work.
  std::sort(small.begin(), small.end(),
            [&](int64_t a, int64_t b) { return matrices[a].size(0) > matrices[b].size(0); });
  const int64_t threads = count > 0 ? host_threads(matrices[0]) : 1;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (size_t j = t; j < small.size(); j += threads) decompose(small[j]);
    }
  });
  return {values, vectors};
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("batched_eigh", &fastlaplace::batched_eigh_aten);
}
