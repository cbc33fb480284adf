// CPU kernel of fastlaplace::factor_accumulate_: F_i <- beta F_i + alpha [X_i,1]^T [X_i,1]
// for every layer of a step in one call.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "../engines/blocked_gram.h"

namespace fastlaplace {

void check_factor_accumulate(at::TensorList factors, at::TensorList inputs,
                             const c10::List<bool>& append_ones) {
  TORCH_CHECK(factors.size() == inputs.size() && inputs.size() == append_ones.size(),
              "factor_accumulate_: factors, inputs and append_ones need one entry per "
              "layer, got ", factors.size(), ", ", inputs.size(), " and ", append_ones.size());
  for (int64_t i = 0; i < static_cast<int64_t>(factors.size()); ++i) {
    const at::Tensor& factor = factors[i];
    const at::Tensor& x = inputs[i];
    check_factor_dtype(factor, "factors", i);
    check_floating(x, "inputs", i);
    check_same_device(factor, factors[0], "factors");
    check_same_device(x, factors[0], "inputs");
    TORCH_CHECK(factor.is_contiguous(), "factors[", i, "] must be contiguous");
    TORCH_CHECK(x.dim() == 2, "inputs[", i, "] must be (N, d), got ", x.sizes());
    const int64_t size = x.size(1) + (append_ones[i] ? 1 : 0);
    TORCH_CHECK(factor.dim() == 2 && factor.size(0) == size && factor.size(1) == size,
                "factors[", i, "] must be (", size, ", ", size, "), got ", factor.sizes());
  }
}

void factor_accumulate_aten(at::TensorList factors, at::TensorList inputs,
                           c10::List<bool> append_ones, double alpha, double beta) {
  check_factor_accumulate(factors, inputs, append_ones);
  accumulate_grams(factors, inputs, append_ones.vec(), alpha, beta);
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("factor_accumulate_", &fastlaplace::factor_accumulate_aten);
}
