// Shared declarations of the multi-scale deformable attention kernels: input checks and sizes.
//
// Shapes (full names, see docs/architecture.md):
//   value               (batch_size, num_values, num_heads, head_dim)
//   spatial_shapes      int[2 * num_levels]: height_0, width_0, height_1, width_1, ... (a list of ints in
//                       the schema, never a tensor: nothing is read from the host or the device)
//   level starts        computed here: level l starts at the sum of height * width of the levels before
//   sampling_locations  (batch_size, num_queries, num_heads, num_levels, num_points, 2), (x, y) in [0, 1]
//   attention_weights   (batch_size, num_queries, num_heads, num_levels, num_points)
//   output              (batch_size, num_queries, num_heads * head_dim)
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace ddetr {

// Error messages. Every TORCH_CHECK of the op passes one ready-made string (a literal or message(...)),
// never integers or sizes to stream: on the H100 machine of issue 14 (torch 2.11, Python 3.12) an
// extension's TORCH_CHECK whose message streams an integer kills the process with SIGSEGV instead of
// raising, while the same check with a plain string raises RuntimeError (devtools diagnosis: plain
// string, live local tensors, OpenMP on or off all raise; any streamed int64 crashes). message()
// formats with std::to_string and never touches an ostream.
inline void append_part(std::string& out, const char* part) { out += part; }
inline void append_part(std::string& out, const std::string& part) { out += part; }
inline void append_part(std::string& out, at::ScalarType part) { out += c10::toString(part); }
inline void append_part(std::string& out, at::IntArrayRef part) {
  out += "[";
  for (size_t i = 0; i < part.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(part[i]);
  }
  out += "]";
}
inline void append_part(std::string& out, double part) { out += std::to_string(part); }
template <typename Integer, typename = std::enable_if_t<std::is_integral_v<Integer>>>
void append_part(std::string& out, Integer part) {
  out += std::to_string(part);
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (append_part(out, parts), ...);
  return out;
}

// Which corners of the bilinear cell whose top-left pixel is (left, top) lie inside a height x width map,
// in the kernels' order: top-left, top-right, bottom-left, bottom-right (CPU and CUDA kernels alike).
template <typename index_t>
C10_HOST_DEVICE inline void corners_inside(index_t left, index_t top, index_t height, index_t width, bool valid[4]) {
  const bool left_in = left >= 0, right_in = left + 1 < width;
  const bool top_in = top >= 0, bottom_in = top + 1 < height;
  valid[0] = top_in && left_in;
  valid[1] = top_in && right_in;
  valid[2] = bottom_in && left_in;
  valid[3] = bottom_in && right_in;
}

struct MSDeformAttnSizes {
  int64_t batch_size;
  int64_t num_values;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
};

// Whether value's dtype goes with the dtype of sampling_locations and attention_weights: they share
// one dtype, value's or, for a float16/bfloat16 value, float32 (autocast gives the value projection in
// half precision and the locations, from float32 reference points, in float32).
inline bool is_reduced_precision(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

inline void check_location_dtype(at::ScalarType value, at::ScalarType locations, at::ScalarType weights) {
  TORCH_CHECK(locations == weights,
              message("ms_deform_attn: sampling_locations and attention_weights must share one dtype, got ", locations,
                      " and ", weights));
  TORCH_CHECK(locations == value || (is_reduced_precision(value) && locations == at::kFloat),
              message("ms_deform_attn: sampling_locations and attention_weights must be ", value,
                      " like value (or float32 for a float16/bfloat16 value), got ", locations));
}

// Calls body(scalar_t(), float()) for a float16/bfloat16 scalar_t; other value types take no float32
// locations (tag dispatch rather than `if constexpr`, which nvcc rejects inside the dispatch lambda).
template <typename scalar_t, typename Body>
void call_with_float_locations(Body& body, std::true_type /*reduced precision*/) {
  body(scalar_t(), float());
}

template <typename scalar_t, typename Body>
void call_with_float_locations(Body& /*body*/, std::false_type /*reduced precision*/) {
  TORCH_CHECK(false, "ms_deform_attn: float32 locations need a float16 or bfloat16 value");
}

// Calls body(value_tag, location_tag) with default-constructed values of the C++ types of value and
// of the locations/weights (see check_location_dtype for the combinations).
template <typename Body>
void dispatch_value_and_location_types(at::ScalarType value, at::ScalarType locations, const char* name,
                                       Body&& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value, "ms_deform_attn", [&] {
    if (locations == value) {
      body(scalar_t(), scalar_t());
    } else {
      TORCH_CHECK(locations == at::kFloat,
                  message(name, ": unsupported locations dtype ", locations, " for value dtype ",
                          value));
      using reduced = std::integral_constant<bool, std::is_same<scalar_t, at::Half>::value ||
                                                       std::is_same<scalar_t, at::BFloat16>::value>;
      call_with_float_locations<scalar_t>(body, reduced());
    }
  });
}

// Where every level starts in num_values (the running sum of height * width), or why the levels do
// not lie inside value (then `error` is set and the starts are incomplete); the kernels index value with
// these numbers. spatial_shapes holds height, width of every level, num_levels pairs.
//
// Overflow-safe: height * width is never formed before it is known to fit, so shapes like
// (2^61, 8), whose product wraps around in int64, are rejected instead of passing the check and
// sending the kernels out of bounds. The message is built with std::to_string (see message() above);
// callers throw it.
struct LevelStarts {
  std::vector<int64_t> start;
  std::string error;
};

inline LevelStarts level_starts(at::IntArrayRef spatial_shapes, int64_t num_levels, int64_t num_values) {
  LevelStarts levels;
  if (static_cast<int64_t>(spatial_shapes.size()) != 2 * num_levels) {
    levels.error = message("ms_deform_attn: spatial_shapes must hold (height, width) of num_levels = ", num_levels,
                           " levels, that is ", 2 * num_levels, " ints, got ", spatial_shapes);
    return levels;
  }
  levels.start.reserve(num_levels);
  int64_t start = 0;  // 0 <= start <= num_values throughout
  for (int64_t level = 0; level < num_levels; ++level) {
    const int64_t height = spatial_shapes[2 * level], width = spatial_shapes[2 * level + 1];
    // height * width <= num_values - start  <=>  width <= (num_values - start) / height (height > 0)
    const bool fits = height >= 0 && width >= 0 && (height == 0 || width <= (num_values - start) / height);
    if (!fits) {
      levels.error = "ms_deform_attn: level " + std::to_string(level) + " (height " + std::to_string(height) +
                     ", width " + std::to_string(width) + ", start " + std::to_string(start) +
                     ") does not fit in num_values = " + std::to_string(num_values);
      return levels;
    }
    levels.start.push_back(start);
    start += height * width;
  }
  return levels;
}

// Checks ranks, sizes, dtypes and devices of the op's inputs and returns their sizes.
inline MSDeformAttnSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4,
              message("ms_deform_attn: value must be (batch_size, num_values, num_heads, head_dim), got ",
                      value.sizes()));
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              message("ms_deform_attn: sampling_locations must be "
                      "(batch_size, num_queries, num_heads, num_levels, num_points, 2), got ",
                      sampling_locations.sizes()));
  MSDeformAttnSizes sizes{};
  sizes.batch_size = value.size(0);
  sizes.num_values = value.size(1);
  sizes.num_heads = value.size(2);
  sizes.head_dim = value.size(3);
  sizes.num_queries = sampling_locations.size(1);
  sizes.num_levels = sampling_locations.size(3);
  sizes.num_points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch_size && sampling_locations.size(2) == sizes.num_heads,
              message("ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
                      " does not match value ", value.sizes(), " in batch_size or num_heads"));
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == sizes.batch_size &&
                  attention_weights.size(1) == sizes.num_queries && attention_weights.size(2) == sizes.num_heads &&
                  attention_weights.size(3) == sizes.num_levels && attention_weights.size(4) == sizes.num_points,
              message("ms_deform_attn: attention_weights must be (batch_size, num_queries, num_heads, num_levels, "
                      "num_points) = ",
                      sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes()));
  TORCH_CHECK(value.is_floating_point(),
              message("ms_deform_attn: value must be floating point, got ", value.scalar_type()));
  check_location_dtype(value.scalar_type(), sampling_locations.scalar_type(), attention_weights.scalar_type());
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device");
  return sizes;
}

// Checks grad_output of the backward op against the forward sizes.
inline void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const MSDeformAttnSizes& sizes) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch_size &&
                  grad_output.size(1) == sizes.num_queries &&
                  grad_output.size(2) == sizes.num_heads * sizes.head_dim,
              message("ms_deform_attn_backward: grad_output must be (batch_size, num_queries, num_heads * head_dim) = (",
                      sizes.batch_size, ", ", sizes.num_queries, ", ", sizes.num_heads * sizes.head_dim, "), got ",
                      grad_output.sizes()));
}

// The host-side checks every kernel makes before it runs, shared by the CPU and CUDA files: the sizes of
// the call and where each level starts in num_values.
struct CheckedCall {
  MSDeformAttnSizes sizes;
  std::vector<int64_t> level_start;
};

// Checks the forward op's inputs for the kernel of `device` (named `backend` in messages): ranks, sizes,
// dtypes and devices (check_ms_deform_attn_inputs), value on that device, the levels inside value.
inline CheckedCall check_forward_call(const at::Tensor& value, at::IntArrayRef spatial_shapes,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                                      at::DeviceType device, const char* backend) {
  const MSDeformAttnSizes sizes = check_ms_deform_attn_inputs(value, sampling_locations, attention_weights);
  TORCH_CHECK(value.device().type() == device,
              message("ms_deform_attn (", backend, "): value must be a ", backend, " tensor"));
  LevelStarts levels = level_starts(spatial_shapes, sizes.num_levels, sizes.num_values);
  TORCH_CHECK(levels.error.empty(), levels.error);
  return {sizes, std::move(levels.start)};
}

// Checks the backward op's inputs: those of the forward, and grad_output against them (shape, device, dtype).
inline CheckedCall check_backward_call(const at::Tensor& grad_output, const at::Tensor& value,
                                       at::IntArrayRef spatial_shapes, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, at::DeviceType device,
                                       const char* backend) {
  CheckedCall call = check_forward_call(value, spatial_shapes, sampling_locations, attention_weights, device, backend);
  check_ms_deform_attn_grad_output(grad_output, call.sizes);
  TORCH_CHECK(grad_output.device() == value.device(),
              message("ms_deform_attn_backward (", backend, "): grad_output and value must be on one ", backend,
                      " device"));
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              message("ms_deform_attn_backward: grad_output dtype ", grad_output.scalar_type(),
                      " differs from value dtype ", value.scalar_type()));
  return call;
}

// The op's tensor inputs made contiguous (the kernels index them densely).
struct ContiguousInputs {
  at::Tensor value;
  at::Tensor sampling_locations;
  at::Tensor attention_weights;
};

inline ContiguousInputs contiguous_inputs(const at::Tensor& value, const at::Tensor& sampling_locations,
                                          const at::Tensor& attention_weights) {
  return {value.contiguous(), sampling_locations.contiguous(), attention_weights.contiguous()};
}

// The forward output, uninitialised: (batch_size, num_queries, num_heads * head_dim) like value.
inline at::Tensor empty_output(const at::Tensor& value, const MSDeformAttnSizes& sizes) {
  return at::empty({sizes.batch_size, sizes.num_queries, sizes.num_heads * sizes.head_dim}, value.options());
}

}  // namespace ddetr

// Registers a backend's forward and backward kernels under the schema of ms_deform_attn.cpp
// (TORCH_LIBRARY_IMPL for `dispatch_key`, e.g. CPU or CUDA), so every backend names the ops alike.
#define DDETR_REGISTER_MS_DEFORM_ATTN_KERNELS(dispatch_key, forward, backward) \
  TORCH_LIBRARY_IMPL(ddetr, dispatch_key, m) {                              \
    m.impl("ms_deform_attn_forward", &(forward));                           \
    m.impl("ms_deform_attn_backward", &(backward));                         \
  }
