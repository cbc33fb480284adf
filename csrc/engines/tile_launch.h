// The host side of the fused tile kernel (tile_gram.h) that every op's launch code
// (csrc/cuda/<op>.h) builds on, shared by the CUDA dispatch and the host emulation so that
// the tests also check it: layer tables grouped by dtype into launches, and the split
// workspace.
//
// A Run is called as run(layers, blocks, workspace, finishing, alpha, beta): it runs
// `blocks` blocks of gram::accumulate_tile (finishing = false), then of gram::finish_tile,
// over the layer table `layers` (a std::vector<gram::Layer<...>>).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "tile_gram.h"
#include "../ops.h"

namespace fastlaplace {
namespace gram {

// Whether a launch's blocks run gram::accumulate_tile_mma (where the GPU has tensor cores
// for it) instead of gram::accumulate_tile: 16-bit inputs into float32 factors.
template <typename L>
constexpr bool uses_tensor_cores =
    (std::is_same_v<typename L::Left::input_t, c10::Half> ||
     std::is_same_v<typename L::Left::input_t, c10::BFloat16>) &&
    std::is_same_v<typename L::Left::input_t, typename L::Right::input_t> &&
    !L::Left::kSquared && !L::Right::kSquared && std::is_same_v<typename L::acc_t, float>;

// One launch over `layers`, planned for about target_blocks blocks (`like`: the device and
// dtype of its workspace), and the launch that adds its chunks if it splits rows.
template <typename L, typename Run>
void run_layers(std::vector<L>& layers, int64_t target_blocks, const at::Tensor& like,
                double alpha, double beta, const Run& run) {
  using acc_t = typename L::acc_t;
  const Plan p = plan(layers, target_blocks);
  if (p.blocks == 0) return;
  at::Tensor workspace = at::empty({p.partial_sums}, like.options());
  acc_t* partial = workspace.mutable_data_ptr<acc_t>();
  run(layers, p.blocks, partial, false, static_cast<acc_t>(alpha), static_cast<acc_t>(beta));
  if (p.finishing_blocks > 0) {
    run(layers, p.finishing_blocks, partial, true, static_cast<acc_t>(alpha),
        static_cast<acc_t>(beta));
  }
}

// X[k][i] = m[k][i] as a source, or with `transposed` X[k][i] = m[i][k].
template <typename scalar_t>
DenseRows<scalar_t> matrix_rows(const at::Tensor& m, bool transposed) {
  const int a = transposed ? 1 : 0, b = 1 - a;
  return {m.const_data_ptr<scalar_t>(), m.size(a), m.size(b), m.stride(a), m.stride(b)};
}

// The product X^T Y of two sources into out (rows out_stride apart): no ones columns, not
// symmetric.
template <typename Left, typename Right, typename acc_t>
Layer<Left, Right, acc_t> product(const Left& x, const Right& y, acc_t* out, int64_t out_stride) {
  return {x, y, false, false, false, out, x.columns, y.columns, out_stride};
}

// The indices 0 .. count - 1 grouped by key(i) (a dtype, or a pair of them): each group in
// index order, the groups in the order of their first members. One launch per group.
template <typename Key>
std::vector<std::vector<size_t>> groups_by(size_t count, const Key& key) {
  std::vector<decltype(key(size_t(0)))> keys;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < count; ++i) {
    const auto k = key(i);
    const size_t g = std::find(keys.begin(), keys.end(), k) - keys.begin();
    if (g == keys.size()) {
      keys.push_back(k);
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  return groups;
}

}  // namespace gram
}  // namespace fastlaplace
