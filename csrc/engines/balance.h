// Independent work items of known cost spread over the host threads.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace fastlaplace {

// Below this size (measured on 2 cores) single-threaded LAPACK factorisations and
// eigendecompositions side by side beat the same calls one after the other with LAPACK's
// own threads, whatever the balance; above it, the reverse.
constexpr int64_t kThreadedLapackSize = 600;

// Largest thread load, relative to an even share, at which run_balanced still spreads the
// items over the threads by default (for GEMMs, which thread well by themselves).
constexpr double kMaxImbalance = 1.15;

// Runs body(item) once for every item, costs[item] its relative cost. With several
// threads and a packing whose largest thread load stays within max_imbalance times an
// even share, the items are packed longest first onto the least loaded thread and run in
// one parallel region, where ATen kernels run single-threaded: small GEMMs side by side
// beat each one threaded. Otherwise (one thread, or a few dominant items) they run one
// after the other on the caller's thread, each kernel threaded by itself. Allocate
// outside body what outlives it: memory freed by another thread than the one that
// allocated it costs more.
void run_balanced(const std::vector<double>& costs, int64_t threads,
                  const std::function<void(int64_t)>& body,
                  double max_imbalance = kMaxImbalance);

// Runs body(item) once for every square matrix item of edge sizes[item], a LAPACK call
// each: those of kThreadedLapackSize or more one after the other with LAPACK's threads,
// the smaller ones spread over the threads by their d^3 cost, one thread each.
void run_lapack(const std::vector<int64_t>& sizes, int64_t threads,
                const std::function<void(int64_t)>& body);

}  // namespace fastlaplace
