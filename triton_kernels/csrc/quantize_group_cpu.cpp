// Per-group uniform quantization (razor::quantize_group / dequantize_group): the CPU
// kernel.
//
// Same rule and layout as the PyTorch kernel in quantize.py (whose comments define
// them), bit-identical to it (tests compare them): per group of `group` elements of the
// flattened tensor, the float32 min / max (NaN propagates), rounded outwards to
// bfloat16; step = (hi - lo) / (2^bits - 1) in float32; code = clamp(nearbyint((x - lo)
// / step)) (half to even), 0 when the step is 0 or the quotient NaN; decoded value
// float(q) * step + lo (a multiply then an add: built with -ffp-contract=off, so no
// fused multiply-add changes the rounding), NaN for a group with a non-finite bound.
// Codes are a little-endian bit stream, `bits` per element; each group owns
// group * bits / 8 whole bytes. Groups run in parallel (at::parallel_for).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "float_types.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

inline uint16_t bf16_bits(c10::BFloat16 b) { return b.x; }

inline c10::BFloat16 bf16_from_bits(uint16_t x) { return c10::BFloat16(x, c10::BFloat16::from_bits()); }

// nextafter for a finite bfloat16 towards -inf (down) or +inf (up).
inline c10::BFloat16 bf16_step(c10::BFloat16 b, bool down) {
  const uint16_t x = bf16_bits(b);
  const bool negative = x & 0x8000u;
  if ((x & 0x7FFFu) == 0) return bf16_from_bits(down ? 0x8001u : 0x0001u);  // +-0: the smallest subnormal
  // away from zero when the step goes the way of the sign, else towards it
  return bf16_from_bits(static_cast<uint16_t>((negative == down) ? x + 1 : x - 1));
}

struct Bounds {
  c10::BFloat16 lo, hi;
};

template <typename T>
Bounds group_bounds(const T* x, int64_t m) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  for (int64_t i = 0; i < m; ++i) {
    const float v = static_cast<float>(x[i]);
    nan |= std::isnan(v);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  c10::BFloat16 lo_b(lo), hi_b(hi);  // round to nearest even
  if (static_cast<float>(lo_b) > lo) lo_b = bf16_step(lo_b, true);
  if (static_cast<float>(hi_b) < hi) hi_b = bf16_step(hi_b, false);
  return {lo_b, hi_b};
}

template <typename T>
void quantize_impl(const T* x, int64_t n, int64_t group, int64_t bits, uint8_t* codes, c10::BFloat16* bounds) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  const float top = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const T* xs = x + g * group;
      const int64_t m = std::min(group, n - g * group);
      const Bounds b = group_bounds(xs, m);
      bounds[2 * g] = b.lo;
      bounds[2 * g + 1] = b.hi;
      const float lo = static_cast<float>(b.lo), hi = static_cast<float>(b.hi);
      const float step = (hi - lo) / top;
      uint8_t* out = codes + g * gbytes;
      uint64_t acc = 0;
      int fill = 0;
      for (int64_t i = 0; i < group; ++i) {
        uint64_t q = 0;
        if (i < m) {
          float t = (static_cast<float>(xs[i]) - lo) / step;
          if (std::isnan(t) || step == 0.0f) t = 0.0f;
          t = std::nearbyint(t);
          q = static_cast<uint64_t>(std::min(std::max(t, 0.0f), top));
        }
        acc |= q << fill;
        fill += static_cast<int>(bits);
        while (fill >= 8) {
          *out++ = static_cast<uint8_t>(acc & 0xFFu);
          acc >>= 8;
          fill -= 8;
        }
      }
    }
  });
}

template <typename T>
void dequantize_impl(const uint8_t* codes, const c10::BFloat16* bounds, int64_t n, int64_t group, int64_t bits,
                     T* out) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  const uint64_t low = (uint64_t{1} << bits) - 1;
  const float top = static_cast<float>(low);
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const float lo = static_cast<float>(bounds[2 * g]), hi = static_cast<float>(bounds[2 * g + 1]);
      const float step = (hi - lo) / top;
      const bool finite = std::isfinite(lo) && std::isfinite(hi);
      const int64_t m = std::min(group, n - g * group);
      const uint8_t* in = codes + g * gbytes;
      T* o = out + g * group;
      uint64_t acc = 0;
      int fill = 0;
      for (int64_t i = 0; i < m; ++i) {
        while (fill < bits) {
          acc |= static_cast<uint64_t>(*in++) << fill;
          fill += 8;
        }
        const float q = static_cast<float>(acc & low);
        acc >>= bits;
        fill -= static_cast<int>(bits);
        const float prod = q * step;
        o[i] = static_cast<T>(finite ? prod + lo : std::numeric_limits<float>::quiet_NaN());
      }
    }
  });
}


std::vector<at::Tensor> quantize_group(const at::Tensor& x_in, int64_t group, int64_t bits) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  at::Tensor codes = at::empty({groups * (group * bits / 8)}, x.options().dtype(at::kByte));
  at::Tensor bounds = at::empty({groups, 2}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {codes, bounds};
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    quantize_impl<T>(x.data_ptr<T>(), n, group, bits, codes.data_ptr<uint8_t>(),
                     bounds.data_ptr<c10::BFloat16>());
  });
  return {codes, bounds};
}

at::Tensor dequantize_group(const at::Tensor& codes_in, const at::Tensor& bounds_in, int64_t n, int64_t group,
                            int64_t bits, at::ScalarType dtype) {
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor bounds = bounds_in.contiguous();
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  RAZOR_FLOAT_TYPES(dtype, [&] {
    dequantize_impl<T>(codes.data_ptr<uint8_t>(), bounds.data_ptr<c10::BFloat16>(), n, group, bits,
                       out.data_ptr<T>());
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_group", &quantize_group, "per-group quantize (CPU)");
  m.def("dequantize_group", &dequantize_group, "per-group dequantize (CPU)");
}
