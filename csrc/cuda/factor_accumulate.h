// The launch code of fastlaplace::factor_accumulate_ on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/factor_accumulate.cu) and its host
// emulation (emulation/factor_accumulate.cpp), so that the tests check it too.
#pragma once

#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

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
                                    "tile_gram", [&] {
      using input_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "tile_gram", [&] {
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

}  // namespace gram
}  // namespace fastlaplace
