// CPU kernel of fastlaplace::ekfac_scales_ (composed of ATen calls, so csrc/cuda/ekfac_scales.cu
// dispatches the same function on the GPU, where the products are cuBLAS GEMMs):
//   S_l <- decay S_l + weight sum_{n,k} (Q_G^T G_nk^T A_n Q_A)^2   (entrywise square)
// for every layer of a step in one call: the second moments of each datum's gradient in the
// Kronecker eigenbasis, EKFAC's corrected eigenvalues (George et al. 2018).
//
// The inputs and the gradient columns are rotated first (N T d_A^2 and N K T d_G^2), so
// that a datum's rotated gradient is one (d_G, T) x (T, d_A) product; with one location
// (T = 1) the whole sum is a single GEMM of the squared rotations, (sum_k g~^2)^T a~^2.
#include <ATen/core/Tensor.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"

namespace fastlaplace {
namespace {

// Rotated per-datum gradients held at once (T > 1): at most this many entries, 64 MiB in float32.
constexpr int64_t kChunkEntries = int64_t(1) << 24;

// inputs[i] as (N, T, d_A) and output_grads[i] as (N, K, T, d_G), views of the arguments.
at::Tensor as_locations(const at::Tensor& inputs) {
  return inputs.dim() == 2 ? inputs.unsqueeze(1) : inputs;
}

at::Tensor as_columns(const at::Tensor& grads) {
  if (grads.dim() == 2) return grads.unsqueeze(1).unsqueeze(1);
  return grads.dim() == 3 ? grads.unsqueeze(1) : grads;
}

void check_ekfac_scales(at::TensorList scales, at::TensorList inputs, at::TensorList output_grads,
                        at::TensorList eigvecs_a, at::TensorList eigvecs_g) {
  const size_t count = scales.size();
  TORCH_CHECK(inputs.size() == count && output_grads.size() == count &&
                  eigvecs_a.size() == count && eigvecs_g.size() == count,
              "ekfac_scales_: scales, inputs, output_grads, eigvecs_a and eigvecs_g need one "
              "entry per layer, got ", count, ", ", inputs.size(), ", ", output_grads.size(), ", ",
              eigvecs_a.size(), " and ", eigvecs_g.size());
  for (int64_t i = 0; i < static_cast<int64_t>(count); ++i) {
    const at::Tensor& s = scales[i];
    check_factor_dtype(s, "scales", i);
    check_floating(inputs[i], "inputs", i);
    check_floating(output_grads[i], "output_grads", i);
    check_factor_dtype(eigvecs_a[i], "eigvecs_a", i);
    check_factor_dtype(eigvecs_g[i], "eigvecs_g", i);
    for (const at::Tensor* t : {&inputs[i], &output_grads[i], &eigvecs_a[i], &eigvecs_g[i]}) {
      check_same_device(*t, scales[0], "ekfac_scales_ arguments");
    }
    check_same_device(s, scales[0], "scales");
    TORCH_CHECK(inputs[i].dim() == 2 || inputs[i].dim() == 3, "inputs[", i,
                "] must be (N, d_A) or (N, T, d_A), got ", inputs[i].sizes());
    TORCH_CHECK(output_grads[i].dim() >= 2 && output_grads[i].dim() <= 4, "output_grads[", i,
                "] must be (N, d_G), (N, T, d_G) or (N, K, T, d_G), got ", output_grads[i].sizes());
    const at::Tensor a = as_locations(inputs[i]), g = as_columns(output_grads[i]);
    TORCH_CHECK(g.size(0) == a.size(0) && g.size(2) == a.size(1), "output_grads[", i, "] ",
                output_grads[i].sizes(), " must have the N and T of inputs[", i, "] ",
                inputs[i].sizes());
    const int64_t d_a = a.size(2), d_g = g.size(3);
    TORCH_CHECK(eigvecs_a[i].dim() == 2 && eigvecs_a[i].size(0) == d_a &&
                    eigvecs_a[i].size(1) == d_a,
                "eigvecs_a[", i, "] must be (", d_a, ", ", d_a, "), got ", eigvecs_a[i].sizes());
    TORCH_CHECK(eigvecs_g[i].dim() == 2 && eigvecs_g[i].size(0) == d_g &&
                    eigvecs_g[i].size(1) == d_g,
                "eigvecs_g[", i, "] must be (", d_g, ", ", d_g, "), got ", eigvecs_g[i].sizes());
    TORCH_CHECK(s.dim() == 2 && s.size(0) == d_g && s.size(1) == d_a, "scales[", i, "] must be (",
                d_g, ", ", d_a, "), got ", s.sizes());
    TORCH_CHECK(eigvecs_a[i].scalar_type() == s.scalar_type() &&
                    eigvecs_g[i].scalar_type() == s.scalar_type(),
                "layer ", i, ": eigvecs_a, eigvecs_g and scales must share a dtype");
  }
}

// sum_{n,k} (Q_G^T G_nk^T A_n Q_A)^2 of one layer, (d_G, d_A) in the dtype of q_a.
at::Tensor eigenbasis_moments(const at::Tensor& inputs, const at::Tensor& output_grads,
                              const at::Tensor& q_a, const at::Tensor& q_g) {
  const at::Tensor a = as_locations(inputs).to(q_a.scalar_type());
  const at::Tensor g = as_columns(output_grads).to(q_a.scalar_type());
  const int64_t n = a.size(0), columns = g.size(1), locations = a.size(1);
  const int64_t d_a = a.size(2), d_g = g.size(3);
  if (locations == 1) {
    const at::Tensor rotated_a = at::matmul(a.select(1, 0), q_a).square_();              // (N, d_A)
    const at::Tensor rotated_g = at::matmul(g.select(2, 0), q_g).square_().sum(1);      // (N, d_G)
    return at::mm(rotated_g.t(), rotated_a);
  }
  at::Tensor sum = at::zeros({d_g, d_a}, q_a.options());
  const int64_t chunk = std::max<int64_t>(1, kChunkEntries / std::max<int64_t>(1, columns * d_g * d_a));
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t size = std::min(chunk, n - start);
    const at::Tensor rotated_a = at::matmul(a.narrow(0, start, size), q_a);             // (c, T, d_A)
    const at::Tensor rotated_g = at::matmul(g.narrow(0, start, size), q_g);             // (c, K, T, d_G)
    const at::Tensor gradients = at::matmul(rotated_g.transpose(2, 3), rotated_a.unsqueeze(1));
    sum.add_(gradients.square_().sum({0, 1}));
  }
  return sum;
}

}  // namespace

void ekfac_scales_aten(at::TensorList scales, at::TensorList inputs, at::TensorList output_grads,
                       at::TensorList eigvecs_a, at::TensorList eigvecs_g, double weight,
                       double decay) {
  check_ekfac_scales(scales, inputs, output_grads, eigvecs_a, eigvecs_g);
  for (size_t i = 0; i < scales.size(); ++i) {
    const at::Tensor moments = eigenbasis_moments(inputs[i], output_grads[i], eigvecs_a[i], eigvecs_g[i]);
    at::Tensor s = scales[i];
    if (decay == 0.0) {
      s.zero_();  // the old content is ignored, NaN included
    } else if (decay != 1.0) {
      s.mul_(decay);
    }
    s.add_(moments, weight);
  }
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("ekfac_scales_", &fastlaplace::ekfac_scales_aten);
}
