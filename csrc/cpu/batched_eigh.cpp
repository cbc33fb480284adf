// CPU kernel of fastlaplace::batched_eigh: eigenpairs of a list of symmetric matrices
// of mixed sizes. Small matrices are spread over the threads (one single-threaded
// LAPACK call each); large ones run one after another with LAPACK's own threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linalg_eigh.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ops.h"
#include "../engines/balance.h"

namespace fastlaplace {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_eigh_aten(
    at::TensorList matrices) {
  const int64_t count = static_cast<int64_t>(matrices.size());
  check_finite_square_matrices(matrices, "its eigendecomposition is undefined");
  std::vector<int64_t> sizes(count);
  for (int64_t i = 0; i < count; ++i) sizes[i] = matrices[i].size(0);
  std::vector<at::Tensor> values(count), vectors(count);
  const int64_t threads = count > 0 ? host_threads(matrices[0]) : 1;
  run_lapack(sizes, threads, [&](int64_t i) {
    std::tie(values[i], vectors[i]) = at::linalg_eigh(matrices[i]);
  });
  return {values, vectors};
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("batched_eigh", &fastlaplace::batched_eigh_aten);
}
