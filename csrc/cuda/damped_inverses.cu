// CUDA dispatch of fastlaplace::damped_inverses: the ATen-composed implementation of
// csrc/cpu/damped_inverses.cpp, whose Cholesky factorisations and inverses are cuSOLVER
// calls on the current stream (one host synchronisation, for the checks and the
// factorisations' status).
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("damped_inverses", &fastlaplace::damped_inverses_aten);
}
