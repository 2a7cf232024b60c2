// CPU kernels of dropout: a counter-based mask (no generator state, any thread order gives the same
// mask) and the scaled product in one pass.
//
// Element i draws 32 bits: the half (i % 2) of splitmix64(seed + (i / 2) * golden), the mixing
// function of Steele, Lea and Flood's SplitMix (its consecutive outputs pass BigCrush). It is dropped
// when those bits are below threshold = round(p * 2^32), so the drop probability is threshold / 2^32
// and kept elements are scaled by 2^32 / (2^32 - threshold); dropped ones are multiplied by 0.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "ms_deform_attn.h"  // message()

namespace ddetr {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

constexpr double kLevels = 4294967296.0;  // 2^32: the mask's resolution

// round(p * 2^32), checked to be a probability below 1.
uint64_t drop_threshold(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, message("dropout: p must be in [0, 1), got ", p));
  return static_cast<uint64_t>(std::llround(p * kLevels));
}

// The scale of kept elements: 1 / (1 - threshold / 2^32).
template <typename opmath_t>
opmath_t keep_scale(uint64_t threshold) {
  return static_cast<opmath_t>(kLevels / (kLevels - static_cast<double>(threshold)));
}

// value * scale where kept, value * 0 where dropped (as PyTorch's dropout: NaN and inf give NaN);
// branch-free so the loops vectorise.
template <typename scalar_t, typename opmath_t>
inline scalar_t scaled(scalar_t value, bool kept, opmath_t scale) {
  return static_cast<scalar_t>(static_cast<opmath_t>(value) * (kept ? scale : opmath_t(0)));
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cpu(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(input.device().is_cpu(), "dropout_forward: input must be a CPU tensor");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              message("dropout_forward: input must be floating point, got ", input.scalar_type()));
  const uint64_t threshold = drop_threshold(p);
  const at::Tensor x = input.contiguous();
  at::Tensor output = at::empty_like(x);
  at::Tensor keep = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t numel = x.numel();
  const uint64_t base = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t scale = keep_scale<opmath_t>(threshold);
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    bool* mask = keep.mutable_data_ptr<bool>();
    // pairs of elements share one 64-bit draw; a task starts on an even element
    const int64_t pairs = numel / 2;
    at::parallel_for(0, pairs, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const uint64_t bits = splitmix64(base + static_cast<uint64_t>(pair) * kGolden);
        const bool kept_low = (bits & 0xFFFFFFFFULL) >= threshold;
        const bool kept_high = (bits >> 32) >= threshold;
        mask[2 * pair] = kept_low;
        mask[2 * pair + 1] = kept_high;
        out[2 * pair] = scaled(in[2 * pair], kept_low, scale);
        out[2 * pair + 1] = scaled(in[2 * pair + 1], kept_high, scale);
      }
    });
    if (numel % 2 == 1) {  // the last element: the low half of its pair's draw
      const uint64_t bits = splitmix64(base + static_cast<uint64_t>(pairs) * kGolden);
      const bool kept = (bits & 0xFFFFFFFFULL) >= threshold;
      mask[numel - 1] = kept;
      out[numel - 1] = scaled(in[numel - 1], kept, scale);
    }
  });
  return {output, keep};
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad_output, const at::Tensor& keep, double p) {
  TORCH_CHECK(grad_output.device().is_cpu() && keep.device().is_cpu(), "dropout_backward: CPU tensors expected");
  TORCH_CHECK(keep.scalar_type() == at::kBool, "dropout_backward: keep must be a bool tensor");
  TORCH_CHECK(grad_output.sizes() == keep.sizes(),
              message("dropout_backward: grad_output ", grad_output.sizes(), " and keep ", keep.sizes(), " differ in shape"));
  const uint64_t threshold = drop_threshold(p);
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor mask_tensor = keep.contiguous();
  at::Tensor grad_input = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dropout_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t scale = keep_scale<opmath_t>(threshold);
    const scalar_t* in = grad.const_data_ptr<scalar_t>();
    const bool* mask = mask_tensor.const_data_ptr<bool>();
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 8192, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = scaled(in[i], mask[i], scale);
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("dropout_forward", &dropout_forward_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}

}  // namespace ddetr
