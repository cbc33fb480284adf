// Independent work items of known cost spread over the host threads.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace fastlaplace {

// Runs body(item) once for every item, costs[item] its relative cost. With several
// threads and a packing whose largest thread load stays within 1.15x of an even share,
// the items are packed longest first onto the least loaded thread and run in one
// parallel region, where ATen kernels run single-threaded: small GEMMs side by side beat
// each one threaded. Otherwise (one thread, or a few dominant items) they run one after
// the other on the caller's thread, each kernel threaded by itself. Allocate outside body
// what outlives it: memory freed by another thread than the one that allocated it costs
// more.
void run_balanced(const std::vector<double>& costs, int64_t threads,
                  const std::function<void(int64_t)>& body);

}  // namespace fastlaplace
