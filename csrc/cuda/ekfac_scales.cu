// CUDA dispatch of fastlaplace::ekfac_scales_: the ATen-composed implementation of
// csrc/cpu/ekfac_scales.cpp, whose rotations and per-datum products are cuBLAS GEMMs on the
// current stream (no host synchronisation). A fused kernel would save the chunk of rotated
// per-datum gradients (at most 2^24 entries) that the square-and-sum reads back.
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("ekfac_scales_", &fastlaplace::ekfac_scales_aten);
}
