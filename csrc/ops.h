// Declarations shared by the CPU and CUDA kernels of the fastlaplace operators.
// The schemas live in registration.cpp; each kernel file registers its own
// implementation with TORCH_LIBRARY_IMPL(fastlaplace, <CPU|CUDA>, m).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

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

// Largest block edge used when a symmetric Gram matrix is accumulated block by
// block (only blocks on or above the diagonal are multiplied).
constexpr int64_t kGramBlock = 160;

}  // namespace fastlaplace
