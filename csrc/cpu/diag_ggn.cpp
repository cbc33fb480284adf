// CPU kernel of fastlaplace::diag_ggn: diag_i = sum_n sum_k (g_nk o g_nk)(a_n o a_n)^T
// per layer, as one GEMM of squared rows instead of per-sample gradients.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ops.h"

namespace fastlaplace {
namespace {

// Samples squared (and converted) at a time: bounds the temporaries.
constexpr int64_t kSampleChunk = 4096;

at::Tensor layer_diag_ggn(const at::Tensor& a, const at::Tensor& g, bool append_ones) {
  const at::ScalarType dtype = accumulation_dtype(a.scalar_type());
  const int64_t samples = a.size(0), d_in = a.size(1), d_out = g.size(-1);
  at::Tensor out = at::zeros({d_out, d_in + (append_ones ? 1 : 0)}, a.options().dtype(dtype));
  at::Tensor weight_part = out.slice(1, 0, d_in);
  for (int64_t start = 0; start < samples; start += kSampleChunk) {
    const int64_t count = std::min(kSampleChunk, samples - start);
    const at::Tensor a2 = a.narrow(0, start, count).to(dtype).square();
    at::Tensor g2 = g.narrow(0, start, count).to(dtype).square();
    if (g2.dim() == 3) g2 = g2.sum(1);  // (count, d_out)
    weight_part.addmm_(g2.t(), a2);
    if (append_ones) out.select(1, d_in).add_(g2.sum(0));
  }
  return out;
}

}  // namespace

void check_diag_ggn(at::TensorList inputs, at::TensorList output_grads,
                    const c10::List<bool>& append_ones) {
  TORCH_CHECK(inputs.size() == output_grads.size() && inputs.size() == append_ones.size(),
              "diag_ggn: inputs, output_grads and append_ones need one entry per layer");
  for (int64_t i = 0; i < static_cast<int64_t>(inputs.size()); ++i) {
    const at::Tensor& a = inputs[i];
    const at::Tensor& g = output_grads[i];
    check_floating(a, "inputs", i);
    check_floating(g, "output_grads", i);
    check_same_device(a, inputs[0], "inputs");
    check_same_device(g, inputs[0], "output_grads");
    TORCH_CHECK(a.dim() == 2, "inputs[", i, "] must be (N, d_in), got ", a.sizes());
    TORCH_CHECK((g.dim() == 2 || g.dim() == 3) && g.size(0) == a.size(0), "output_grads[",
                i, "] must be (N, K, d_out) or (N, d_out) with N = ", a.size(0), ", got ",
                g.sizes());
  }
}

std::vector<at::Tensor> diag_ggn_aten(at::TensorList inputs, at::TensorList output_grads,
                                     c10::List<bool> append_ones) {
  check_diag_ggn(inputs, output_grads, append_ones);
  std::vector<at::Tensor> result;
  for (int64_t i = 0; i < static_cast<int64_t>(inputs.size()); ++i) {
    result.push_back(layer_diag_ggn(inputs[i], output_grads[i], append_ones[i]));
  }
  return result;
}

}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("diag_ggn", &fastlaplace::diag_ggn_aten); }
