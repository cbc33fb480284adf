// CUDA dispatch of fastlaplace::conv_input_factor_: the ATen-composed implementation of
// csrc/cpu/conv_input_factor.cpp, whose products run as cuBLAS / cuSOLVER calls on the current
// stream. A fused kernel replaces it once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("conv_input_factor_", &fastlaplace::conv_input_factor_aten); }
