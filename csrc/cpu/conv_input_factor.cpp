// CPU kernel of fastlaplace::conv_input_factor_: the Kronecker input factor of a
// Conv2d, F <- beta F + alpha sum over images and output positions of u u^T, u the
// patch (C*kh*kw, in weight.flatten(1) order) with an optional 1 for the bias.
//
// Two exact ways to the same sums, chosen by their cost:
// - patches: unfold a few images at a time (implicit im2col) and accumulate the
//   patches' Gram matrix, N*L*(C*kh*kw)^2 multiply-adds;
// - pixels (small images, on the CPU): one Gram matrix T = X^T X of the whole images,
//   X (N, H*W*C), N*(H*W*C)^2 multiply-adds, whose entries are then added up: the
//   entry of patch features (c, k) and (c', k') is the sum over output positions o of
//   T[(pixel of o under offset k, c), (pixel of o under offset k', c')], the pixels
//   both inside the image (padding contributes zeros). For the 4x4 and 8x8 images of
//   a small CNN this is several times fewer flops, with no unfolded copy at all.
// - rows (vertical stride 1, kernel height > 1, images of kRowsMinHeight * kh output
//   rows or more, on the CPU): the patches' Gram matrix
//   has kh x kh blocks of kernel rows (ki, ki'), each the cross-Gram of the horizontal
//   patches (C*kw features) of image rows a and a + (ki' - ki)*dh, summed over the
//   first rows a that kernel row ki sees. That row set depends on ki only at the image's
//   border, so for each shift dy = ki' - ki one product over the rows all kernel rows
//   share is added to the few border rows' own products: about kh (C*kw)^2 instead of
//   (kh*kw*C)^2 / 2 multiply-adds per position (1.5x fewer for 3x3), in larger GEMMs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../ops.h"
#include "../engines/blocked_gram.h"

namespace fastlaplace {
namespace {

// Unfolded patches of this many bytes at most exist at a time: the full unfolded
// batch is kh*kw times the input.
constexpr int64_t kPatchBytes = 8 << 20;
// Horizontal patches of this many bytes at most exist at a time (the rows path): kw
// times the input.
constexpr int64_t kRowPatchBytes = 32 << 20;
// The rows path needs at least this many output rows per kernel row: on smaller images
// its border rows' products (depth: one image row) dominate and run slower than the
// patches' Gram matrix (measured on 2 AVX2 cores: 2x slower at 4x4, faster from 16x16).
constexpr int64_t kRowsMinHeight = 4;
// The pixel Gram matrix T is (H*W*C)^2: used only while it stays this small.
constexpr int64_t kPixelGramBytes = 32 << 20;
// Cost of one scalar addition of the gather, in GEMM multiply-adds (a GEMM runs many
// multiply-adds per cycle, the gather's loop about one addition).
constexpr double kGatherWeight = 8.0;

// For each kernel offset k, the input pixel (row-major in H x W) that output position
// o sees under it, or -1 where that falls into the zero padding.
std::vector<std::vector<int64_t>> offset_pixels(const ConvGeometry& g) {
  std::vector<std::vector<int64_t>> pixels(g.offsets(), std::vector<int64_t>(g.positions()));
  for (int64_t ki = 0; ki < g.kh; ++ki) {
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      std::vector<int64_t>& column = pixels[ki * g.kw + kj];
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        for (int64_t ox = 0; ox < g.out_w; ++ox) {
          const int64_t iy = oy * g.stride[0] - g.padding[0] + ki * g.dilation[0];
          const int64_t ix = ox * g.stride[1] - g.padding[1] + kj * g.dilation[1];
          const bool inside = iy >= 0 && iy < g.height && ix >= 0 && ix < g.width;
          column[oy * g.out_w + ox] = inside ? iy * g.width + ix : -1;
        }
      }
    }
  }
  return pixels;
}

// Multiply-adds (GEMM-equivalent) of the pixel path, or a negative value where T
// would be too large.
double pixel_path_cost(const ConvGeometry& g, int64_t images, int64_t element_size) {
  const double pixels = static_cast<double>(g.pixels());
  if (pixels * pixels * element_size > kPixelGramBytes) return -1.0;
  const double offsets = static_cast<double>(g.offsets());
  const double gather = 0.5 * offsets * offsets * g.channels * g.channels * g.positions();
  return images * pixels * pixels + kGatherWeight * gather;
}

template <typename scalar_t>
void pixel_factor(const at::Tensor& factor, const at::Tensor& input, const ConvGeometry& g,
                  bool append_ones, double alpha, double beta) {
  const int64_t images = input.size(0);
  const int64_t channels = g.channels, pixels = g.pixels();
  // (N, H*W*C): pixel-major, channel-minor, so that a pixel pair is a C x C block of T.
  const at::Tensor x =
      input.to(factor.scalar_type()).permute({0, 2, 3, 1}).reshape({images, pixels}).contiguous();
  const at::Tensor gram = at::mm(x.t(), x);  // (H*W*C)^2
  const scalar_t* t = gram.const_data_ptr<scalar_t>();
  scalar_t* f = factor.mutable_data_ptr<scalar_t>();
  const int64_t size = factor.size(0);
  const int64_t offsets = g.offsets(), positions = g.positions();
  const std::vector<std::vector<int64_t>> under = offset_pixels(g);

  // Upper-triangle entry (i, j) and its mirror get beta F(i, j) + alpha value.
  auto store = [&](int64_t i, int64_t j, double value) {
    if (i > j) std::swap(i, j);
    const double old = beta == 0 ? 0.0 : beta * static_cast<double>(f[i * size + j]);
    const scalar_t result = static_cast<scalar_t>(old + alpha * value);
    f[i * size + j] = result;
    f[j * size + i] = result;
  };

  // Offset pairs k <= k'; each gives the C x C block of features (c, k), (c', k').
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t k = 0; k < offsets; ++k) {
    for (int64_t k2 = k; k2 < offsets; ++k2) pairs.emplace_back(k, k2);
  }
  const int64_t work = channels * channels * positions;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, work));
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), grain, [&](int64_t begin, int64_t end) {
    std::vector<double> block(channels * channels);
    std::vector<std::pair<int64_t, int64_t>> both;
    for (int64_t index = begin; index < end; ++index) {
      const auto [k, k2] = pairs[index];
      both.clear();
      for (int64_t o = 0; o < positions; ++o) {
        const int64_t p = under[k][o], p2 = under[k2][o];
        if (p >= 0 && p2 >= 0) both.emplace_back(p, p2);
      }
      std::fill(block.begin(), block.end(), 0.0);
      for (const auto& [p, p2] : both) {
        const scalar_t* rows = t + (p * channels) * pixels + p2 * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* row = rows + c * pixels;
          double* out = block.data() + c * channels;
          for (int64_t c2 = 0; c2 < channels; ++c2) out[c2] += static_cast<double>(row[c2]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        // Diagonal offset blocks are symmetric: their upper half (c <= c') only.
        for (int64_t c2 = k == k2 ? c : 0; c2 < channels; ++c2) {
          store(c * offsets + k, c2 * offsets + k2, block[c * channels + c2]);
        }
      }
    }
  });
  if (append_ones) {
    // The ones column: sums of each feature over images and positions; corner N*L.
    // (a plain loop: a casting reduction over dimension 0 costs more than the Gram itself)
    std::vector<double> s(pixels, 0.0);
    const scalar_t* rows = x.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < images; ++n) {
      const scalar_t* row = rows + n * pixels;
      for (int64_t p = 0; p < pixels; ++p) s[p] += static_cast<double>(row[p]);
    }
    const int64_t d = g.features();
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t k = 0; k < offsets; ++k) {
        double value = 0.0;
        for (int64_t o = 0; o < positions; ++o) {
          if (under[k][o] >= 0) value += s[under[k][o] * channels + c];
        }
        store(c * offsets + k, d, value);
      }
    }
    store(d, d, static_cast<double>(images) * positions);
  }
}

// The rows path (vertical stride 1): see the file comment. Only the upper triangle of
// the old factor is read, and the result is exactly symmetric, as on the other paths.
void row_factor(const at::Tensor& factor, const at::Tensor& input, const ConvGeometry& g,
                bool append_ones, double alpha, double beta) {
  const int64_t images = input.size(0), channels = g.channels, height = g.height;
  const int64_t kh = g.kh, kw = g.kw, dh = g.dilation[0], out_w = g.out_w;
  const int64_t width = channels * kw, features = g.features();
  // Old factor: its upper triangle, mirrored and scaled (beta == 0 ignores it, NaN included).
  if (beta == 0) {
    factor.zero_();
  } else {
    const at::Tensor upper = factor.triu();
    factor.copy_(upper.add(upper.triu(1).t()));
    if (beta != 1.0) factor.mul_(beta);
  }
  // Kernel row ki's first image rows: [ki dh - ph, ki dh - ph + out_h) within [0, H).
  auto first_row = [&](int64_t ki) { return ki * dh - g.padding[0]; };
  // (C, kh, kw, C, kh, kw) view of the factor's patch block.
  const at::Tensor blocks = factor.narrow(0, 0, features)
                                .narrow(1, 0, features)
                                .unflatten(0, {channels, kh, kw})
                                .unflatten(3, {channels, kh, kw});
  const int64_t bytes_per_image = height * out_w * width * factor.element_size();
  const int64_t chunk = std::max<int64_t>(1, kRowPatchBytes / std::max<int64_t>(1, bytes_per_image));
  // The ones column's entries: each patch feature summed over images and positions.
  std::vector<double> column_sums(append_ones ? features : 0, 0.0);
  for (int64_t start = 0; start < images; start += chunk) {
    const int64_t count = std::min(chunk, images - start);
    const at::Tensor x = at::constant_pad_nd(
        input.narrow(0, start, count).to(factor.scalar_type()), {g.padding[1], g.padding[1], 0, 0});
    std::vector<at::Tensor> shifted;
    for (int64_t kj = 0; kj < kw; ++kj) {
      const int64_t left = kj * g.dilation[1];
      shifted.push_back(x.slice(3, left, left + g.stride[1] * (out_w - 1) + 1, g.stride[1]));
    }
    // (H, count * out_w, C * kw): every image row's horizontal patches, rows contiguous.
    const at::Tensor rows = at::stack(shifted, -1)
                                .permute({2, 0, 3, 1, 4})
                                .reshape({height, count * out_w, width})
                                .contiguous();
    // Products of image rows [a0, a1) with the rows dy * dh below them.
    auto product = [&](int64_t a0, int64_t a1, int64_t dy) {
      const at::Tensor first = rows.narrow(0, a0, a1 - a0).reshape({-1, width});
      if (dy == 0) {  // symmetric: upper blocks only, exactly symmetric
        const at::Tensor out = at::zeros({width, width}, factor.options());
        accumulate_grams({out}, {first}, {false}, 1.0, 0.0);
        return out;
      }
      return at::mm(first.t(), rows.narrow(0, a0 + dy * dh, a1 - a0).reshape({-1, width}));
    };
    for (int64_t dy = 0; dy < kh; ++dy) {
      const int64_t below = dy * dh;
      // Per kernel row pair (ki, ki + dy): its first rows, both rows inside the image.
      std::vector<int64_t> lo(kh - dy), hi(kh - dy);
      int64_t common_lo = 0, common_hi = height;
      for (int64_t ki = 0; ki + dy < kh; ++ki) {
        lo[ki] = std::max<int64_t>(first_row(ki), 0);
        hi[ki] = std::min<int64_t>(first_row(ki) + g.out_h, height - below);
        common_lo = std::max(common_lo, lo[ki]);
        common_hi = std::min(common_hi, hi[ki]);
      }
      const bool shared = common_hi > common_lo;
      const at::Tensor common = shared ? product(common_lo, common_hi, dy)
                                       : at::zeros({width, width}, factor.options());
      std::vector<at::Tensor> border(height);  // each border row's own product, computed once
      for (int64_t ki = 0; ki + dy < kh; ++ki) {
        at::Tensor block = common;
        for (int64_t a = lo[ki]; a < hi[ki]; ++a) {
          if (shared && a >= common_lo && a < common_hi) continue;
          if (!border[a].defined()) border[a] = product(a, a + 1, dy);
          block = block.add(border[a]);
        }
        const at::Tensor b = block.view({channels, kw, channels, kw});
        blocks.select(4, ki + dy).select(1, ki).add_(b, alpha);
        if (dy > 0) blocks.select(4, ki).select(1, ki + dy).add_(b.permute({2, 3, 0, 1}), alpha);
      }
    }
    if (append_ones) {
      // Per image row, the sums of its horizontal patches over images and positions.
      const at::Tensor sums = rows.sum(1, false, at::kDouble).contiguous();
      const double* row_sums = sums.const_data_ptr<double>();
      for (int64_t ki = 0; ki < kh; ++ki) {
        const int64_t a0 = std::max<int64_t>(first_row(ki), 0);
        const int64_t a1 = std::min<int64_t>(first_row(ki) + g.out_h, height);
        for (int64_t a = a0; a < a1; ++a) {
          for (int64_t c = 0; c < channels; ++c) {
            for (int64_t kj = 0; kj < kw; ++kj) {
              column_sums[(c * kh + ki) * kw + kj] += row_sums[a * width + c * kw + kj];
            }
          }
        }
      }
    }
  }
  if (append_ones) {
    const at::Tensor sums = at::zeros({features}, factor.options().dtype(at::kDouble));
    std::copy(column_sums.begin(), column_sums.end(), sums.mutable_data_ptr<double>());
    const at::Tensor scaled = sums.mul(alpha).to(factor.scalar_type());
    factor.narrow(0, features, 1).narrow(1, 0, features).squeeze(0).add_(scaled);
    factor.narrow(1, features, 1).narrow(0, 0, features).squeeze(1).add_(scaled);
    factor.narrow(0, features, 1).narrow(1, features, 1).add_(
        alpha * static_cast<double>(images) * g.positions());
  }
}

}  // namespace

ConvGeometry conv_input_geometry(const at::Tensor& factor, const at::Tensor& input,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 bool append_ones) {
  check_factor_dtype(factor, "factor");
  check_floating(input, "input");
  check_same_device(input, factor, "input");
  TORCH_CHECK(input.dim() == 4, "input must be (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(factor.is_contiguous(), "factor must be contiguous");
  ConvGeometry g{input.size(1), input.size(2), input.size(3), kernel_size[0], kernel_size[1], 0, 0,
                 {stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]}};
  int64_t out[2];
  for (int64_t axis = 0; axis < 2; ++axis) {
    const int64_t span = dilation[axis] * (kernel_size[axis] - 1) + 1;
    const int64_t padded = input.size(2 + axis) + 2 * padding[axis];
    TORCH_CHECK(padded >= span, "input is smaller than the kernel's span along dimension ",
                2 + axis);
    out[axis] = (padded - span) / stride[axis] + 1;
  }
  g.out_h = out[0];
  g.out_w = out[1];
  const int64_t size = g.features() + (append_ones ? 1 : 0);
  TORCH_CHECK(factor.dim() == 2 && factor.size(0) == size && factor.size(1) == size,
              "factor must be (", size, ", ", size, "), got ", factor.sizes());
  return g;
}

void conv_input_factor_aten(const at::Tensor& factor, const at::Tensor& input,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation,
                           bool append_ones, double alpha, double beta) {
  const ConvGeometry g = conv_input_geometry(factor, input, kernel_size, stride, padding,
                                             dilation, append_ones);
  const int64_t positions = g.positions();
  const int64_t features = g.features();
  const int64_t images = input.size(0);
  if (factor.is_cpu() && images > 0) {
    const double pixel_cost = pixel_path_cost(g, images, factor.element_size());
    const double patch_cost = static_cast<double>(images) * positions * features * features;
    if (pixel_cost >= 0 && pixel_cost < patch_cost) {
      AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "conv_input_factor_pixels", [&] {
        pixel_factor<scalar_t>(factor, input, g, append_ones, alpha, beta);
      });
      return;
    }
    if (g.stride[0] == 1 && g.kh > 1 && g.out_h >= kRowsMinHeight * g.kh) {
      row_factor(factor, input, g, append_ones, alpha, beta);
      return;
    }
  }
  const int64_t bytes_per_image = positions * features * factor.element_size();
  const int64_t chunk = std::max<int64_t>(1, kPatchBytes / std::max<int64_t>(1, bytes_per_image));
  for (int64_t start = 0; start == 0 || start < images; start += chunk) {
    const int64_t count = std::min(chunk, images - start);
    const at::Tensor patches = at::im2col(
        input.narrow(0, start, count).to(factor.scalar_type()).contiguous(), kernel_size,
        dilation, padding, stride);  // (count, features, positions)
    const at::Tensor rows = patches.transpose(1, 2).reshape({count * positions, features});
    accumulate_grams({factor}, {rows}, {append_ones}, alpha, start == 0 ? beta : 1.0);
  }
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("conv_input_factor_", &fastlaplace::conv_input_factor_aten);
}
