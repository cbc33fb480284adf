#include "balance.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <numeric>

namespace fastlaplace {

void run_balanced(const std::vector<double>& costs, int64_t threads,
                  const std::function<void(int64_t)>& body, double max_imbalance) {
  const int64_t count = static_cast<int64_t>(costs.size());
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  threads = std::max<int64_t>(1, std::min(threads, count));
  std::vector<std::vector<int64_t>> buckets(threads);
  std::vector<double> load(threads, 0.0);
  double total = 0.0;
  for (int64_t item : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    buckets[t].push_back(item);
    load[t] += costs[item];
    total += costs[item];
  }
  if (threads == 1 ||
      *std::max_element(load.begin(), load.end()) > max_imbalance * total / threads) {
    for (int64_t item : order) body(item);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      for (int64_t item : buckets[t]) body(item);
    }
  });
}

void run_lapack(const std::vector<int64_t>& sizes, int64_t threads,
                const std::function<void(int64_t)>& body) {
  std::vector<int64_t> small;
  std::vector<double> costs;
  for (int64_t i = 0; i < static_cast<int64_t>(sizes.size()); ++i) {
    if (sizes[i] >= kThreadedLapackSize) {
      body(i);
    } else {
      small.push_back(i);
      costs.push_back(double(sizes[i]) * sizes[i] * sizes[i]);
    }
  }
  run_balanced(costs, threads, [&](int64_t j) { body(small[j]); },
               std::numeric_limits<double>::infinity());
}

}  // namespace fastlaplace
