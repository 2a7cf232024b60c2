// CPU kernels of multi-scale deformable attention (forward and backward).
//
// Sampling follows grid_sample(bilinear, zeros, align_corners=False): pixel = location * size - 0.5,
// corners outside the map read zero. Every sampling point computes its bilinear corners once, then
// the loops over head_dim (contiguous in value) are vectorised. Reduced precision types
// (bfloat16, float16) are read and written in their dtype and accumulated in float32 (opmath).
//
// Threading:
//   forward   over (batch, query): each task owns its output rows.
//   backward  over (batch, head[, query chunk]): each task owns grad_value[batch, :, head, :] (or a
//             private copy of it per query chunk, summed afterwards), so the scatter into grad_value
//             needs no atomics. With many samples per pixel (encoder) it works on (batch, head, value,
//             channel) copies of value and grad_value, so a task's slice is contiguous; it
//             prefetches its strided per-query rows. grad_sampling_locations and grad_attention_weights are written once
//             per sampling point by the task that owns it.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"

namespace ddetr {
namespace {

// The (up to) four pixels a bilinear sample reads: top-left, top-right, bottom-left, bottom-right.
template <typename opmath_t>
struct BilinearCorners {
  int64_t pixel[4];    // row * width + column inside the level, 0 for corners outside the map
  opmath_t weight[4];  // bilinear weight, 0 for corners outside the map
  bool valid[4];
  bool all_valid;
  opmath_t frac_x;  // position inside the cell, in [0, 1)
  opmath_t frac_y;
};

// Fills `corners` for a location (x, y) in [0, 1] on a height x width level. Returns false when the
// sample only reads zeros (outside the map or NaN).
template <typename opmath_t>
inline bool bilinear_corners(opmath_t location_x, opmath_t location_y, int64_t height, int64_t width,
                             BilinearCorners<opmath_t>& corners) {
  const opmath_t x = location_x * static_cast<opmath_t>(width) - opmath_t(0.5);
  const opmath_t y = location_y * static_cast<opmath_t>(height) - opmath_t(0.5);
  // x == -1 still has a gradient through column 0 (as in grid_sample); the range test also rejects
  // NaN and keeps floor() small enough for int64
  if (!(x >= opmath_t(-1) && x < static_cast<opmath_t>(width) && y >= opmath_t(-1) &&
        y < static_cast<opmath_t>(height))) {
    return false;
  }
  const opmath_t x_floor = std::floor(x);
  const opmath_t y_floor = std::floor(y);
  const int64_t left = static_cast<int64_t>(x_floor);
  const int64_t top = static_cast<int64_t>(y_floor);
  corners.frac_x = x - x_floor;
  corners.frac_y = y - y_floor;
  corners_inside(left, top, height, width, corners.valid);
  corners.all_valid = corners.valid[0] && corners.valid[3];
  const opmath_t one = 1;
  const opmath_t weight[4] = {(one - corners.frac_y) * (one - corners.frac_x), (one - corners.frac_y) * corners.frac_x,
                              corners.frac_y * (one - corners.frac_x), corners.frac_y * corners.frac_x};
  const int64_t pixel[4] = {top * width + left, top * width + left + 1, (top + 1) * width + left,
                            (top + 1) * width + left + 1};
  for (int corner = 0; corner < 4; ++corner) {
    corners.weight[corner] = corners.valid[corner] ? weight[corner] : opmath_t(0);
    corners.pixel[corner] = corners.valid[corner] ? pixel[corner] : 0;
  }
  return true;
}

// accumulator[d] += sum over the four corners of weight_c * value_c[d]
template <typename scalar_t, typename opmath_t>
inline void accumulate_four(opmath_t* __restrict__ accumulator, const scalar_t* __restrict__ value0,
                            const scalar_t* __restrict__ value1, const scalar_t* __restrict__ value2,
                            const scalar_t* __restrict__ value3, opmath_t weight0, opmath_t weight1, opmath_t weight2,
                            opmath_t weight3, int64_t head_dim) {
#pragma omp simd
  for (int64_t channel = 0; channel < head_dim; ++channel) {
    accumulator[channel] += weight0 * static_cast<opmath_t>(value0[channel]) +
                            weight1 * static_cast<opmath_t>(value1[channel]) +
                            weight2 * static_cast<opmath_t>(value2[channel]) +
                            weight3 * static_cast<opmath_t>(value3[channel]);
  }
}

// accumulator[d] += weight * value[d]
template <typename scalar_t, typename opmath_t>
inline void accumulate_one(opmath_t* __restrict__ accumulator, const scalar_t* __restrict__ value, opmath_t weight,
                           int64_t head_dim) {
#pragma omp simd
  for (int64_t channel = 0; channel < head_dim; ++channel) {
    accumulator[channel] += weight * static_cast<opmath_t>(value[channel]);
  }
}

// For four corners at once: dot_c = <grad_output, value_c> and grad_value_c += scale_c * grad_output.
template <typename scalar_t, typename opmath_t>
inline void backward_four(const opmath_t* __restrict__ grad_output, const scalar_t* __restrict__ value0,
                          const scalar_t* __restrict__ value1, const scalar_t* __restrict__ value2,
                          const scalar_t* __restrict__ value3, opmath_t* __restrict__ grad_value0,
                          opmath_t* __restrict__ grad_value1, opmath_t* __restrict__ grad_value2,
                          opmath_t* __restrict__ grad_value3, const opmath_t scale[4], int64_t head_dim,
                          opmath_t dot[4]) {
  opmath_t dot0 = 0, dot1 = 0, dot2 = 0, dot3 = 0;
  const opmath_t scale0 = scale[0], scale1 = scale[1], scale2 = scale[2], scale3 = scale[3];
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
  for (int64_t channel = 0; channel < head_dim; ++channel) {
    const opmath_t grad = grad_output[channel];
    dot0 += grad * static_cast<opmath_t>(value0[channel]);
    dot1 += grad * static_cast<opmath_t>(value1[channel]);
    dot2 += grad * static_cast<opmath_t>(value2[channel]);
    dot3 += grad * static_cast<opmath_t>(value3[channel]);
    grad_value0[channel] += scale0 * grad;
    grad_value1[channel] += scale1 * grad;
    grad_value2[channel] += scale2 * grad;
    grad_value3[channel] += scale3 * grad;
  }
  dot[0] = dot0;
  dot[1] = dot1;
  dot[2] = dot2;
  dot[3] = dot3;
}

// One corner: returns <grad_output, value> and adds scale * grad_output to grad_value.
template <typename scalar_t, typename opmath_t>
inline opmath_t backward_one(const opmath_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                             opmath_t* __restrict__ grad_value, opmath_t scale, int64_t head_dim) {
  opmath_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t channel = 0; channel < head_dim; ++channel) {
    const opmath_t grad = grad_output[channel];
    dot += grad * static_cast<opmath_t>(value[channel]);
    grad_value[channel] += scale * grad;
  }
  return dot;
}

// How many queries ahead the backward prefetches its per-query rows.
constexpr int64_t kPrefetchDistance = 4;

// Prefetches the cache lines of data[0, count).
template <typename T>
inline void prefetch_range(const T* data, int64_t count, bool for_write) {
#if defined(__GNUC__) || defined(__clang__)
  const char* begin = reinterpret_cast<const char*>(data);
  const char* end = reinterpret_cast<const char*>(data + count);
  for (const char* line = begin; line < end; line += 64) {
    if (for_write) {
      __builtin_prefetch(line, 1);
    } else {
      __builtin_prefetch(line, 0);
    }
  }
#else
  (void)data;
  (void)count;
  (void)for_write;
#endif
}

template <typename scalar_t, typename loc_t>
void forward_kernel(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const loc_t* sampling_locations, const loc_t* attention_weights, scalar_t* output,
                    const MSDeformAttnSizes& sizes) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t num_heads = sizes.num_heads, head_dim = sizes.head_dim, num_levels = sizes.num_levels,
                num_points = sizes.num_points, num_queries = sizes.num_queries;
  const int64_t pixel_stride = num_heads * head_dim;  // distance between neighbouring pixels in value
  const int64_t work_per_query = std::max<int64_t>(1, num_heads * num_levels * num_points * head_dim);
  const int64_t grain_size = std::max<int64_t>(1, 32768 / work_per_query);
  at::parallel_for(0, sizes.batch_size * num_queries, grain_size, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> accumulator_storage(head_dim);  // one per task, reused for every row
    opmath_t* accumulator = accumulator_storage.data();
    BilinearCorners<opmath_t> corners;
    for (int64_t batch_query = begin; batch_query < end; ++batch_query) {
      const int64_t batch = batch_query / num_queries;
      const scalar_t* batch_value = value + batch * sizes.num_values * pixel_stride;
      for (int64_t head = 0; head < num_heads; ++head) {
        std::fill(accumulator, accumulator + head_dim, opmath_t(0));
        const int64_t head_sample = (batch_query * num_heads + head) * num_levels * num_points;
        for (int64_t level = 0; level < num_levels; ++level) {
          const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
          const scalar_t* level_value = batch_value + level_start_index[level] * pixel_stride + head * head_dim;
          for (int64_t point = 0; point < num_points; ++point) {
            const int64_t sample = head_sample + level * num_points + point;
            const opmath_t weight = static_cast<opmath_t>(attention_weights[sample]);
            const opmath_t x = static_cast<opmath_t>(sampling_locations[2 * sample]);
            const opmath_t y = static_cast<opmath_t>(sampling_locations[2 * sample + 1]);
            if (!bilinear_corners(x, y, height, width, corners)) {
              // reads zeros; as in the reference, a NaN location or non-finite weight still poisons
              // the output, so a diverged model is seen instead of silently masked
              if (std::isnan(x) || std::isnan(y) || !std::isfinite(weight)) {
                std::fill(accumulator, accumulator + head_dim, std::numeric_limits<opmath_t>::quiet_NaN());
              }
              continue;
            }
            if (corners.all_valid) {
              accumulate_four(accumulator, level_value + corners.pixel[0] * pixel_stride,
                              level_value + corners.pixel[1] * pixel_stride,
                              level_value + corners.pixel[2] * pixel_stride,
                              level_value + corners.pixel[3] * pixel_stride, weight * corners.weight[0],
                              weight * corners.weight[1], weight * corners.weight[2], weight * corners.weight[3],
                              head_dim);
            } else {
              for (int corner = 0; corner < 4; ++corner) {
                if (corners.valid[corner]) {
                  accumulate_one(accumulator, level_value + corners.pixel[corner] * pixel_stride,
                                 weight * corners.weight[corner], head_dim);
                }
              }
            }
          }
        }
        scalar_t* output_row = output + (batch_query * num_heads + head) * head_dim;
        for (int64_t channel = 0; channel < head_dim; ++channel) {
          output_row[channel] = static_cast<scalar_t>(accumulator[channel]);
        }
      }
    }
  });
}

// Where the (batch, head) slices of value and grad_value lie: element (batch, pixel, head, channel)
// is at batch * batch_stride + head * head_stride + pixel * pixel_stride + channel.
//   heads inner  (batch_size, num_values, num_heads, head_dim): value as given
//   heads outer  (batch_size, num_heads, num_values, head_dim): a task's slice is contiguous (fewer
//                cache and TLB misses), worth a transposed copy when there are many samples per pixel
struct ValueLayout {
  int64_t batch_stride;
  int64_t head_stride;
  int64_t pixel_stride;
};

// grad_value_accumulator: num_chunks copies of grad_value in `layout`, in opmath_t; chunk c holds
// the contributions of the queries in chunk c.
template <typename scalar_t, typename loc_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const loc_t* sampling_locations,
                     const loc_t* attention_weights, at::opmath_type<scalar_t>* grad_value_accumulator,
                     loc_t* grad_sampling_locations, loc_t* grad_attention_weights,
                     const MSDeformAttnSizes& sizes, const ValueLayout& layout, int64_t num_chunks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch_size = sizes.batch_size, num_heads = sizes.num_heads, head_dim = sizes.head_dim,
                num_levels = sizes.num_levels, num_points = sizes.num_points, num_queries = sizes.num_queries,
                num_values = sizes.num_values;
  const int64_t pixel_stride = layout.pixel_stride;
  const int64_t chunk_stride = batch_size * num_values * num_heads * head_dim;
  const int64_t queries_per_chunk = (num_queries + num_chunks - 1) / num_chunks;
  at::parallel_for(0, batch_size * num_heads * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> grad_output_storage(head_dim);  // grad_output row in opmath_t, one per task
    BilinearCorners<opmath_t> corners;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % num_chunks;
      const int64_t head = (task / num_chunks) % num_heads;
      const int64_t batch = task / (num_chunks * num_heads);
      const int64_t slice_offset = batch * layout.batch_stride + head * layout.head_stride;
      const scalar_t* batch_value = value + slice_offset;
      opmath_t* batch_grad_value = grad_value_accumulator + chunk * chunk_stride + slice_offset;
      const int64_t query_end = std::min(num_queries, (chunk + 1) * queries_per_chunk);
      for (int64_t query = chunk * queries_per_chunk; query < query_end; ++query) {
        const int64_t batch_query_head = (batch * num_queries + query) * num_heads + head;
        if (query + kPrefetchDistance < query_end) {
          // the per-query rows of this head are num_heads rows apart: too far for the hardware
          // prefetcher, so fetch the rows of a later query now
          const int64_t ahead = batch_query_head + kPrefetchDistance * num_heads;
          const int64_t samples = num_levels * num_points;
          prefetch_range(sampling_locations + 2 * ahead * samples, 2 * samples, false);
          prefetch_range(attention_weights + ahead * samples, samples, false);
          prefetch_range(grad_output + ahead * head_dim, head_dim, false);
          prefetch_range(grad_sampling_locations + 2 * ahead * samples, 2 * samples, true);
          prefetch_range(grad_attention_weights + ahead * samples, samples, true);
        }
        const scalar_t* grad_output_row = grad_output + batch_query_head * head_dim;
        const opmath_t* grad_row;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          grad_row = grad_output_row;
        } else {
          for (int64_t channel = 0; channel < head_dim; ++channel) {
            grad_output_storage[channel] = static_cast<opmath_t>(grad_output_row[channel]);
          }
          grad_row = grad_output_storage.data();
        }
        for (int64_t level = 0; level < num_levels; ++level) {
          const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
          const int64_t level_offset = level_start_index[level] * pixel_stride;
          const scalar_t* level_value = batch_value + level_offset;
          opmath_t* level_grad_value = batch_grad_value + level_offset;
          for (int64_t point = 0; point < num_points; ++point) {
            const int64_t sample = (batch_query_head * num_levels + level) * num_points + point;
            if (!bilinear_corners(static_cast<opmath_t>(sampling_locations[2 * sample]),
                                  static_cast<opmath_t>(sampling_locations[2 * sample + 1]), height, width,
                                  corners)) {
              grad_sampling_locations[2 * sample] = loc_t(0);
              grad_sampling_locations[2 * sample + 1] = loc_t(0);
              grad_attention_weights[sample] = loc_t(0);
              continue;
            }
            const opmath_t weight = static_cast<opmath_t>(attention_weights[sample]);
            const opmath_t scale[4] = {weight * corners.weight[0], weight * corners.weight[1],
                                       weight * corners.weight[2], weight * corners.weight[3]};
            opmath_t dot[4] = {0, 0, 0, 0};  // <grad_output, corner value>
            if (corners.all_valid) {
              backward_four(grad_row, level_value + corners.pixel[0] * pixel_stride,
                            level_value + corners.pixel[1] * pixel_stride,
                            level_value + corners.pixel[2] * pixel_stride,
                            level_value + corners.pixel[3] * pixel_stride,
                            level_grad_value + corners.pixel[0] * pixel_stride,
                            level_grad_value + corners.pixel[1] * pixel_stride,
                            level_grad_value + corners.pixel[2] * pixel_stride,
                            level_grad_value + corners.pixel[3] * pixel_stride, scale, head_dim, dot);
            } else {
              for (int corner = 0; corner < 4; ++corner) {
                if (corners.valid[corner]) {
                  dot[corner] = backward_one(grad_row, level_value + corners.pixel[corner] * pixel_stride,
                                             level_grad_value + corners.pixel[corner] * pixel_stride, scale[corner],
                                             head_dim);
                }
              }
            }
            const opmath_t one = 1;
            grad_attention_weights[sample] =
                static_cast<loc_t>(corners.weight[0] * dot[0] + corners.weight[1] * dot[1] +
                                      corners.weight[2] * dot[2] + corners.weight[3] * dot[3]);
            // d(bilinear sample)/d(frac_x), d/d(frac_y); pixel = location * size - 0.5
            const opmath_t grad_x = (one - corners.frac_y) * (dot[1] - dot[0]) + corners.frac_y * (dot[3] - dot[2]);
            const opmath_t grad_y = (one - corners.frac_x) * (dot[2] - dot[0]) + corners.frac_x * (dot[3] - dot[1]);
            grad_sampling_locations[2 * sample] = static_cast<loc_t>(weight * grad_x * static_cast<opmath_t>(width));
            grad_sampling_locations[2 * sample + 1] =
                static_cast<loc_t>(weight * grad_y * static_cast<opmath_t>(height));
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const CheckedCall call =
      check_forward_call(value, spatial_shapes, sampling_locations, attention_weights, at::kCPU, "CPU");
  const MSDeformAttnSizes& sizes = call.sizes;
  const ContiguousInputs inputs = contiguous_inputs(value, sampling_locations, attention_weights);
  at::Tensor output = empty_output(value, sizes);
  if (output.numel() != 0) {
    dispatch_value_and_location_types(
        value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_forward_cpu",
        [&](auto value_tag, auto location_tag) {
          using scalar_t = decltype(value_tag);
          using loc_t = decltype(location_tag);
          forward_kernel<scalar_t, loc_t>(inputs.value.const_data_ptr<scalar_t>(), spatial_shapes.data(),
                                          call.level_start.data(), inputs.sampling_locations.const_data_ptr<loc_t>(),
                                          inputs.attention_weights.const_data_ptr<loc_t>(),
                                          output.mutable_data_ptr<scalar_t>(), sizes);
        });
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, at::IntArrayRef spatial_shapes,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const CheckedCall call = check_backward_call(grad_output, value, spatial_shapes, sampling_locations,
                                               attention_weights, at::kCPU, "CPU");
  const MSDeformAttnSizes& sizes = call.sizes;
  const at::Tensor grad_output_c = grad_output.contiguous();
  const at::Tensor sampling_locations_c = sampling_locations.contiguous();
  const at::Tensor attention_weights_c = attention_weights.contiguous();

  at::Tensor grad_sampling_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attention_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  const int64_t num_row_tasks = sizes.batch_size * sizes.num_heads;
  if (num_row_tasks == 0 || sizes.num_queries == 0 || sizes.head_dim == 0) {
    grad_sampling_locations.zero_();
    grad_attention_weights.zero_();
    return {at::zeros(value.sizes(), value.options()), grad_sampling_locations, grad_attention_weights};
  }
  // Few (batch, head) rows for many threads: split the queries into chunks, each with a private
  // grad_value, summed afterwards.
  const int64_t num_threads = at::get_num_threads();
  const int64_t num_chunks =
      std::min(sizes.num_queries, std::max<int64_t>(1, (num_threads + num_row_tasks - 1) / num_row_tasks));
  // heads outer when every pixel of a head is read by several samples on average (the encoder),
  // heads inner when the transposed copies would cost more than they save (the decoder)
  const int64_t samples_per_head = sizes.num_queries * sizes.num_levels * sizes.num_points;
  const bool heads_outer = samples_per_head >= 4 * sizes.num_values && sizes.num_heads > 1;
  const int64_t S = sizes.num_values, M = sizes.num_heads, D = sizes.head_dim;
  const ValueLayout layout = heads_outer ? ValueLayout{M * S * D, S * D, D} : ValueLayout{S * M * D, D, M * D};
  const at::Tensor value_c =
      heads_outer ? value.permute({0, 2, 1, 3}).contiguous() : value.contiguous();  // (N, M, S, D) or (N, S, M, D)
  const at::ScalarType opmath_dtype = at::toOpMathType(value.scalar_type());
  const bool accumulate_in_place = !heads_outer && num_chunks == 1 && opmath_dtype == value.scalar_type();
  at::Tensor grad_value_accumulator =
      accumulate_in_place ? at::zeros(value.sizes(), value.options())
                          : at::zeros({num_chunks, value_c.size(0), value_c.size(1), value_c.size(2), D},
                                      value.options().dtype(opmath_dtype));  // (chunks, *value_c.shape)

  dispatch_value_and_location_types(
      value.scalar_type(), sampling_locations.scalar_type(), "ms_deform_attn_backward_cpu",
      [&](auto value_tag, auto location_tag) {
        using scalar_t = decltype(value_tag);
        using loc_t = decltype(location_tag);
        backward_kernel<scalar_t, loc_t>(
            grad_output_c.const_data_ptr<scalar_t>(), value_c.const_data_ptr<scalar_t>(),
            spatial_shapes.data(), call.level_start.data(),
            sampling_locations_c.const_data_ptr<loc_t>(), attention_weights_c.const_data_ptr<loc_t>(),
            grad_value_accumulator.mutable_data_ptr<at::opmath_type<scalar_t>>(),
            grad_sampling_locations.mutable_data_ptr<loc_t>(), grad_attention_weights.mutable_data_ptr<loc_t>(), sizes,
            layout, num_chunks);
      });
  if (accumulate_in_place) {
    return {grad_value_accumulator, grad_sampling_locations, grad_attention_weights};
  }
  // (chunks, *value_c.shape) -> value_c.shape -> (N, S, M, D)
  const at::Tensor grad_value_summed =
      num_chunks == 1 ? grad_value_accumulator.select(0, 0) : grad_value_accumulator.sum(0);
  at::Tensor grad_value = at::empty(value.sizes(), value.options());  // contiguous
  grad_value.copy_(heads_outer ? grad_value_summed.permute({0, 2, 1, 3}) : grad_value_summed);
  return {grad_value, grad_sampling_locations, grad_attention_weights};
}

}  // namespace

DDETR_REGISTER_MS_DEFORM_ATTN_KERNELS(CPU, ms_deform_attn_forward_cpu, ms_deform_attn_backward_cpu)

}  // namespace ddetr
