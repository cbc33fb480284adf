// The launch code of fastlaplace::kron_inverse_precondition_ on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/kron_inverse_precondition.cu) and its
// host emulation (emulation/kron_inverse_precondition.cpp), so that the tests check it too.
#pragma once

#include "kron_precondition.h"

namespace fastlaplace {
namespace gram {

// kron_inverse_precondition_ on checked arguments (its layout) that tiles_take_gradients:
// for every layer, in place, V <- nu G^-1 V A^-1 over its blocks, as two launches over all
// layers: T = G^-1 V, a block's columns at a time, then each block's columns of T A^-1,
// into the block itself. With kl_weights the second goes to a workspace instead, block
// after block, for the KL dots k_l <V_b, U_b> (1 x 1 products of the flattened blocks, one
// launch), nu = min(1, 1 / sqrt(sum of the dots)) on the device, and nu U into the blocks
// (two foreach calls). Returns nu (1 without kl_weights) as a 0-d tensor.
template <typename Run>
at::Tensor kron_inverse_precondition_tiles(at::TensorList gradients, at::IntArrayRef blocks,
                                           at::TensorList inverses_a, at::TensorList inverses_g,
                                           const std::optional<at::Tensor>& kl_weights,
                                           const PreconditionLayout& layout,
                                           int64_t target_blocks, const Run& run) {
  const int64_t count = static_cast<int64_t>(inverses_a.size());
  const at::Tensor& like = inverses_a[0];
  at::Tensor nu = at::ones({}, like.options());
  const at::Tensor weights = kl_multipliers(kl_weights, like);
  const bool clipped = kl_weights.has_value();
  int64_t entries = 0;
  for (const at::Tensor& block : gradients) entries += block.numel();
  const at::Tensor results = at::empty({clipped ? entries : 0}, like.options());
  const int64_t block_count = static_cast<int64_t>(gradients.size());
  const at::Tensor dot = at::empty({clipped ? block_count : 0}, like.options());
  std::vector<at::Tensor> result_blocks;
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "kron_inverse_precondition_tiles", [&] {
    using Rows = DenseRows<scalar_t>;
    std::vector<Layer<Rows, Rows, scalar_t>> left, right, dots;
    std::vector<at::Tensor> keep;  // alive until the launches are queued
    for (int64_t i = 0, start = 0; i < count; ++i) {
      const at::Tensor& inverse_a = inverses_a[i];
      const int64_t d_a = inverse_a.size(0), d_g = inverses_g[i].size(0);
      const at::Tensor t = at::empty({d_g, d_a}, like.options());  // G^-1 V
      keep.push_back(t);
      for (int64_t b = layout.firsts[i], offset = 0; b < layout.firsts[i] + blocks[i];
           offset += layout.widths[b], ++b) {
        const int64_t width = layout.widths[b], size = d_g * width;
        left.push_back(product(matrix_rows<scalar_t>(inverses_g[i], true),
                               matrix_rows<scalar_t>(gradients[b].view({d_g, width}), false),
                               t.mutable_data_ptr<scalar_t>() + offset, d_a));
        scalar_t* out = clipped ? results.mutable_data_ptr<scalar_t>() + start
                                : gradients[b].mutable_data_ptr<scalar_t>();
        right.push_back(product(matrix_rows<scalar_t>(t, true),
                                matrix_rows<scalar_t>(inverse_a.narrow(1, offset, width), false),
                                out, width));
        if (!clipped) continue;
        const Rows v{gradients[b].const_data_ptr<scalar_t>(), size, 1, 1, 0};
        const Rows u{out, size, 1, 1, 0};
        dots.push_back(product(v, u, dot.mutable_data_ptr<scalar_t>() + b, 1));
        dots.back().multiplier = weights.const_data_ptr<scalar_t>() + i;
        result_blocks.push_back(results.narrow(0, start, size).view(gradients[b].sizes()));
        start += size;
      }
    }
    run_layers(left, target_blocks, like, 1.0, 0.0, run);
    run_layers(right, target_blocks, like, 1.0, 0.0, run);
    if (clipped) run_layers(dots, target_blocks, like, 1.0, 0.0, run);
  });
  if (clipped) {
    nu.copy_(device_kl_clip(dot.sum()));
    at::_foreach_mul_(result_blocks, nu);
    at::_foreach_copy_(gradients, result_blocks);
  }
  return nu;
}

}  // namespace gram
}  // namespace fastlaplace
