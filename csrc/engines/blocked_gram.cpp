#include "blocked_gram.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/triu.h>
#include <ATen/ops/sum.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "balance.h"

namespace fastlaplace {
namespace {

// An input in another dtype than its factor is converted a chunk of rows at a time:
// about this many bytes, but at least kMinConvertRows rows so that the GEMMs stay
// efficient.
constexpr int64_t kConvertBytes = 4 << 20;
constexpr int64_t kMinConvertRows = 256;
constexpr int64_t kAlign = 32;
// A Gram matrix of at most this many multiply-adds is one GEMM: halving its flops with
// triangle blocks saves less than the extra GEMM calls cost (measured on 2 AVX2 cores).
constexpr double kWholeGram = double(1 << 21);

// out[rows, cols] (+)= alpha x[:, rows]^T x[:, cols]; with `mirror`, also its mirror
// image below the diagonal (a CPU factor is mirrored once, by mirror_upper, instead).
void accumulate_block(const at::Tensor& out, const at::Tensor& x, int64_t row_begin,
                      int64_t row_end, int64_t col_begin, int64_t col_end, double alpha,
                      double beta, bool mirror) {
  at::Tensor block = out.slice(0, row_begin, row_end).slice(1, col_begin, col_end);
  if (beta == 0) block.zero_();  // the product must not see old NaN
  block.addmm_(x.slice(1, row_begin, row_end).t(), x.slice(1, col_begin, col_end), beta,
               alpha);
  if (!mirror) return;
  if (row_begin != col_begin) {
    out.slice(0, col_begin, col_end).slice(1, row_begin, row_end).copy_(block.t());
  } else {
    // A GEMM rounds (i, j) and (j, i) differently: keep the upper half and mirror it.
    const at::Tensor strict_upper = block.triu(1);
    block.triu_().add_(strict_upper.t());
  }
}

// The lower triangle of a contiguous CPU factor set from its upper one, in one loop: per
// block, a transposed copy (or triu, triu_ and add_) costs more than a small block's GEMM.
void mirror_upper(const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "mirror_upper", [&] {
    scalar_t* f = out.mutable_data_ptr<scalar_t>();
    const int64_t d = out.size(0);
    // Tile by tile, so that the column writes of a large factor stay in cache.
    constexpr int64_t tile = 32;
    for (int64_t i0 = 0; i0 < d; i0 += tile) {
      for (int64_t j0 = i0; j0 < d; j0 += tile) {
        for (int64_t i = i0; i < std::min(i0 + tile, d); ++i) {
          for (int64_t j = std::max(j0, i + 1); j < std::min(j0 + tile, d); ++j) {
            f[j * d + i] = f[i * d + j];
          }
        }
      }
    }
  });
}

// The ones column: its row is the column sums of x, its corner the row count.
void accumulate_ones_column(const at::Tensor& out, const at::Tensor& x, double alpha,
                            double beta) {
  const int64_t d = x.size(1);
  if (out.is_cpu()) {
    // The column above the corner and the corner only (mirror_upper writes the row), in
    // plain loops: a reduction and five small ATen calls cost more than the sums.
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "accumulate_ones_column", [&] {
      const scalar_t* rows = x.const_data_ptr<scalar_t>();
      const int64_t n = x.size(0), row_stride = x.stride(0), column_stride = x.stride(1);
      std::vector<double> sums(d, 0.0);
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < d; ++j) sums[j] += rows[r * row_stride + j * column_stride];
      }
      scalar_t* f = out.mutable_data_ptr<scalar_t>();
      auto update = [&](int64_t at, double value) {
        f[at] = static_cast<scalar_t>((beta == 0 ? 0.0 : beta * f[at]) + alpha * value);
      };
      for (int64_t j = 0; j < d; ++j) update(j * (d + 1) + d, sums[j]);
      update(d * (d + 1) + d, static_cast<double>(n));
    });
    return;
  }
  const at::Tensor sums = x.sum(0);
  at::Tensor row = out.select(0, d).slice(0, 0, d);
  if (beta == 0) {
    row.copy_(sums).mul_(alpha);
  } else {
    row.mul_(beta).add_(sums, alpha);
  }
  out.select(1, d).slice(0, 0, d).copy_(row);
  at::Tensor corner = out.select(0, d).select(0, d);
  const double old_corner = beta == 0 ? 0.0 : beta * corner.item<double>();
  corner.fill_(old_corner + alpha * static_cast<double>(x.size(0)));
}

struct Block {
  int64_t layer, row_begin, row_end, col_begin, col_end;
  double cost;
};

// The upper triangle of [begin, end)^2 as blocks: recursive halving gives two
// triangles and one square off-diagonal block, so all but the smallest diagonal
// blocks are square GEMMs, and about half the flops of x^T x are spent.
void split_triangle(int64_t layer, int64_t begin, int64_t end, int64_t rows,
                    std::vector<Block>& blocks) {
  const int64_t size = end - begin;
  if (size <= kGramBlock) {
    blocks.push_back({layer, begin, end, begin, end, double(size) * size * (rows + 1)});
    return;
  }
  const int64_t middle = begin + (size / 2 + kAlign - 1) / kAlign * kAlign;
  blocks.push_back({layer, begin, middle, middle, end,
                    double(middle - begin) * (end - middle) * (rows + 1)});
  split_triangle(layer, begin, middle, rows, blocks);
  split_triangle(layer, middle, end, rows, blocks);
}

// Blocks of every layer, spread over the threads: one parallel region for the whole
// step, single-threaded GEMMs inside it (or threaded GEMMs in turn, see run_balanced).
void accumulate_blocks(at::TensorList outs, const std::vector<at::Tensor>& xs,
                       double alpha, double beta) {
  std::vector<Block> blocks;
  for (int64_t layer = 0; layer < static_cast<int64_t>(xs.size()); ++layer) {
    const int64_t size = xs[layer].size(1), rows = xs[layer].size(0);
    if (double(rows) * size * size <= kWholeGram) {
      blocks.push_back({layer, 0, size, 0, size, double(size) * size * (rows + 1)});
    } else {
      split_triangle(layer, 0, size, rows, blocks);
    }
  }
  if (blocks.empty()) return;
  const bool mirror = !outs[0].is_cpu();
  std::vector<double> costs;
  for (const Block& b : blocks) costs.push_back(b.cost);
  run_balanced(costs, host_threads(outs[0]), [&](int64_t i) {
    const Block& b = blocks[i];
    accumulate_block(outs[b.layer], xs[b.layer], b.row_begin, b.row_end, b.col_begin,
                     b.col_end, alpha, beta, mirror);
  });
}

}  // namespace

int64_t host_threads(const at::Tensor& t) {
  return t.is_cpu() ? std::max<int64_t>(1, at::get_num_threads()) : 1;
}

void accumulate_grams(at::TensorList outs, at::TensorList xs,
                       const std::vector<bool>& append_ones, double alpha, double beta) {
  // Inputs already in their factor's dtype: every layer's blocks in one parallel region.
  std::vector<at::Tensor> same_outs, same_xs;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].scalar_type() != outs[i].scalar_type()) continue;
    same_outs.push_back(outs[i]);
    same_xs.push_back(xs[i]);
    if (append_ones[i]) accumulate_ones_column(outs[i], xs[i], alpha, beta);
  }
  accumulate_blocks(same_outs, same_xs, alpha, beta);
  // The others one layer at a time, converted a chunk of rows at a time.
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].scalar_type() == outs[i].scalar_type()) continue;
    const int64_t n = xs[i].size(0);
    const int64_t chunk_rows = std::max(
        kMinConvertRows,
        kConvertBytes / std::max<int64_t>(1, xs[i].size(1) * outs[i].element_size()));
    for (int64_t start = 0; start == 0 || start < n; start += chunk_rows) {
      const at::Tensor chunk =
          xs[i].narrow(0, start, std::min(chunk_rows, n - start)).to(outs[i].scalar_type());
      const double chunk_beta = start == 0 ? beta : 1.0;
      if (append_ones[i]) accumulate_ones_column(outs[i], chunk, alpha, chunk_beta);
      accumulate_blocks({outs[i]}, {chunk}, alpha, chunk_beta);
    }
  }
  for (const at::Tensor& out : outs) {
    if (out.is_cpu()) mirror_upper(out);
  }
}

}  // namespace fastlaplace
