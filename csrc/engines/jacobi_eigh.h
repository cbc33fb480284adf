// The one-block-per-matrix Jacobi eigensolver of the CUDA batched_eigh, written once for
// the GPU (csrc/cuda/batched_eigh.cu) and for its host emulation
// (csrc/emulation/jacobi_eigh.cpp, for the tests); see host_device.h for how.
//
// Two-sided cyclic Jacobi (Golub & Van Loan, Algorithm 8.5.3) in the parallel
// round-robin ordering: a sweep is m - 1 rounds (m = n rounded up to even) of m / 2
// rotations on disjoint index pairs, each round J^T A J applied by rows, then by columns
// (and to V by columns). Sweeps repeat until the off-diagonal norm is below the working
// precision relative to ||A||_F, at most max_sweeps times. Eigenvalues come out ascending
// with their eigenvectors, as LAPACK's.
//
// The working copies are double whatever the input: in float32 a sweep's ~2n rounded
// updates of every entry left eigenvalues 2e-5 off (relative, n = 100) against LAPACK's
// 5e-7; in double they are exact to float32 rounding. The stopping and skipping tests use
// the input's precision, which is all the rounded result keeps.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fastlaplace {
namespace jacobi {

// The largest matrix the solver takes: its working copies live in one block's shared
// memory (2 n (n | 1) doubles: 161 KiB at n = 100; a GPU may allow less, see the
// dispatch), and larger ones are faster through cuSOLVER.
constexpr int64_t kMaxSize = 112;

// Sweeps before giving up on convergence (it takes 6-10 at these sizes).
template <typename scalar_t>
FL_HOST_DEVICE constexpr int max_sweeps() {
  return sizeof(scalar_t) == 4 ? 20 : 30;
}

// Leading dimension of the working matrices: odd, so that a column walk of a warp touches
// 32 different shared-memory banks.
FL_HOST_DEVICE inline int64_t leading_dimension(int64_t n) { return n | 1; }

// Doubles of shared working memory for an n x n matrix and block of `threads`: A and V,
// the round's rotations (c, s and the pair), the eigenvalue ranks and the reduction slots.
FL_HOST_DEVICE inline int64_t workspace_elements(int64_t n, int64_t threads) {
  const int64_t pairs = (n + 1) / 2;
  return 2 * n * leading_dimension(n) + 4 * pairs + n + threads + 1;
}

// The pair k of round r of a round-robin tournament of m (even) players: player 0 stays,
// the others turn; over rounds 0 .. m - 2 every pair meets exactly once.
FL_HOST_DEVICE inline void round_robin_pair(int m, int round, int k, int* p, int* q) {
  const int turning = m - 1;
  if (k == 0) {
    *p = 0;
    *q = 1 + round % turning;
  } else {
    *p = 1 + (round + k) % turning;
    *q = 1 + (round - k + turning) % turning;
  }
}

struct Workspace {
  double* a;        // n x ld, the matrix being diagonalised
  double* v;        // n x ld, the accumulated rotations (eigenvectors as columns)
  double* cosine;   // per pair of the round
  double* sine;
  double* first;    // the round's pairs, stored as doubles (exact)
  double* second;
  double* rank;     // per eigenvalue, its position in ascending order
  double* partial;  // per thread, a partial sum; then the total in partial[threads]
};

FL_HOST_DEVICE inline Workspace carve(double* memory, int64_t n) {
  const int64_t ld = leading_dimension(n), pairs = (n + 1) / 2;
  Workspace w;
  w.a = memory;
  w.v = w.a + n * ld;
  w.cosine = w.v + n * ld;
  w.sine = w.cosine + pairs;
  w.first = w.sine + pairs;
  w.second = w.first + pairs;
  w.rank = w.second + pairs;
  w.partial = w.rank + n;  // threads + 1 slots, the last of workspace_elements
  return w;
}

// (x, y) <- (c x - s y, s x + c y): one entry pair of the rotation J(p, q, θ).
FL_HOST_DEVICE inline void rotate(double* x, double* y, double c, double s) {
  const double a = *x, b = *y;
  *x = c * a - s * b;
  *y = s * a + c * b;
}

template <typename scalar_t>
FL_HOST_DEVICE scalar_t machine_epsilon();
template <>
FL_HOST_DEVICE inline float machine_epsilon<float>() { return 1.1920929e-7f; }
template <>
FL_HOST_DEVICE inline double machine_epsilon<double>() { return 2.220446049250313e-16; }

// f(i, j) for the entries e = t, t + count, ... < rows * columns of a block's thread t, as
// (i, j) = (e / columns, e % columns) stepped without a division per entry: a GPU has no
// integer divider, and these loops are the solver's inner ones.
template <typename Entry>
FL_HOST_DEVICE void for_each_entry(int t, int count, int rows, int columns, Entry f) {
  const int step_i = count / columns, step_j = count % columns;
  for (int i = t / columns, j = t % columns; i < rows;) {
    f(i, j);
    i += step_i;
    j += step_j;
    if (j >= columns) {
      j -= columns;
      ++i;
    }
  }
}

// Sum over the threads of each one's value, left in w.partial[threads] for all to read.
template <typename Threads, typename Value>
FL_HOST_DEVICE double block_sum(const Threads& threads, const Workspace& w, Value value) {
  const int count = int(threads.count());
  threads.each([&](int t) { w.partial[t] = value(t); });
  threads.each([&](int t) {
    if (t != 0) return;
    double total = 0;
    for (int i = 0; i < count; ++i) total += w.partial[i];
    w.partial[count] = total;
  });
  return w.partial[count];
}

// Eigenpairs of the symmetric n x n matrix whose lower triangle is input[i * n + j], i >= j
// (row-major, contiguous): values[j] ascending, vectors column-major (vectors[j * n + i]
// is entry i of eigenvector j). Every thread of the block calls it with the same arguments.
template <typename scalar_t, typename Threads>
FL_HOST_DEVICE void eigh(const Threads& threads, const Workspace& w, const scalar_t* input, int n,
                         scalar_t* values, scalar_t* vectors, int max_sweeps) {
  // 32-bit indices: n is small (see kMaxSize).
  const int count = int(threads.count()), ld = int(leading_dimension(n));
  const int m = n + (n & 1), pairs = m / 2;
  threads.each([&](int t) {
    for_each_entry(t, count, n, n, [&](int i, int j) {
      w.a[i * ld + j] = i >= j ? input[i * n + j] : input[j * n + i];
      w.v[i * ld + j] = i == j ? 1.0 : 0.0;
    });
  });
  const double eps = machine_epsilon<scalar_t>();
  const double frobenius = block_sum(threads, w, [&](int t) {
    double sum = 0;
    for_each_entry(t, count, n, n, [&](int i, int j) { sum += w.a[i * ld + j] * w.a[i * ld + j]; });
    return sum;
  });
  for (int sweep = 0; sweep < max_sweeps && n > 1; ++sweep) {
    const double off = block_sum(threads, w, [&](int t) {
      double sum = 0;
      for_each_entry(t, count, n, n, [&](int i, int j) {
        if (i != j) sum += w.a[i * ld + j] * w.a[i * ld + j];
      });
      return sum;
    });
    if (!(off > eps * eps * frobenius)) break;  // also stops on a zero matrix
    for (int round = 0; round < m - 1; ++round) {
      // The round's rotations, one thread per pair; a pair with the padding index of an
      // odd n, or an off-diagonal entry already negligible, gets the identity.
      threads.each([&](int t) {
        for (int k = t; k < pairs; k += count) {
          int p, q;
          round_robin_pair(m, round, k, &p, &q);
          w.first[k] = p;
          w.second[k] = q;
          double c = 1, s = 0;
          if (p < n && q < n) {
            const double apq = w.a[p * ld + q], app = w.a[p * ld + p], aqq = w.a[q * ld + q];
            if (std::fabs(apq) > eps * std::sqrt(std::fabs(app) * std::fabs(aqq)) && apq != 0) {
              const double theta = (aqq - app) / (2 * apq);
              const double tangent = (theta >= 0 ? 1.0 : -1.0) /
                                       (std::fabs(theta) + std::sqrt(1 + theta * theta));
              c = 1 / std::sqrt(1 + tangent * tangent);
              s = tangent * c;
            }
          }
          w.cosine[k] = c;
          w.sine[k] = s;
        }
      });
      // A <- J^T A: rows p and q of each pair.
      threads.each([&](int t) {
        for_each_entry(t, count, pairs, n, [&](int k, int j) {
          const int p = int(w.first[k]), q = int(w.second[k]);
          if (p >= n || q >= n || w.sine[k] == 0) return;
          rotate(&w.a[p * ld + j], &w.a[q * ld + j], w.cosine[k], w.sine[k]);
        });
      });
      // A <- A J and V <- V J: columns p and q of each pair.
      threads.each([&](int t) {
        for_each_entry(t, count, pairs, n, [&](int k, int i) {
          const int p = int(w.first[k]), q = int(w.second[k]);
          if (p >= n || q >= n || w.sine[k] == 0) return;
          rotate(&w.a[i * ld + p], &w.a[i * ld + q], w.cosine[k], w.sine[k]);
          rotate(&w.v[i * ld + p], &w.v[i * ld + q], w.cosine[k], w.sine[k]);
        });
      });
    }
  }
  // Ascending order: eigenvalue j goes to position #{i : λ_i < λ_j, or λ_i = λ_j and i < j}.
  threads.each([&](int t) {
    for (int j = t; j < n; j += count) {
      const double value = w.a[j * ld + j];
      int position = 0;
      for (int i = 0; i < n; ++i) {
        const double other = w.a[i * ld + i];
        position += other < value || (other == value && i < j);
      }
      w.rank[j] = position;
    }
  });
  threads.each([&](int t) {
    for_each_entry(t, count, n, n, [&](int j, int i) {  // entry i of eigenvector j: coalesced
      const int position = int(w.rank[j]);
      vectors[position * n + i] = scalar_t(w.v[i * ld + j]);
      if (i == 0) values[position] = scalar_t(w.a[j * ld + j]);
    });
  });
}

}  // namespace jacobi
}  // namespace fastlaplace
