// CUDA dispatch of fastlaplace::diag_ggn: the ATen-composed implementation of
// csrc/cpu/diag_ggn.cpp, whose products run as cuBLAS / cuSOLVER calls on the current
// stream. A fused kernel replaces it once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("diag_ggn", &fastlaplace::diag_ggn_aten); }
