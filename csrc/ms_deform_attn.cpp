// Schema of the multi-scale deformable attention ops, declared once for every backend.
//
// The kernels register themselves per dispatch key in cpu/ms_deform_attn_cpu.cpp (CPU) and
// cuda/ms_deform_attn_cuda.cu (CUDA). Python adds the fake (shape) implementation and the autograd
// formula (ddetr/ops/_registration.py), whose backward calls ms_deform_attn_backward.
#include <torch/library.h>

// spatial_shapes is the flat list height_0, width_0, height_1, width_1, ... of the levels, as SymInts:
// under torch.compile with dynamic sizes they stay symbolic (no recompile per image size), and the op
// reads no shape tensor on the host or the device. The levels lie one after another in value; every
// kernel derives their start offsets from the shapes.
TORCH_LIBRARY(ddetr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, SymInt[] spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  // Returns (grad_value, grad_sampling_locations, grad_attention_weights).
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, SymInt[] spatial_shapes, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}
