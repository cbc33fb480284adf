// CUDA dispatch of fastlaplace::factor_accumulate_: the ATen-composed implementation of
// csrc/cpu/factor_accumulate.cpp, whose products run as cuBLAS / cuSOLVER calls on the current
// stream. A fused kernel replaces it once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("factor_accumulate_", &fastlaplace::factor_accumulate_aten); }
