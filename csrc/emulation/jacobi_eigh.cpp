// fastlaplace::_jacobi_eigh_emulated: the CUDA batched_eigh's Jacobi solver
// (csrc/engines/jacobi_eigh.h) run on the host, each phase for every thread id in turn (from the
// last with reverse_order, the tests' race check: see HostThreads), so that the tests check
// the kernel's arithmetic where there is no GPU. Not a fast path.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../engines/jacobi_eigh.h"
#include "../ops.h"

namespace fastlaplace {
namespace {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> jacobi_eigh_emulated(
    at::TensorList matrices, int64_t threads, bool reverse_order) {
  check_finite_square_matrices(matrices, "its eigendecomposition is undefined");
  TORCH_CHECK(threads >= 1 && threads <= 1024, "threads must lie in [1, 1024], got ", threads);
  std::vector<at::Tensor> values, vectors;
  for (const at::Tensor& matrix : matrices) {
    TORCH_CHECK(matrix.is_cpu(), "_jacobi_eigh_emulated runs on the CPU");
    const int64_t n = matrix.size(0);
    TORCH_CHECK(n <= jacobi::kMaxSize, "the Jacobi solver takes matrices up to ",
                jacobi::kMaxSize, ", got ", n);
    const at::Tensor input = matrix.contiguous();
    at::Tensor value = at::empty({n}, input.options());
    at::Tensor vector = at::empty({n, n}, input.options());  // row j: eigenvector j
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "_jacobi_eigh_emulated", [&] {
      std::vector<double> memory(jacobi::workspace_elements(n, threads));
      const auto workspace = jacobi::carve(memory.data(), n);
      jacobi::eigh(HostThreads{threads, reverse_order}, workspace,
                   input.const_data_ptr<scalar_t>(), int(n), value.mutable_data_ptr<scalar_t>(),
                   vector.mutable_data_ptr<scalar_t>(), jacobi::max_sweeps<scalar_t>());
    });
    values.push_back(value);
    vectors.push_back(vector.t());  // eigenvectors as columns, column-major like LAPACK's
  }
  return {values, vectors};
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_FRAGMENT(fastlaplace, m) {
  m.def(
      "_jacobi_eigh_emulated(Tensor[] matrices, int threads, bool reverse_order=False) "
      "-> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_jacobi_eigh_emulated", &fastlaplace::jacobi_eigh_emulated);
}
