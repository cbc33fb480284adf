// CPU kernel of fastlaplace::kron_logdet: log det P_l = sum_ij log(s mu_j lambda_i + delta)
// per layer without a (d_G, d_A) temporary. A log per entry would cost more than the
// torch one-liner's vectorised logs, so entries are multiplied in float64 and only the
// products are logged: their binary exponents are split off (frexp) every few factors,
// which keeps them far from overflow and underflow.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "../engines/kron_eigen.h"

namespace fastlaplace {
namespace {

// Independent running products (they hide the multiply latency) and the factors each
// takes between two renormalisations: 4 factors below float's range stay in double's.
constexpr int kLanes = 4;
constexpr int kFactorsPerRound = 4;

// sum_j sum_i log(mu_j * a_i + delta) for rows [begin, end) of the grid.
double grid_log_sum(const std::vector<double>& a, const double* mu, int64_t begin,
                    int64_t end, double delta) {
  const int64_t size = static_cast<int64_t>(a.size());
  const int64_t block = kLanes * kFactorsPerRound;
  std::array<double, kLanes> product;
  product.fill(1.0);
  int64_t exponent = 0;
  double tail = 0.0;  // log of the entries that do not fill a whole block
  for (int64_t j = begin; j < end; ++j) {
    int64_t i = 0;
    for (; i + block <= size; i += block) {
      for (int f = 0; f < kFactorsPerRound; ++f) {
        for (int lane = 0; lane < kLanes; ++lane) {
          product[lane] *= mu[j] * a[i + f * kLanes + lane] + delta;
        }
      }
      for (int lane = 0; lane < kLanes; ++lane) {
        int e = 0;
        product[lane] = std::frexp(product[lane], &e);
        exponent += e;
      }
    }
    for (; i < size; ++i) tail += std::log(mu[j] * a[i] + delta);
  }
  double total = tail + static_cast<double>(exponent) * std::log(2.0);
  for (double p : product) total += std::log(p);
  return total;
}

template <typename scalar_t>
double layer_logdet(const at::Tensor& eigvals_a, const at::Tensor& eigvals_g, double scale,
                    double delta) {
  const at::Tensor la = eigvals_a.contiguous();
  const at::Tensor lg = eigvals_g.contiguous();
  // NaN survives the clamp (x < 0 is false for NaN), as in torch.clamp_min.
  auto clamp = [](scalar_t x) { return x < 0 ? 0.0 : static_cast<double>(x); };
  std::vector<double> a(la.numel());
  for (int64_t i = 0; i < la.numel(); ++i) a[i] = clamp(la.data_ptr<scalar_t>()[i]);
  std::vector<double> mu(lg.numel());
  for (int64_t j = 0; j < lg.numel(); ++j) mu[j] = scale * clamp(lg.data_ptr<scalar_t>()[j]);
  const int64_t rows_per_task = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, la.numel()));
  return at::parallel_reduce(
      0, lg.numel(), rows_per_task, 0.0,
      [&](int64_t begin, int64_t end, double partial) {
        return partial + grid_log_sum(a, mu.data(), begin, end, delta);
      },
      [](double x, double y) { return x + y; });
}

at::Tensor kron_logdet_cpu(at::TensorList eigvals_a, at::TensorList eigvals_g,
                           const at::Tensor& scale, const at::Tensor& delta) {
  const int64_t layers = static_cast<int64_t>(eigvals_a.size());
  TORCH_CHECK(static_cast<int64_t>(eigvals_g.size()) == layers,
              "kron_logdet: eigvals_a and eigvals_g need one entry per layer");
  TORCH_CHECK(layers > 0, "kron_logdet needs at least one layer");
  check_per_layer(scale, layers, "scale");
  check_per_layer(delta, layers, "delta");
  const at::Tensor scales = scale.to(at::kDouble).contiguous();
  const at::Tensor deltas = delta.to(at::kDouble).contiguous();
  std::vector<double> logdets(layers);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& la = eigvals_a[i];
    const at::Tensor& lg = eigvals_g[i];
    check_factor_dtype(la, "eigvals_a", i);
    TORCH_CHECK(la.dim() == 1 && lg.dim() == 1 && lg.scalar_type() == la.scalar_type(),
                "eigvals_a[", i, "] and eigvals_g[", i, "] must be 1-D of one dtype");
    AT_DISPATCH_FLOATING_TYPES(la.scalar_type(), "kron_logdet_cpu", [&] {
      logdets[i] = layer_logdet<scalar_t>(la, lg, scales.data_ptr<double>()[i],
                                          deltas.data_ptr<double>()[i]);
    });
  }
  at::Tensor result = at::empty({layers}, eigvals_a[0].options().dtype(at::kDouble));
  std::copy(logdets.begin(), logdets.end(), result.data_ptr<double>());
  return result.to(eigvals_a[0].scalar_type());
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("kron_logdet", &fastlaplace::kron_logdet_cpu); }
