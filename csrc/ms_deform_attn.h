// Shared declarations of the multi-scale deformable attention kernels: input checks and sizes.
//
// Shapes (full names, see docs/architecture.md):
//   value               (batch_size, num_values, num_heads, head_dim)
//   spatial_shapes      (num_levels, 2) int64, (height, width) of every level
//   level_start_index   (num_levels,) int64, offset of every level in num_values
//   sampling_locations  (batch_size, num_queries, num_heads, num_levels, num_points, 2), (x, y) in [0, 1]
//   attention_weights   (batch_size, num_queries, num_heads, num_levels, num_points)
//   output              (batch_size, num_queries, num_heads * head_dim)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace ddetr {

struct MSDeformAttnSizes {
  int64_t batch_size;
  int64_t num_values;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
};

// Checks ranks, sizes, dtypes and devices of the op's inputs and returns their sizes.
inline MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (batch_size, num_values, num_heads, head_dim), got ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be "
              "(batch_size, num_queries, num_heads, num_levels, num_points, 2), got ",
              sampling_locations.sizes());
  MSDeformAttnSizes sizes{};
  sizes.batch_size = value.size(0);
  sizes.num_values = value.size(1);
  sizes.num_heads = value.size(2);
  sizes.head_dim = value.size(3);
  sizes.num_queries = sampling_locations.size(1);
  sizes.num_levels = sampling_locations.size(3);
  sizes.num_points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch_size && sampling_locations.size(2) == sizes.num_heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes(), " in batch_size or num_heads");
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == sizes.batch_size &&
                  attention_weights.size(1) == sizes.num_queries && attention_weights.size(2) == sizes.num_heads &&
                  attention_weights.size(3) == sizes.num_levels && attention_weights.size(4) == sizes.num_points,
              "ms_deform_attn: attention_weights must be (batch_size, num_queries, num_heads, num_levels, "
              "num_points) = ",
              sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.num_levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (num_levels, 2) = (", sizes.num_levels, ", 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.num_levels,
              "ms_deform_attn: level_start_index must be (num_levels,) = (", sizes.num_levels, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.is_floating_point(), "ms_deform_attn: value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device");
  return sizes;
}

// Checks grad_output of the backward op against the forward sizes.
inline void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const MSDeformAttnSizes& sizes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch_size &&
                  grad_output.size(1) == sizes.num_queries &&
                  grad_output.size(2) == sizes.num_heads * sizes.head_dim,
              "ms_deform_attn_backward: grad_output must be (batch_size, num_queries, num_heads * head_dim) = (",
              sizes.batch_size, ", ", sizes.num_queries, ", ", sizes.num_heads * sizes.head_dim, "), got ",
              grad_output.sizes());
}

}  // namespace ddetr
