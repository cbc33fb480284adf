// CUDA dispatch of fastlaplace::kron_precondition_: the ATen-composed implementation of
// csrc/cpu/kron_precondition.cpp, whose products run as cuBLAS calls on the current stream
// (its ν stays on the device: no host synchronisation). A fused kernel replaces it once one
// is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
}
