// Op schemas and CPU registrations. Fake (meta) kernels and autograd are registered in Python
// (dropreg/cpu.py), as torch.library recommends for C++ ops.
#include <Python.h>
#include <torch/library.h>

#include "linear_ce_dropreg.h"
#include "philox.h"
#include "rdrop.h"

namespace dropreg {

at::Tensor philox_signs_op(int64_t seed, int64_t rows, int64_t dim) {
  return philox_signs(static_cast<uint64_t>(seed), rows, dim, at::kFloat);
}

}  // namespace dropreg

TORCH_LIBRARY(dropreg, m) {
  m.def(
      "linear_ce_forward(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor? signs, int seed, "
      "bool need_explicit, bool need_implicit) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_backward(Tensor grad_ce, Tensor grad_quadratic, Tensor grad_sign_term, Tensor? grad_mu, "
      "Tensor input, "
      "Tensor weight, Tensor? bias, Tensor target, Tensor? signs, int seed, Tensor lse, Tensor mu, Tensor var, "
      "bool need_explicit, bool need_implicit, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rdrop_forward(Tensor input1, Tensor input2, Tensor weight, Tensor? bias, Tensor target) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rdrop_backward(Tensor grad_ce1, Tensor grad_ce2, Tensor grad_kl, Tensor input1, Tensor input2, "
      "Tensor weight, Tensor? bias, Tensor target, Tensor lse, Tensor expected_d, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_with_grads(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor row_weight, "
      "Tensor? z_weight, int block_rows, bool[3] output_mask, float? softcap=None, Tensor? smoothing_weights=None, "
      "Tensor? smoothing_row_weight=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("softmax_mean_forward(Tensor input, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def(
      "softmax_mean_backward(Tensor grad_mu, Tensor input, Tensor weight, Tensor? bias, Tensor lse, Tensor mu, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "softcap_statistics(Tensor input, Tensor weight, Tensor? bias, float softcap, bool need_m1, bool need_m2, "
      "Tensor? smoothing_weights) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "softcap_gradient_sweep(Tensor input, Tensor weight, Tensor? bias, float softcap, Tensor lse, Tensor target, "
      "Tensor amount, Tensor row_const, Tensor? T, Tensor? Q, Tensor? smoothing_weights, Tensor? grad_smoothing_sum, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("sample_targets(Tensor input, Tensor weight, Tensor? bias, int samples, int seed) -> Tensor");
  m.def("philox_signs(int seed, int rows, int dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropreg, CPU, m) {
  m.impl("linear_ce_forward", &dropreg::linear_ce_forward);
  m.impl("linear_ce_backward", &dropreg::linear_ce_backward);
  m.impl("rdrop_forward", &dropreg::rdrop_forward);
  m.impl("rdrop_backward", &dropreg::rdrop_backward);
  m.impl("linear_ce_with_grads", &dropreg::linear_ce_with_grads);
  m.impl("softmax_mean_forward", &dropreg::softmax_mean_forward);
  m.impl("softmax_mean_backward", &dropreg::softmax_mean_backward);
  m.impl("softcap_statistics", &dropreg::softcap_statistics);
  m.impl("softcap_gradient_sweep", &dropreg::softcap_gradient_sweep);
  m.impl("sample_targets", &dropreg::sample_targets);
}

TORCH_LIBRARY_IMPL(dropreg, CompositeExplicitAutograd, m) {
  m.impl("philox_signs", &dropreg::philox_signs_op);
}

// Lets `import dropreg._C` load the library (and with it the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
