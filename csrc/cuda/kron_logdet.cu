// CUDA kernel of fastlaplace::kron_logdet: every layer's log det in one launch of
// csrc/engines/kron_logdet_blocks.h's blocks and one that adds each layer's block sums, on the
// current stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../engines/kron_logdet_blocks.h"
#include "../engines/device_table.h"

namespace fastlaplace {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(logdet::kThreads)
    block_log_sum_kernel(const logdet::Layer<scalar_t>* layers, int64_t count, double* partial) {
  __shared__ double slots[logdet::kThreads];
  logdet::block_log_sum(DeviceThreads{}, slots, layers, count, blockIdx.x, partial);
}

template <typename scalar_t>
__global__ void layer_log_sum_kernel(const logdet::Layer<scalar_t>* layers, int64_t count,
                                     const double* partial, scalar_t* out) {
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l < count) logdet::layer_log_sum(layers, l, partial, out);
}

struct DeviceRun {
  at::Tensor like;
  template <typename scalar_t>
  void operator()(const std::vector<logdet::Layer<scalar_t>>& layers, int64_t blocks,
                  double* partial, scalar_t* out) const {
    const at::Tensor table = device_table(layers, like);
    const auto* on_device =
        reinterpret_cast<const logdet::Layer<scalar_t>*>(table.const_data_ptr());
    const int64_t count = static_cast<int64_t>(layers.size());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (blocks > 0) {
      block_log_sum_kernel<scalar_t>
          <<<static_cast<unsigned>(blocks), logdet::kThreads, 0, stream>>>(on_device, count,
                                                                             partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    constexpr int threads = 128;
    layer_log_sum_kernel<scalar_t>
        <<<static_cast<unsigned>((count + threads - 1) / threads), threads, 0, stream>>>(
            on_device, count, partial, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor kron_logdet_cuda(at::TensorList eigvals_a, at::TensorList eigvals_g,
                            const at::Tensor& scale, const at::Tensor& delta) {
  TORCH_CHECK(!eigvals_a.empty(), "kron_logdet needs at least one layer");
  const c10::cuda::CUDAGuard guard(eigvals_a[0].device());
  return logdet::kron_logdet_blocks(eigvals_a, eigvals_g, scale, delta, DeviceRun{eigvals_a[0]});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_logdet", &fastlaplace::kron_logdet_cuda);
}
