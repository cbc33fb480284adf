// The launch code of fastlaplace::kron_precondition_ on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/kron_precondition.cu) and its host
// emulation (emulation/kron_precondition.cpp), so that the tests check it too.
#pragma once

#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

// Whether kron_precondition_tiles and kron_inverse_precondition_tiles take these gradients:
// in the dtype of the layer's matrices (mats_a: eigenvectors or inverses), and each block's
// (d_G, width) rows a view of it with unit column stride.
inline bool tiles_take_gradients(at::TensorList gradients, at::IntArrayRef blocks,
                                 at::TensorList mats_a, const PreconditionLayout& layout) {
  for (size_t i = 0; i < mats_a.size(); ++i) {
    for (int64_t b = layout.firsts[i]; b < layout.firsts[i] + blocks[i]; ++b) {
      const at::Tensor& block = gradients[b];
      if (block.scalar_type() != mats_a[i].scalar_type() || !block.is_contiguous()) {
        return false;
      }
    }
  }
  return true;
}

// The KL weights k_l of a preconditioning call in the dtype of `like`, on its device (each
// KL dot's multiplier), where given.
inline at::Tensor kl_multipliers(const std::optional<at::Tensor>& kl_weights,
                                 const at::Tensor& like) {
  return kl_weights.has_value() ? kl_weights->to(like.scalar_type()).contiguous() : at::Tensor();
}

// kron_precondition_ on checked arguments (check_kron_precondition's layout) that
// tiles_take_gradients: for every layer, in place, V <- nu Q_G [(Q_G^T V Q_A) * S] Q_A^T
// over its blocks V = [block_1 | block_2 | ...], as six launches over all layers (each
// block's columns its own product where V is read or written; the KL dots
// k_l <R, R * S> = k_l <V, result> as 1 x 1 products), nu = min(1, 1 / sqrt(sum of the
// dots)) on the device. Returns nu (1 without kl_weights) as a 0-d tensor.
template <typename Run>
at::Tensor kron_precondition_tiles(at::TensorList gradients, at::IntArrayRef blocks,
                                   at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                   at::TensorList inverse_spectra,
                                   const std::optional<at::Tensor>& kl_weights,
                                   const PreconditionLayout& layout, int64_t target_blocks,
                                   const Run& run) {
  const int64_t count = static_cast<int64_t>(eigvecs_a.size());
  const at::Tensor& like = eigvecs_a[0];
  at::Tensor nu = at::ones({}, like.options());
  const at::Tensor weights = kl_multipliers(kl_weights, like);
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "kron_precondition_tiles", [&] {
    using Rows = DenseRows<scalar_t>;
    using Product = Layer<Rows, Rows, scalar_t>;
    using Weighted = Layer<Rows, ScaledRows<scalar_t>, scalar_t>;
    std::vector<Product> rotate, project, write;
    std::vector<Weighted> dots, weigh;
    std::vector<at::Tensor> keep;  // alive until the launches are queued
    const at::Tensor dot = at::empty({count}, like.options());
    for (int64_t i = 0; i < count; ++i) {
      const at::Tensor& qa = eigvecs_a[i];
      const at::Tensor& qg = eigvecs_g[i];
      const int64_t d_a = qa.size(0), d_g = qg.size(0);
      const at::Tensor first = at::empty({d_g, d_a}, like.options());  // Q_G^T V, later Q_G (R S)
      const at::Tensor rotated = at::empty({d_g, d_a}, like.options());  // R = Q_G^T V Q_A
      const at::Tensor spectrum = inverse_spectra[i].contiguous();
      keep.insert(keep.end(), {first, rotated, spectrum});
      for (int64_t b = layout.firsts[i], offset = 0; b < layout.firsts[i] + blocks[i];
           offset += layout.widths[b], ++b) {
        const int64_t width = layout.widths[b];
        // Q_G^T V, a block's columns at a time; at the end the result, into the block.
        rotate.push_back(product(matrix_rows<scalar_t>(qg, false),
                                 matrix_rows<scalar_t>(gradients[b].view({d_g, width}), false),
                                 first.mutable_data_ptr<scalar_t>() + offset, d_a));
        write.push_back(product(matrix_rows<scalar_t>(first, true),
                                matrix_rows<scalar_t>(qa.narrow(0, offset, width), true),
                                gradients[b].mutable_data_ptr<scalar_t>(), width));
        write.back().multiplier = nu.const_data_ptr<scalar_t>();
      }
      project.push_back(product(matrix_rows<scalar_t>(first, true),
                                matrix_rows<scalar_t>(qa, false),
                                rotated.mutable_data_ptr<scalar_t>(), d_a));
      const ScaledRows<scalar_t> weighted{matrix_rows<scalar_t>(rotated, false),
                                          spectrum.const_data_ptr<scalar_t>(), d_a, 1};
      weigh.push_back(product(matrix_rows<scalar_t>(qg, true), weighted,
                              first.mutable_data_ptr<scalar_t>(), d_a));
      if (!kl_weights.has_value()) continue;
      // k_l <R, R * S>: R and S as (d_G d_A, 1) columns.
      const Rows column{rotated.const_data_ptr<scalar_t>(), d_g * d_a, 1, 1, 0};
      const ScaledRows<scalar_t> scaled{column, spectrum.const_data_ptr<scalar_t>(), 1, 0};
      dots.push_back(product(column, scaled, dot.mutable_data_ptr<scalar_t>() + i, 1));
      dots.back().multiplier = weights.const_data_ptr<scalar_t>() + i;
    }
    run_layers(rotate, target_blocks, like, 1.0, 0.0, run);
    run_layers(project, target_blocks, like, 1.0, 0.0, run);
    if (kl_weights.has_value()) {
      run_layers(dots, target_blocks, like, 1.0, 0.0, run);
      nu.copy_(device_kl_clip(dot.sum()));
    }
    run_layers(weigh, target_blocks, like, 1.0, 0.0, run);
    run_layers(write, target_blocks, like, 1.0, 0.0, run);
  });
  return nu;
}

}  // namespace gram
}  // namespace fastlaplace
