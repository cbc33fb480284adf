// The host side of the fused tile kernel (gram_tiles.h), shared by the CUDA dispatch and
// the host emulation so that the tests also check it: each op's layers built from its
// tensors and grouped by dtype into launches, and the split workspace.
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

#include "gram_tiles.h"
#include "ops.h"
#include "product_sums.h"

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

// factor_accumulate_ on checked arguments (check_factor_accumulate): all layers whose
// inputs and factors share dtypes in one launch.
template <typename Run>
void accumulate_input_factors(at::TensorList factors, at::TensorList inputs,
                              const c10::List<bool>& append_ones, double alpha, double beta,
                              int64_t target_blocks, const Run& run) {
  const auto groups = groups_by(factors.size(), [&](size_t i) {
    return std::pair(inputs[i].scalar_type(), factors[i].scalar_type());
  });
  for (const std::vector<size_t>& group : groups) {
    const at::Tensor& like = factors[group[0]];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, inputs[group[0]].scalar_type(),
                                    "gram_tiles", [&] {
      using input_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "gram_tiles", [&] {
        std::vector<Layer<DenseRows<input_t>, DenseRows<input_t>, scalar_t>> layers;
        for (size_t i : group) {
          layers.push_back(gram_layer(matrix_rows<input_t>(inputs[i], false), append_ones[i],
                                      factors[i].mutable_data_ptr<scalar_t>()));
        }
        run_layers(layers, target_blocks, like, alpha, beta, run);
      });
    });
  }
}

// diag_ggn on checked arguments (check_diag_ggn): (sum_k g_k o g_k)^T ([a, 1] o [a, 1]) per
// layer, all layers of one input dtype in one launch. A layer whose inputs and gradients
// differ in dtype has both converted to its accumulation dtype first.
template <typename Run>
std::vector<at::Tensor> diag_ggn_tiles(at::TensorList inputs, at::TensorList output_grads,
                                       const c10::List<bool>& append_ones,
                                       int64_t target_blocks, const Run& run) {
  const size_t count = inputs.size();
  std::vector<at::Tensor> results(count), as(count), gs(count);
  for (size_t i = 0; i < count; ++i) {
    const at::ScalarType dtype = inputs[i].scalar_type() == output_grads[i].scalar_type()
                                     ? inputs[i].scalar_type()
                                     : accumulation_dtype(inputs[i].scalar_type());
    as[i] = inputs[i].to(dtype);
    gs[i] = output_grads[i].to(dtype);
  }
  for (const std::vector<size_t>& group :
       groups_by(count, [&](size_t i) { return as[i].scalar_type(); })) {
    const at::ScalarType input_dtype = as[group[0]].scalar_type();
    const at::ScalarType out_dtype = accumulation_dtype(input_dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_dtype, "gram_tiles", [&] {
      using input_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<input_t, double>, double, float>;
      std::vector<Layer<SquaredRows<input_t>, SquaredRows<input_t>, acc_t>> layers;
      for (size_t i : group) {
        const at::Tensor& a = as[i];
        const at::Tensor& g = gs[i];
        const bool summed = g.dim() == 3;  // (N, K, d_out)
        const SquaredRows<input_t> left{
            {g.const_data_ptr<input_t>(), g.size(0), g.size(-1), g.stride(0), g.stride(-1)},
            summed ? g.size(1) : 1,
            summed ? g.stride(1) : 0};
        const SquaredRows<input_t> right{matrix_rows<input_t>(a, false), 1, 0};
        const int64_t columns = a.size(1) + (append_ones[i] ? 1 : 0);
        results[i] = at::empty({g.size(-1), columns}, a.options().dtype(out_dtype));
        layers.push_back({left, right, false, append_ones[i], false,
                          results[i].mutable_data_ptr<acc_t>(), g.size(-1), columns, columns});
      }
      run_layers(layers, target_blocks, results[group[0]], 1.0, 0.0, run);
    });
  }
  return results;
}

// kron_solve on checked arguments (check_kron_solve): P^p V = Q_G [(Q_G^T V Q_A) * D^p] Q_A^T
// for every layer and every matrix of its batch, D = s mu lambda^T + delta, as four
// launches over all of them (one per product, of strided views), the power of D applied as
// the second product is stored. Layers are grouped by dtype.
template <typename Run>
std::vector<at::Tensor> kron_solve_tiles(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                         at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                         at::TensorList rhs, const at::Tensor& scale,
                                         const at::Tensor& delta, double exponent,
                                         int64_t target_blocks, const Run& run) {
  const size_t count = eigvecs_a.size();
  std::vector<at::Tensor> results(count);
  const at::Tensor scales = scale.to(at::kDouble).contiguous();
  const at::Tensor deltas = delta.to(at::kDouble).contiguous();
  for (const std::vector<size_t>& group :
       groups_by(count, [&](size_t i) { return eigvecs_a[i].scalar_type(); })) {
    const at::ScalarType dtype = eigvecs_a[group[0]].scalar_type();
    AT_DISPATCH_FLOATING_TYPES(dtype, "kron_solve_tiles", [&] {
      using L = Layer<DenseRows<scalar_t>, DenseRows<scalar_t>, scalar_t>;
      std::vector<L> products[4];
      std::vector<at::Tensor> keep;  // alive until the launches are queued
      auto into = [](const DenseRows<scalar_t>& x, const DenseRows<scalar_t>& y,
                     const at::Tensor& out) {
        return product(x, y, out.mutable_data_ptr<scalar_t>(), y.columns);
      };
      for (size_t i : group) {
        const at::Tensor& qa = eigvecs_a[i];
        const at::Tensor& qg = eigvecs_g[i];
        const int64_t d_a = qa.size(0), d_g = qg.size(0);
        const at::Tensor v = rhs[i].to(dtype).reshape({-1, d_g, d_a});
        results[i] = at::empty(rhs[i].sizes(), qa.options());
        const at::Tensor out = results[i].view({-1, d_g, d_a});
        const at::Tensor rotated = at::empty_like(out), weighted = at::empty_like(out);
        const at::Tensor la = eigvals_a[i].contiguous(), lg = eigvals_g[i].contiguous();
        keep.insert(keep.end(), {v, rotated, weighted, la, lg});
        for (int64_t b = 0; b < v.size(0); ++b) {
          products[0].push_back(into(matrix_rows<scalar_t>(qg, false),
                                     matrix_rows<scalar_t>(v[b], false), rotated[b]));
          L second = into(matrix_rows<scalar_t>(rotated[b], true),
                          matrix_rows<scalar_t>(qa, false), weighted[b]);
          second.spectrum = {lg.const_data_ptr<scalar_t>(), la.const_data_ptr<scalar_t>(),
                             scales.const_data_ptr<double>() + i,
                             deltas.const_data_ptr<double>() + i, exponent};
          products[1].push_back(second);
          products[2].push_back(into(matrix_rows<scalar_t>(qg, true),
                                     matrix_rows<scalar_t>(weighted[b], false), rotated[b]));
          products[3].push_back(into(matrix_rows<scalar_t>(rotated[b], true),
                                     matrix_rows<scalar_t>(qa, true), out[b]));
        }
      }
      for (std::vector<L>& layers : products) {
        run_layers(layers, target_blocks, eigvecs_a[group[0]], 1.0, 0.0, run);
      }
    });
  }
  return results;
}

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

// Whether kron_variance_tiles takes these checked layers (a layer's Q_A and Q_G share a
// dtype): every layer's eigenvectors of one dtype, and an output Jacobian for every layer
// or for none (a last layer's closed form).
inline bool tiles_take_variance(const c10::List<std::optional<at::Tensor>>& output_jacobians,
                                at::TensorList eigvecs_a) {
  const bool jacobians = output_jacobians.get(0).has_value();
  for (size_t i = 0; i < eigvecs_a.size(); ++i) {
    if (eigvecs_a[i].scalar_type() != eigvecs_a[0].scalar_type() ||
        output_jacobians.get(i).has_value() != jacobians) {
      return false;
    }
  }
  return true;
}

// The stride that steps through dims (outer, inner) of t flattened into one, if one does.
inline std::optional<int64_t> flattened_stride(const at::Tensor& t, int outer, int inner) {
  if (t.size(inner) == 1) return t.stride(outer);
  if (t.size(outer) == 1 || t.stride(outer) == t.size(inner) * t.stride(inner)) {
    return t.stride(inner);
  }
  return std::nullopt;
}

// kron_predictive_variance on checked arguments (check_kron_predictive_variance's shape)
// that tiles_take_variance, as four launches over all layers: the rotated inputs
// A~ = [a, 1] Q_A of every layer side by side in one (N, sum d_A) workspace; the weights
// w = A~^2 D^-1 (D = s lambda mu^T + delta, a SpectrumRows) in one (N, sum d_G); the
// rotated Jacobians B~ = B Q_G in one (N, C, sum d_G), in the storage order of the first
// Jacobian's (N, C) (a batched backward gives (C, N, d_G)); then per sample
// B~_n diag(w_n) B~_n^T: for more than variance::kMaxPairOutputs outputs as symmetric
// products of the tile kernel, else (and for variances, its diagonal) by sum_products's
// warp-per-entry sums. A last layer's B~ is its Q_G for every sample (the
// layers' Q_G side by side, with a sample stride of 0). The sum over layers is a sum
// over the concatenated eigen-directions of one product: no atomics.
template <typename Run, typename SumProducts>
at::Tensor kron_variance_tiles(at::TensorList inputs,
                               const c10::List<std::optional<at::Tensor>>& output_jacobians,
                               at::TensorList eigvecs_a, at::TensorList eigvals_a,
                               at::TensorList eigvecs_g, at::TensorList eigvals_g,
                               const at::Tensor& scale, const at::Tensor& delta,
                               const c10::List<bool>& append_ones, bool full_covariance,
                               const VarianceShape& shape, int64_t target_blocks,
                               const Run& run, const SumProducts& sum_products) {
  const size_t count = inputs.size();
  const at::Tensor& like = eigvecs_a[0];
  const int64_t n = shape.samples, c = shape.outputs;
  std::vector<int64_t> offsets_a(count + 1, 0), offsets_g(count + 1, 0);
  for (size_t i = 0; i < count; ++i) {
    offsets_a[i + 1] = offsets_a[i] + eigvecs_a[i].size(0);
    offsets_g[i + 1] = offsets_g[i] + eigvecs_g[i].size(0);
  }
  const int64_t width_a = offsets_a[count], width = offsets_g[count];
  const at::Tensor rotated_inputs = at::empty({n, width_a}, like.options());
  const at::Tensor weights = at::empty({n, width}, like.options());
  const at::Tensor scales = scale.to(at::kDouble).contiguous();
  const at::Tensor deltas = delta.to(at::kDouble).contiguous();
  const bool jacobians = output_jacobians.get(0).has_value();
  // B~ (samples, outputs, width) in order (N, C) or (C, N), or the Q_G side by side.
  bool classes_outer = false;
  at::Tensor rotated_jacobians;
  if (jacobians) {
    const at::Tensor first = *output_jacobians.get(0);  // get() returns a copy
    classes_outer = !flattened_stride(first, 0, 1) && flattened_stride(first, 1, 0);
    rotated_jacobians = at::empty({n * c, width}, like.options());
  } else {
    rotated_jacobians = at::cat(eigvecs_g, 1);
  }
  const int64_t sample_stride = !jacobians ? 0 : classes_outer ? width : c * width;
  const int64_t output_stride = jacobians && classes_outer ? n * width : width;
  at::Tensor result = full_covariance ? at::empty({n, c, c}, like.options())
                                      : at::empty({n, c}, like.options());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "kron_variance_tiles", [&] {
    using Rows = DenseRows<scalar_t>;
    std::vector<Layer<RowsWithOnes<scalar_t>, Rows, scalar_t>> rotate_inputs;
    std::vector<Layer<ScaledRows<scalar_t>, SpectrumRows<scalar_t>, scalar_t>> weigh;
    std::vector<Layer<Rows, Rows, scalar_t>> rotate_jacobians;
    std::vector<at::Tensor> keep;  // alive until the launches are queued
    scalar_t* rotated = rotated_inputs.mutable_data_ptr<scalar_t>();
    scalar_t* w = weights.mutable_data_ptr<scalar_t>();
    scalar_t* b = rotated_jacobians.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor a = inputs[i].to(like.scalar_type());
      const at::Tensor& qa = eigvecs_a[i];
      const at::Tensor& qg = eigvecs_g[i];
      const int64_t d_a = qa.size(0), d_g = qg.size(0);
      const at::Tensor la = eigvals_a[i].contiguous(), lg = eigvals_g[i].contiguous();
      keep.insert(keep.end(), {a, la, lg});
      // X[k][m] = [a, 1][m][k]
      const RowsWithOnes<scalar_t> features{
          {a.const_data_ptr<scalar_t>(), d_a, n, a.stride(1), a.stride(0)}, append_ones[i]};
      rotate_inputs.push_back(
          product(features, matrix_rows<scalar_t>(qa, false), rotated + offsets_a[i], width_a));
      const Rows rotated_rows{rotated + offsets_a[i], d_a, n, 1, width_a};
      const Spectrum<scalar_t> inverse{la.const_data_ptr<scalar_t>(),
                                       lg.const_data_ptr<scalar_t>(),
                                       scales.const_data_ptr<double>() + i,
                                       deltas.const_data_ptr<double>() + i, -1.0};
      weigh.push_back(product(ScaledRows<scalar_t>{rotated_rows, rotated_rows.data, 1, width_a},
                              SpectrumRows<scalar_t>{inverse, d_a, d_g}, w + offsets_g[i], width));
      if (!jacobians) continue;
      at::Tensor jac = output_jacobians.get(i)->to(like.scalar_type());
      std::optional<int64_t> step =
          classes_outer ? flattened_stride(jac, 1, 0) : flattened_stride(jac, 0, 1);
      if (!step) {
        jac = classes_outer ? jac.transpose(0, 1).contiguous().transpose(0, 1) : jac.contiguous();
        step = classes_outer ? jac.stride(0) : jac.stride(1);
      }
      keep.push_back(jac);
      const Rows columns{jac.const_data_ptr<scalar_t>(), d_g, n * c, jac.stride(2), *step};
      rotate_jacobians.push_back(
          product(columns, matrix_rows<scalar_t>(qg, false), b + offsets_g[i], width));
    }
    run_layers(rotate_inputs, target_blocks, like, 1.0, 0.0, run);
    run_layers(weigh, target_blocks, like, 1.0, 0.0, run);
    run_layers(rotate_jacobians, target_blocks, like, 1.0, 0.0, run);
    scalar_t* out = result.mutable_data_ptr<scalar_t>();
    if (!full_covariance || c <= variance::kMaxPairOutputs) {
      sum_products(variance::ProductSums<scalar_t>{b, sample_stride, output_stride, 1, w, out, n,
                                                   c, width, full_covariance});
      return;
    }
    std::vector<Layer<ScaledRows<scalar_t>, Rows, scalar_t>> covariances;
    for (int64_t s = 0; s < n; ++s) {
      const Rows directions{b + s * sample_stride, width, c, 1, output_stride};
      covariances.push_back({ScaledRows<scalar_t>{directions, w + s * width, 1, 0}, directions,
                             false, false, true, out + s * c * c, c, c, c});
    }
    run_layers(covariances, target_blocks, like, 1.0, 0.0, run);
  });
  return result;
}

// conv_input_factor_ on checked arguments (conv_input_geometry's g).
template <typename Run>
void accumulate_conv_factor(const at::Tensor& factor, const at::Tensor& input,
                            const ConvGeometry& g, bool append_ones, double alpha, double beta,
                            int64_t target_blocks, const Run& run) {
  const int64_t rows = input.size(0) * g.positions();
  constexpr int64_t limit = int64_t(1) << 31;
  TORCH_CHECK(rows < limit && g.features() < limit && g.height * g.width < limit,
              "conv_input_factor_: the CUDA kernel takes fewer than 2^31 patches and features, "
              "got ", rows, " patches of ", g.features());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gram_tiles", [&] {
    using input_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "gram_tiles", [&] {
      auto small = [](int64_t value) { return static_cast<int32_t>(value); };
      const ConvPatches<input_t> patches{input.const_data_ptr<input_t>(),
                                         rows,
                                         g.features(),
                                         Divider::of(small(g.positions())),
                                         Divider::of(small(g.out_w)),
                                         small(g.offsets()),
                                         small(g.kw),
                                         small(g.height),
                                         small(g.width),
                                         {small(g.stride[0]), small(g.stride[1])},
                                         {small(g.padding[0]), small(g.padding[1])},
                                         {small(g.dilation[0]), small(g.dilation[1])},
                                         input.stride(0),
                                         input.stride(1),
                                         input.stride(2),
                                         input.stride(3)};
      std::vector<Layer<ConvPatches<input_t>, ConvPatches<input_t>, scalar_t>> layers{
          gram_layer(patches, append_ones, factor.mutable_data_ptr<scalar_t>())};
      run_layers(layers, target_blocks, factor, alpha, beta, run);
    });
  });
}

}  // namespace gram
}  // namespace fastlaplace
