// The checks in front of the LAPACK / cuSOLVER calls (ops.h): square float32/float64
// matrices of a side LAPACK's 32-bit sizes can count, without NaN or Inf, which make
// LAPACK loop or return garbage.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace fastlaplace {
namespace {

// One pass, no temporaries: a contiguous CPU tensor.
bool all_finite_cpu(const at::Tensor& t) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "all_finite", [&] {
    const scalar_t* x = t.const_data_ptr<scalar_t>();
    // x * 0 is 0 for a finite x and NaN for NaN or +-Inf: the sum is NaN exactly when an
    // entry is not finite, and cannot overflow.
    scalar_t sum = 0;
    for (int64_t j = 0, n = t.numel(); j < n; ++j) sum += x[j] * scalar_t(0);
    finite = std::isfinite(sum);
  });
  return finite;
}

}  // namespace

void check_finite_square_matrices(at::TensorList matrices, const char* consequence) {
  const int64_t count = static_cast<int64_t>(matrices.size());
  std::vector<at::Tensor> sums;
  std::vector<int64_t> summed;
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& m = matrices[i];
    check_factor_dtype(m, "matrices", i);
    TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1), "matrices[", i,
                "] must be square, got ", m.sizes());
    TORCH_CHECK_VALUE(m.size(0) <= kLapackMaxSide, "matrices[", i, "] is ", m.size(0), " x ",
                      m.size(0), ": above ", kLapackMaxSide,
                      " a side overflows the 32-bit workspace size of LAPACK's and cuSOLVER's "
                      "eigensolver");
    check_same_device(m, matrices[0], "matrices");
    if (m.is_cpu() && m.is_contiguous()) {
      TORCH_CHECK(all_finite_cpu(m), "matrices[", i, "] contains NaN or Inf; ", consequence);
    } else {  // x * 0 as above, one reduction per matrix and one synchronisation for all
      sums.push_back(m.mul(0).sum().to(at::kDouble));
      summed.push_back(i);
    }
  }
  if (sums.empty()) return;
  const at::Tensor finite = at::stack(sums).isfinite().cpu();
  const bool* ok = finite.const_data_ptr<bool>();
  for (size_t k = 0; k < summed.size(); ++k) {
    TORCH_CHECK(ok[k], "matrices[", summed[k], "] contains NaN or Inf; ", consequence);
  }
}

}  // namespace fastlaplace
