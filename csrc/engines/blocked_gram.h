// Symmetric Gram-matrix accumulation shared by the factor kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastlaplace {

// For every i: outs[i] <- beta * outs[i] + alpha * [xs[i], 1]^T [xs[i], 1]
// (the ones column only where append_ones[i]).
//
// outs[i]: (d_i + append_ones[i])^2 in the accumulation dtype, symmetric (as with
// BLAS syrk only the upper triangle is read, and the result is exactly symmetric).
// xs[i]: (n_i, d_i), any floating dtype; converted about 4 MiB of rows at a time,
// never whole. Only the block-rows on and above the diagonal are multiplied (about half the
// flops of x^T x); all layers' blocks share one parallel region. The ones column is
// never materialised: its row is the column sums, its corner the row count.
// beta == 0 ignores the old content (NaN included), as BLAS does.
void accumulate_grams(at::TensorList outs, at::TensorList xs,
                      const std::vector<bool>& append_ones, double alpha, double beta);

}  // namespace fastlaplace
