// CUDA dispatch of fastlaplace::kron_predictive_variance: the ATen-composed implementation of
// csrc/cpu/kron_predictive_variance.cpp, whose products run as cuBLAS / cuSOLVER calls on the current
// stream. A fused kernel replaces it once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("kron_predictive_variance", &fastlaplace::kron_predictive_variance_aten); }
