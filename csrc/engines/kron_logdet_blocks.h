// The one-launch Kron log-determinant of the CUDA kron_logdet, written once for the GPU
// (csrc/cuda/kron_logdet.cu) and for its host emulation (csrc/emulation/kron_logdet.cpp,
// for the tests); see host_device.h for how.
//
// log det P_l = sum_ij log(s_l mu_j lambda_i + delta_l) for every layer l of the call: the
// layers' (d_G, d_A) grids are cut into runs of blocks in one launch, with no temporary of
// a grid's size. Each block writes its float64 partial sum to its own slot, and a second
// launch adds each layer's slots in block order: no atomics, so the result does not change
// from run to run.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "host_device.h"
#include "../ops.h"

namespace fastlaplace {
namespace logdet {

constexpr int kThreads = 256;
// A block takes at least this many grid entries per thread, a layer at most this many
// blocks.
constexpr int64_t kEntriesPerThread = 16;
constexpr int64_t kMaxBlocksPerLayer = 1024;

template <typename scalar_t>
struct Layer {
  const scalar_t* eigvals_a;
  int64_t size_a;
  const scalar_t* eigvals_g;
  int64_t size_g;
  const double* scale;  // this layer's s_l and delta_l, where the eigenvalues are
  const double* delta;
  int64_t first_block = 0, blocks = 0;
};

// x < 0 ? 0 : x keeps NaN, as torch.clamp_min does (fmax would drop it).
template <typename scalar_t>
FL_HOST_DEVICE double clamped(scalar_t x) {
  return x < 0 ? 0.0 : static_cast<double>(x);
}

// Block `block` of the first launch: its share of its layer's grid into partial[block].
// slots: kThreads doubles of shared memory.
template <typename scalar_t, typename Threads>
FL_HOST_DEVICE void block_log_sum(const Threads& threads, double* slots,
                                  const Layer<scalar_t>* layers, int64_t count, int64_t block,
                                  double* partial) {
  const Layer<scalar_t>& layer = layers[job_of_block(
      layers, count, block, [](const Layer<scalar_t>& l) { return l.first_block; })];
  const int64_t total = layer.size_a * layer.size_g;
  const int64_t step = layer.blocks * kThreads;
  threads.each([&](int t) {
    double sum = 0.0;
    for (int64_t e = (block - layer.first_block) * kThreads + t; e < total; e += step) {
      const double mu = clamped(layer.eigvals_g[e / layer.size_a]);
      const double lambda = clamped(layer.eigvals_a[e % layer.size_a]);
      sum += std::log(*layer.scale * mu * lambda + *layer.delta);
    }
    slots[t] = sum;
  });
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    threads.each([&](int t) {
      if (t < stride) slots[t] += slots[t + stride];
    });
  }
  threads.each([&](int t) {
    if (t == 0) partial[block] = slots[0];
  });
}

// Layer l's log det: its blocks' partial sums in block order.
template <typename scalar_t>
FL_HOST_DEVICE void layer_log_sum(const Layer<scalar_t>* layers, int64_t l,
                                  const double* partial, scalar_t* out) {
  double sum = 0.0;
  for (int64_t b = 0; b < layers[l].blocks; ++b) sum += partial[layers[l].first_block + b];
  out[l] = static_cast<scalar_t>(sum);
}

// kron_logdet's checks, and its layers with their blocks (keep: the contiguous float64
// and eigenvalue tensors they point into). Returns the launch's block count.
template <typename scalar_t>
int64_t plan(at::TensorList eigvals_a, at::TensorList eigvals_g, const at::Tensor& scale,
             const at::Tensor& delta, std::vector<Layer<scalar_t>>& layers,
             std::vector<at::Tensor>& keep) {
  const int64_t count = static_cast<int64_t>(eigvals_a.size());
  check_same_device(scale, eigvals_a[0], "scale");
  check_same_device(delta, eigvals_a[0], "delta");
  keep.push_back(scale.to(at::kDouble).contiguous());
  keep.push_back(delta.to(at::kDouble).contiguous());
  const double* scales = keep[0].const_data_ptr<double>();
  const double* deltas = keep[1].const_data_ptr<double>();
  int64_t blocks = 0;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(eigvals_a[i].dim() == 1 && eigvals_g[i].dim() == 1 &&
                    eigvals_a[i].scalar_type() == eigvals_a[0].scalar_type() &&
                    eigvals_g[i].scalar_type() == eigvals_a[0].scalar_type(),
                "eigvals_a[", i, "] and eigvals_g[", i, "] must be 1-D and of one dtype");
    check_same_device(eigvals_a[i], eigvals_a[0], "eigvals_a");
    check_same_device(eigvals_g[i], eigvals_a[0], "eigvals_g");
    keep.push_back(eigvals_a[i].contiguous());
    keep.push_back(eigvals_g[i].contiguous());
    const at::Tensor& a = keep[keep.size() - 2];
    const at::Tensor& g = keep.back();
    Layer<scalar_t> layer{a.const_data_ptr<scalar_t>(), a.numel(), g.const_data_ptr<scalar_t>(),
                          g.numel(), scales + i, deltas + i};
    const int64_t per_block = kThreads * kEntriesPerThread;
    layer.first_block = blocks;
    layer.blocks =
        std::min(kMaxBlocksPerLayer, (a.numel() * g.numel() + per_block - 1) / per_block);
    blocks += layer.blocks;
    layers.push_back(layer);
  }
  return blocks;
}

// kron_logdet with run(layers, blocks, partial, out) running both launches.
template <typename Run>
at::Tensor kron_logdet_blocks(at::TensorList eigvals_a, at::TensorList eigvals_g,
                              const at::Tensor& scale, const at::Tensor& delta, const Run& run) {
  const int64_t count = static_cast<int64_t>(eigvals_a.size());
  TORCH_CHECK(count > 0 && static_cast<int64_t>(eigvals_g.size()) == count,
              "kron_logdet: eigvals_a and eigvals_g need one entry per layer");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == count && delta.dim() == 1 &&
                  delta.size(0) == count,
              "kron_logdet: scale and delta must be (", count, ",)");
  check_factor_dtype(eigvals_a[0], "eigvals_a", 0);
  at::Tensor out = at::empty({count}, eigvals_a[0].options());
  AT_DISPATCH_FLOATING_TYPES(eigvals_a[0].scalar_type(), "kron_logdet_blocks", [&] {
    std::vector<Layer<scalar_t>> layers;
    std::vector<at::Tensor> keep;  // alive until the launches are queued
    const int64_t blocks = plan(eigvals_a, eigvals_g, scale, delta, layers, keep);
    at::Tensor partial = at::empty({blocks}, out.options().dtype(at::kDouble));
    run(layers, blocks, partial.mutable_data_ptr<double>(), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace logdet
}  // namespace fastlaplace
