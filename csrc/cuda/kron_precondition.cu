// CUDA dispatch of fastlaplace::kron_precondition_ and kron_inverse_precondition_: the
// ATen-composed implementations of csrc/cpu/kron_precondition.cpp, whose products run as
// cuBLAS calls on the current stream (their ν stays on the device: no host
// synchronisation). Fused kernels replace them once one is measured faster on the GPU.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_precondition_", &fastlaplace::kron_precondition_aten);
  m.impl("kron_inverse_precondition_", &fastlaplace::kron_inverse_precondition_aten);
}
