// The CUDA launches of the fused tile kernel (csrc/engines/tile_gram.h) for factor_accumulate_,
// conv_input_factor_, diag_ggn and kron_solve: one block of gram::kThreads threads per
// (tile, row chunk), all layers of a call in one launch per dtype, on the current stream;
// 16-bit inputs into float32 factors on the tensor cores (WMMA, compute capability 8.0 and
// later).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <vector>

#include "tile_launch.h"
#include "device_table.h"

namespace fastlaplace {
namespace gram {

template <typename L>
__global__ void __launch_bounds__(kThreads)
    accumulate_tiles_kernel(const L* layers, int64_t count, typename L::acc_t* workspace,
                            typename L::acc_t alpha, typename L::acc_t beta) {
  __shared__ Stage<typename L::acc_t> stage;
  DeviceRegisters<typename L::acc_t, kMicro * kMicro> sums;
  DeviceRegisters<typename L::acc_t, staged_values<kDepth>()> staged;
  accumulate_tile(DeviceThreads{}, stage, sums, staged, layers, count, workspace, blockIdx.x,
                  alpha, beta);
}

template <typename L>
__global__ void __launch_bounds__(kThreads)
    finish_tiles_kernel(const L* layers, int64_t count, const typename L::acc_t* workspace,
                        typename L::acc_t alpha, typename L::acc_t beta) {
  finish_tile(DeviceThreads{}, layers, count, workspace, blockIdx.x, alpha, beta);
}

// The 16-bit type the WMMA fragments take for a c10 one (the same bits).
template <typename half_t>
struct Wmma;
template <>
struct Wmma<c10::Half> {
  using type = __half;
};
template <>
struct Wmma<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// A warp's accumulators of gram::accumulate_tile_mma, every method called by all its lanes.
template <typename half_t>
struct DeviceFragments {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kFragment, kFragment,
                                             kFragment, float>;
  Accumulator running[kFragmentsPerWarp], stage[kFragmentsPerWarp];
#endif

  __device__ void zero(int) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FL_UNROLL for (int f = 0; f < kFragmentsPerWarp; ++f) {
      nvcuda::wmma::fill_fragment(running[f], 0.0f);
      nvcuda::wmma::fill_fragment(stage[f], 0.0f);
    }
#endif
  }
  __device__ void multiply(int, int f, const half_t* a, const half_t* b, int ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    using element = typename Wmma<half_t>::type;
    wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, element, wmma::col_major> x;
    wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, element, wmma::row_major> y;
    wmma::load_matrix_sync(x, reinterpret_cast<const element*>(a), ldm);
    wmma::load_matrix_sync(y, reinterpret_cast<const element*>(b), ldm);
    wmma::mma_sync(stage[f], x, y, stage[f]);
#endif
  }
  __device__ void finish_stage(int) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // Accumulator fragments of one type share their layout: add element by element.
    FL_UNROLL for (int f = 0; f < kFragmentsPerWarp; ++f) {
      FL_UNROLL for (int e = 0; e < running[f].num_elements; ++e) {
        running[f].x[e] += stage[f].x[e];
        stage[f].x[e] = 0.0f;
      }
    }
#endif
  }
  __device__ void store(int, int f, float* out, int ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    nvcuda::wmma::store_matrix_sync(out, running[f], ldm, nvcuda::wmma::mem_row_major);
#endif
  }
};

template <typename L>
__global__ void __launch_bounds__(kThreads)
    accumulate_tiles_mma_kernel(const L* layers, int64_t count, float* workspace, float alpha,
                                float beta) {
  using half_t = typename L::Left::input_t;
  __shared__ MmaStage<half_t> stage;
  DeviceFragments<half_t> fragments;
  DeviceRegisters<half_t, staged_values<kMmaDepth>()> staged;
  accumulate_tile_mma(DeviceThreads{}, stage, fragments, staged, layers, count, workspace,
                      blockIdx.x, alpha, beta);
}

// Whether the device of `t` has the tensor cores that accumulate_tiles_mma_kernel uses.
inline bool has_tensor_cores(const at::Tensor& t) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        t.device().index()));
  return major >= 8;
}

struct DeviceRun {
  at::Tensor like;  // a factor of the call: its device and stream
  template <typename L>
  void operator()(const std::vector<L>& layers, int64_t blocks, typename L::acc_t* workspace,
                  bool finishing, typename L::acc_t alpha, typename L::acc_t beta) const {
    const at::Tensor table = device_table(layers, like);
    const L* on_device = reinterpret_cast<const L*>(table.const_data_ptr());
    const int64_t count = static_cast<int64_t>(layers.size());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(blocks));
    if (finishing) {
      finish_tiles_kernel<L><<<grid, kThreads, 0, stream>>>(on_device, count, workspace, alpha,
                                                            beta);
    } else if (uses_tensor_cores<L> && has_tensor_cores(like)) {
      if constexpr (uses_tensor_cores<L>) {
        accumulate_tiles_mma_kernel<L><<<grid, kThreads, 0, stream>>>(on_device, count,
                                                                      workspace, alpha, beta);
      }
    } else {
      accumulate_tiles_kernel<L><<<grid, kThreads, 0, stream>>>(on_device, count, workspace,
                                                                alpha, beta);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Blocks that fill the GPU of `t`: a launch with fewer tiles splits its rows.
inline int64_t target_blocks(const at::Tensor& t) {
  int processors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount,
                                        t.device().index()));
  return 4 * static_cast<int64_t>(processors);
}

}  // namespace gram
}  // namespace fastlaplace
