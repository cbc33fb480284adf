// The last step of the CUDA kron_predictive_variance for variances, and for covariances of
// few outputs, written once for the GPU (csrc/cuda/kron_predictive_variance.cu) and for
// its host emulation (csrc/emulation/); see host_device.h for how.
//
// cov[n, c, c'] = sum_j B[n, c, j] B[n, c', j] w[n, j] over the eigen-directions j of all
// layers, for the pairs c <= c' (mirrored: exactly symmetric), or var[n, c] for c = c'
// only: one warp per entry, its lanes reading consecutive j (B's rows are contiguous in the
// workspace), each lane adding every 32nd term and lane 0 the lanes' sums in lane order
// (no atomics: the result does not change from run to run). Reading B and w is all the
// work, so no tiles; covariances of more outputs than kMaxPairOutputs go to the tile
// kernel instead, whose 64 x 64 output tiles would be mostly waste below it.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastlaplace {
namespace variance {

constexpr int kLanes = 32;
constexpr int kThreads = 256;
constexpr int kEntriesPerBlock = kThreads / kLanes;
// Outputs up to which covariances are summed here: C (C + 1) / 2 sums of a warp each per
// sample, against a 64 x 64 tile's 4096 products of the same length.
constexpr int64_t kMaxPairOutputs = 16;

template <typename scalar_t>
struct ProductSums {
  const scalar_t* rotated;  // B (samples, outputs, width), any strides (0 repeats)
  int64_t sample_stride, output_stride, width_stride;
  const scalar_t* weights;  // w (samples, width), contiguous
  scalar_t* out;            // (samples, outputs, outputs) with pairs, else (samples, outputs)
  int64_t samples, outputs, width;
  bool pairs;  // every pair c <= c', else c = c' only

  FL_HOST_DEVICE int64_t per_sample() const {
    return pairs ? outputs * (outputs + 1) / 2 : outputs;
  }
  FL_HOST_DEVICE int64_t entries() const { return samples * per_sample(); }
  FL_HOST_DEVICE int64_t blocks() const {
    return (entries() + kEntriesPerBlock - 1) / kEntriesPerBlock;
  }

  // The sample and the outputs (c, c') of an entry: the pairs of a sample row by row.
  FL_HOST_DEVICE void locate(int64_t entry, int64_t* n, int64_t* c, int64_t* c2) const {
    *n = entry / per_sample();
    int64_t k = entry - *n * per_sample();
    if (!pairs) {
      *c = *c2 = k;
      return;
    }
    *c = 0;
    while (k >= outputs - *c) k -= outputs - (*c)++;
    *c2 = *c + k;
  }

  // Block `block`'s entries; lane_sums: kThreads values of shared memory.
  template <typename Threads>
  FL_HOST_DEVICE void block_sums(const Threads& threads, scalar_t* lane_sums,
                                 int64_t block) const {
    threads.each([&](int t) {
      const int64_t entry = block * kEntriesPerBlock + t / kLanes;
      scalar_t sum = scalar_t(0);
      if (entry < entries()) {
        int64_t n, c, c2;
        locate(entry, &n, &c, &c2);
        const scalar_t* x = rotated + n * sample_stride + c * output_stride;
        const scalar_t* y = rotated + n * sample_stride + c2 * output_stride;
        const scalar_t* w = weights + n * width;
        for (int64_t j = t % kLanes; j < width; j += kLanes) {
          sum += x[j * width_stride] * y[j * width_stride] * w[j];
        }
      }
      lane_sums[t] = sum;
    });
    threads.each([&](int t) {
      const int64_t entry = block * kEntriesPerBlock + t / kLanes;
      if (t % kLanes != 0 || entry >= entries()) return;
      scalar_t total = scalar_t(0);
      for (int lane = 0; lane < kLanes; ++lane) total += lane_sums[t + lane];
      int64_t n, c, c2;
      locate(entry, &n, &c, &c2);
      if (!pairs) {
        out[n * outputs + c] = total;
        return;
      }
      out[(n * outputs + c) * outputs + c2] = total;
      out[(n * outputs + c2) * outputs + c] = total;
    });
  }
};

}  // namespace variance
}  // namespace fastlaplace
