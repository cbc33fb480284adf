// CUDA dispatch of fastlaplace::batched_eigh: the ATen-composed implementation of
// csrc/cpu/batched_eigh.cpp, whose products run as cuBLAS / cuSOLVER calls on the current
// stream. A fused kernel replaces it once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) { m.impl("batched_eigh", &fastlaplace::batched_eigh_aten); }
