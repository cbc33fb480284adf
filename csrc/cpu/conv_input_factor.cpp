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
// - cells (stride 1, on the CPU): the C x C block of kernel offsets (k, k') sums
//   x(:, p) x(:, p + s)^T over the pixels p that offset k visits with a partner p + s
//   that k' visits, s = k' - k: a rectangle of pixels (a window). The windows of all
//   offset pairs with one shift s cut the image into cells (rectangles each window
//   covers whole or not at all); each cell's product is a few GEMMs as deep as its
//   images' pixels, and each block the sum of its window's cells. Every pixel pair is
//   multiplied once: (2kh-1)(2kw-1)/2 shifts, about 13 C^2 multiply-adds per pixel for
//   a 3x3 kernel instead of 40 for the patches, no unfolded copy and no product with
//   the zero padding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/im2col.h>
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
// Images of this many bytes at most are transposed at a time (the cells path): about
// the input's size.
constexpr int64_t kCellBytes = 8 << 20;
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

// The pixels p (along one axis) that kernel offset k visits with partner p + shift
// visited by offset k + s: [lo, hi), possibly empty.
std::pair<int64_t, int64_t> window(const std::vector<std::pair<int64_t, int64_t>>& visits,
                                   int64_t k, int64_t s, int64_t shift) {
  return {std::max(visits[k].first, visits[k + s].first - shift),
          std::min(visits[k].second, visits[k + s].second - shift)};
}

// The cut of the windows at every window's ends, less the pieces no window covers:
// segments that each window covers whole or not at all.
std::vector<std::pair<int64_t, int64_t>> segments(
    const std::vector<std::pair<int64_t, int64_t>>& windows) {
  std::vector<int64_t> cuts;
  for (const auto& [lo, hi] : windows) {
    if (lo < hi) {
      cuts.push_back(lo);
      cuts.push_back(hi);
    }
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> result;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    const bool covered = std::any_of(windows.begin(), windows.end(), [&](const auto& w) {
      return w.first <= cuts[i] && cuts[i + 1] <= w.second;
    });
    if (covered) result.emplace_back(cuts[i], cuts[i + 1]);
  }
  return result;
}

// The image rows (axis 0) or columns (axis 1) each kernel offset visits, per offset.
std::vector<std::pair<int64_t, int64_t>> visits(const ConvGeometry& g, int axis) {
  const int64_t kernel = axis == 0 ? g.kh : g.kw, out = axis == 0 ? g.out_h : g.out_w;
  const int64_t size = axis == 0 ? g.height : g.width;
  std::vector<std::pair<int64_t, int64_t>> result(kernel);
  for (int64_t k = 0; k < kernel; ++k) result[k] = visited(k, g.dilation[axis], g.padding[axis], out, size);
  return result;
}

// One shift (sy, sx) of the kernel offsets' pairs k <= k' (row-major order): its pixel
// shift (dy, dx), the first offsets (ky, kx) of its pairs with their row and column
// windows, and the cells those windows cut.
struct ShiftCells {
  int64_t sy, sx, dy, dx;
  std::vector<int64_t> kys, kxs;
  std::vector<std::pair<int64_t, int64_t>> row_windows, col_windows, row_cells, col_cells;
};

std::vector<ShiftCells> shift_cells(const ConvGeometry& g) {
  const auto rows_of = visits(g, 0), cols_of = visits(g, 1);
  std::vector<ShiftCells> shifts;
  for (int64_t sy = 0; sy < g.kh; ++sy) {
    for (int64_t sx = sy == 0 ? 0 : 1 - g.kw; sx < g.kw; ++sx) {
      ShiftCells shift{sy, sx, sy * g.dilation[0], sx * g.dilation[1], {}, {}, {}, {}, {}, {}};
      for (int64_t ky = 0; ky + sy < g.kh; ++ky) {
        shift.kys.push_back(ky);
        shift.row_windows.push_back(window(rows_of, ky, sy, shift.dy));
      }
      for (int64_t kx = std::max<int64_t>(0, -sx); kx < g.kw && kx + sx < g.kw; ++kx) {
        shift.kxs.push_back(kx);
        shift.col_windows.push_back(window(cols_of, kx, sx, shift.dx));
      }
      shift.row_cells = segments(shift.row_windows);
      shift.col_cells = segments(shift.col_windows);
      shifts.push_back(std::move(shift));
    }
  }
  return shifts;
}

// Multiply-adds of the cells path (stride 1): every pixel pair (p, p + s) that some
// offset pair reaches, once, over C^2 channel pairs and the images.
double cell_path_cost(const ConvGeometry& g, int64_t images) {
  double pairs = 0.0;
  for (const ShiftCells& shift : shift_cells(g)) {
    double height = 0.0, width = 0.0;
    for (const auto& [lo, hi] : shift.row_cells) height += static_cast<double>(hi - lo);
    for (const auto& [lo, hi] : shift.col_cells) width += static_cast<double>(hi - lo);
    pairs += height * width;
  }
  return pairs * images * g.channels * g.channels;
}

// factor <- beta factor + alpha (the batch's patch Gram matrix), from its blocks:
// values[pair(k, k')] the C x C block of kernel offsets k <= k' (row-major), `sums` the
// ones column's C*kh*kw entries (empty without a bias) and `count` its corner. The old
// factor is read on and above the diagonal only and the result written to both
// triangles (exactly symmetric); beta == 0 ignores the old factor (NaN included). The
// pass goes by tiles of a few channels' features (all their kernel offsets), each tile
// and its mirror written row by row; each thread owns the tiles of its rows on and above
// the diagonal and their mirrors.
template <typename scalar_t>
void add_blocks(const at::Tensor& factor, const at::Tensor& values, const std::vector<int64_t>& pair,
                int64_t offsets, const std::vector<double>& sums, double count, double alpha, double beta) {
  const int64_t size = factor.size(0), channels = values.size(1), features = channels * offsets;
  const int64_t tile_channels = std::max<int64_t>(1, 64 / offsets), tile = tile_channels * offsets;
  const int64_t tiles = (channels + tile_channels - 1) / tile_channels;
  scalar_t* f = factor.mutable_data_ptr<scalar_t>();
  const scalar_t* v = values.const_data_ptr<scalar_t>();
  auto combine = [&](int64_t i, int64_t j, double value) {
    const double old = beta == 0 ? 0.0 : beta * static_cast<double>(f[i * size + j]);
    return static_cast<scalar_t>(old + alpha * value);
  };
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> mirror(tile * tile);
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t ca = ti * tile_channels, ca_end = std::min(channels, ca + tile_channels);
      for (int64_t tj = ti; tj < tiles; ++tj) {
        const int64_t cb = tj * tile_channels, cb_end = std::min(channels, cb + tile_channels);
        const int64_t i0 = ca * offsets, j0 = cb * offsets;
        for (int64_t c = ca; c < ca_end; ++c) {
          for (int64_t k = 0; k < offsets; ++k) {
            const int64_t i = c * offsets + k;
            for (int64_t c2 = std::max(c, cb); c2 < cb_end; ++c2) {
              // Entries on and above the diagonal only: within one channel, offsets k2 >= k.
              for (int64_t k2 = c2 == c ? k : 0; k2 < offsets; ++k2) {
                const int64_t j = c2 * offsets + k2;
                const scalar_t block_value =
                    k <= k2 ? v[(pair[k * offsets + k2] * channels + c) * channels + c2]
                            : v[(pair[k2 * offsets + k] * channels + c2) * channels + c];
                const scalar_t result = combine(i, j, static_cast<double>(block_value));
                f[i * size + j] = result;
                mirror[(j - j0) * tile + (i - i0)] = result;
              }
            }
          }
        }
        for (int64_t c2 = cb; c2 < cb_end; ++c2) {
          for (int64_t k2 = 0; k2 < offsets; ++k2) {
            const int64_t j = c2 * offsets + k2;
            const int64_t i_end = std::min(ca_end * offsets, j + 1);
            for (int64_t i = i0; i < i_end; ++i) f[j * size + i] = mirror[(j - j0) * tile + (i - i0)];
          }
        }
      }
    }
  });
  if (size > features) {  // the ones column and its corner
    for (int64_t i = 0; i <= features; ++i) {
      const scalar_t result = combine(i, features, i == features ? count : sums[i]);
      f[i * size + features] = result;
      f[features * size + i] = result;
    }
  }
}

// The cells path (stride 1): see the file comment. Only the upper triangle of the old
// factor is read, and the result is exactly symmetric, as on the other paths.
void cell_factor(const at::Tensor& factor, const at::Tensor& input, const ConvGeometry& g,
                 bool append_ones, double alpha, double beta) {
  RECORD_FUNCTION("fastlaplace::conv_input_factor_cells", c10::ArrayRef<const c10::IValue>{});
  const int64_t images = input.size(0), channels = g.channels, height = g.height;
  const int64_t width = g.width, kh = g.kh, kw = g.kw, offsets = g.offsets();
  // The blocks of offset pairs k <= k', each a contiguous C x C matrix: values[pair[k K + k']].
  std::vector<int64_t> pair(offsets * offsets, -1);
  int64_t pairs = 0;
  for (int64_t k = 0; k < offsets; ++k) {
    for (int64_t k2 = k; k2 < offsets; ++k2) pair[k * offsets + k2] = pairs++;
  }
  const at::Tensor values = at::empty({pairs, channels, channels}, factor.options());
  const int64_t bytes_per_image = channels * height * width * factor.element_size();
  const int64_t chunk = std::max<int64_t>(1, kCellBytes / std::max<int64_t>(1, bytes_per_image));
  const at::Tensor pixel_sums = at::zeros({channels, height, width}, factor.options());
  const std::vector<ShiftCells> shifts = shift_cells(g);
  for (int64_t start = 0; start < images; start += chunk) {
    const int64_t count = std::min(chunk, images - start);
    const at::Tensor x_chunk = input.narrow(0, start, count).to(factor.scalar_type());
    if (append_ones) pixel_sums.add_(x_chunk.sum(0));
    // (H, C, W, N): the images of one pixel row and a run of its columns are one
    // (C, columns * N) matrix, leading dimension W * N.
    const at::Tensor x = x_chunk.permute({2, 1, 3, 0}).contiguous();
    for (const ShiftCells& shift : shifts) {
      const auto &row_cells = shift.row_cells, &col_cells = shift.col_cells;
      // cells[i][j]: sum over the images and the pixels p of row cell i x column cell j
      // of x(:, p) x(:, p + s)^T.
      std::vector<std::vector<at::Tensor>> cells(row_cells.size(),
                                                 std::vector<at::Tensor>(col_cells.size()));
      for (size_t i = 0; i < row_cells.size(); ++i) {
        for (size_t j = 0; j < col_cells.size(); ++j) {
          // The cell's pixel rows as a batch of (C, columns * N) matrices: one batched GEMM
          // (threads share its rows where C alone is too small to split), then their sum.
          const auto [r0, r1] = row_cells[i];
          const auto [c0, c1] = col_cells[j];
          const at::Tensor first = x.narrow(0, r0, r1 - r0).narrow(2, c0, c1 - c0).flatten(2);
          const at::Tensor second =
              x.narrow(0, r0 + shift.dy, r1 - r0).narrow(2, c0 + shift.dx, c1 - c0).flatten(2);
          cells[i][j] = r1 - r0 == 1 ? at::mm(first[0], second[0].t()) : at::bmm(first, second.transpose(1, 2)).sum(0);
        }
      }
      for (size_t a = 0; a < shift.kys.size(); ++a) {
        for (size_t b = 0; b < shift.kxs.size(); ++b) {
          const int64_t k = shift.kys[a] * kw + shift.kxs[b];
          const int64_t k2 = (shift.kys[a] + shift.sy) * kw + shift.kxs[b] + shift.sx;
          const at::Tensor block = values.select(0, pair[k * offsets + k2]);
          if (start == 0) block.zero_();
          const auto &rows = shift.row_windows[a], &cols = shift.col_windows[b];
          for (size_t i = 0; i < row_cells.size(); ++i) {
            if (row_cells[i].first < rows.first || row_cells[i].second > rows.second) continue;
            for (size_t j = 0; j < col_cells.size(); ++j) {
              if (col_cells[j].first < cols.first || col_cells[j].second > cols.second) continue;
              block.add_(cells[i][j]);
            }
          }
        }
      }
    }
  }
  // The ones column: each patch feature summed over images and positions, the pixel
  // sums over the rows and columns its kernel offset visits; corner N*L.
  std::vector<double> sums;
  if (append_ones) {
    const auto rows_of = visits(g, 0), cols_of = visits(g, 1);
    const at::Tensor feature_sums = at::zeros({channels, kh, kw}, at::kDouble);
    for (int64_t ki = 0; ki < kh; ++ki) {
      for (int64_t kj = 0; kj < kw; ++kj) {
        const auto [r0, r1] = rows_of[ki];
        const auto [c0, c1] = cols_of[kj];
        if (r1 > r0 && c1 > c0) {
          feature_sums.select(1, ki).select(1, kj).copy_(
              pixel_sums.narrow(1, r0, r1 - r0).narrow(2, c0, c1 - c0).sum({1, 2}));
        }
      }
    }
    const at::Tensor flat = feature_sums.flatten().contiguous();
    sums.assign(flat.const_data_ptr<double>(), flat.const_data_ptr<double>() + flat.numel());
  }
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "conv_input_factor_cells", [&] {
    add_blocks<scalar_t>(factor, values, pair, offsets, sums, static_cast<double>(images) * g.positions(),
                         alpha, beta);
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
    const double cell_cost = unit_stride ? cell_path_cost(g, images) : -1.0;
    const bool cells_cheaper = cell_cost >= 0 && cell_cost < patch_cost;
    const double best_other = cells_cheaper ? cell_cost : patch_cost;
    if (pixel_cost >= 0 && pixel_cost < best_other) {
      AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "conv_input_factor_pixels", [&] {
        pixel_factor<scalar_t>(factor, input, g, append_ones, alpha, beta);
      });
      return;
    }
    if (cells_cheaper) {
      cell_factor(factor, input, g, append_ones, alpha, beta);
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
