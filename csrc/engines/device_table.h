// A kernel's table of per-job structs (plain data: pointers and sizes), copied to the GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

namespace fastlaplace {

// The bytes of `entries` on `like`'s device; the kernel reads them as const T*. They go
// through pinned memory by an asynchronous copy on the current stream: a copy from
// pageable memory would wait for the stream's earlier work, a host synchronisation at
// every launch. The caching host allocator keeps the pinned bytes until the copy is done.
template <typename T>
at::Tensor device_table(const std::vector<T>& entries, const at::Tensor& like) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(T));
  at::Tensor staged =
      at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes > 0) std::memcpy(staged.mutable_data_ptr(), entries.data(), bytes);
  at::Tensor table = at::empty({bytes}, like.options().dtype(at::kByte));
  table.copy_(staged, /*non_blocking=*/true);
  return table;
}

}  // namespace fastlaplace
