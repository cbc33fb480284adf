// Code written once for a CUDA block and for its host emulation (the tests' way to check
// a kernel's arithmetic where there is no GPU): the function qualifier, and the two ways
// of running a block's threads. A block's work is a sequence of phases separated by
// barriers; on the GPU each phase is the thread's own call followed by __syncthreads(),
// on the host a phase runs for every thread id in turn, which is the same computation in
// the same order per thread.
#pragma once

#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__
#define FL_UNROLL _Pragma("unroll")
#else
#define FL_HOST_DEVICE
#define FL_UNROLL
#endif

namespace fastlaplace {

// A CUDA block: a phase is the calling thread's call, then a barrier.
struct DeviceThreads {
  FL_HOST_DEVICE int64_t count() const {
#ifdef __CUDA_ARCH__
    return blockDim.x;
#else
    return 1;
#endif
  }
  template <typename Phase>
  FL_HOST_DEVICE void each(Phase phase) const {
#ifdef __CUDA_ARCH__
    phase(static_cast<int>(threadIdx.x));
    __syncthreads();
#endif
  }
};

// A block of `threads` threads on one host thread: a phase runs for every thread id, from
// the first or (reversed) from the last. A kernel whose results differ between the two
// orders has a thread that reads or writes what another writes in the same phase: a race
// on the GPU, where the threads of a phase run in any order.
struct HostThreads {
  int64_t threads;
  bool reversed = false;
  int64_t count() const { return threads; }
  template <typename Phase>
  void each(Phase phase) const {
    for (int64_t i = 0; i < threads; ++i) phase(static_cast<int>(reversed ? threads - 1 - i : i));
  }
};

// run(block) for every block of a launch on the host, from the first or (reversed) from the
// last: the blocks of a launch run in any order on the GPU too.
template <typename Run>
void host_blocks(int64_t blocks, bool reversed, Run run) {
  for (int64_t i = 0; i < blocks; ++i) run(reversed ? blocks - 1 - i : i);
}

// Values each thread keeps across phases (registers on the GPU): of(t) is thread t's N.
template <typename T, int N>
struct DeviceRegisters {
  T values[N];
  FL_HOST_DEVICE T* of(int) { return values; }
};

template <typename T, int N>
struct HostRegisters {
  std::vector<T> values;
  explicit HostRegisters(int64_t threads) : values(threads * N) {}
  T* of(int t) { return values.data() + static_cast<int64_t>(t) * N; }
};

// The job that block `block` of a launch belongs to, when jobs[0, count) take consecutive
// runs of blocks in order and first(job) is a job's first block: the last job whose first
// block is at most `block` (a job without blocks shares its first block with the next one,
// which wins).
template <typename Job, typename First>
FL_HOST_DEVICE int64_t job_of_block(const Job* jobs, int64_t count, int64_t block,
                                    First first) {
  int64_t low = 0;
  for (int64_t span = count; span > 1;) {  // jobs[low, low + span) holds the answer
    const int64_t half = span / 2;
    if (first(jobs[low + half]) <= block) {
      low += half;
      span -= half;
    } else {
      span = half;
    }
  }
  return low;
}

}  // namespace fastlaplace
