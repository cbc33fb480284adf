// A kernel's table of per-job structs (plain data: pointers and sizes), copied to the GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <vector>

namespace fastlaplace {

// The bytes of `entries` on `like`'s device; the kernel reads them as const T*.
template <typename T>
at::Tensor device_table(const std::vector<T>& entries, const at::Tensor& like) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(T));
  at::Tensor table = at::empty({bytes}, like.options().dtype(at::kByte));
  table.copy_(at::from_blob(const_cast<T*>(entries.data()), {bytes},
                            at::TensorOptions().dtype(at::kByte)));
  return table;
}

}  // namespace fastlaplace
