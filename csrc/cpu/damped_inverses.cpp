// CPU kernel of fastlaplace::damped_inverses (and the CUDA dispatch, through cuSOLVER):
// (M_i + s_i I)^-1 for a list of symmetric positive semi-definite matrices of mixed sizes,
// each shift s_i > 0. A Cholesky factorisation and its inverse cost a fraction of an
// eigendecomposition; a matrix whose shifted Cholesky fails in floating point (a shift
// below the rounding of a large factor) is inverted through its eigendecomposition
// instead, its eigenvalues clamped at 0. On the CPU small matrices share the host
// threads, each LAPACK call on one (see run_lapack).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cholesky_inverse.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "../engines/balance.h"

namespace fastlaplace {

std::vector<at::Tensor> damped_inverses_aten(at::TensorList matrices, const at::Tensor& shifts) {
  const int64_t count = static_cast<int64_t>(matrices.size());
  TORCH_CHECK(count > 0, "damped_inverses needs at least one matrix");
  TORCH_CHECK(shifts.dim() == 1 && shifts.size(0) == count, "shifts must be (", count,
              ",), one per matrix, got ", shifts.sizes());
  check_finite_square_matrices(matrices, "its inverse is undefined");
  std::vector<int64_t> sizes(count);
  for (int64_t i = 0; i < count; ++i) sizes[i] = matrices[i].size(0);
  check_same_device(shifts, matrices[0], "shifts");
  // A shift must be positive for the shifted matrix to be positive definite. On the CPU the
  // shifts are read once, as doubles; a GPU's stay on the device.
  const at::Tensor host_shifts =
      shifts.is_cpu() ? shifts.to(at::kDouble).contiguous() : at::Tensor();
  if (host_shifts.defined()) {
    const double* s = host_shifts.const_data_ptr<double>();
    for (int64_t i = 0; i < count; ++i) {
      TORCH_CHECK(std::isfinite(s[i]) && s[i] > 0, "damped_inverses: shifts[", i,
                  "] must be positive and finite, got ", s[i]);
    }
  } else {
    TORCH_CHECK(shifts.isfinite().logical_and(shifts.gt(0)).all().item<bool>(),
                "damped_inverses: every shift must be positive and finite, got ", shifts);
  }
  const int64_t threads = host_threads(matrices[0]);
  std::vector<at::Tensor> factors(count), infos(count), inverses(count);
  run_lapack(sizes, threads, [&](int64_t i) {
    at::Tensor shifted = matrices[i].clone(at::MemoryFormat::Contiguous);
    if (host_shifts.defined()) {
      shifted.diagonal().add_(host_shifts.const_data_ptr<double>()[i]);
    } else {
      shifted.diagonal().add_(shifts[i].to(shifted.scalar_type()));
    }
    std::tie(factors[i], infos[i]) = at::linalg_cholesky_ex(shifted);
  });
  const at::Tensor failed = at::stack(infos).ne(0).cpu();
  const bool* fails = failed.const_data_ptr<bool>();
  run_lapack(sizes, threads, [&](int64_t i) {
    if (!fails[i]) {
      // LAPACK writes it column-major; symmetric, its transpose is the same matrix, row-major.
      const at::Tensor inverse = at::cholesky_inverse(factors[i]);
      inverses[i] = inverse.is_contiguous() ? inverse : inverse.t();
      return;
    }
    auto [values, vectors] = at::linalg_eigh(matrices[i]);
    const at::Tensor shift = host_shifts.defined() ? host_shifts[i] : shifts[i];
    const at::Tensor scale = values.clamp_min(0).add_(shift.to(values.scalar_type())).reciprocal_();
    inverses[i] = at::mm(vectors.mul(scale), vectors.t());
  });
  return inverses;
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("damped_inverses", &fastlaplace::damped_inverses_aten);
}
