// CUDA kernels of multi-scale deformable attention (forward and backward).
//
// Sampling follows grid_sample(bilinear, zeros, align_corners=False): pixel = location * size - 0.5,
// corners outside the map read zero. The whole batch is processed in one launch (no im2col_step).
//
// Work split (both kernels): one group of G threads per (batch, query, head); every thread owns a
// vector of VEC consecutive channels (float4 for float32, 8 values for float16/bfloat16, so one
// corner of one head is one 128-byte line for head_dim 32). The corner arithmetic of a sample is done
// once per thread, not once per channel. G = head_dim / VEC rounded up to a power of two, at most 32;
// larger heads loop over channel chunks.
//
// forward   each thread accumulates its channels over the levels and points in float32 (opmath) and
//           writes them once.
// backward  each thread scatters weight * corner_weight * grad_output into a float32 grad_value with
//           vector atomics (float4 atomicAdd on compute capability >= 9.0, scalar before), and keeps
//           its partial <grad_output, corner> dot products; the group reduces them with warp shuffles
//           into grad_attention_weights and grad_sampling_locations, which one lane writes (no atomics).
//
// Dtypes: value (and output, grad_output, grad_value) in float64, float32, float16 or bfloat16;
// sampling_locations and attention_weights in value's dtype, or in float32 when value is float16 or
// bfloat16 (autocast); their gradients come back in their own dtype. Accumulation is float32 (float64
// for float64).
//
// Levels come as a list of ints in the op's schema (no tensor) and go to the kernels by value as kernel
// parameters, with their start offsets derived on the host from the shapes: no copy, no
// synchronisation, and nothing that stops the op from being captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

constexpr int kThreadsPerBlock = 256;  // a multiple of the warp size
constexpr int kMaxLevels = 16;

// Heights, widths and start offsets of the levels, as kernel parameters.
struct Levels {
  int height[kMaxLevels];
  int width[kMaxLevels];
  int start[kMaxLevels];
};

// The levels as kernel parameters: heights and widths from the (height, width) list, starts from the
// checked level starts (check_forward_call); throws when there are more than kMaxLevels levels or a number
// above 2^31 - 1. Nothing is copied from the device.
Levels kernel_levels(at::IntArrayRef spatial_shapes, const std::vector<int64_t>& level_start) {
  const int64_t num_levels = static_cast<int64_t>(level_start.size());
  TORCH_CHECK(num_levels <= kMaxLevels,
              message("ms_deform_attn (CUDA): at most ", kMaxLevels, " levels are supported, got ", num_levels));
  Levels levels{};
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
    // the levels fit in value, but a zero height leaves the width unbounded: keep every number an int
    constexpr int64_t int_max = std::numeric_limits<int>::max();
    TORCH_CHECK(height <= int_max && width <= int_max && level_start[level] <= int_max,
                message("ms_deform_attn (CUDA): level ", level, " has a height, width or start above 2^31 - 1"));
    levels.height[level] = static_cast<int>(height);
    levels.width[level] = static_cast<int>(width);
    levels.start[level] = static_cast<int>(level_start[level]);
  }
  return levels;
}

// VEC values of type T, loaded and stored as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T data[VEC];
};

template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* __restrict__ address, acc_t (&values)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(address);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    values[k] = static_cast<acc_t>(pack.data[k]);
  }
}

template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ address, const acc_t (&values)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    pack.data[k] = static_cast<T>(values[k]);
  }
  *reinterpret_cast<Pack<T, VEC>*>(address) = pack;
}

// address[k] += scale * values[k] for k < VEC, atomically per element (vectorised where possible).
template <typename acc_t, int VEC>
__device__ __forceinline__ void atomic_add_scaled(acc_t* address, acc_t scale, const acc_t (&values)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      atomicAdd(reinterpret_cast<float4*>(address + k),
                make_float4(scale * values[k], scale * values[k + 1], scale * values[k + 2], scale * values[k + 3]));
    }
    return;
  }
#endif
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    atomicAdd(address + k, scale * values[k]);
  }
}

// The (up to) four pixels a bilinear sample reads: top-left, top-right, bottom-left, bottom-right.
template <typename acc_t>
struct BilinearCorners {
  int pixel[4];      // row * width + column inside the level
  acc_t weight[4];   // bilinear weight, 0 for corners outside the map
  bool valid[4];
  acc_t frac_x;  // position inside the cell, in [0, 1)
  acc_t frac_y;
};

// Fills `corners` for a location (x, y) in [0, 1] on a height x width level. Returns false when the
// sample only reads zeros (outside the map or NaN).
template <typename acc_t>
__device__ __forceinline__ bool bilinear_corners(acc_t location_x, acc_t location_y, int height, int width,
                                                 BilinearCorners<acc_t>& corners) {
  const acc_t x = location_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = location_y * static_cast<acc_t>(height) - acc_t(0.5);
  // x == -1 still has a gradient through column 0 (as in grid_sample); the range test also rejects
  // NaN and keeps floor() inside int range
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(width) && y >= acc_t(-1) && y < static_cast<acc_t>(height))) {
    return false;
  }
  const acc_t x_floor = floor(x);
  const acc_t y_floor = floor(y);
  const int left = static_cast<int>(x_floor);
  const int top = static_cast<int>(y_floor);
  const acc_t frac_x = x - x_floor;
  const acc_t frac_y = y - y_floor;
  corners.frac_x = frac_x;
  corners.frac_y = frac_y;
  corners_inside(left, top, height, width, corners.valid);
  const acc_t one = 1;
  const acc_t weight[4] = {(one - frac_y) * (one - frac_x), (one - frac_y) * frac_x, frac_y * (one - frac_x),
                           frac_y * frac_x};
  const int top_left = top * width + left;
  const int pixel[4] = {top_left, top_left + 1, top_left + width, top_left + width + 1};
#pragma unroll
  for (int corner = 0; corner < 4; ++corner) {
    corners.weight[corner] = corners.valid[corner] ? weight[corner] : acc_t(0);
    corners.pixel[corner] = pixel[corner];
  }
  return true;
}

// Sizes shared by both kernels. Offsets inside one image's value (num_values * num_heads * head_dim)
// fit in 32 bits (checked on the host); batch offsets are 64-bit.
struct KernelSizes {
  int64_t num_groups;  // batch_size * num_queries * num_heads
  int num_values;
  int num_queries;
  int num_heads;
  int head_dim;
  int num_levels;
  int num_points;
  int group_shift;  // log2(G)
};

template <typename scalar_t, typename loc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const __grid_constant__ Levels levels,
                   const loc_t* __restrict__ sampling_locations, const loc_t* __restrict__ attention_weights,
                   scalar_t* __restrict__ output, const KernelSizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread >> sizes.group_shift;  // (batch * num_queries + query) * num_heads + head
  if (group >= sizes.num_groups) {
    return;
  }
  const int group_size = 1 << sizes.group_shift;
  const int lane = static_cast<int>(thread) & (group_size - 1);
  const int head = static_cast<int>(group % sizes.num_heads);
  const int64_t batch = group / (static_cast<int64_t>(sizes.num_heads) * sizes.num_queries);
  const int pixel_stride = sizes.num_heads * sizes.head_dim;  // distance between neighbouring pixels
  const scalar_t* head_value =
      value + batch * sizes.num_values * static_cast<int64_t>(pixel_stride) + head * sizes.head_dim;
  const int num_samples = sizes.num_levels * sizes.num_points;
  const loc_t* group_locations = sampling_locations + group * num_samples * 2;
  const loc_t* group_weights = attention_weights + group * num_samples;
  for (int channel = lane * VEC; channel < sizes.head_dim; channel += group_size * VEC) {
    acc_t accumulator[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      accumulator[k] = 0;
    }
    BilinearCorners<acc_t> corners;
    int sample = 0;
    for (int level = 0; level < sizes.num_levels; ++level) {
      const int height = levels.height[level], width = levels.width[level];
      const scalar_t* level_value = head_value + levels.start[level] * pixel_stride + channel;
#pragma unroll 4
      for (int point = 0; point < sizes.num_points; ++point, ++sample) {
        const acc_t x = static_cast<acc_t>(group_locations[2 * sample]);
        const acc_t y = static_cast<acc_t>(group_locations[2 * sample + 1]);
        const acc_t weight = static_cast<acc_t>(group_weights[sample]);
        if (!bilinear_corners(x, y, height, width, corners)) {
          // reads zeros; as in the reference, a NaN location or non-finite weight poisons the output
          if (isnan(x) || isnan(y) || !isfinite(weight)) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              accumulator[k] += weight * acc_t(NAN);
            }
          }
          continue;
        }
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.valid[corner]) {
            acc_t corner_value[VEC];
            load_pack(level_value + corners.pixel[corner] * pixel_stride, corner_value);
            const acc_t scale = weight * corners.weight[corner];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              accumulator[k] += scale * corner_value[k];
            }
          }
        }
      }
    }
    store_pack(output + group * sizes.head_dim + channel, accumulator);
  }
}

// grad_value: (batch_size, num_values, num_heads, head_dim) in acc_t, zero-initialised.
// One group per (batch, query, head, level): the samples of different levels are independent here
// (no output to sum), and 4x more groups keep the GPU busy at decoder sizes.
template <typename scalar_t, typename loc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const __grid_constant__ Levels levels, const loc_t* __restrict__ sampling_locations,
                    const loc_t* __restrict__ attention_weights, at::opmath_type<scalar_t>* __restrict__ grad_value,
                    loc_t* __restrict__ grad_sampling_locations, loc_t* __restrict__ grad_attention_weights,
                    const KernelSizes sizes) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread >> sizes.group_shift;  // ((batch * num_queries + query) * num_heads + head) * num_levels + level
  // groups are aligned inside a warp and leave together, so the shuffles below only ever name the
  // lanes of their own group
  if (group >= sizes.num_groups) {
    return;
  }
  const int group_size = 1 << sizes.group_shift;
  const int lane = static_cast<int>(thread) & (group_size - 1);
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned group_mask =
      group_size == 32 ? 0xffffffffu : (((1u << group_size) - 1u) << (warp_lane & ~unsigned(group_size - 1)));
  const int level = static_cast<int>(group % sizes.num_levels);
  const int64_t query_head = group / sizes.num_levels;  // (batch * num_queries + query) * num_heads + head
  const int head = static_cast<int>(query_head % sizes.num_heads);
  const int64_t batch = query_head / (static_cast<int64_t>(sizes.num_heads) * sizes.num_queries);
  const int pixel_stride = sizes.num_heads * sizes.head_dim;
  const int height = levels.height[level], width = levels.width[level];
  const int64_t level_offset = batch * sizes.num_values * static_cast<int64_t>(pixel_stride) +
                               static_cast<int64_t>(levels.start[level]) * pixel_stride + head * sizes.head_dim;
  const scalar_t* level_value = value + level_offset;
  acc_t* level_grad_value = grad_value + level_offset;
  const scalar_t* grad_row = grad_output + query_head * sizes.head_dim;
  const int64_t first_sample = group * sizes.num_points;  // samples are (query_head, level, point) row-major
  const acc_t one = 1;
  BilinearCorners<acc_t> corners;
#pragma unroll 2
  for (int point = 0; point < sizes.num_points; ++point) {
    const int64_t sample = first_sample + point;
    const bool inside = bilinear_corners(static_cast<acc_t>(sampling_locations[2 * sample]),
                                         static_cast<acc_t>(sampling_locations[2 * sample + 1]), height, width,
                                         corners);
    const acc_t weight = static_cast<acc_t>(attention_weights[sample]);
    acc_t partial_weight = 0, partial_x = 0, partial_y = 0;  // over this thread's channels
    if (inside) {
      for (int channel = lane * VEC; channel < sizes.head_dim; channel += group_size * VEC) {
        acc_t grad[VEC];
        load_pack(grad_row + channel, grad);
        acc_t dot[4] = {0, 0, 0, 0};  // <grad_output, corner value>
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.valid[corner]) {
            const int offset = corners.pixel[corner] * pixel_stride + channel;
            acc_t corner_value[VEC];
            load_pack(level_value + offset, corner_value);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              dot[corner] += grad[k] * corner_value[k];
            }
            atomic_add_scaled(level_grad_value + offset, weight * corners.weight[corner], grad);
          }
        }
        partial_weight += corners.weight[0] * dot[0] + corners.weight[1] * dot[1] + corners.weight[2] * dot[2] +
                          corners.weight[3] * dot[3];
        // d(bilinear sample)/d(frac_x) and d/d(frac_y)
        partial_x += (one - corners.frac_y) * (dot[1] - dot[0]) + corners.frac_y * (dot[3] - dot[2]);
        partial_y += (one - corners.frac_x) * (dot[2] - dot[0]) + corners.frac_x * (dot[3] - dot[1]);
      }
    }
    for (int offset = group_size / 2; offset > 0; offset /= 2) {
      partial_weight += __shfl_xor_sync(group_mask, partial_weight, offset, group_size);
      partial_x += __shfl_xor_sync(group_mask, partial_x, offset, group_size);
      partial_y += __shfl_xor_sync(group_mask, partial_y, offset, group_size);
    }
    // every lane holds the sums; the writes rotate over the lanes
    if (lane == (point & (group_size - 1))) {
      grad_attention_weights[sample] = static_cast<loc_t>(partial_weight);
      // pixel = location * size - 0.5
      grad_sampling_locations[2 * sample] =
          static_cast<loc_t>(inside ? weight * partial_x * static_cast<acc_t>(width) : acc_t(0));
      grad_sampling_locations[2 * sample + 1] =
          static_cast<loc_t>(inside ? weight * partial_y * static_cast<acc_t>(height) : acc_t(0));
    }
  }
}

// Channels per thread in the forward: 16 bytes of value (4 x float32, 8 x float16/bfloat16), so a
// group of 8 or 4 lanes reads one head's corner (head_dim 32) as one 128-byte line.
template <typename scalar_t>
constexpr int kForwardVec = std::is_same_v<scalar_t, double> ? 1 : static_cast<int>(16 / sizeof(scalar_t));

// Channels per thread in the backward: 4, one float4 atomic into the float32 grad_value, so the
// atomics of a group cover whole 128-byte lines (8 lanes for head_dim 32) whatever value's dtype.
template <typename scalar_t>
constexpr int kBackwardVec = std::is_same_v<scalar_t, double> ? 1 : 4;

// `wide` when head_dim and the alignment of every pointer allow it, else 1.
int vector_width(int wide, int64_t head_dim, std::initializer_list<std::pair<const void*, int>> pointers) {
  if (wide == 1 || head_dim % wide != 0) {
    return 1;
  }
  for (const auto& [pointer, element_size] : pointers) {
    if (reinterpret_cast<uintptr_t>(pointer) % (wide * element_size) != 0) {
      return 1;
    }
  }
  return wide;
}

// num_groups: groups of G lanes in the launch (queries x heads, times levels in the backward).
KernelSizes kernel_sizes(const MSDeformAttnSizes& sizes, int vec, int64_t num_groups) {
  TORCH_CHECK(sizes.num_values * sizes.num_heads * sizes.head_dim < std::numeric_limits<int>::max() &&
                  sizes.num_queries < std::numeric_limits<int>::max(),
              message("ms_deform_attn (CUDA): one image's value has ", sizes.num_values * sizes.num_heads * sizes.head_dim,
                      " elements; at most 2^31 - 1 are supported"));
  KernelSizes kernel{};
  kernel.num_groups = num_groups;
  kernel.num_values = static_cast<int>(sizes.num_values);
  kernel.num_queries = static_cast<int>(sizes.num_queries);
  kernel.num_heads = static_cast<int>(sizes.num_heads);
  kernel.head_dim = static_cast<int>(sizes.head_dim);
  kernel.num_levels = static_cast<int>(sizes.num_levels);
  kernel.num_points = static_cast<int>(sizes.num_points);
  const int64_t lanes_needed = (sizes.head_dim + vec - 1) / vec;
  int shift = 0;
  while (shift < 5 && (int64_t{1} << shift) < lanes_needed) {
    ++shift;
  }
  kernel.group_shift = shift;
  return kernel;
}

int64_t num_blocks(const KernelSizes& kernel) {
  const int64_t threads = kernel.num_groups << kernel.group_shift;
  return (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const CheckedCall call =
      check_forward_call(value, spatial_shapes, sampling_locations, attention_weights, at::kCUDA, "CUDA");
  const MSDeformAttnSizes& sizes = call.sizes;
  const Levels levels = kernel_levels(spatial_shapes, call.level_start);
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());
  const ContiguousInputs inputs = contiguous_inputs(value, sampling_locations, attention_weights);
  at::Tensor output = empty_output(value, sizes);
  if (output.numel() == 0) {
    return output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_value_and_location_types(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward_cuda",
      [&](auto value_tag, auto location_tag) {
        using scalar_t = decltype(value_tag);
        using loc_t = decltype(location_tag);
        constexpr int wide = kForwardVec<scalar_t>;
        const int vec = vector_width(wide, sizes.head_dim, {{inputs.value.const_data_ptr(), sizeof(scalar_t)},
                                                            {output.const_data_ptr(), sizeof(scalar_t)}});
        const KernelSizes kernel =
            kernel_sizes(sizes, vec, sizes.batch_size * sizes.num_queries * sizes.num_heads);
        auto launch = [&](auto kernel_function) {
          if (num_blocks(kernel) == 0) {
            return;  // no levels
          }
          kernel_function<<<num_blocks(kernel), kThreadsPerBlock, 0, stream>>>(
              inputs.value.const_data_ptr<scalar_t>(), levels, inputs.sampling_locations.const_data_ptr<loc_t>(),
              inputs.attention_weights.const_data_ptr<loc_t>(), output.mutable_data_ptr<scalar_t>(), kernel);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (vec == wide) {
          launch(forward_kernel<scalar_t, loc_t, wide>);
        } else {
          launch(forward_kernel<scalar_t, loc_t, 1>);
        }
      });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  // the float atomics into grad_value make the summation order vary from run to run
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const CheckedCall call = check_backward_call(grad_output, value, spatial_shapes, sampling_locations,
                                               attention_weights, at::kCUDA, "CUDA");
  const MSDeformAttnSizes& sizes = call.sizes;
  const Levels levels = kernel_levels(spatial_shapes, call.level_start);
  const c10::cuda::OptionalCUDAGuard device_guard(value.device());
  const at::Tensor grad_output_c = grad_output.contiguous();
  const ContiguousInputs inputs = contiguous_inputs(value, sampling_locations, attention_weights);

  const at::ScalarType opmath_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_accumulator = at::zeros(value.sizes(), value.options().dtype(opmath_dtype));
  at::Tensor grad_sampling_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (sizes.batch_size * sizes.num_queries * sizes.num_heads == 0 || sizes.head_dim == 0) {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
    return {grad_value_accumulator.to(value.scalar_type()), grad_sampling_locations, grad_attention_weights};
  }
  dispatch_value_and_location_types(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward_cuda",
      [&](auto value_tag, auto location_tag) {
        using scalar_t = decltype(value_tag);
        using loc_t = decltype(location_tag);
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int wide = kBackwardVec<scalar_t>;
        const int vec = vector_width(wide, sizes.head_dim, {{inputs.value.const_data_ptr(), sizeof(scalar_t)},
                                                            {grad_output_c.const_data_ptr(), sizeof(scalar_t)},
                                                            {grad_value_accumulator.const_data_ptr(), sizeof(acc_t)}});
        const KernelSizes kernel = kernel_sizes(
            sizes, vec, sizes.batch_size * sizes.num_queries * sizes.num_heads * sizes.num_levels);
        auto launch = [&](auto kernel_function) {
          if (num_blocks(kernel) == 0) {
            return;  // no levels
          }
          kernel_function<<<num_blocks(kernel), kThreadsPerBlock, 0, stream>>>(
              grad_output_c.const_data_ptr<scalar_t>(), inputs.value.const_data_ptr<scalar_t>(), levels,
              inputs.sampling_locations.const_data_ptr<loc_t>(), inputs.attention_weights.const_data_ptr<loc_t>(),
              grad_value_accumulator.mutable_data_ptr<acc_t>(), grad_sampling_locations.mutable_data_ptr<loc_t>(),
              grad_attention_weights.mutable_data_ptr<loc_t>(), kernel);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (vec == wide) {
          launch(backward_kernel<scalar_t, loc_t, wide>);
        } else {
          launch(backward_kernel<scalar_t, loc_t, 1>);
        }
      });
  at::Tensor grad_value = grad_value_accumulator.scalar_type() == value.scalar_type()
                              ? grad_value_accumulator
                              : grad_value_accumulator.to(value.scalar_type());
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

DDETR_REGISTER_MS_DEFORM_ATTN_KERNELS(CUDA, ms_deform_attn_forward_cuda, ms_deform_attn_backward_cuda)

}  // namespace ddetr
