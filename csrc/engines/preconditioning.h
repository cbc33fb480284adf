// What the CPU (and ATen-composed) kernels of both preconditioners share: moving gradient
// blocks in and out of a layer's workspace, the checks of their common arguments, and K-FAC's
// KL clip nu. Used by csrc/cpu/kron_precondition.cpp and kron_inverse_precondition.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../ops.h"

namespace fastlaplace {
namespace preconditioning {

// Block rows (d_G, width) of a gradient block of d_G * width entries, as a matrix.
int64_t block_width(const at::Tensor& block, int64_t rows, int64_t index);

// Whether the plain loops serve this block: contiguous (d_G, width) rows in the work's
// dtype, on the CPU. Other blocks (transposed, bf16, on a GPU) take ATen copies.
bool plain_block(const at::Tensor& block, const at::Tensor& work);

// work[:, offset : offset + width] <- the block as (d_G, width) rows.
void copy_in(const at::Tensor& work, const at::Tensor& block, int64_t offset, int64_t width);

// The block <- nu * result[:, offset : offset + width]: nu is host_nu, or the 0-d device
// tensor device_nu where that is defined.
void copy_out(const at::Tensor& block, const at::Tensor& result, int64_t offset, int64_t width,
              double host_nu, const at::Tensor& device_nu);

// Checks the arguments both ops share: per layer a square (d_A, d_A) matrix of mats_a, a
// square (d_G, d_G) one of mats_g, both float32 or float64 of one dtype, and its blocks of
// d_G rows and d_A columns in all.
PreconditionLayout check_layers(const char* op, at::TensorList gradients,
                                at::IntArrayRef blocks, at::TensorList mats_a,
                                at::TensorList mats_g, const char* name_a, const char* name_g,
                                const std::optional<at::Tensor>& kl_weights);

// nu = min(1, 1 / sqrt(sum_l k_l dot_l)), 1 without kl_weights; 1 / sqrt(0) = inf (and
// rounding below 0) give nu = 1. A CPU caller waits for the result anyway: there nu is
// computed on the host, in double, from host_dots; a GPU's stays on the device (from
// device_dots, no synchronisation).
struct Clip {
  double host = 1.0;
  at::Tensor device;
};

Clip kl_clip(const std::optional<at::Tensor>& kl_weights, bool on_host,
             const std::vector<double>& host_dots, const std::vector<at::Tensor>& device_dots);

// The op's result: nu as a 0-d tensor in the matrices' dtype.
at::Tensor clip_result(const Clip& clip, const at::Tensor& like);

}  // namespace preconditioning
}  // namespace fastlaplace
