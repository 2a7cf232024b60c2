// Schema of the multi-scale deformable attention ops, declared once for every backend.
//
// The kernels register themselves per dispatch key in cpu/ms_deform_attn_cpu.cpp (CPU) and
// cuda/ms_deform_attn_cuda.cu (CUDA). Python adds the fake (shape) implementation and the autograd
// formula (ddetr/ops/_registration.py), whose backward calls ms_deform_attn_backward.
#include <torch/library.h>

TORCH_LIBRARY(ddetr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights).
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}
