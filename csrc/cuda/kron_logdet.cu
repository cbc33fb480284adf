// CUDA kernel of fastlaplace::kron_logdet: log det P_l = sum_ij log(s mu_j lambda_i + delta)
// per layer, one grid-stride pass over the (d_G, d_A) grid with no temporary of its
// size. Each block writes its float64 partial sum to its own slot, and the slots are
// summed afterwards: no atomics, so the result does not change from run to run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"

namespace fastlaplace {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

template <typename scalar_t>
__global__ void kron_logdet_kernel(const scalar_t* __restrict__ eigvals_a, int64_t size_a,
                                   const scalar_t* __restrict__ eigvals_g, int64_t size_g,
                                   const scalar_t* __restrict__ scale,
                                   const scalar_t* __restrict__ delta, int64_t layer,
                                   double* __restrict__ block_sums) {
  __shared__ double partial[kThreads];
  const double s = static_cast<double>(scale[layer]);
  const double d = static_cast<double>(delta[layer]);
  double sum = 0.0;
  const int64_t total = size_a * size_g;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // x < 0 ? 0 : x keeps NaN, as torch.clamp_min does (fmax would drop it).
    const double g = static_cast<double>(eigvals_g[e / size_a]);
    const double a = static_cast<double>(eigvals_a[e % size_a]);
    const double mu = g < 0 ? 0.0 : g;
    const double lambda = a < 0 ? 0.0 : a;
    sum += log(s * mu * lambda + d);
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_sums[blockIdx.x] = partial[0];
}

at::Tensor kron_logdet_cuda(at::TensorList eigvals_a, at::TensorList eigvals_g,
                            const at::Tensor& scale, const at::Tensor& delta) {
  const int64_t layers = static_cast<int64_t>(eigvals_a.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(eigvals_g.size()) == layers,
              "kron_logdet: eigvals_a and eigvals_g need one entry per layer");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == layers && delta.dim() == 1 &&
                  delta.size(0) == layers,
              "kron_logdet: scale and delta must be (", layers, ",)");
  const c10::cuda::CUDAGuard guard(eigvals_a[0].device());
  const at::ScalarType dtype = eigvals_a[0].scalar_type();
  check_factor_dtype(eigvals_a[0], "eigvals_a", 0);
  const at::Tensor scales = scale.to(dtype).contiguous();
  const at::Tensor deltas = delta.to(dtype).contiguous();
  // One row of block partial sums per layer; unused slots stay 0.
  at::Tensor block_sums =
      at::zeros({layers, kMaxBlocks}, eigvals_a[0].options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t i = 0; i < layers; ++i) {
    TORCH_CHECK(eigvals_a[i].dim() == 1 && eigvals_g[i].dim() == 1 &&
                    eigvals_a[i].scalar_type() == dtype && eigvals_g[i].scalar_type() == dtype,
                "eigvals_a[", i, "] and eigvals_g[", i, "] must be 1-D and of one dtype");
    check_same_device(eigvals_a[i], eigvals_a[0], "eigvals_a");
    check_same_device(eigvals_g[i], eigvals_a[0], "eigvals_g");
    const at::Tensor la = eigvals_a[i].contiguous();
    const at::Tensor lg = eigvals_g[i].contiguous();
    const int64_t total = la.numel() * lg.numel();
    if (total == 0) continue;
    const int64_t blocks = std::min(kMaxBlocks, (total + kThreads - 1) / kThreads);
    AT_DISPATCH_FLOATING_TYPES(dtype, "kron_logdet_cuda", [&] {
      kron_logdet_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          la.data_ptr<scalar_t>(), la.numel(), lg.data_ptr<scalar_t>(), lg.numel(),
          scales.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(), i,
          block_sums[i].data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return block_sums.sum(1).to(dtype);
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_logdet", &fastlaplace::kron_logdet_cuda);
}
