// The launch code of fastlaplace::conv_input_factor_ on the fused tile kernel
// (csrc/engines/tile_gram.h), shared by the CUDA kernel (cuda/conv_input_factor.cu) and its host
// emulation (emulation/conv_input_factor.cpp), so that the tests check it too.
#pragma once

#include "../engines/tile_launch.h"

namespace fastlaplace {
namespace gram {

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "tile_gram", [&] {
    using input_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "tile_gram", [&] {
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
