// CUDA kernel of fastlaplace::batched_eigh: every matrix small enough for one block's
// shared memory is diagonalised by the Jacobi solver of csrc/jacobi_eigh.h, one block
// per matrix and one launch per dtype for all of them; larger ones go to cuSOLVER
// (at::linalg_eigh), one after the other. torch.linalg.eigh loops over cuSOLVER's syevd
// per matrix above n = 32, which is what the one-launch path avoids.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_eigh.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../jacobi_eigh.h"
#include "../ops.h"
#include "device_table.h"

namespace fastlaplace {
namespace {

// One matrix of the launch: its contiguous input, and where its eigenpairs go.
template <typename scalar_t>
struct Job {
  const scalar_t* input;
  scalar_t* values;
  scalar_t* vectors;  // row j: eigenvector j (the caller returns the transpose)
  int n;
};

template <typename scalar_t>
__global__ void jacobi_eigh_kernel(const Job<scalar_t>* jobs) {
  extern __shared__ double shared[];
  const Job<scalar_t> job = jobs[blockIdx.x];
  const jacobi::Workspace workspace = jacobi::carve(shared, job.n);
  jacobi::eigh(DeviceThreads{}, workspace, job.input, job.n, job.values, job.vectors,
               jacobi::max_sweeps<scalar_t>());
}

// Threads per block: enough for a round's pair updates at the largest size, in warps.
int64_t block_threads(int64_t n) {
  const int64_t work = (n + 1) / 2 * n;
  return std::clamp<int64_t>((work / 4 + 31) / 32 * 32, 32, 256);
}

// Diagonalises matrices[i] for i in `which` (all of scalar_t, on one device) in one launch.
template <typename scalar_t>
void launch_jacobi(at::TensorList matrices, const std::vector<int64_t>& which,
                   std::vector<at::Tensor>& values, std::vector<at::Tensor>& vectors) {
  std::vector<Job<scalar_t>> jobs;
  std::vector<at::Tensor> inputs;  // kept alive until the launch is queued
  int64_t largest = 0;
  for (int64_t i : which) {
    const at::Tensor input = matrices[i].contiguous();
    const int64_t n = input.size(0);
    values[i] = at::empty({n}, input.options());
    const at::Tensor rows = at::empty({n, n}, input.options());
    vectors[i] = rows.t();  // eigenvectors as columns, column-major like cuSOLVER's
    jobs.push_back({input.const_data_ptr<scalar_t>(), values[i].mutable_data_ptr<scalar_t>(),
                    rows.mutable_data_ptr<scalar_t>(), static_cast<int>(n)});
    inputs.push_back(input);
    largest = std::max(largest, n);
  }
  const at::Tensor table = device_table(jobs, matrices[which[0]]);
  const int64_t threads = block_threads(largest);
  const size_t shared = jacobi::workspace_elements(largest, threads) * sizeof(double);
  C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eigh_kernel<scalar_t>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared)));
  jacobi_eigh_kernel<scalar_t>
      <<<static_cast<unsigned>(jobs.size()), static_cast<unsigned>(threads), shared,
         c10::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const Job<scalar_t>*>(table.const_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_eigh_cuda(
    at::TensorList matrices) {
  const int64_t count = static_cast<int64_t>(matrices.size());
  check_finite_square_matrices(matrices, "its eigendecomposition is undefined");
  std::vector<at::Tensor> values(count), vectors(count);
  if (count == 0) return {values, vectors};
  const c10::cuda::CUDAGuard guard(matrices[0].device());
  // The Jacobi solver's shared memory must fit the device's per-block limit.
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        matrices[0].device().index()));
  std::vector<int64_t> small_float, small_double;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = matrices[i].size(0);
    const int64_t shared =
        jacobi::workspace_elements(n, block_threads(n)) * static_cast<int64_t>(sizeof(double));
    if (n > jacobi::kMaxSize || shared > limit) {
      std::tie(values[i], vectors[i]) = at::linalg_eigh(matrices[i]);
    } else {
      (matrices[i].scalar_type() == at::kFloat ? small_float : small_double).push_back(i);
    }
  }
  if (!small_float.empty()) launch_jacobi<float>(matrices, small_float, values, vectors);
  if (!small_double.empty()) launch_jacobi<double>(matrices, small_double, values, vectors);
  return {values, vectors};
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("batched_eigh", &fastlaplace::batched_eigh_cuda);
}
