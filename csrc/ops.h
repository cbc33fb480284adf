// Declarations shared by the CPU and CUDA kernels of the fastlaplace operators.
// The schemas live in registration.cpp; each kernel file registers its own
// implementation with TORCH_LIBRARY_IMPL(fastlaplace, <CPU|CUDA>, m).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastlaplace {

// Curvature is accumulated in float64 for float64 data and in float32 for
// everything else (bf16 / fp16 in, fp32 out).
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Errors name the argument and, for per-layer lists, the layer: "factors[2] ...".
inline std::string argument_name(const char* name, int64_t index) {
  return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
}

inline void check_factor_dtype(const at::Tensor& t, const char* name, int64_t index = -1) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              argument_name(name, index), " must be float32 or float64, got ",
              t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name, int64_t index = -1) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), argument_name(name, index),
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(),
              " but the other arguments are on ", ref.device());
}

// Checks the arguments of factor_accumulate_ (one entry per layer, dtypes, devices, shapes).
void check_factor_accumulate(at::TensorList factors, at::TensorList inputs,
                             const c10::List<bool>& append_ones);

// Checks the arguments of diag_ggn (one entry per layer, dtypes, devices, shapes).
void check_diag_ggn(at::TensorList inputs, at::TensorList output_grads,
                    const c10::List<bool>& append_ones);

// Checks the arguments of kron_solve (one entry per layer, eigenpairs, rhs shapes, devices).
void check_kron_solve(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                      at::TensorList eigvecs_g, at::TensorList eigvals_g, at::TensorList rhs,
                      const at::Tensor& scale, const at::Tensor& delta);

// The checked layout of kron_precondition_'s layers: each gradient block's width (its
// columns of the layer's (d_G, d_A) gradient), each layer's first block, and each
// layer's multiply-adds (its share of the host threads).
struct PreconditionLayout {
  std::vector<int64_t> widths, firsts;
  std::vector<double> costs;
};

// Checks the arguments of kron_precondition_ and returns the layout of its layers.
PreconditionLayout check_kron_precondition(at::TensorList gradients, at::IntArrayRef blocks,
                                           at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                           at::TensorList inverse_spectra,
                                           const std::optional<at::Tensor>& kl_weights);

// Checks the arguments of kron_inverse_precondition_ and returns the layout of its layers.
PreconditionLayout check_kron_inverse_precondition(at::TensorList gradients,
                                                   at::IntArrayRef blocks,
                                                   at::TensorList inverses_a,
                                                   at::TensorList inverses_g,
                                                   const std::optional<at::Tensor>& kl_weights);

// K-FAC's KL clip on the device: min(1, 1 / sqrt(ratio)) as a 0-d tensor in ratio's dtype,
// ratio = sum_l k_l <V_l, result_l> a 0-d tensor, with no host synchronisation.
at::Tensor device_kl_clip(const at::Tensor& ratio);

// The checked shape of kron_predictive_variance's result: (samples, outputs[, outputs]).
struct VarianceShape {
  int64_t samples, outputs;
};

// Checks the arguments of kron_predictive_variance (one entry per layer, eigenpairs,
// input and Jacobian shapes, devices) and returns the result's shape.
VarianceShape check_kron_predictive_variance(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    const c10::List<bool>& append_ones);

// The shape of a Conv2d's patches: C * kh * kw features at out_h * out_w positions.
struct ConvGeometry {
  int64_t channels, height, width, kh, kw, out_h, out_w;
  int64_t stride[2], padding[2], dilation[2];
  int64_t positions() const { return out_h * out_w; }
  int64_t offsets() const { return kh * kw; }
  int64_t features() const { return channels * kh * kw; }
  int64_t pixels() const { return height * width * channels; }
};

// Checks the arguments of conv_input_factor_ and returns the patches' shape.
ConvGeometry conv_input_geometry(const at::Tensor& factor, const at::Tensor& input,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 bool append_ones);

// Largest block edge used when a symmetric Gram matrix is accumulated block by
// block (only blocks on or above the diagonal are multiplied).
constexpr int64_t kGramBlock = 96;

// ATen-composed implementations (csrc/cpu/*.cpp). They serve the CPU and, until
// fused CUDA kernels replace them, the CUDA dispatch key too: on a GPU their GEMMs and
// eigensolvers are cuBLAS / cuSOLVER calls and their host threading is off.
void factor_accumulate_aten(at::TensorList factors, at::TensorList inputs,
                            c10::List<bool> append_ones, double alpha, double beta);
void conv_input_factor_aten(const at::Tensor& factor, const at::Tensor& input,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation,
                            bool append_ones, double alpha, double beta);
std::vector<at::Tensor> diag_ggn_aten(at::TensorList inputs, at::TensorList output_grads,
                                      c10::List<bool> append_ones);
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> batched_eigh_aten(
    at::TensorList matrices);
std::vector<at::Tensor> kron_solve_aten(at::TensorList eigvecs_a, at::TensorList eigvals_a,
                                        at::TensorList eigvecs_g, at::TensorList eigvals_g,
                                        at::TensorList rhs, const at::Tensor& scale,
                                        const at::Tensor& delta, double exponent);
at::Tensor kron_precondition_aten(at::TensorList gradients, at::IntArrayRef blocks,
                                  at::TensorList eigvecs_a, at::TensorList eigvecs_g,
                                  at::TensorList inverse_spectra,
                                  const std::optional<at::Tensor>& kl_weights);
at::Tensor kron_inverse_precondition_aten(at::TensorList gradients, at::IntArrayRef blocks,
                                          at::TensorList inverses_a, at::TensorList inverses_g,
                                          const std::optional<at::Tensor>& kl_weights);
std::vector<at::Tensor> damped_inverses_aten(at::TensorList matrices, const at::Tensor& shifts);
at::Tensor kron_predictive_variance_aten(
    at::TensorList inputs, const c10::List<std::optional<at::Tensor>>& output_jacobians,
    at::TensorList eigvecs_a, at::TensorList eigvals_a, at::TensorList eigvecs_g,
    at::TensorList eigvals_g, const at::Tensor& scale, const at::Tensor& delta,
    c10::List<bool> append_ones, bool full_covariance);

void ekfac_scales_aten(at::TensorList scales, at::TensorList inputs, at::TensorList output_grads,
                       at::TensorList eigvecs_a, at::TensorList eigvecs_g, double weight,
                       double decay);

// The largest side n of a matrix handed to LAPACK's / cuSOLVER's symmetric eigensolver
// (syevd): its workspace of 1 + 6n + 2n^2 entries is counted in a 32-bit int, which
// overflows above this ("Argument 8 has illegal value" from LAPACK).
constexpr int64_t kLapackMaxSide = 32766;

// Checks matrices[i] for the LAPACK / cuSOLVER calls: square, float32 or float64, on one
// device, of side at most kLapackMaxSide (a ValueError), and free of NaN and Inf (on which
// LAPACK loops or returns garbage; the error says `consequence`). One host
// synchronisation for all GPU matrices.
void check_finite_square_matrices(at::TensorList matrices, const char* consequence);

// Host threads for work spread over the CPU; a GPU's work stays on the caller's thread
// (and so on its current stream).
int64_t host_threads(const at::Tensor& t);

}  // namespace fastlaplace
