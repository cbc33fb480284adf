// all_finite (ops.h): the NaN / Inf check in front of the LAPACK calls.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/sum.h>

#include <cmath>

#include "../ops.h"

namespace fastlaplace {

bool all_finite(const at::Tensor& t) {
  if (t.is_cpu() && t.is_contiguous()) {  // one pass, no temporaries: this runs per factor
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
  // A finite sum means finite entries; an overflowing one asks for the full check.
  return at::isfinite(t.sum()).item<bool>() || at::isfinite(t).all().item<bool>();
}

}  // namespace fastlaplace
