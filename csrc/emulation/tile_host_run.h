// The host side of the emulated tile kernel: the launches of the CUDA curvature ops' fused
// tile kernel (csrc/engines/tile_gram.h, and csrc/engines/product_sums.h's sums) run on the
// host, every block in turn and each phase for every thread id in turn (the tensor cores'
// warp operations by plain float32 loops), so that the tests check the kernel's arithmetic
// where there is no GPU. target_blocks plays the GPU's size (it decides when rows are
// split); reverse_order runs blocks and threads from the last, for the tests' race check
// (see HostThreads). Each op's emulation (emulation/<op>.cpp) runs its CUDA launch code
// (csrc/cuda/<op>.h) with these. Not a fast path.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../engines/product_sums.h"
#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace emulation {

// The warps' tensor-core fragments of gram::accumulate_tile_mma: lane 0 of a warp does the
// warp's collective operation, with float32 arithmetic.
struct HostFragments {
  static constexpr int kElements = gram::kFragment * gram::kFragment;  // row-major
  std::vector<float> running, stage;

  HostFragments()
      : running(gram::kWarps * gram::kFragmentsPerWarp * kElements),
        stage(gram::kWarps * gram::kFragmentsPerWarp * kElements) {}
  static float* of(std::vector<float>& fragments, int t, int f) {
    return fragments.data() + ((t / 32) * gram::kFragmentsPerWarp + f) * kElements;
  }
  void zero(int t) {
    if (t % 32 != 0) return;
    for (int f = 0; f < gram::kFragmentsPerWarp; ++f) {
      std::fill_n(of(running, t, f), kElements, 0.0f);
      std::fill_n(of(stage, t, f), kElements, 0.0f);
    }
  }
  template <typename half_t>
  void multiply(int t, int f, const half_t* a, const half_t* b, int ldm) {
    if (t % 32 != 0) return;
    float* c = of(stage, t, f);
    for (int i = 0; i < gram::kFragment; ++i) {
      for (int j = 0; j < gram::kFragment; ++j) {
        float sum = c[i * gram::kFragment + j];
        for (int k = 0; k < gram::kFragment; ++k) {
          sum += static_cast<float>(a[k * ldm + i]) * static_cast<float>(b[k * ldm + j]);
        }
        c[i * gram::kFragment + j] = sum;
      }
    }
  }
  void finish_stage(int t) {
    if (t % 32 != 0) return;
    for (int f = 0; f < gram::kFragmentsPerWarp; ++f) {
      float* sums = of(running, t, f);
      float* products = of(stage, t, f);
      for (int e = 0; e < kElements; ++e) {
        sums[e] += products[e];
        products[e] = 0.0f;
      }
    }
  }
  void store(int t, int f, float* out, int ldm) {
    if (t % 32 != 0) return;
    const float* sums = of(running, t, f);
    for (int i = 0; i < gram::kFragment; ++i) {
      std::copy_n(sums + i * gram::kFragment, gram::kFragment, out + i * ldm);
    }
  }
};

// Runs the launches in thread and block order, or in reverse (see HostThreads).
struct HostRun {
  bool reversed;
  template <typename L>
  void operator()(const std::vector<L>& layers, int64_t blocks, typename L::acc_t* workspace,
                  bool finishing, typename L::acc_t alpha, typename L::acc_t beta) const {
    using acc_t = typename L::acc_t;
    const HostThreads threads{gram::kThreads, reversed};
    const int64_t count = static_cast<int64_t>(layers.size());
    if (finishing) {
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::finish_tile(threads, layers.data(), count, workspace, block, alpha, beta);
      });
    } else if constexpr (gram::uses_tensor_cores<L>) {
      using half_t = typename L::Left::input_t;
      auto stage = std::make_unique<gram::MmaStage<half_t>>();
      HostFragments fragments;
      HostRegisters<half_t, gram::staged_values<gram::kMmaDepth>()> staged(gram::kThreads);
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::accumulate_tile_mma(threads, *stage, fragments, staged, layers.data(), count,
                                  workspace, block, alpha, beta);
      });
    } else {
      auto stage = std::make_unique<gram::Stage<acc_t>>();
      HostRegisters<acc_t, gram::kMicro * gram::kMicro> sums(gram::kThreads);
      HostRegisters<acc_t, gram::staged_values<gram::kDepth>()> staged(gram::kThreads);
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::accumulate_tile(threads, *stage, sums, staged, layers.data(), count, workspace,
                              block, alpha, beta);
      });
    }
  }
};

struct HostProductSums {
  bool reversed;
  template <typename scalar_t>
  void operator()(const variance::ProductSums<scalar_t>& sums) const {
    std::vector<scalar_t> lane_sums(variance::kThreads);
    host_blocks(sums.blocks(), reversed, [&](int64_t block) {
      sums.block_sums(HostThreads{variance::kThreads, reversed}, lane_sums.data(), block);
    });
  }
};

inline void check_target_blocks(int64_t target_blocks) {
  TORCH_CHECK(target_blocks >= 1, "target_blocks must be at least 1, got ", target_blocks);
}

}  // namespace emulation
}  // namespace fastlaplace
