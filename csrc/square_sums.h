// The last step of the CUDA kron_predictive_variance for variances (no covariances),
// written once for the GPU (csrc/cuda/kron_predictive_variance.cu) and for its host
// emulation (csrc/cpu/gram_emulation.cpp); see host_device.h for how.
//
// var[n, c] = sum_j B[n, c, j]^2 w[n, j] over the eigen-directions j of all layers: one
// warp per entry, its lanes reading consecutive j (B's rows are contiguous in the
// workspace), each lane adding every 32nd term and lane 0 the lanes' sums in lane order
// (no atomics: the result does not change from run to run). Reading B and w once is all
// the work, so no tiles.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastlaplace {
namespace variance {

constexpr int kLanes = 32;
constexpr int kThreads = 256;
constexpr int kEntriesPerBlock = kThreads / kLanes;

template <typename scalar_t>
struct SquareSums {
  const scalar_t* rotated;  // B (samples, outputs, width), any strides (0 repeats)
  int64_t sample_stride, output_stride, width_stride;
  const scalar_t* weights;  // w (samples, width), contiguous
  scalar_t* out;            // (samples, outputs), contiguous
  int64_t samples, outputs, width;

  FL_HOST_DEVICE int64_t entries() const { return samples * outputs; }
  FL_HOST_DEVICE int64_t blocks() const {
    return (entries() + kEntriesPerBlock - 1) / kEntriesPerBlock;
  }

  // Block `block`'s entries; lane_sums: kThreads values of shared memory.
  template <typename Threads>
  FL_HOST_DEVICE void block_sums(const Threads& threads, scalar_t* lane_sums,
                                 int64_t block) const {
    threads.each([&](int t) {
      const int64_t entry = block * kEntriesPerBlock + t / kLanes;
      scalar_t sum = scalar_t(0);
      if (entry < entries()) {
        const int64_t n = entry / outputs, c = entry - n * outputs;
        const scalar_t* b = rotated + n * sample_stride + c * output_stride;
        const scalar_t* w = weights + n * width;
        for (int64_t j = t % kLanes; j < width; j += kLanes) {
          const scalar_t x = b[j * width_stride];
          sum += x * x * w[j];
        }
      }
      lane_sums[t] = sum;
    });
    threads.each([&](int t) {
      const int64_t entry = block * kEntriesPerBlock + t / kLanes;
      if (t % kLanes != 0 || entry >= entries()) return;
      scalar_t total = scalar_t(0);
      for (int lane = 0; lane < kLanes; ++lane) total += lane_sums[t + lane];
      out[entry] = total;
    });
  }
};

}  // namespace variance
}  // namespace fastlaplace
