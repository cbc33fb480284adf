// The fused tile kernel of the CUDA curvature ops (factor accumulation, conv factor,
// diagonal GGN, Kron solve, K-FAC preconditioning, Kron predictive variance), written once
// for the GPU (csrc/engines/tile_launch_cuda.cuh) and for its host emulation
// (csrc/emulation/, for the tests); see host_device.h for how.
//
// Out_l <- beta Out_l + alpha X_l^T Y_l for every layer l of a launch, X_l and Y_l
// virtual matrices with the same rows, read element by element from their Sources (a
// layer's input rows, a Conv2d input's patches by implicit im2col, squared or scaled
// rows, strided views, a row of ones below a layer's rows, a damped Kron spectrum), each
// with an optional implicit ones column, and optionally each entry times a damped Kron
// spectrum's power (the Kron solve is four such launches) and a factor read on the device
// (the K-FAC preconditioner's KL clip). A symmetric layer's product is a symmetric matrix
// (a Gram matrix X = Y, or B^T diag(w) B): only its tiles on or above the diagonal are
// computed, and each block writes its upper entries and their mirror images, so the
// result is exactly symmetric. One block computes one kTile x kTile
// tile of one layer (all layers' tiles in one launch), staging rows of both operands in
// shared memory, converted to the factor's dtype there (no converted copy of a bf16 input
// exists; 16-bit inputs keep their dtype for the tensor-core variant), each thread keeping
// a kMicro x kMicro block of sums.
//
// A launch with fewer tiles than the GPU has room for splits the rows of its layers
// into chunks: each (tile, chunk) block writes its partial sums to a workspace, and a
// second launch adds them in chunk order (no atomics: the result does not change from
// run to run).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "host_device.h"

namespace fastlaplace {
namespace gram {

constexpr int kMicro = 4;                // each thread's sums: kMicro x kMicro
constexpr int kSide = 16;                // threads along a tile edge
constexpr int kTile = kSide * kMicro;    // tile edge
constexpr int kThreads = kSide * kSide;  // threads of a block
constexpr int kDepth = 16;               // rows of X and Y per shared-memory stage
constexpr int kMmaDepth = 32;            // the same on the tensor cores
// Rows a chunk gets at least when a launch's rows are split, and the most chunks.
constexpr int64_t kMinChunkRows = 512;
constexpr int64_t kMaxChunks = 256;
// The split workspace holds at most this many partial sums per launch.
constexpr int64_t kMaxPartialSums = int64_t(1) << 24;

// (s mu_i lambda_j + delta)^p, the damped Kron spectrum's power (eigenvalues clamped at 0,
// NaN kept): a factor on each entry (i, j) of an output (the Kron solve), or a Source.
template <typename acc_t>
struct Spectrum {
  const acc_t* mu = nullptr;  // null: no factor
  const acc_t* lambda = nullptr;
  const double* scale = nullptr;
  const double* delta = nullptr;
  double exponent = -1.0;

  FL_HOST_DEVICE acc_t weight(int64_t i, int64_t j) const {
    const acc_t m = mu[i] < 0 ? acc_t(0) : mu[i], l = lambda[j] < 0 ? acc_t(0) : lambda[j];
    const acc_t damped = static_cast<acc_t>(*scale) * m * l + static_cast<acc_t>(*delta);
    if (exponent == -1.0) return acc_t(1) / damped;
    if (exponent == -0.5) return acc_t(1) / std::sqrt(damped);
    return static_cast<acc_t>(std::pow(damped, static_cast<acc_t>(exponent)));
  }
};

// A Source is read as at(row(r), column(c)): the row and column parts of an element's
// address are worked out apart, so that a thread, whose column is the same in every
// stage, decodes it once per stage and each row once for both operands.

// A layer's inputs (rows, columns), any strides (expanded and transposed included).
template <typename input_t_>
struct DenseRows {
  using input_t = input_t_;
  static constexpr bool kSquared = false;
  const input_t* data;
  int64_t rows, columns, row_stride, column_stride;

  struct Row {
    int64_t offset;
  };
  struct Column {
    int64_t offset;
  };
  FL_HOST_DEVICE Row row(int64_t r) const { return {r * row_stride}; }
  FL_HOST_DEVICE Column column(int64_t c) const { return {c * column_stride}; }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    return static_cast<acc_t>(data[r.offset + c.offset]);
  }
};

// n / d for a d fixed by the launch, by a multiply, an add and a shift (division by an
// invariant integer, Granlund & Montgomery 1994): a GPU has no integer divider. Exact for
// every 32-bit n and 1 <= d <= 2^31.
struct Divider {
  uint32_t divisor, multiplier, shift;

  static Divider of(uint32_t d) {
    uint32_t shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    // floor(2^32 (2^shift - d) / d) + 1 < 2^32: the quotient's high product
    const uint64_t multiplier = ((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1;
    return {d, static_cast<uint32_t>(multiplier), shift};
  }
  FL_HOST_DEVICE uint32_t quotient(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t(n) * multiplier) >> 32);
#endif
    return static_cast<uint32_t>((uint64_t(high) + n) >> shift);
  }
};

// The patches of a Conv2d input (N, C, H, W) as rows: row image * positions + (oy * out_w
// + ox), column channel * offsets + (ki * kw + kj), the order of weight.flatten(1); zero
// where the kernel sees the padding. Rows and columns are below 2^31 (checked by the
// launch), so that the decoding divides in 32 bits; a row's, decoded at every stage, by
// Dividers.
template <typename input_t_>
struct ConvPatches {
  using input_t = input_t_;
  static constexpr bool kSquared = false;
  const input_t* data;
  int64_t rows, columns;
  Divider positions, out_w;
  int32_t offsets, kw, height, width;
  int32_t stride[2], padding[2], dilation[2];
  int64_t image_stride, channel_stride, height_stride, width_stride;

  struct Row {
    int64_t offset;  // of the image
    int32_t y, x;    // the input pixel under the kernel's first offset
  };
  struct Column {
    int64_t offset;  // of the channel
    int32_t dy, dx;  // the kernel offset's displacement
  };
  FL_HOST_DEVICE Row row(int64_t r) const {
    const uint32_t index = static_cast<uint32_t>(r);
    const uint32_t image = positions.quotient(index);
    const uint32_t position = index - image * positions.divisor;
    const int32_t oy = static_cast<int32_t>(out_w.quotient(position));
    const int32_t ox = static_cast<int32_t>(position) - oy * static_cast<int32_t>(out_w.divisor);
    return {image * image_stride, oy * stride[0] - padding[0], ox * stride[1] - padding[1]};
  }
  FL_HOST_DEVICE Column column(int64_t c) const {
    const uint32_t index = static_cast<uint32_t>(c);
    const uint32_t channel = index / offsets, offset = index - channel * offsets;
    const int32_t ki = static_cast<int32_t>(offset / kw);
    const int32_t kj = static_cast<int32_t>(offset) - ki * kw;
    return {channel * channel_stride, ki * dilation[0], kj * dilation[1]};
  }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    const int32_t y = r.y + c.dy, x = r.x + c.dx;
    if (y < 0 || y >= height || x < 0 || x >= width) return acc_t(0);
    return static_cast<acc_t>(data[r.offset + c.offset + y * height_stride + x * width_stride]);
  }
};

// Squares of the rows of a (rows, inner, columns) tensor summed over `inner`: entry
// (r, c) = sum_k x[r, k, c]^2 (inner = 1 for a matrix), in the factor's dtype. No
// tensor-core variant: a square rounded to 16 bits would lose the input's precision.
template <typename input_t_>
struct SquaredRows : DenseRows<input_t_> {
  using typename DenseRows<input_t_>::Row;
  using typename DenseRows<input_t_>::Column;
  static constexpr bool kSquared = true;
  int64_t inner, inner_stride;

  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    acc_t sum = acc_t(0);
    for (int64_t k = 0; k < inner; ++k) {
      const acc_t x = static_cast<acc_t>(this->data[r.offset + k * inner_stride + c.offset]);
      sum += x * x;
    }
    return sum;
  }
};

// Entries of a layer's rows times the entries of a second tensor at the same (row, column)
// under its own strides (R * S for the K-FAC preconditioner; stride 0 repeats a vector).
template <typename input_t_>
struct ScaledRows : DenseRows<input_t_> {
  const input_t_* scale;
  int64_t scale_row_stride, scale_column_stride;

  struct Row {
    int64_t offset, scale_offset;
  };
  struct Column {
    int64_t offset, scale_offset;
  };
  FL_HOST_DEVICE Row row(int64_t r) const { return {r * this->row_stride, r * scale_row_stride}; }
  FL_HOST_DEVICE Column column(int64_t c) const {
    return {c * this->column_stride, c * scale_column_stride};
  }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    return static_cast<acc_t>(this->data[r.offset + c.offset]) *
           static_cast<acc_t>(scale[r.scale_offset + c.scale_offset]);
  }
};

// A layer's rows and, where `ones` is set, a row of ones below them (the last of `rows`):
// [X; 1], the transposed inputs of a layer with a bias.
template <typename input_t_>
struct RowsWithOnes : DenseRows<input_t_> {
  using typename DenseRows<input_t_>::Column;
  bool ones;

  struct Row {
    int64_t offset;
    bool one;
  };
  FL_HOST_DEVICE Row row(int64_t r) const {
    return {r * this->row_stride, ones && r == this->rows - 1};
  }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    return r.one ? acc_t(1) : static_cast<acc_t>(this->data[r.offset + c.offset]);
  }
};

// The damped Kron spectrum's power as a matrix: entry (i, j) = spectrum.weight(i, j).
template <typename input_t_>
struct SpectrumRows {
  using input_t = input_t_;
  static constexpr bool kSquared = false;
  Spectrum<input_t> spectrum;
  int64_t rows, columns;

  struct Row {
    int64_t index;
  };
  struct Column {
    int64_t index;
  };
  FL_HOST_DEVICE Row row(int64_t r) const { return {r}; }
  FL_HOST_DEVICE Column column(int64_t c) const { return {c}; }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t at(Row r, Column c) const {
    return static_cast<acc_t>(spectrum.weight(r.index, c.index));
  }
};

// One output of a launch, X^T Y, and the blocks that compute it.
template <typename Left_, typename Right_, typename acc_t_>
struct Layer {
  using Left = Left_;
  using Right = Right_;
  using acc_t = acc_t_;
  Left left;                 // X; left.rows == right.rows
  Right right;               // Y
  bool left_ones, right_ones;
  bool symmetric;            // X^T Y is symmetric: upper tiles only, mirrored
  acc_t* out;                // out_rows x out_columns, rows out_stride apart
  int64_t out_rows;          // left.columns, plus the ones column
  int64_t out_columns;       // right.columns, plus the ones column
  int64_t out_stride;
  int64_t tiles_down = 0;    // ceil(out_rows / kTile)
  int64_t tiles_across = 0;  // ceil(out_columns / kTile)
  int64_t chunks = 1;        // row chunks; partial sums in the workspace when > 1
  int64_t first_block = 0;   // blocks of the layers before it in the launch
  int64_t first_finishing_block = 0;  // the same in the launch that adds the chunks
  int64_t partial_offset = 0;         // its chunks' partial sums in the workspace
  Spectrum<acc_t> spectrum = {};      // a factor on every entry, where spectrum.mu is set
  const acc_t* multiplier = nullptr;  // and a factor on all of them, where set

  FL_HOST_DEVICE int64_t rows() const { return left.rows; }
  FL_HOST_DEVICE int64_t tiles() const {
    return symmetric ? tiles_down * (tiles_down + 1) / 2 : tiles_down * tiles_across;
  }
  FL_HOST_DEVICE int64_t blocks() const { return tiles() * chunks; }
  FL_HOST_DEVICE int64_t finishing_blocks() const { return chunks > 1 ? tiles() : 0; }
  FL_HOST_DEVICE int64_t chunk_rows() const {
    const int64_t per = (rows() + chunks - 1) / chunks;
    return (per + kMmaDepth - 1) / kMmaDepth * kMmaDepth;  // whole stages of either kind
  }
};

// The Gram layer [X, 1]^T [X, 1] of one source (a factor of size x size).
template <typename acc_t, typename Source>
Layer<Source, Source, acc_t> gram_layer(const Source& x, bool ones, acc_t* out) {
  const int64_t size = x.columns + (ones ? 1 : 0);
  return {x, x, ones, ones, true, out, size, size, size};
}

struct Plan {
  int64_t blocks = 0, finishing_blocks = 0, partial_sums = 0;
};

// Tiles, chunks and block numbering of a launch meant to fill about target_blocks blocks.
template <typename L>
Plan plan(std::vector<L>& layers, int64_t target_blocks) {
  int64_t tiles = 0;
  for (L& layer : layers) {
    layer.tiles_down = (layer.out_rows + kTile - 1) / kTile;
    layer.tiles_across = (layer.out_columns + kTile - 1) / kTile;
    tiles += layer.tiles();
  }
  Plan p;
  const int64_t wanted = tiles == 0 ? 1 : (target_blocks + tiles - 1) / tiles;
  for (L& layer : layers) {
    const int64_t by_rows = (layer.rows() + kMinChunkRows - 1) / kMinChunkRows;
    const int64_t sums = layer.out_rows * layer.out_columns;
    const int64_t room = sums == 0 ? 1 : (kMaxPartialSums - p.partial_sums) / sums;
    layer.chunks = std::max<int64_t>(1, std::min({wanted, by_rows, kMaxChunks, room}));
    layer.first_block = p.blocks;
    layer.first_finishing_block = p.finishing_blocks;
    layer.partial_offset = p.partial_sums;
    p.blocks += layer.blocks();
    p.finishing_blocks += layer.finishing_blocks();
    if (layer.chunks > 1) p.partial_sums += layer.chunks * sums;
  }
  return p;
}

// What block `block` of a launch computes.
struct Job {
  int64_t layer, chunk, tile_row, tile_column;
};

template <typename L>
FL_HOST_DEVICE Job locate(const L* layers, int64_t count, int64_t block, bool finishing) {
  auto first = [finishing](const L& layer) {
    return finishing ? layer.first_finishing_block : layer.first_block;
  };
  const int64_t low = job_of_block(layers, count, block, first);
  const L& layer = layers[low];
  int64_t index = block - first(layer);
  Job job{low, index / layer.tiles(), 0, 0};
  index -= job.chunk * layer.tiles();
  if (!layer.symmetric) {
    job.tile_row = index / layer.tiles_across;
    job.tile_column = index - job.tile_row * layer.tiles_across;
    return job;
  }
  // Row r of the upper triangle has tiles_down - r tiles.
  while (index >= layer.tiles_down - job.tile_row) {
    index -= layer.tiles_down - job.tile_row;
    ++job.tile_row;
  }
  job.tile_column = job.tile_row + index;
  return job;
}

// Column c of [X, 1, 0...] as one thread loads it: from the source, the ones column, or
// the zeros past the output's edge.
template <typename Source>
struct Operand {
  typename Source::Column column;
  bool from_source, one;

  FL_HOST_DEVICE Operand(const Source& source, bool ones, int64_t c)
      : column(source.column(c < source.columns ? c : 0)),
        from_source(c < source.columns),
        one(c == source.columns && ones) {}
  template <typename T>
  FL_HOST_DEVICE T value(const Source& source, typename Source::Row row) const {
    return from_source ? source.template at<T>(row, column) : T(one ? 1.0f : 0.0f);
  }
};

// What a block of the accumulating launch computes: tile (row0.., column0..) of a layer,
// over its rows [begin, end).
struct Tile {
  Job job;
  int64_t row0, column0, begin, end;
};

template <typename L>
FL_HOST_DEVICE Tile tile_of(const L* layers, int64_t count, int64_t block) {
  const Job job = locate(layers, count, block, false);
  const L& layer = layers[job.layer];
  const int64_t begin = job.chunk * layer.chunk_rows();
  return {job, job.tile_row * kTile, job.tile_column * kTile, begin,
          std::min(layer.rows(), begin + layer.chunk_rows())};
}

// A stage of `depth` rows of X and Y is loaded in two steps, so that the global reads of
// the next stage overlap the multiplication of this one: fetch_stage reads thread t's
// share into its registers (staged_values<depth>() values), put_stage writes them into
// shared memory. Thread t takes column t % kTile of both operands, in rows t / kTile +
// multiples of kRowsPerPass: consecutive threads read consecutive columns, and a thread
// decodes its column once and each row once for both operands.
constexpr int kRowsPerPass = kThreads / kTile;

template <int depth>
FL_HOST_DEVICE constexpr int staged_values() {
  static_assert(depth % kRowsPerPass == 0, "every thread loads as many rows");
  return 2 * depth / kRowsPerPass;
}

template <int depth, typename T, typename L>
FL_HOST_DEVICE void fetch_stage(const L& layer, const Tile& tile, int64_t k0, int t, T* mine) {
  const int c = t % kTile;
  const Operand<typename L::Left> x(layer.left, layer.left_ones, tile.row0 + c);
  const Operand<typename L::Right> y(layer.right, layer.right_ones, tile.column0 + c);
  FL_UNROLL for (int q = 0; q < depth / kRowsPerPass; ++q) {
    const int64_t r = k0 + t / kTile + q * kRowsPerPass;
    const bool live = r < tile.end;
    mine[2 * q] = live ? x.template value<T>(layer.left, layer.left.row(r)) : T(0.0f);
    mine[2 * q + 1] = live ? y.template value<T>(layer.right, layer.right.row(r)) : T(0.0f);
  }
}

template <int depth, typename T>
FL_HOST_DEVICE void put_stage(int t, const T* mine, T (*left)[kTile], T (*right)[kTile]) {
  const int c = t % kTile;
  FL_UNROLL for (int q = 0; q < depth / kRowsPerPass; ++q) {
    const int k = t / kTile + q * kRowsPerPass;
    left[k][c] = mine[2 * q];
    right[k][c] = mine[2 * q + 1];
  }
}

// Whether (i, j) is an entry a block computes: inside the output, and for a symmetric one
// on or above the diagonal.
template <typename L>
FL_HOST_DEVICE bool computed(const L& layer, int64_t i, int64_t j) {
  return i < layer.out_rows && j < layer.out_columns && !(layer.symmetric && i > j);
}

// Entry (i, j) (computed) of the output gets beta Out(i, j) + alpha sum, the sum times the
// spectrum's factor and the multiplier where set (beta == 0 ignores the old entry, NaN
// included, as BLAS does); an upper entry of a symmetric output also its mirror image.
template <typename L>
FL_HOST_DEVICE void store(const L& layer, int64_t i, int64_t j, typename L::acc_t sum,
                          typename L::acc_t alpha, typename L::acc_t beta) {
  using acc_t = typename L::acc_t;
  acc_t* out = layer.out;
  const int64_t at = i * layer.out_stride + j;
  if (layer.spectrum.mu != nullptr) sum *= layer.spectrum.weight(i, j);
  if (layer.multiplier != nullptr) sum *= *layer.multiplier;
  const acc_t result = beta == acc_t(0) ? alpha * sum : beta * out[at] + alpha * sum;
  out[at] = result;
  if (layer.symmetric) out[j * layer.out_stride + i] = result;
}

// A block's sum for entry (i, j) of its tile, if computed: into the output (see store), or
// as its chunk's partial sum.
template <typename L>
FL_HOST_DEVICE void deliver(const L& layer, const Tile& tile, int64_t i, int64_t j,
                            typename L::acc_t sum, typename L::acc_t* workspace,
                            typename L::acc_t alpha, typename L::acc_t beta) {
  if (!computed(layer, i, j)) return;
  if (layer.chunks == 1) {
    store(layer, i, j, sum, alpha, beta);
  } else {
    workspace[layer.partial_offset + (tile.job.chunk * layer.out_rows + i) * layer.out_columns +
              j] = sum;
  }
}

template <typename acc_t>
struct Stage {
  acc_t left[kDepth][kTile];   // X[k0 + k, the tile's rows]
  acc_t right[kDepth][kTile];  // Y[k0 + k, the tile's columns]
};

// Block `block` of the accumulating launch on the arithmetic units, for every dtype.
// Sums and Staged: DeviceRegisters or HostRegisters of kMicro * kMicro and of
// staged_values<kDepth>() acc_t; `threads` must have kThreads threads.
template <typename L, typename Threads, typename Sums, typename Staged>
FL_HOST_DEVICE void accumulate_tile(const Threads& threads, Stage<typename L::acc_t>& stage,
                                    Sums& sums, Staged& staged, const L* layers, int64_t count,
                                    typename L::acc_t* workspace, int64_t block,
                                    typename L::acc_t alpha, typename L::acc_t beta) {
  using acc_t = typename L::acc_t;
  const Tile tile = tile_of(layers, count, block);
  const L& layer = layers[tile.job.layer];
  threads.each([&](int t) {
    acc_t* mine = sums.of(t);
    FL_UNROLL for (int o = 0; o < kMicro * kMicro; ++o) mine[o] = acc_t(0);
    fetch_stage<kDepth>(layer, tile, tile.begin, t, staged.of(t));
  });
  for (int64_t k0 = tile.begin; k0 < tile.end; k0 += kDepth) {
    threads.each([&](int t) { put_stage<kDepth>(t, staged.of(t), stage.left, stage.right); });
    threads.each([&](int t) {
      if (k0 + kDepth < tile.end) fetch_stage<kDepth>(layer, tile, k0 + kDepth, t, staged.of(t));
      const int ty = t / kSide, tx = t % kSide;
      acc_t* mine = sums.of(t);
      FL_UNROLL for (int k = 0; k < kDepth; ++k) {
        acc_t a[kMicro], b[kMicro];
        FL_UNROLL for (int m = 0; m < kMicro; ++m) {
          a[m] = stage.left[k][ty + kSide * m];
          b[m] = stage.right[k][tx + kSide * m];
        }
        FL_UNROLL for (int m = 0; m < kMicro; ++m) {
          FL_UNROLL for (int n = 0; n < kMicro; ++n) mine[m * kMicro + n] += a[m] * b[n];
        }
      }
    });
  }
  threads.each([&](int t) {
    const int ty = t / kSide, tx = t % kSide;
    const acc_t* mine = sums.of(t);
    FL_UNROLL for (int m = 0; m < kMicro; ++m) {
      FL_UNROLL for (int n = 0; n < kMicro; ++n) {
        deliver(layer, tile, tile.row0 + ty + kSide * m, tile.column0 + tx + kSide * n,
                mine[m * kMicro + n], workspace, alpha, beta);
      }
    }
  });
}

// The tensor-core variant, for bf16 / fp16 inputs and float32 factors: the stage keeps
// the inputs' own 16-bit values, and each warp multiplies kFragmentsPerWarp 16 x 16
// output fragments of the tile (those below the diagonal of a diagonal tile skipped)
// with 16 x 16 x 16 matrix multiply-adds. A stage's products go to a zeroed fragment that
// is then added to the running sums on the arithmetic units: the tensor cores' own
// float32 accumulation (not rounded to nearest) then only ever adds kMmaDepth products.
constexpr int kFragment = 16;
constexpr int kWarps = kThreads / 32;
constexpr int kFragmentsPerWarp = (kTile / kFragment) * (kTile / kFragment) / kWarps;

template <typename half_t>
struct MmaStage {
  alignas(128) half_t left[kMmaDepth][kTile];
  alignas(128) half_t right[kMmaDepth][kTile];
  alignas(128) float sums[kTile][kTile];
};

// Fragment f of warp w covers tile rows 16 (g / 4).., columns 16 (g % 4).., g = w * F + f.
FL_HOST_DEVICE inline int fragment_row(int warp, int f) {
  return (warp * kFragmentsPerWarp + f) / (kTile / kFragment) * kFragment;
}
FL_HOST_DEVICE inline int fragment_column(int warp, int f) {
  return (warp * kFragmentsPerWarp + f) % (kTile / kFragment) * kFragment;
}

// Fragments: the warps' accumulators and their collective operations (DeviceFragments on
// the GPU, called by all 32 lanes of a warp; HostFragments in the emulation): zero(t);
// multiply(t, f, a, b, ldm) adds the product of the col-major 16 x 16 a and the row-major
// b to the stage fragment f of thread t's warp; finish_stage(t) adds the stage fragments
// to the running ones and zeroes them; store(t, f, out, ldm) writes the running fragment
// f row-major. Staged: registers of staged_values<kMmaDepth>() 16-bit values.
template <typename L, typename Threads, typename Fragments, typename Staged>
FL_HOST_DEVICE void accumulate_tile_mma(const Threads& threads,
                                        MmaStage<typename L::Left::input_t>& stage,
                                        Fragments& fragments, Staged& staged, const L* layers,
                                        int64_t count, float* workspace, int64_t block,
                                        float alpha, float beta) {
  const Tile tile = tile_of(layers, count, block);
  const L& layer = layers[tile.job.layer];
  const bool diagonal = layer.symmetric && tile.job.tile_row == tile.job.tile_column;
  // A warp's fragment is needed unless it lies wholly below a diagonal tile's diagonal.
  auto needed = [&](int warp, int f) {
    return !diagonal || fragment_row(warp, f) <= fragment_column(warp, f);
  };
  threads.each([&](int t) {
    fragments.zero(t);
    fetch_stage<kMmaDepth>(layer, tile, tile.begin, t, staged.of(t));
  });
  for (int64_t k0 = tile.begin; k0 < tile.end; k0 += kMmaDepth) {
    threads.each([&](int t) { put_stage<kMmaDepth>(t, staged.of(t), stage.left, stage.right); });
    threads.each([&](int t) {
      if (k0 + kMmaDepth < tile.end) {
        fetch_stage<kMmaDepth>(layer, tile, k0 + kMmaDepth, t, staged.of(t));
      }
      const int warp = t / 32;
      FL_UNROLL for (int f = 0; f < kFragmentsPerWarp; ++f) {
        if (!needed(warp, f)) continue;
        FL_UNROLL for (int k = 0; k < kMmaDepth; k += kFragment) {
          fragments.multiply(t, f, &stage.left[k][fragment_row(warp, f)],
                             &stage.right[k][fragment_column(warp, f)], kTile);
        }
      }
      fragments.finish_stage(t);
    });
  }
  threads.each([&](int t) {
    const int warp = t / 32;
    FL_UNROLL for (int f = 0; f < kFragmentsPerWarp; ++f) {
      fragments.store(t, f, &stage.sums[fragment_row(warp, f)][fragment_column(warp, f)], kTile);
    }
  });
  threads.each([&](int t) {
    for (int e = t; e < kTile * kTile; e += kThreads) {
      const int i = e / kTile, j = e % kTile;
      deliver(layer, tile, tile.row0 + i, tile.column0 + j, stage.sums[i][j], workspace, alpha,
              beta);
    }
  });
}

// Block `block` of the finishing launch: a tile's chunk sums added in chunk order.
template <typename L, typename Threads>
FL_HOST_DEVICE void finish_tile(const Threads& threads, const L* layers, int64_t count,
                                const typename L::acc_t* workspace, int64_t block,
                                typename L::acc_t alpha, typename L::acc_t beta) {
  using acc_t = typename L::acc_t;
  const Job job = locate(layers, count, block, true);
  const L& layer = layers[job.layer];
  threads.each([&](int t) {
    for (int e = t; e < kTile * kTile; e += kThreads) {
      const int64_t i = job.tile_row * kTile + e / kTile;
      const int64_t j = job.tile_column * kTile + e % kTile;
      if (!computed(layer, i, j)) continue;
      acc_t sum = acc_t(0);
      for (int64_t chunk = 0; chunk < layer.chunks; ++chunk) {
        sum += workspace[layer.partial_offset + (chunk * layer.out_rows + i) * layer.out_columns +
                         j];
      }
      store(layer, i, j, sum, alpha, beta);
    }
  });
}

}  // namespace gram
}  // namespace fastlaplace
