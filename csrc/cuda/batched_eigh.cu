// CUDA kernel of fastlaplace::batched_eigh: every matrix small enough for one block's
// shared memory is diagonalised by the Jacobi solver of csrc/engines/jacobi_eigh.h, one block
// per matrix and one launch per dtype for all of them; larger ones go to cuSOLVER
// (at::linalg_eigh), several at once on streams of their own. torch.linalg.eigh loops over
// cuSOLVER's syevd per matrix above n = 32, waiting for each, which is what both paths
// avoid.
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_eigh.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <thread>
#include <tuple>
#include <vector>

#include "../engines/jacobi_eigh.h"
#include "../ops.h"
#include "../engines/device_table.h"

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

// The most cuSOLVER solves batched_eigh keeps on the GPU at once.
constexpr size_t kSolverLanes = 8;

// A CUDA event, destroyed with its owner (a pending one is released once it completes).
struct Event {
  cudaEvent_t event;
  explicit Event(cudaStream_t stream) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event, stream));
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { cudaEventDestroy(event); }
};

// Diagonalises matrices[i] for i in `which` by cuSOLVER (at::linalg_eigh). Its error check
// waits for the GPU after every matrix, so up to kSolverLanes host threads (each with the
// caller's thread-local state) solve on streams of torch's pool, several matrices on the
// GPU at once, and none waits for the caller's stream beyond `inputs_ready`. The caller's
// stream waits for them before anything it queues later.
void solve_concurrently(at::TensorList matrices, const std::vector<int64_t>& which,
                        const Event& inputs_ready, std::vector<at::Tensor>& values,
                        std::vector<at::Tensor>& vectors) {
  const size_t lanes = std::min(kSolverLanes, which.size());
  if (lanes == 0) return;
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
  const at::ThreadLocalState state;
  std::vector<c10::cuda::CUDAStream> streams;
  for (size_t lane = 0; lane < lanes; ++lane) {
    streams.push_back(c10::cuda::getStreamFromPool(false, caller.device_index()));
  }
  std::vector<std::exception_ptr> errors(lanes);
  std::vector<std::thread> threads;
  for (size_t lane = 0; lane < lanes; ++lane) {
    threads.emplace_back([&, lane] {
      try {
        const at::ThreadLocalStateGuard local(state);
        const c10::cuda::CUDAStreamGuard guard(streams[lane]);
        C10_CUDA_CHECK(cudaStreamWaitEvent(streams[lane].stream(), inputs_ready.event, 0));
        for (size_t k = lane; k < which.size(); k += lanes) {
          const int64_t i = which[k];
          // The allocator learns which streams use which memory: the input is read on the
          // pooled stream, and the results made there are read on the caller's.
          at::Tensor(matrices[i]).record_stream(streams[lane]);
          std::tie(values[i], vectors[i]) = at::linalg_eigh(matrices[i]);
          values[i].record_stream(caller);
          vectors[i].record_stream(caller);
        }
      } catch (...) {
        errors[lane] = std::current_exception();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const c10::cuda::CUDAStream& stream : streams) {
    const Event done(stream.stream());
    C10_CUDA_CHECK(cudaStreamWaitEvent(caller.stream(), done.event, 0));
  }
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
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
  std::vector<int64_t> small_float, small_double, large;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = matrices[i].size(0);
    const int64_t shared =
        jacobi::workspace_elements(n, block_threads(n)) * static_cast<int64_t>(sizeof(double));
    if (n > jacobi::kMaxSize || shared > limit) {
      large.push_back(i);
    } else {
      (matrices[i].scalar_type() == at::kFloat ? small_float : small_double).push_back(i);
    }
  }
  // The inputs are ready after the caller's work so far; the Jacobi launches, queued first,
  // run while the host waits for cuSOLVER.
  const Event inputs_ready(c10::cuda::getCurrentCUDAStream().stream());
  if (!small_float.empty()) launch_jacobi<float>(matrices, small_float, values, vectors);
  if (!small_double.empty()) launch_jacobi<double>(matrices, small_double, values, vectors);
  solve_concurrently(matrices, large, inputs_ready, values, vectors);
  return {values, vectors};
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("batched_eigh", &fastlaplace::batched_eigh_cuda);
}
