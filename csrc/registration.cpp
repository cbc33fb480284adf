// Every public fastlaplace operator's schema, in one place. Kernels are registered per
// device in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the private schemas of the CUDA
// kernels' host emulations, for the tests, are in csrc/emulation/.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace fastlaplace {

std::string build_info() {
#ifdef FASTLAPLACE_WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}

}  // namespace fastlaplace

TORCH_LIBRARY(fastlaplace, m) {
  m.def("build_info() -> str", &fastlaplace::build_info);
  m.def(
      "factor_accumulate_(Tensor(a!)[] factors, Tensor[] inputs, bool[] append_ones, "
      "float alpha=1., float beta=1.) -> ()");
  m.def(
      "conv_input_factor_(Tensor(a!) factor, Tensor input, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool append_ones, "
      "float alpha=1., float beta=1.) -> ()");
  m.def("diag_ggn(Tensor[] inputs, Tensor[] output_grads, bool[] append_ones) -> Tensor[]");
  m.def("batched_eigh(Tensor[] matrices) -> (Tensor[], Tensor[])");
  m.def("damped_inverses(Tensor[] matrices, Tensor shifts) -> Tensor[]");
  m.def(
      "kron_solve(Tensor[] eigvecs_a, Tensor[] eigvals_a, Tensor[] eigvecs_g, "
      "Tensor[] eigvals_g, Tensor[] rhs, Tensor scale, Tensor delta, "
      "float exponent=-1.) -> Tensor[]");
  m.def(
      "kron_precondition_(Tensor(a!)[] gradients, int[] blocks, Tensor[] eigvecs_a, "
      "Tensor[] eigvecs_g, Tensor[] inverse_spectra, Tensor? kl_weights=None) -> Tensor");
  m.def(
      "kron_inverse_precondition_(Tensor(a!)[] gradients, int[] blocks, Tensor[] inverses_a, "
      "Tensor[] inverses_g, Tensor? kl_weights=None) -> Tensor");
  m.def(
      "kron_logdet(Tensor[] eigvals_a, Tensor[] eigvals_g, Tensor scale, Tensor delta) "
      "-> Tensor");
  m.def(
      "kron_predictive_variance(Tensor[] inputs, Tensor?[] output_jacobians, "
      "Tensor[] eigvecs_a, Tensor[] eigvals_a, Tensor[] eigvecs_g, Tensor[] eigvals_g, "
      "Tensor scale, Tensor delta, bool[] append_ones, bool full_covariance) -> Tensor");
  m.def(
      "ekfac_scales_(Tensor(a!)[] scales, Tensor[] inputs, Tensor[] output_grads, "
      "Tensor[] eigvecs_a, Tensor[] eigvecs_g, float weight=1., float decay=1.) -> ()");
}

// `import fastlaplace._C` only has to load this library so that the static
// TORCH_LIBRARY registrations above run; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
