// Schema of the dropout ops, plain and after a ReLU (CPU kernels in cpu/dropout_cpu.cpp). Python adds
// the fake kernels and the autograd formulas (ddetr/ops/_registration.py) and uses them on CPU tensors
// only: CUDA's own dropout is already one fused kernel (ddetr/models/dropout.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ddetr, m) {
  // Returns (output, keep): keep is a bool mask, each element False with probability p (rounded to
  // 2^-32), and output = input * keep / (1 - p). The mask is a function of (seed, element index).
  m.def("dropout_forward(Tensor input, float p, int seed) -> (Tensor, Tensor)");
  // grad_output * keep / (1 - p), with p rounded as in dropout_forward.
  m.def("dropout_backward(Tensor grad_output, Tensor keep, float p) -> Tensor");
  // dropout(relu(input)) with dropout_forward's mask for the same seed; no mask is returned.
  m.def("relu_dropout_forward(Tensor input, float p, int seed) -> Tensor");
  // grad_output / (1 - p) where output (of relu_dropout_forward) > 0, else 0.
  m.def("relu_dropout_backward(Tensor grad_output, Tensor output, float p) -> Tensor");
}
