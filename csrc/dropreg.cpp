// Op schemas and CPU registrations of the C++ passes. Fake (meta) kernels are registered in Python (dropreg/cpu.py),
// as torch.library recommends for C++ ops; the whole-head ops built on these passes (linear_ce_forward, ...) are
// defined in Python (dropreg/cpu_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "vocab_passes.h"
#include "philox.h"
#include "rdrop.h"

namespace dropreg {

at::Tensor philox_signs_op(int64_t seed, int64_t rows, int64_t dim) {
  return philox_signs(static_cast<uint64_t>(seed), rows, dim, at::kFloat);
}

}  // namespace dropreg

TORCH_LIBRARY(dropreg, m) {
  m.def(
      "vocab_statistics(Tensor input, Tensor weight, Tensor? bias, bool need_mu, bool need_m2) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logit_gradient_sweep(Tensor input, Tensor weight, Tensor? bias, Tensor lse, Tensor row_const, "
      "Tensor? T_stack, bool with_squares, Tensor? target, Tensor? target_amount, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("rdrop_statistics(Tensor input1, Tensor input2, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def(
      "rdrop_gradient_sweep(Tensor input1, Tensor input2, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor expected_d, Tensor grad_ce1, Tensor grad_ce2, Tensor grad_kl, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_with_grads(Tensor input, Tensor weight, Tensor? bias, Tensor target, Tensor row_weight, "
      "Tensor? z_weight, int block_rows, bool[3] output_mask, float? softcap=None, Tensor? smoothing_weights=None, "
      "Tensor? smoothing_row_weight=None) -> (Tensor, Tensor, Tensor, Tensor)");
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
  m.impl("vocab_statistics", &dropreg::vocab_statistics);
  m.impl("logit_gradient_sweep", &dropreg::logit_gradient_sweep);
  m.impl("rdrop_statistics", &dropreg::rdrop_statistics);
  m.impl("rdrop_gradient_sweep", &dropreg::rdrop_gradient_sweep);
  m.impl("linear_ce_with_grads", &dropreg::linear_ce_with_grads);
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
