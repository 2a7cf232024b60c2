// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Sampling follows grid_sample(bilinear, zeros, align_corners=False): pixel = location * size - 0.5,
// corners outside the map read zero. All indices are 64-bit. The whole batch is processed in one
// launch (no im2col_step). Reduced precision types (float16, bfloat16) are read and written in their
// dtype and accumulated in float32 (opmath), including grad_value, which is accumulated in a float32
// buffer and converted at the end.
//
// forward   one thread per output element (batch, query, head, channel); consecutive threads read
//           consecutive channels of a pixel, so the loads coalesce.
// backward  one group of G lanes (G = head_dim rounded up to a power of two, at most 32) per
//           (batch, query, head); lanes stride over the channels, scatter into grad_value with
//           atomicAdd, and reduce their partial grad_attention_weights / grad_sampling_locations with
//           warp shuffles inside the group; lane 0 writes them, so those need no atomics.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

constexpr int kThreadsPerBlock = 256;  // a multiple of the warp size
constexpr int64_t kMaxBlocks = 65535;  // more work is covered by grid-stride loops

// The (up to) four pixels a bilinear sample reads: top-left, top-right, bottom-left, bottom-right.
template <typename opmath_t>
struct BilinearCorners {
  int64_t pixel[4];    // row * width + column inside the level, 0 for corners outside the map
  opmath_t weight[4];  // bilinear weight, 0 for corners outside the map
  bool valid[4];
  opmath_t frac_x;  // position inside the cell, in [0, 1)
  opmath_t frac_y;
};

// Fills `corners` for a location (x, y) in [0, 1] on a height x width level. Returns false when the
// sample only reads zeros (outside the map or NaN).
template <typename opmath_t>
__device__ __forceinline__ bool bilinear_corners(opmath_t location_x, opmath_t location_y, int64_t height,
                                                 int64_t width, BilinearCorners<opmath_t>& corners) {
  const opmath_t x = location_x * static_cast<opmath_t>(width) - opmath_t(0.5);
  const opmath_t y = location_y * static_cast<opmath_t>(height) - opmath_t(0.5);
  // x == -1 still has a gradient through column 0 (as in grid_sample); the range test also rejects
  // NaN and keeps floor() small enough for int64
  if (!(x >= opmath_t(-1) && x < static_cast<opmath_t>(width) && y >= opmath_t(-1) &&
        y < static_cast<opmath_t>(height))) {
    return false;
  }
  const opmath_t x_floor = floor(x);
  const opmath_t y_floor = floor(y);
  const int64_t left = static_cast<int64_t>(x_floor);
  const int64_t top = static_cast<int64_t>(y_floor);
  const opmath_t frac_x = x - x_floor;
  const opmath_t frac_y = y - y_floor;
  corners.frac_x = frac_x;
  corners.frac_y = frac_y;
  const bool left_in = left >= 0, right_in = left + 1 < width;
  const bool top_in = top >= 0, bottom_in = top + 1 < height;
  corners.valid[0] = top_in && left_in;
  corners.valid[1] = top_in && right_in;
  corners.valid[2] = bottom_in && left_in;
  corners.valid[3] = bottom_in && right_in;
  const opmath_t one = 1;
  const opmath_t weight[4] = {(one - frac_y) * (one - frac_x), (one - frac_y) * frac_x, frac_y * (one - frac_x),
                              frac_y * frac_x};
  const int64_t pixel[4] = {top * width + left, top * width + left + 1, (top + 1) * width + left,
                            (top + 1) * width + left + 1};
#pragma unroll
  for (int corner = 0; corner < 4; ++corner) {
    corners.weight[corner] = corners.valid[corner] ? weight[corner] : opmath_t(0);
    corners.pixel[corner] = corners.valid[corner] ? pixel[corner] : 0;
  }
  return true;
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const scalar_t* __restrict__ sampling_locations,
                               const scalar_t* __restrict__ attention_weights, scalar_t* __restrict__ output,
                               int64_t num_outputs, int64_t num_values, int64_t num_queries, int64_t num_heads,
                               int64_t head_dim, int64_t num_levels, int64_t num_points) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = num_heads * head_dim;  // distance between neighbouring pixels in value
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < num_outputs;
       index += grid_stride) {
    // index = ((batch * num_queries + query) * num_heads + head) * head_dim + channel
    const int64_t channel = index % head_dim;
    const int64_t batch_query_head = index / head_dim;
    const int64_t head = batch_query_head % num_heads;
    const int64_t batch = batch_query_head / (num_heads * num_queries);
    const scalar_t* head_value = value + batch * num_values * pixel_stride + head * head_dim + channel;
    const int64_t head_sample = batch_query_head * num_levels * num_points;
    opmath_t accumulator = 0;
    BilinearCorners<opmath_t> corners;
    for (int64_t level = 0; level < num_levels; ++level) {
      const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
      const scalar_t* level_value = head_value + level_start_index[level] * pixel_stride;
      for (int64_t point = 0; point < num_points; ++point) {
        const int64_t sample = head_sample + level * num_points + point;
        const opmath_t weight = static_cast<opmath_t>(attention_weights[sample]);
        const opmath_t x = static_cast<opmath_t>(sampling_locations[2 * sample]);
        const opmath_t y = static_cast<opmath_t>(sampling_locations[2 * sample + 1]);
        if (!bilinear_corners(x, y, height, width, corners)) {
          // reads zeros; as in the reference, a NaN location or non-finite weight poisons the output
          if (isnan(x) || isnan(y) || !isfinite(weight)) {
            accumulator += weight * opmath_t(NAN);
          }
          continue;
        }
        opmath_t sampled = 0;
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.valid[corner]) {
            sampled += corners.weight[corner] * static_cast<opmath_t>(level_value[corners.pixel[corner] * pixel_stride]);
          }
        }
        accumulator += weight * sampled;
      }
    }
    output[index] = static_cast<scalar_t>(accumulator);
  }
}

// grad_value: (batch_size, num_values, num_heads, head_dim) in opmath_t, zero-initialised.
template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start_index,
                                const scalar_t* __restrict__ sampling_locations,
                                const scalar_t* __restrict__ attention_weights,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_sampling_locations,
                                scalar_t* __restrict__ grad_attention_weights, int64_t num_groups, int64_t num_values,
                                int64_t num_queries, int64_t num_heads, int64_t head_dim, int64_t num_levels,
                                int64_t num_points, int group_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t pixel_stride = num_heads * head_dim;
  const int lane = threadIdx.x % group_size;
  const unsigned warp_lane = threadIdx.x % 32;
  // the lanes of this group inside its warp (group_size divides 32, groups are aligned)
  const unsigned group_mask =
      group_size == 32 ? 0xffffffffu : (((1u << group_size) - 1u) << (warp_lane & ~unsigned(group_size - 1)));
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / group_size);
  const opmath_t one = 1;
  BilinearCorners<opmath_t> corners;
  // the loop condition is uniform within a group, so the shuffles below see all of its lanes
  for (int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / group_size;
       group < num_groups; group += groups_per_grid) {
    // group = (batch * num_queries + query) * num_heads + head
    const int64_t head = group % num_heads;
    const int64_t batch = group / (num_heads * num_queries);
    const scalar_t* grad_row = grad_output + group * head_dim;
    const int64_t head_offset = batch * num_values * pixel_stride + head * head_dim;
    for (int64_t level = 0; level < num_levels; ++level) {
      const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
      const int64_t level_offset = head_offset + level_start_index[level] * pixel_stride;
      const scalar_t* level_value = value + level_offset;
      opmath_t* level_grad_value = grad_value + level_offset;
      for (int64_t point = 0; point < num_points; ++point) {
        const int64_t sample = (group * num_levels + level) * num_points + point;
        const bool inside =
            bilinear_corners(static_cast<opmath_t>(sampling_locations[2 * sample]),
                             static_cast<opmath_t>(sampling_locations[2 * sample + 1]), height, width, corners);
        const opmath_t weight = static_cast<opmath_t>(attention_weights[sample]);
        opmath_t partial_weight = 0, partial_x = 0, partial_y = 0;  // this lane's channels
        if (inside) {
          for (int64_t channel = lane; channel < head_dim; channel += group_size) {
            const opmath_t grad = static_cast<opmath_t>(grad_row[channel]);
            opmath_t corner_value[4];
#pragma unroll
            for (int corner = 0; corner < 4; ++corner) {
              const int64_t offset = corners.pixel[corner] * pixel_stride + channel;
              corner_value[corner] = corners.valid[corner] ? static_cast<opmath_t>(level_value[offset]) : opmath_t(0);
              if (corners.valid[corner]) {
                gpuAtomicAdd(level_grad_value + offset, weight * corners.weight[corner] * grad);
              }
            }
            partial_weight += grad * (corners.weight[0] * corner_value[0] + corners.weight[1] * corner_value[1] +
                                      corners.weight[2] * corner_value[2] + corners.weight[3] * corner_value[3]);
            // d(bilinear sample)/d(frac_x) and d/d(frac_y)
            partial_x += grad * ((one - corners.frac_y) * (corner_value[1] - corner_value[0]) +
                                 corners.frac_y * (corner_value[3] - corner_value[2]));
            partial_y += grad * ((one - corners.frac_x) * (corner_value[2] - corner_value[0]) +
                                 corners.frac_x * (corner_value[3] - corner_value[1]));
          }
        }
        for (int offset = group_size / 2; offset > 0; offset /= 2) {
          partial_weight += __shfl_xor_sync(group_mask, partial_weight, offset, group_size);
          partial_x += __shfl_xor_sync(group_mask, partial_x, offset, group_size);
          partial_y += __shfl_xor_sync(group_mask, partial_y, offset, group_size);
        }
        if (lane == 0) {
          grad_attention_weights[sample] = static_cast<scalar_t>(partial_weight);
          // pixel = location * size - 0.5
          grad_sampling_locations[2 * sample] =
              static_cast<scalar_t>(inside ? weight * partial_x * static_cast<opmath_t>(width) : opmath_t(0));
          grad_sampling_locations[2 * sample + 1] =
              static_cast<scalar_t>(inside ? weight * partial_y * static_cast<opmath_t>(height) : opmath_t(0));
        }
      }
    }
  }
}

int64_t num_blocks(int64_t num_threads) {
  return std::min<int64_t>(kMaxBlocks, (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor");
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());
  const at::Tensor spatial_shapes_c = spatial_shapes.to(value.device()).contiguous();
  const at::Tensor level_start_index_c = level_start_index.to(value.device()).contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor sampling_locations_c = sampling_locations.contiguous();
  const at::Tensor attention_weights_c = attention_weights.contiguous();
  at::Tensor output = at::empty({sizes.batch_size, sizes.num_queries, sizes.num_heads * sizes.head_dim},
                                value.options());
  const int64_t num_outputs = output.numel();
  if (num_outputs == 0) {
    return output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(num_outputs), kThreadsPerBlock, 0, stream>>>(
        value_c.const_data_ptr<scalar_t>(), spatial_shapes_c.const_data_ptr<int64_t>(),
        level_start_index_c.const_data_ptr<int64_t>(), sampling_locations_c.const_data_ptr<scalar_t>(),
        attention_weights_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), num_outputs,
        sizes.num_values, sizes.num_queries, sizes.num_heads, sizes.head_dim, sizes.num_levels, sizes.num_points);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MSDeformAttnSizes sizes =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_ms_deform_attn_grad_output(grad_output, sizes);
  TORCH_CHECK(value.is_cuda() && grad_output.device() == value.device(),
              "ms_deform_attn_backward (CUDA): grad_output and value must be on one CUDA device");
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn_backward: grad_output dtype ",
              grad_output.scalar_type(), " differs from value dtype ", value.scalar_type());
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());
  const at::Tensor spatial_shapes_c = spatial_shapes.to(value.device()).contiguous();
  const at::Tensor level_start_index_c = level_start_index.to(value.device()).contiguous();
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor value_c = value.contiguous();
  const at::Tensor sampling_locations_c = sampling_locations.contiguous();
  const at::Tensor attention_weights_c = attention_weights.contiguous();

  const at::ScalarType opmath_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_accumulator = at::zeros(value.sizes(), value.options().dtype(opmath_dtype));
  at::Tensor grad_sampling_locations = at::empty(sampling_locations.sizes(), value.options());
  at::Tensor grad_attention_weights = at::empty(attention_weights.sizes(), value.options());
  const int64_t num_groups = sizes.batch_size * sizes.num_queries * sizes.num_heads;
  if (num_groups == 0 || sizes.head_dim == 0) {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
    return {grad_value_accumulator.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
  }
  int group_size = 1;  // head_dim rounded up to a power of two, at most a warp
  while (group_size < 32 && group_size < sizes.head_dim) {
    group_size *= 2;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t><<<num_blocks(num_groups * group_size), kThreadsPerBlock, 0, stream>>>(
        grad_output_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(),
        spatial_shapes_c.const_data_ptr<int64_t>(), level_start_index_c.const_data_ptr<int64_t>(),
        sampling_locations_c.const_data_ptr<scalar_t>(), attention_weights_c.const_data_ptr<scalar_t>(),
        grad_value_accumulator.mutable_data_ptr<opmath_t>(), grad_sampling_locations.mutable_data_ptr<scalar_t>(),
        grad_attention_weights.mutable_data_ptr<scalar_t>(), num_groups, sizes.num_values, sizes.num_queries,
        sizes.num_heads, sizes.head_dim, sizes.num_levels, sizes.num_points, group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor grad_value = grad_value_accumulator.scalar_type() == value.scalar_type()
                              ? grad_value_accumulator
                              : grad_value_accumulator.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ddetr
