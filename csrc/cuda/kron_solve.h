// The launch code of fastlaplace::kron_solve on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/kron_solve.cu) and its host
// emulation (emulation/kron_solve.cpp), so that the tests check it too.
#pragma once

#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

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

}  // namespace gram
}  // namespace fastlaplace
