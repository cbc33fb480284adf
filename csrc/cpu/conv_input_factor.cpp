// CPU kernel of fastlaplace::conv_input_factor_: the Kronecker input factor of a
// Conv2d, F <- beta F + alpha sum over images and output positions of u u^T, u the
// patch (C*kh*kw, in weight.flatten(1) order) with an optional 1 for the bias.
//
// Three exact ways to the same sums, chosen by their cost:
// - patches: unfold a few images at a time (implicit im2col) and accumulate the
//   patches' Gram matrix, N*L*(C*kh*kw)^2 multiply-adds;
// - pixels (small images, on the CPU): one Gram matrix T = X^T X of the whole images,
//   X (N, H*W*C), N*(H*W*C)^2 multiply-adds, whose entries are then added up: the
//   entry of patch features (c, k) and (c', k') is the sum over output positions o of
//   T[(pixel of o under offset k, c), (pixel of o under offset k', c')], the pixels
//   both inside the image (padding contributes zeros). For the 4x4 and 8x8 images of
//   a small CNN this is several times fewer flops, with no unfolded copy at all.
// - shifts (stride 1, on the CPU): the C x C block of kernel offsets (k, k') sums
//   x(c, p) x(c', p + s) over the pixels p that offset k visits, s = k' - k. Over all
//   pixels that sum is one product of the channel-first images with themselves shifted
//   by s (flattened, with zero rows and columns after each image so that a shift never
//   pairs two unrelated pixels); the pixels offset k does not visit are a few border
//   rows and columns, whose own products are subtracted (their crossings added back).
//   One product per shift, (2kh-1)(2kw-1)/2 of them: about 13 C^2 multiply-adds per
//   pixel for a 3x3 kernel instead of 40 for the patches, no unfolded copy, and GEMMs
//   as deep as the batch's pixels (2-3x faster on a ResNet-18's convolutions).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/im2col.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/mm.h>
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
// Padded channel-first images of this many bytes at most exist at a time (the shifts
// path): about the input's size.
constexpr int64_t kShiftBytes = 8 << 20;
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

// Real image rows (or columns) [lo, hi) that the first pixel of kernel row ki visits
// over the output positions: [ki d - p, ki d - p + out) within [0, size).
std::pair<int64_t, int64_t> visited(int64_t k, int64_t dilation, int64_t padding, int64_t out,
                                    int64_t size) {
  const int64_t start = k * dilation - padding;
  return {std::max<int64_t>(start, 0), std::min<int64_t>(start + out, size)};
}

// The image rows (or columns) some kernel row leaves out: the union of [0, size) minus
// each kernel row's visited range.
std::vector<int64_t> left_out(int64_t kernel, int64_t dilation, int64_t padding, int64_t out,
                              int64_t size) {
  std::vector<bool> out_of_some(size, false);
  for (int64_t k = 0; k < kernel; ++k) {
    const auto [lo, hi] = visited(k, dilation, padding, out, size);
    for (int64_t i = 0; i < size; ++i) out_of_some[i] = out_of_some[i] || i < lo || i >= hi;
  }
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < size; ++i) {
    if (out_of_some[i]) rows.push_back(i);
  }
  return rows;
}

// Multiply-adds of the shifts path (stride 1): per shift, the whole-image product and
// the left-out rows', columns' and corners' products.
double shift_path_cost(const ConvGeometry& g, int64_t images) {
  const double rows = static_cast<double>(
      left_out(g.kh, g.dilation[0], g.padding[0], g.out_h, g.height).size());
  const double cols = static_cast<double>(
      left_out(g.kw, g.dilation[1], g.padding[1], g.out_w, g.width).size());
  const double padded = static_cast<double>(g.height + (g.kh - 1) * g.dilation[0]) *
                        (g.width + (g.kw - 1) * g.dilation[1]);
  const double shifts = static_cast<double>(g.kw + (g.kh - 1) * (2 * g.kw - 1));
  const double depth = padded + rows * g.width + cols * g.height + rows * cols;
  return shifts * images * depth * g.channels * g.channels;
}

// factor <- beta factor + alpha update, both read on and above the diagonal only and the
// result written to both triangles (exactly symmetric), in one pass of 64 x 64 tiles.
// beta == 0 ignores the old factor (NaN included). Each thread owns the tiles of its
// rows on and above the diagonal and their mirrors: no two threads touch one entry.
template <typename scalar_t>
void add_symmetric(const at::Tensor& factor, const at::Tensor& update, double alpha, double beta) {
  constexpr int64_t kTile = 64;
  const int64_t size = factor.size(0), tiles = (size + kTile - 1) / kTile;
  scalar_t* f = factor.mutable_data_ptr<scalar_t>();
  const scalar_t* u = update.const_data_ptr<scalar_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      for (int64_t tj = ti; tj < tiles; ++tj) {
        for (int64_t i = ti * kTile; i < std::min(size, (ti + 1) * kTile); ++i) {
          for (int64_t j = std::max(i, tj * kTile); j < std::min(size, (tj + 1) * kTile); ++j) {
            const double old = beta == 0 ? 0.0 : beta * static_cast<double>(f[i * size + j]);
            const scalar_t value = static_cast<scalar_t>(old + alpha * static_cast<double>(u[i * size + j]));
            f[i * size + j] = value;
            f[j * size + i] = value;
          }
        }
      }
    }
  });
}

// The shifts path (stride 1): see the file comment. Only the upper triangle of the old
// factor is read, and the result is exactly symmetric, as on the other paths.
void shift_factor(const at::Tensor& factor, const at::Tensor& input, const ConvGeometry& g,
                  bool append_ones, double alpha, double beta) {
  const int64_t images = input.size(0), channels = g.channels, height = g.height;
  const int64_t width = g.width, kh = g.kh, kw = g.kw, features = g.features();
  const int64_t dh = g.dilation[0], dw = g.dilation[1];
  // Zero rows below and columns right of each image, as many as the kernel reaches: a
  // shift of the flattened images then pairs a pixel with its shifted pixel or a zero.
  const int64_t padded_h = height + (kh - 1) * dh, padded_w = width + (kw - 1) * dw;
  std::vector<std::pair<int64_t, int64_t>> rows_of(kh), cols_of(kw);
  for (int64_t k = 0; k < kh; ++k) rows_of[k] = visited(k, dh, g.padding[0], g.out_h, height);
  for (int64_t k = 0; k < kw; ++k) cols_of[k] = visited(k, dw, g.padding[1], g.out_w, width);
  // The batch's patch Gram matrix, built here and added to the factor at the end; its
  // (C, kh, kw, C, kh, kw) view.
  const at::Tensor update = at::zeros(factor.sizes(), factor.options());
  const at::Tensor blocks = update.narrow(0, 0, features)
                                .narrow(1, 0, features)
                                .unflatten(0, {channels, kh, kw})
                                .unflatten(3, {channels, kh, kw});
  const int64_t bytes_per_image = channels * padded_h * padded_w * factor.element_size();
  const int64_t chunk = std::max<int64_t>(1, kShiftBytes / std::max<int64_t>(1, bytes_per_image));
  const at::Tensor pixel_sums = at::zeros({channels, height, width}, factor.options());
  for (int64_t start = 0; start < images; start += chunk) {
    const int64_t count = std::min(chunk, images - start);
    const at::Tensor x_chunk = input.narrow(0, start, count).to(factor.scalar_type());
    if (append_ones) pixel_sums.add_(x_chunk.sum(0));
    // (C, count, Hp, Wp), channels first: each channel's images are one row of `flat`.
    const at::Tensor x = at::constant_pad_nd(x_chunk, {0, padded_w - width, 0, padded_h - height})
                             .transpose(0, 1)
                             .contiguous();
    const at::Tensor flat = x.view({channels, -1});
    const at::Tensor planes = x.view({channels, count, padded_h * padded_w});
    const int64_t length = flat.size(1);
    // Shifts (sy, sx) of the second pixel's kernel offset from the first's, half of them:
    // the other half are the transposed blocks.
    for (int64_t sy = 0; sy < kh; ++sy) {
      for (int64_t sx = sy == 0 ? 0 : 1 - kw; sx < kw; ++sx) {
        const int64_t dy = sy * dh, dx = sx * dw, shift = dy * padded_w + dx;
        const at::Tensor whole =
            at::mm(flat.narrow(1, 0, length - shift), flat.narrow(1, shift, length - shift).t());
        // The products of a left-out row r, column c or pixel (r, c) with their shifted
        // pixels; computed once per shift, on first use.
        std::vector<at::Tensor> row_terms(height), col_terms(width), corner_terms(height * width);
        auto row_term = [&](int64_t r) {
          if (!row_terms[r].defined()) {
            const at::Tensor first = planes.narrow(2, r * padded_w, width).reshape({channels, -1});
            const at::Tensor second =
                planes.narrow(2, r * padded_w + shift, width).reshape({channels, -1});
            row_terms[r] = at::mm(first, second.t());
          }
          return row_terms[r];
        };
        auto col_term = [&](int64_t c) {
          if (!col_terms[c].defined()) {
            const at::Tensor first = x.select(3, c).narrow(2, 0, height).reshape({channels, -1});
            const at::Tensor second = x.select(3, c + dx).narrow(2, dy, height).reshape({channels, -1});
            col_terms[c] = at::mm(first, second.t());
          }
          return col_terms[c];
        };
        auto corner_term = [&](int64_t r, int64_t c) {
          at::Tensor& term = corner_terms[r * width + c];
          if (!term.defined()) {
            term = at::mm(x.select(3, c).select(2, r), x.select(3, c + dx).select(2, r + dy).t());
          }
          return term;
        };
        for (int64_t ki = 0; ki + sy < kh; ++ki) {
          for (int64_t kj = std::max<int64_t>(0, -sx); kj < kw && kj + sx < kw; ++kj) {
            const at::Tensor block = blocks.select(1, ki).select(1, kj).select(2, ki + sy).select(2, kj + sx);
            block.add_(whole);
            const auto [r0, r1] = rows_of[ki];
            const auto [c0, c1] = cols_of[kj];
            // Pixels whose shifted partner lies left of the image pair with zeros: skipped.
            auto paired = [&](int64_t c) { return c + dx >= 0 && c + dx < width; };
            for (int64_t r = 0; r < height; ++r) {
              if (r < r0 || r >= r1) block.sub_(row_term(r));
            }
            for (int64_t c = 0; c < width; ++c) {
              if ((c < c0 || c >= c1) && paired(c)) {
                block.sub_(col_term(c));
                for (int64_t r = 0; r < height; ++r) {
                  if (r < r0 || r >= r1) block.add_(corner_term(r, c));
                }
              }
            }
          }
        }
      }
    }
  }
  // The blocks below the offsets' diagonal, mirrored (a diagonal one holds both halves).
  for (int64_t k = 0; k < kh * kw; ++k) {
    for (int64_t k2 = k + 1; k2 < kh * kw; ++k2) {
      const at::Tensor upper = blocks.select(1, k / kw).select(1, k % kw).select(2, k2 / kw).select(2, k2 % kw);
      blocks.select(1, k2 / kw).select(1, k2 % kw).select(2, k / kw).select(2, k % kw).copy_(upper.t());
    }
  }
  if (append_ones) {
    // The ones column: each patch feature summed over images and positions, the pixel
    // sums over the rows and columns its kernel offset visits; corner N*L.
    const at::Tensor sums = at::zeros({channels, kh, kw}, factor.options());
    for (int64_t ki = 0; ki < kh; ++ki) {
      for (int64_t kj = 0; kj < kw; ++kj) {
        const auto [r0, r1] = rows_of[ki];
        const auto [c0, c1] = cols_of[kj];
        if (r1 > r0 && c1 > c0) {
          sums.select(1, ki).select(1, kj).copy_(
              pixel_sums.narrow(1, r0, r1 - r0).narrow(2, c0, c1 - c0).sum({1, 2}));
        }
      }
    }
    update.narrow(0, features, 1).narrow(1, 0, features).squeeze(0).copy_(sums.flatten());
    update.narrow(1, features, 1).narrow(0, 0, features).squeeze(1).copy_(sums.flatten());
    update.narrow(0, features, 1).narrow(1, features, 1).fill_(static_cast<double>(images) * g.positions());
  }
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "conv_input_factor_combine", [&] {
    add_symmetric<scalar_t>(factor, update, alpha, beta);
  });
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
    const double patch_cost = static_cast<double>(images) * positions * features * features;
    const double pixel_cost = pixel_path_cost(g, images, factor.element_size());
    const bool unit_stride = g.stride[0] == 1 && g.stride[1] == 1;
    const double shift_cost = unit_stride ? shift_path_cost(g, images) : -1.0;
    const bool shifts_cheaper = shift_cost >= 0 && shift_cost < patch_cost;
    const double best_other = shifts_cheaper ? shift_cost : patch_cost;
    if (pixel_cost >= 0 && pixel_cost < best_other) {
      AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "conv_input_factor_pixels", [&] {
        pixel_factor<scalar_t>(factor, input, g, append_ones, alpha, beta);
      });
      return;
    }
    if (shifts_cheaper) {
      shift_factor(factor, input, g, append_ones, alpha, beta);
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
