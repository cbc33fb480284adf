// The last step of the CUDA kron_predictive_variance for variances (no covariances),
// written once for the GPU (csrc/cuda/kron_predictive_variance.cu) and for its host
// emulation (csrc/cpu/gram_emulation.cpp); see host_device.h for how.
//
// var[n, c] = sum_j B[n, c, j]^2 w[n, j] over the eigen-directions j of all layers: one
// thread per entry, adding in j order (no atomics: the result does not change from run to
// run). Reading B and w once is all the work, so no tiles.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastlaplace {
namespace variance {

constexpr int kThreads = 256;

template <typename scalar_t>
struct SquareSums {
  const scalar_t* rotated;  // B (samples, outputs, width), any strides (0 repeats)
  int64_t sample_stride, output_stride, width_stride;
  const scalar_t* weights;  // w (samples, width), contiguous
  scalar_t* out;            // (samples, outputs), contiguous
  int64_t samples, outputs, width;

  FL_HOST_DEVICE int64_t entries() const { return samples * outputs; }
  FL_HOST_DEVICE void sum(int64_t entry) const {
    const int64_t n = entry / outputs, c = entry - n * outputs;
    const scalar_t* b = rotated + n * sample_stride + c * output_stride;
    const scalar_t* w = weights + n * width;
    scalar_t total = scalar_t(0);
    for (int64_t j = 0; j < width; ++j) {
      const scalar_t x = b[j * width_stride];
      total += x * x * w[j];
    }
    out[entry] = total;
  }
};

}  // namespace variance
}  // namespace fastlaplace
