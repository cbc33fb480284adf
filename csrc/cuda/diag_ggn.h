// The launch code of fastlaplace::diag_ggn on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/diag_ggn.cu) and its host
// emulation (emulation/diag_ggn.cpp), so that the tests check it too.
#pragma once

#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input_dtype, "tile_gram", [&] {
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

}  // namespace gram
}  // namespace fastlaplace
