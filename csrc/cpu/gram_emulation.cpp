// fastlaplace::_factor_accumulate_emulated_, _conv_input_factor_emulated_,
// _diag_ggn_emulated, _kron_solve_emulated, _kron_precondition_emulated_,
// _kron_inverse_precondition_emulated_ and _kron_predictive_variance_emulated: the CUDA
// curvature ops' fused tile kernel (csrc/gram_tiles.h, and csrc/product_sums.h's sums) and
// its launch code run on the host, every block in turn and each phase for every thread id
// in turn (the tensor cores' warp operations by plain float32 loops), so that the tests
// check the kernel's arithmetic where there is no GPU. target_blocks plays the GPU's size
// (it decides when rows are split); reverse_order runs blocks and threads from the last,
// for the tests' race check (see HostThreads). Not a fast path.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../gram_tiles_launch.h"
#include "../ops.h"

namespace fastlaplace {
namespace {

// The warps' tensor-core fragments of gram::accumulate_tile_mma: lane 0 of a warp does the
// warp's collective operation, with float32 arithmetic.
struct HostFragments {
  static constexpr int kElements = gram::kFragment * gram::kFragment;  // row-major
  std::vector<float> running, stage;

  HostFragments()
      : running(gram::kWarps * gram::kFragmentsPerWarp * kElements),
        stage(gram::kWarps * gram::kFragmentsPerWarp * kElements) {}
  static float* of(std::vector<float>& fragments, int t, int f) {
    return fragments.data() + ((t / 32) * gram::kFragmentsPerWarp + f) * kElements;
  }
  void zero(int t) {
    if (t % 32 != 0) return;
    for (int f = 0; f < gram::kFragmentsPerWarp; ++f) {
      std::fill_n(of(running, t, f), kElements, 0.0f);
      std::fill_n(of(stage, t, f), kElements, 0.0f);
    }
  }
  template <typename half_t>
  void multiply(int t, int f, const half_t* a, const half_t* b, int ldm) {
    if (t % 32 != 0) return;
    float* c = of(stage, t, f);
    for (int i = 0; i < gram::kFragment; ++i) {
      for (int j = 0; j < gram::kFragment; ++j) {
        float sum = c[i * gram::kFragment + j];
        for (int k = 0; k < gram::kFragment; ++k) {
          sum += static_cast<float>(a[k * ldm + i]) * static_cast<float>(b[k * ldm + j]);
        }
        c[i * gram::kFragment + j] = sum;
      }
    }
  }
  void finish_stage(int t) {
    if (t % 32 != 0) return;
    for (int f = 0; f < gram::kFragmentsPerWarp; ++f) {
      float* sums = of(running, t, f);
      float* products = of(stage, t, f);
      for (int e = 0; e < kElements; ++e) {
        sums[e] += products[e];
        products[e] = 0.0f;
      }
    }
  }
  void store(int t, int f, float* out, int ldm) {
    if (t % 32 != 0) return;
    const float* sums = of(running, t, f);
    for (int i = 0; i < gram::kFragment; ++i) {
      std::copy_n(sums + i * gram::kFragment, gram::kFragment, out + i * ldm);
    }
  }
};

// Runs the launches in thread and block order, or in reverse (see HostThreads).
struct HostRun {
  bool reversed;
  template <typename L>
  void operator()(const std::vector<L>& layers, int64_t blocks, typename L::acc_t* workspace,
                  bool finishing, typename L::acc_t alpha, typename L::acc_t beta) const {
    using acc_t = typename L::acc_t;
    const HostThreads threads{gram::kThreads, reversed};
    const int64_t count = static_cast<int64_t>(layers.size());
    if (finishing) {
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::finish_tile(threads, layers.data(), count, workspace, block, alpha, beta);
      });
    } else if constexpr (gram::uses_tensor_cores<L>) {
      using half_t = typename L::Left::input_t;
      auto stage = std::make_unique<gram::MmaStage<half_t>>();
      HostFragments fragments;
      HostRegisters<half_t, gram::staged_values<gram::kMmaDepth>()> staged(gram::kThreads);
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::accumulate_tile_mma(threads, *stage, fragments, staged, layers.data(), count,
                                  workspace, block, alpha, beta);
      });
    } else {
      auto stage = std::make_unique<gram::Stage<acc_t>>();
      HostRegisters<acc_t, gram::kMicro * gram::kMicro> sums(gram::kThreads);
      HostRegisters<acc_t, gram::staged_values<gram::kDepth>()> staged(gram::kThreads);
      host_blocks(blocks, reversed, [&](int64_t block) {
        gram::accumulate_tile(threads, *stage, sums, staged, layers.data(), count, workspace,
                              block, alpha, beta);
      });
    }
  }
};

struct HostProductSums {
  bool reversed;
  template <typename scalar_t>
  void operator()(const variance::ProductSums<scalar_t>& sums) const {
    std::vector<scalar_t> lane_sums(variance::kThreads);
    host_blocks(sums.blocks(), reversed, [&](int64_t block) {
      sums.block_sums(HostThreads{variance::kThreads, reversed}, lane_sums.data(), block);
    });
  }
};

void check_target_blocks(int64_t target_blocks) {
  TORCH_CHECK(target_blocks >= 1, "target_blocks must be at least 1, got ", target_blocks);
}

void factor_accumulate_emulated(at::TensorList factors, at::TensorList inputs,
                                c10::List<bool> append_ones, double alpha, double beta,
                                int64_t target_blocks, bool reverse_order) {
  check_factor_accumulate(factors, inputs, append_ones);
  check_target_blocks(target_blocks);
  gram::accumulate_input_factors(factors, inputs, append_ones, alpha, beta, target_blocks,
                                 HostRun{reverse_order});
}

void conv_input_factor_emulated(const at::Tensor& factor, const at::Tensor& input,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool append_ones, double alpha, double beta,
                                int64_t target_blocks, bool reverse_order) {
  const ConvGeometry g = conv_input_geometry(factor, input, kernel_size, stride, padding,
                                             dilation, append_ones);
  check_target_blocks(target_blocks);
  gram::accumulate_conv_factor(factor, input, g, append_ones, alpha, beta, target_blocks,
                               HostRun{reverse_order});
}

std::vector<at::Tensor> diag_ggn_emulated(at::TensorList inputs, at::TensorList output_grads,
                                          c10::List<bool> append_ones, int64_t target_blocks,
                                          bool reverse_order) {
  check_diag_ggn(inputs, output_grads, append_ones);
  check_target_blocks(target_blocks);
  return gram::diag_ggn_tiles(inputs, output_grads, append_ones, target_blocks,
                              HostRun{reverse_order});
}

std::vector<at::Tensor> kron_solve_emulated(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                            at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                            at::TensorList rhs, const at::Tensor& scale,
                                            const at::Tensor& delta, double exponent,
                                            int64_t target_blocks, bool reverse_order) {
  check_kron_solve(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta);
  check_target_blocks(target_blocks);
  return gram::kron_solve_tiles(eigvecs_a, eigvals_a, eigvecs_g, eigvals_g, rhs, scale, delta,
                                exponent, target_blocks, HostRun{reverse_order});
}

at::Tensor kron_precondition_emulated(at::TensorList gradients, at::IntArrayRef blocks,
                                      at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                      at::TensorList inverse_spectra,
                                      const std::optional<at::Tensor>& kl_weights,
                                      int64_t target_blocks, bool reverse_order) {
  const PreconditionLayout layout = check_kron_precondition(gradients, blocks, eigvecs_a,
                                                            eigvecs_g, inverse_spectra, kl_weights);
  check_target_blocks(target_blocks);
  TORCH_CHECK(gram::tiles_take_gradients(gradients, blocks, eigvecs_a, layout),
              "_kron_precondition_emulated_ takes contiguous gradients in the eigenvectors' "
              "dtype (the CUDA kernel's other cases go to the ATen path)");
  return gram::kron_precondition_tiles(gradients, blocks, eigvecs_a, eigvecs_g,
                                       inverse_spectra, kl_weights, layout, target_blocks,
                                       HostRun{reverse_order});
}

at::Tensor kron_inverse_precondition_emulated(at::TensorList gradients, at::IntArrayRef blocks,
                                              at::TensorList inverses_a,
                                              at::TensorList inverses_g,
                                              const std::optional<at::Tensor>& kl_weights,
                                              int64_t target_blocks, bool reverse_order) {
  const PreconditionLayout layout =
      check_kron_inverse_precondition(gradients, blocks, inverses_a, inverses_g, kl_weights);
  check_target_blocks(target_blocks);
  TORCH_CHECK(gram::tiles_take_gradients(gradients, blocks, inverses_a, layout),
              "_kron_inverse_precondition_emulated_ takes contiguous gradients in the inverses' "
              "dtype (the CUDA kernel's other cases go to the ATen path)");
  return gram::kron_inverse_precondition_tiles(gradients, blocks, inverses_a, inverses_g,
                                               kl_weights, layout, target_blocks,
                                               HostRun{reverse_order});
}

at::Tensor kron_predictive_variance_emulated(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    c10::List<bool> append_ones, bool full_covariance, int64_t target_blocks,
    bool reverse_order) {
  const VarianceShape shape =
      check_kron_predictive_variance(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                     eigvals_g, scale, delta, append_ones);
  check_target_blocks(target_blocks);
  TORCH_CHECK(gram::tiles_take_variance(output_jacobians, eigvecs_a),
              "_kron_predictive_variance_emulated takes eigenvectors of one dtype and an output "
              "Jacobian for every layer or for none (the CUDA kernel's other cases go to the "
              "ATen path)");
  return gram::kron_variance_tiles(inputs, output_jacobians, eigvecs_a, eigvals_a, eigvecs_g,
                                   eigvals_g, scale, delta, append_ones, full_covariance, shape,
                                   target_blocks, HostRun{reverse_order},
                                   HostProductSums{reverse_order});
}

}  // namespace
}  // namespace fastlaplace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("_factor_accumulate_emulated_", &fastlaplace::factor_accumulate_emulated);
  m.impl("_conv_input_factor_emulated_", &fastlaplace::conv_input_factor_emulated);
  m.impl("_diag_ggn_emulated", &fastlaplace::diag_ggn_emulated);
  m.impl("_kron_solve_emulated", &fastlaplace::kron_solve_emulated);
  m.impl("_kron_precondition_emulated_", &fastlaplace::kron_precondition_emulated);
  m.impl("_kron_inverse_precondition_emulated_",
         &fastlaplace::kron_inverse_precondition_emulated);
  m.impl("_kron_predictive_variance_emulated", &fastlaplace::kron_predictive_variance_emulated);
}
