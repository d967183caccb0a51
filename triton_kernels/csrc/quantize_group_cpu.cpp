// Uniform quantization: the CPU kernels of razor::quantize_group / dequantize_group
// (per-group bounds) and of razor::quantize_uniform / dequantize_uniform (one fixed
// [lo, hi] for the whole tensor, the GELU derivative codes; same rounding as below with
// float32(lo) and float32((hi - lo) / (2^bits - 1)), the values a float32 tensor op
// with Python-float operands computes with, and one bit stream over all elements).
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
//
// float32 runs four lanes at a time on SSE2 (every x86-64 CPU) and, where the CPU has
// AVX-512 and BMI2, sixteen lanes at a time with the codes packed and unpacked in
// registers (pext / pdep); both paths give the same bits (set_simd(0) selects the
// first, and the tests run both).

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
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RAZOR_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace {

// Wider paths chosen at run time (the module is built for the baseline x86-64, so
// the AVX-512 and BMI2 code sits in functions compiled for those targets alone):
// 0 = the portable code (SSE2 on x86-64), 1 = AVX-512 float32 bounds / levels /
// decode and BMI2 bit packing where the CPU has them. set_simd() lowers it, so the
// tests check both against the PyTorch kernel on a CPU that has both.
int simd_level() {
#if defined(RAZOR_X86_DISPATCH)
  static const int detected = [] {
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2")) ? 1 : 0;
  }();
  return detected;
#else
  return 0;
#endif
}

int simd_cap = 1;  // set_simd(); read by every call below
inline bool use_wide() { return simd_cap > 0 && simd_level() > 0; }

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

// The float32 min / max of a group (NaN if it has one) rounded outwards to bfloat16.
// A zero bound is +0 (adding +0 turns -0 into +0): which of a -0 and a +0 a min / max
// keeps depends on the order it visits them, and the kernels visit in different orders.
inline Bounds rounded_bounds(float lo, float hi, bool nan) {
  lo += 0.0f;
  hi += 0.0f;
  if (nan) lo = hi = std::numeric_limits<float>::quiet_NaN();
  c10::BFloat16 lo_b(lo), hi_b(hi);  // round to nearest even
  if (static_cast<float>(lo_b) > lo) lo_b = bf16_step(lo_b, true);
  if (static_cast<float>(hi_b) < hi) hi_b = bf16_step(hi_b, false);
  return {lo_b, hi_b};
}

// The bounds of x[0, m) from those of x[0, i) (lo, hi, nan): the scalar tail of the
// vector loops below.
inline Bounds tail_bounds(const float* x, int64_t i, int64_t m, float lo, float hi, bool nan, float c = 0.0f) {
  for (; i < m; ++i) {
    const float v = x[i] - c;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= v != v;
  }
  return rounded_bounds(lo, hi, nan);
}

// Round half to even of t in [0, 2^22): adding and subtracting 1.5 * 2^23 leaves the
// integer nearest to t under the default rounding mode (what nearbyint and torch.round
// give), in two vectorisable adds.
inline float round_even(float t) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (t + kMagic) - kMagic;
}

// The level of v (clamped, NaN to 0) and the value of a level: the one rule both
// layouts (per group, fixed range) encode and decode with.
inline uint8_t level(float v, float lo, float step, float top) {
  float t = (v - lo) / step;
  t = t >= 0.0f ? t : 0.0f;  // NaN to 0
  t = t < top ? t : top;     // clamping before rounding: the ends are integers
  return static_cast<uint8_t>(round_even(t));
}

inline float level_value_scaled(float level, float sigma, float mu) {
  const float prod = level * sigma;  // a multiply, then an add: no FMA
  return prod + mu;
}

inline float level_value(uint8_t q, float step, float lo) {
  const float prod = static_cast<float>(q) * step;  // a multiply, then an add: no FMA
  return prod + lo;
}

// Eight 3-bit codes (one per byte) to the 24-bit word holding code b at bits 3b..3b+2,
// and back. On a little-endian 64-bit word of the eight bytes this is three rounds of
// merging neighbouring fields (16-, 32-, then 64-bit lanes), a dozen integer operations
// instead of eight shifts, masks and ors per code; other byte orders take the plain loop.
inline uint32_t pack_3bit(const uint8_t* q) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t x;
  std::memcpy(&x, q, 8);
  x = (x & 0x0007000700070007ull) | ((x >> 5) & 0x0038003800380038ull);
  x = (x & 0x0000003F0000003Full) | ((x >> 10) & 0x00000FC000000FC0ull);
  x = (x & 0x0000000000000FFFull) | ((x >> 20) & 0x0000000000FFF000ull);
  return static_cast<uint32_t>(x);
#else
  uint32_t w = 0;
  for (int b = 0; b < 8; ++b) w |= static_cast<uint32_t>(q[b]) << (3 * b);
  return w;
#endif
}

inline void unpack_3bit(uint32_t w, uint8_t* q) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  uint64_t x = w;
  x = (x & 0x0000000000000FFFull) | ((x & 0x0000000000FFF000ull) << 20);
  x = (x & 0x0000003F0000003Full) | ((x & 0x00000FC000000FC0ull) << 10);
  x = (x & 0x0007000700070007ull) | ((x & 0x0038003800380038ull) << 5);
  std::memcpy(q, &x, 8);
#else
  for (int b = 0; b < 8; ++b) q[b] = (w >> (3 * b)) & 0x7;
#endif
}

// Pack `count` codes (a multiple of 8) of `bits` bits into count * bits / 8 bytes.
inline void pack(const uint8_t* q, int64_t count, int64_t bits, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, q, count);
  } else if (bits == 4) {
    for (int64_t j = 0; j < count / 2; ++j) out[j] = static_cast<uint8_t>(q[2 * j] | (q[2 * j + 1] << 4));
  } else if (bits == 2) {
    for (int64_t j = 0; j < count / 4; ++j)
      out[j] = static_cast<uint8_t>(q[4 * j] | (q[4 * j + 1] << 2) | (q[4 * j + 2] << 4) | (q[4 * j + 3] << 6));
  } else {  // 3 bits: eight codes fill three bytes
    for (int64_t j = 0; j < count / 8; ++j) {
      const uint32_t w = pack_3bit(q + 8 * j);
      out[3 * j] = static_cast<uint8_t>(w);
      out[3 * j + 1] = static_cast<uint8_t>(w >> 8);
      out[3 * j + 2] = static_cast<uint8_t>(w >> 16);
    }
  }
}

inline void unpack(const uint8_t* in, int64_t count, int64_t bits, uint8_t* q) {
  if (bits == 8) {
    std::memcpy(q, in, count);
  } else if (bits == 4) {
    for (int64_t j = 0; j < count / 2; ++j) {
      q[2 * j] = in[j] & 0xF;
      q[2 * j + 1] = in[j] >> 4;
    }
  } else if (bits == 2) {
    for (int64_t j = 0; j < count / 4; ++j)
      for (int b = 0; b < 4; ++b) q[4 * j + b] = (in[j] >> (2 * b)) & 0x3;
  } else {
    for (int64_t j = 0; j < count / 8; ++j) {
      const uint32_t w = in[3 * j] | (in[3 * j + 1] << 8) | (static_cast<uint32_t>(in[3 * j + 2]) << 16);
      unpack_3bit(w, q + 8 * j);
    }
  }
}

#if defined(__SSE2__)
// float32 on SSE2 (every x86-64 CPU): the same bounds and levels as group_bounds and
// level, four lanes at a time. The compiler does not vectorise those loops itself (the
// ternaries stay branches). minps(v, lo) is `v < lo ? v : lo` and maxps(t, 0) is
// `t > 0 ? t : 0`, NaN going to the second operand exactly as in the scalar code; the
// divide, the two adds of round_even and the truncation are the same IEEE operations.
inline Bounds group_bounds_f32(const float* x, int64_t m) {
  __m128 lo4 = _mm_set1_ps(std::numeric_limits<float>::infinity());
  __m128 hi4 = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  __m128 nan4 = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const __m128 v = _mm_loadu_ps(x + i);
    lo4 = _mm_min_ps(v, lo4);
    hi4 = _mm_max_ps(v, hi4);
    nan4 = _mm_or_ps(nan4, _mm_cmpunord_ps(v, v));
  }
  alignas(16) float lo_l[4], hi_l[4];
  _mm_store_ps(lo_l, lo4);
  _mm_store_ps(hi_l, hi4);
  float lo = lo_l[0], hi = hi_l[0];
  for (int j = 1; j < 4; ++j) {
    lo = lo_l[j] < lo ? lo_l[j] : lo;
    hi = hi_l[j] > hi ? hi_l[j] : hi;
  }
  bool nan = _mm_movemask_ps(nan4) != 0;
  return tail_bounds(x, i, m, lo, hi, nan);
}

inline void levels_f32(const float* x, int64_t m, float lo, float step, float top, uint8_t* q) {
  const __m128 lo4 = _mm_set1_ps(lo), step4 = _mm_set1_ps(step), top4 = _mm_set1_ps(top);
  const __m128 zero = _mm_setzero_ps(), magic = _mm_set1_ps(12582912.0f);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    __m128i k[4];
    for (int j = 0; j < 4; ++j) {
      __m128 t = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(x + i + 4 * j), lo4), step4);
      t = _mm_min_ps(_mm_max_ps(t, zero), top4);
      k[j] = _mm_cvttps_epi32(_mm_sub_ps(_mm_add_ps(t, magic), magic));
    }
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(k[0], k[1]), _mm_packs_epi32(k[2], k[3]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), bytes);
  }
  for (; i < m; ++i) q[i] = level(x[i], lo, step, top);
}
#endif


#if defined(RAZOR_X86_DISPATCH)
// AVX-512: the same operations as the SSE2 code above, sixteen lanes at a time. The
// lanes visit a group's elements in another order than four lanes or the PyTorch
// kernel do; min / max are order-free up to the sign of a zero, which rounded_bounds
// makes +0 for every kernel.
//
// Both take a center c and read x - c (a float32 subtraction, as the graph computes it;
// c = 0 reads x exactly, -0 included), so a centered group needs no copy.
__attribute__((target("avx512f"))) Bounds group_bounds_f32_avx512(const float* x, int64_t m, float c) {
  const __m512 c16 = _mm512_set1_ps(c);
  __m512 lo16 = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 hi16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan16 = 0;
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + i), c16);
    lo16 = _mm512_min_ps(v, lo16);
    hi16 = _mm512_max_ps(v, hi16);
    nan16 = static_cast<__mmask16>(nan16 | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
  }
  // the lanes hold no NaN (min / max keep their second operand, never NaN)
  float lo = _mm512_reduce_min_ps(lo16), hi = _mm512_reduce_max_ps(hi16);
  bool nan = nan16 != 0;
  return tail_bounds(x, i, m, lo, hi, nan, c);
}

__attribute__((target("avx512f"))) void levels_f32_avx512(const float* x, int64_t m, float lo, float step, float top,
                                                          uint8_t* q) {
  const __m512 lo16 = _mm512_set1_ps(lo), step16 = _mm512_set1_ps(step), top16 = _mm512_set1_ps(top);
  const __m512 zero = _mm512_setzero_ps(), magic = _mm512_set1_ps(12582912.0f);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), lo16), step16);
    t = _mm512_min_ps(_mm512_max_ps(t, zero), top16);
    const __m512i k = _mm512_cvttps_epi32(_mm512_sub_ps(_mm512_add_ps(t, magic), magic));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(k));
  }
  for (; i < m; ++i) q[i] = level(x[i], lo, step, top);
}

// Decoded values of m levels: float(q) * step + lo, a multiply then an add.
__attribute__((target("avx512f"))) void level_values_f32_avx512(const uint8_t* q, int64_t m, float step, float lo,
                                                                float* out) {
  const __m512 step16 = _mm512_set1_ps(step), lo16 = _mm512_set1_ps(lo);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512i k = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(k), step16), lo16));
  }
  for (; i < m; ++i) out[i] = level_value(q[i], step, lo);
}

// Codes straight to and from the bit stream, sixteen elements at a time (2B bytes of
// the stream for B bits; m a multiple of 16): the levels as above, then BMI2's pext
// gathers the low B bits of each code byte into the little-endian stream and pdep
// spreads them back, in registers (codes that go through memory byte by byte and are
// read back sixteen at a time stall on store forwarding).
template <int B>
__attribute__((target("avx512f,bmi2"))) void encode_f32_avx512(const float* x, int64_t m, float c, float lo,
                                                               float step, float top, uint8_t* out) {
  const __m512 c16 = _mm512_set1_ps(c);
  constexpr uint64_t kMask = 0x0101010101010101ull * ((1u << B) - 1);
  const __m512 lo16 = _mm512_set1_ps(lo), step16 = _mm512_set1_ps(step), top16 = _mm512_set1_ps(top);
  const __m512 zero = _mm512_setzero_ps(), magic = _mm512_set1_ps(12582912.0f);
  for (int64_t i = 0; i < m; i += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + i), c16);
    __m512 t = _mm512_div_ps(_mm512_sub_ps(v, lo16), step16);
    t = _mm512_min_ps(_mm512_max_ps(t, zero), top16);
    const __m128i k = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_sub_ps(_mm512_add_ps(t, magic), magic)));
    const uint64_t w0 = _pext_u64(static_cast<uint64_t>(_mm_cvtsi128_si64(k)), kMask);
    const uint64_t w1 = _pext_u64(static_cast<uint64_t>(_mm_extract_epi64(k, 1)), kMask);
    const uint64_t w = w0 | (w1 << (8 * B));
    std::memcpy(out + 2 * B * (i / 16), &w, 2 * B);
  }
}

template <int B>
__attribute__((target("avx512f,bmi2"))) void decode_f32_avx512(const uint8_t* in, int64_t m, float step, float lo,
                                                               float* out) {
  constexpr uint64_t kMask = 0x0101010101010101ull * ((1u << B) - 1);
  const __m512 step16 = _mm512_set1_ps(step), lo16 = _mm512_set1_ps(lo);
  for (int64_t i = 0; i < m; i += 16) {
    // One 8-byte load (an exact-size copy goes through the stack and stalls on store
    // forwarding): every block but the last reads past its own 2B bytes into the next
    // block's; the last reads the 8 bytes that end with it and shifts.
    const uint8_t* p = in + 2 * B * (i / 16);
    uint64_t w;
    if (i + 16 < m) {
      std::memcpy(&w, p, 8);
    } else if (i > 0) {
      std::memcpy(&w, p + 2 * B - 8, 8);
      w >>= 8 * (8 - 2 * B);
    } else {
      w = 0;
      std::memcpy(&w, p, 2 * B);
    }
    const __m128i k = _mm_set_epi64x(static_cast<int64_t>(_pdep_u64(w >> (8 * B), kMask)),
                                     static_cast<int64_t>(_pdep_u64(w, kMask)));
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(k));
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(v, step16), lo16));  // a multiply, then an add
  }
}
#endif

// The wide encode / decode of m float32 elements where it applies (a CPU with them,
// 2-4 bits, m a multiple of 16); false leaves the work to the portable code.
inline bool encode_wide(const float* x, int64_t m, int64_t bits, float lo, float step, float top, uint8_t* out,
                        float c = 0.0f) {
#if defined(RAZOR_X86_DISPATCH)
  if (!use_wide() || m % 16 != 0) return false;
  switch (bits) {
    case 2: encode_f32_avx512<2>(x, m, c, lo, step, top, out); return true;
    case 3: encode_f32_avx512<3>(x, m, c, lo, step, top, out); return true;
    case 4: encode_f32_avx512<4>(x, m, c, lo, step, top, out); return true;
    default: return false;
  }
#else
  return false;
#endif
}

inline bool decode_wide(const uint8_t* in, int64_t m, int64_t bits, float step, float lo, float* out) {
#if defined(RAZOR_X86_DISPATCH)
  if (!use_wide() || m % 16 != 0) return false;
  switch (bits) {
    case 2: decode_f32_avx512<2>(in, m, step, lo, out); return true;
    case 3: decode_f32_avx512<3>(in, m, step, lo, out); return true;
    case 4: decode_f32_avx512<4>(in, m, step, lo, out); return true;
    default: return false;
  }
#else
  return false;
#endif
}

template <typename T>
void level_values(const uint8_t* q, int64_t m, float step, float lo, T* out) {
#if defined(RAZOR_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (use_wide()) return level_values_f32_avx512(q, m, step, lo, out);
  }
#endif
  for (int64_t i = 0; i < m; ++i) out[i] = static_cast<T>(level_value(q[i], step, lo));
}

template <typename T>
Bounds group_bounds(const T* x, int64_t m) {
#if defined(RAZOR_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (use_wide()) return group_bounds_f32_avx512(x, m, 0.0f);
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return group_bounds_f32(x, m);
#endif
  // min / max ignoring NaN, NaN tracked on its own
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  for (int64_t i = 0; i < m; ++i) {
    const float v = static_cast<float>(x[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= v != v;
  }
  return rounded_bounds(lo, hi, nan);
}

// The levels of the m elements of x into q.
template <typename T>
void levels(const T* x, int64_t m, float lo, float step, float top, uint8_t* q) {
#if defined(RAZOR_X86_DISPATCH)
  if constexpr (std::is_same_v<T, float>) {
    if (use_wide()) return levels_f32_avx512(x, m, lo, step, top, q);
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return levels_f32(x, m, lo, step, top, q);
#endif
  for (int64_t i = 0; i < m; ++i) q[i] = level(static_cast<float>(x[i]), lo, step, top);
}

// Stores a group's bounds into bounds[0..1] and gives its lo and step; false for a
// group whose codes are all 0 (a constant group, or NaN bounds).
inline bool store_scale(Bounds b, float top, c10::BFloat16* bounds, float& lo, float& step) {
  bounds[0] = b.lo;
  bounds[1] = b.hi;
  lo = static_cast<float>(b.lo);
  step = (static_cast<float>(b.hi) - lo) / top;
  return !(step == 0.0f || step != step);
}

// One group: its bounds into bounds[0..1], its codes into codes (group * bits / 8 bytes);
// q is scratch of `group` bytes. m <= group elements are real, the rest padding.
template <typename T>
void encode_group(const T* xs, int64_t m, int64_t group, int64_t bits, uint8_t* codes, c10::BFloat16* bounds,
                  uint8_t* q) {
  const float top = static_cast<float>((1 << bits) - 1);
  float lo, step;
  if (!store_scale(group_bounds(xs, m), top, bounds, lo, step)) {
    std::fill(q, q + group, uint8_t{0});
  } else {
    if constexpr (std::is_same_v<T, float>) {
      if (m == group && encode_wide(xs, m, bits, lo, step, top, codes)) return;
    }
    levels(xs, m, lo, step, top, q);
    std::fill(q + m, q + group, uint8_t{0});  // padding
  }
  pack(q, group, bits, codes);
}

// Stochastic rounding (quantize.py, "stochastic rounding"): the hash of the element
// index keyed by mix(seed), in uint32 arithmetic (products modulo 2^32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The level of v rounded up with probability frac(t): min(floor(clamp(t) + u), top),
// u = (mix(key ^ index) >> 8) * 2^-24. The clamp is the one of `level`; floor of a
// non-negative float below 2^22 is its truncation.
inline uint8_t stochastic_level(float v, float lo, float step, float top, uint32_t key, uint32_t index) {
  float t = (v - lo) / step;
  t = t >= 0.0f ? t : 0.0f;
  t = t < top ? t : top;
  const float u = static_cast<float>(mix32(key ^ index) >> 8) * 5.9604644775390625e-08f;  // 2^-24
  const float s = t + u;
  const float q = static_cast<float>(static_cast<int32_t>(s));
  return static_cast<uint8_t>(q < top ? q : top);
}

// One group as encode_group, its levels rounded stochastically; `first` is the flat
// index of its first element.
template <typename T>
void encode_group_stochastic(const T* xs, int64_t m, int64_t group, int64_t bits, uint8_t* codes,
                             c10::BFloat16* bounds, uint8_t* q, uint32_t key, int64_t first) {
  const float top = static_cast<float>((1 << bits) - 1);
  float lo, step;
  if (!store_scale(group_bounds(xs, m), top, bounds, lo, step)) {
    std::fill(q, q + group, uint8_t{0});
  } else {
    for (int64_t i = 0; i < m; ++i)
      q[i] = stochastic_level(static_cast<float>(xs[i]), lo, step, top, key, static_cast<uint32_t>(first + i));
    std::fill(q + m, q + group, uint8_t{0});
  }
  pack(q, group, bits, codes);
}

template <typename T>
void quantize_stochastic_impl(const T* x, int64_t n, int64_t group, int64_t bits, uint8_t* codes,
                              c10::BFloat16* bounds, uint32_t key) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> q(group);
    for (int64_t g = g0; g < g1; ++g)
      encode_group_stochastic(x + g * group, std::min(group, n - g * group), group, bits, codes + g * gbytes,
                              bounds + 2 * g, q.data(), key, g * group);
  });
}

template <typename T>
void quantize_impl(const T* x, int64_t n, int64_t group, int64_t bits, uint8_t* codes, c10::BFloat16* bounds) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> q(group);
    for (int64_t g = g0; g < g1; ++g)
      encode_group(x + g * group, std::min(group, n - g * group), group, bits, codes + g * gbytes, bounds + 2 * g,
                   q.data());
  });
}

// A whole group of one channel on the wide path, centered in registers; false where
// that path does not apply (the caller then centers into a scratch buffer).
inline bool encode_centered_wide(const float* xs, float c, int64_t m, int64_t bits, uint8_t* codes,
                                 c10::BFloat16* bounds) {
#if defined(RAZOR_X86_DISPATCH)
  if (!use_wide() || m % 16 != 0 || bits < 2 || bits > 4) return false;
  const float top = static_cast<float>((1 << bits) - 1);
  float lo, step;
  if (!store_scale(group_bounds_f32_avx512(xs, m, c), top, bounds, lo, step)) {
    std::memset(codes, 0, m * bits / 8);
    return true;
  }
  return encode_wide(xs, m, bits, lo, step, top, codes, c);
#else
  return false;
#endif
}

// quantize_impl of x - center[c] (float32 subtraction), c the index along dim 1 of a
// contiguous (outer, C, inner) x: what quantize_group gives for the materialized
// difference, without writing it out. A whole group of one channel is centered in
// registers on the wide path; any other group in a scratch buffer.
void quantize_centered_impl(const float* x, const float* center, int64_t n, int64_t channels, int64_t inner,
                            int64_t group, int64_t bits, uint8_t* codes, c10::BFloat16* bounds) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> q(group);
    std::vector<float> centered(group);
    // the channel c of the group's first element and its offset in that channel's run,
    // carried from group to group (no integer division per group)
    int64_t c = (g0 * group / inner) % channels, offset = g0 * group % inner;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t i0 = g * group, m = std::min(group, n - i0);
      if (!(m == group && offset + m <= inner &&
            encode_centered_wide(x + i0, center[c], m, bits, codes + g * gbytes, bounds + 2 * g))) {
        for (int64_t k = 0, kc = c, ko = offset; k < m;) {  // runs of one channel
          const int64_t run = std::min(m - k, inner - ko);
          const float cv = center[kc];
          for (int64_t r = 0; r < run; ++r) centered[k + r] = x[i0 + k + r] - cv;
          k += run;
          ko = 0;
          kc = kc + 1 == channels ? 0 : kc + 1;
        }
        encode_group(centered.data(), m, group, bits, codes + g * gbytes, bounds + 2 * g, q.data());
      }
      for (offset += group; offset >= inner; offset -= inner) c = c + 1 == channels ? 0 : c + 1;
    }
  });
}

template <typename T>
void dequantize_impl(const uint8_t* codes, const c10::BFloat16* bounds, int64_t n, int64_t group, int64_t bits,
                     T* out) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  const float top = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> q(group);
    for (int64_t g = g0; g < g1; ++g) {
      const float lo = static_cast<float>(bounds[2 * g]), hi = static_cast<float>(bounds[2 * g + 1]);
      const float step = (hi - lo) / top;
      const int64_t m = std::min(group, n - g * group);
      T* o = out + g * group;
      if (!(std::isfinite(lo) && std::isfinite(hi))) {
        std::fill(o, o + m, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      if constexpr (std::is_same_v<T, float>) {
        if (m == group && decode_wide(codes + g * gbytes, m, bits, step, lo, o)) continue;
      }
      unpack(codes + g * gbytes, group, bits, q.data());
      level_values(q.data(), m, step, lo, o);
    }
  });
}

constexpr int64_t kUniformChunk = 4096;  // elements per parallel task, a multiple of 8

template <typename T>
void quantize_uniform_impl(const T* x, int64_t n, int64_t bits, float lo, float step, uint8_t* codes) {
  const float top = static_cast<float>((1 << bits) - 1);
  const int64_t total = (n * bits + 7) / 8;
  const int64_t chunks = (n + kUniformChunk - 1) / kUniformChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint8_t> q(kUniformChunk), packed(kUniformChunk * bits / 8);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * kUniformChunk, m = std::min(kUniformChunk, n - e0);
      if constexpr (std::is_same_v<T, float>) {  // a whole chunk owns m * bits / 8 bytes of the stream
        if (m == kUniformChunk && encode_wide(x + e0, m, bits, lo, step, top, codes + e0 * bits / 8)) continue;
      }
      levels(x + e0, m, lo, step, top, q.data());
      const int64_t count = (m + 7) / 8 * 8;
      std::fill(q.begin() + m, q.begin() + count, uint8_t{0});
      pack(q.data(), count, bits, packed.data());
      const int64_t b0 = e0 * bits / 8;
      std::memcpy(codes + b0, packed.data(), std::min(count * bits / 8, total - b0));
    }
  });
}

template <typename T>
void dequantize_uniform_impl(const uint8_t* codes, int64_t n, int64_t bits, float lo, float step, T* out) {
  const int64_t total = (n * bits + 7) / 8;
  const int64_t chunks = (n + kUniformChunk - 1) / kUniformChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint8_t> q(kUniformChunk), packed(kUniformChunk * bits / 8, 0);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t e0 = c * kUniformChunk, m = std::min(kUniformChunk, n - e0);
      if constexpr (std::is_same_v<T, float>) {
        if (m == kUniformChunk && decode_wide(codes + e0 * bits / 8, m, bits, step, lo, out + e0)) continue;
      }
      const int64_t count = (m + 7) / 8 * 8, b0 = e0 * bits / 8;
      const int64_t have = std::min(count * bits / 8, total - b0);
      std::memcpy(packed.data(), codes + b0, have);
      std::fill(packed.begin() + have, packed.begin() + count * bits / 8, uint8_t{0});
      unpack(packed.data(), count, bits, q.data());
      level_values(q.data(), m, step, lo, out + e0);
    }
  });
}

std::vector<at::Tensor> quantize_group(const at::Tensor& x_in, int64_t group, int64_t bits) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  at::Tensor codes = at::empty({groups * (group * bits / 8)}, x.options().dtype(at::kByte));
  at::Tensor bounds = at::empty({2 * groups}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {codes, bounds};
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    quantize_impl<T>(x.data_ptr<T>(), n, group, bits, codes.data_ptr<uint8_t>(),
                     bounds.data_ptr<c10::BFloat16>());
  });
  return {codes, bounds};
}

// Normal codebook (quantize.py, "normal codebook"): per group the float64 mean (to
// float, then bfloat16, as torch converts), the two elements farthest from it (the
// first of equal distances; NaN farthest), the float64 deviation of the others, and
// per element the number of thresholds strictly below (x - mu) / sigma (0 when sigma
// is 0). Sums run in float64 in element order.
constexpr int kOutliers = 2;

template <typename T, typename O>
void normal_impl(const T* x, int64_t n, int64_t group, int64_t bits, const std::vector<float>& thresholds,
                 uint8_t* codes, c10::BFloat16* stats, O* offsets, c10::BFloat16* values) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    std::vector<float> r(group), far(group);
    std::vector<uint8_t> q(group);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t m = std::min(group, n - g * group);
      for (int64_t i = 0; i < m; ++i) r[i] = static_cast<float>(x[g * group + i]);
      for (int64_t i = m; i < group; ++i) r[i] = r[m - 1];  // padding repeats the last element
      double sum = 0.0;
      for (int64_t i = 0; i < group; ++i) sum += static_cast<double>(r[i]);
      const c10::BFloat16 mu_b(static_cast<float>(sum / static_cast<double>(group)));
      const float mu = static_cast<float>(mu_b);
      for (int64_t i = 0; i < group; ++i) {
        const float d = r[i] - mu;
        far[i] = d != d ? std::numeric_limits<float>::infinity() : std::fabs(d);
      }
      int64_t out[kOutliers];
      for (int k = 0; k < kOutliers; ++k) {
        int64_t best = 0;
        for (int64_t i = 1; i < group; ++i) best = far[i] > far[best] ? i : best;
        out[k] = best;
        far[best] = -1.0f;
      }
      double sq = 0.0;
      for (int64_t i = 0; i < group; ++i) {
        if (far[i] == -1.0f) continue;  // an outlier (no distance is negative)
        const double d = static_cast<double>(r[i] - mu);
        sq += d * d;
      }
      const c10::BFloat16 sigma_b(static_cast<float>(std::sqrt(sq / static_cast<double>(group - kOutliers))));
      const float sigma = static_cast<float>(sigma_b);
      for (int64_t i = 0; i < group; ++i) {
        const float z = sigma == 0.0f ? 0.0f : (r[i] - mu) / sigma;
        uint8_t c = 0;
        for (const float t : thresholds) c += t < z ? 1 : 0;
        q[i] = c;
      }
      pack(q.data(), group, bits, codes + g * gbytes);
      stats[2 * g] = mu_b;
      stats[2 * g + 1] = sigma_b;
      for (int k = 0; k < kOutliers; ++k) {
        offsets[kOutliers * g + k] = static_cast<O>(out[k]);
        values[kOutliers * g + k] = c10::BFloat16(r[out[k]]);
      }
    }
  });
}

std::vector<at::Tensor> quantize_normal(const at::Tensor& x_in, int64_t group, int64_t bits,
                                        const std::vector<double>& thresholds_in) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  std::vector<float> thresholds(thresholds_in.begin(), thresholds_in.end());
  const bool small = group <= 256;
  at::Tensor codes = at::empty({groups * (group * bits / 8)}, x.options().dtype(at::kByte));
  at::Tensor stats = at::empty({2 * groups}, x.options().dtype(at::kBFloat16));
  at::Tensor offsets = at::empty({groups, kOutliers}, x.options().dtype(small ? at::kByte : at::kShort));
  at::Tensor values = at::empty({groups, kOutliers}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {codes, stats, offsets, values};
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    if (small)
      normal_impl<T, uint8_t>(x.data_ptr<T>(), n, group, bits, thresholds, codes.data_ptr<uint8_t>(),
                              stats.data_ptr<c10::BFloat16>(), offsets.data_ptr<uint8_t>(),
                              values.data_ptr<c10::BFloat16>());
    else
      normal_impl<T, int16_t>(x.data_ptr<T>(), n, group, bits, thresholds, codes.data_ptr<uint8_t>(),
                              stats.data_ptr<c10::BFloat16>(), offsets.data_ptr<int16_t>(),
                              values.data_ptr<c10::BFloat16>());
  });
  return {codes, stats, offsets, values};
}

template <typename T, typename O>
void dequantize_normal_impl(const uint8_t* codes, const c10::BFloat16* stats, const O* offsets,
                            const c10::BFloat16* values, int64_t n, int64_t group, int64_t bits,
                            const std::vector<float>& levels, T* out) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t gbytes = group * bits / 8;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> q(group);
    std::vector<float> v(group);
    for (int64_t g = g0; g < g1; ++g) {
      unpack(codes + g * gbytes, group, bits, q.data());
      const float mu = static_cast<float>(stats[2 * g]), sigma = static_cast<float>(stats[2 * g + 1]);
      const bool finite = std::isfinite(mu) && std::isfinite(sigma);
      for (int64_t i = 0; i < group; ++i) v[i] = level_value_scaled(levels[q[i]], sigma, mu);
      for (int k = 0; k < kOutliers; ++k)
        v[static_cast<int64_t>(offsets[kOutliers * g + k])] = static_cast<float>(values[kOutliers * g + k]);
      const int64_t m = std::min(group, n - g * group);
      for (int64_t i = 0; i < m; ++i)
        out[g * group + i] = static_cast<T>(finite ? v[i] : std::numeric_limits<float>::quiet_NaN());
    }
  });
}

at::Tensor dequantize_normal(const at::Tensor& codes, const at::Tensor& stats, const at::Tensor& offsets,
                             const at::Tensor& values, int64_t n, int64_t group, int64_t bits,
                             const std::vector<double>& levels_in, at::ScalarType dtype) {
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  std::vector<float> levels(levels_in.begin(), levels_in.end());
  const at::Tensor c = codes.contiguous(), st = stats.contiguous(), off = offsets.contiguous(),
                   val = values.contiguous();
  RAZOR_FLOAT_TYPES(dtype, [&] {
    if (off.scalar_type() == at::kByte)
      dequantize_normal_impl<T, uint8_t>(c.data_ptr<uint8_t>(), st.data_ptr<c10::BFloat16>(), off.data_ptr<uint8_t>(),
                                         val.data_ptr<c10::BFloat16>(), n, group, bits, levels, out.data_ptr<T>());
    else
      dequantize_normal_impl<T, int16_t>(c.data_ptr<uint8_t>(), st.data_ptr<c10::BFloat16>(), off.data_ptr<int16_t>(),
                                         val.data_ptr<c10::BFloat16>(), n, group, bits, levels, out.data_ptr<T>());
  });
  return out;
}

// quantize_group with stochastic rounding keyed by `seed` (the low 32 bits count).
std::vector<at::Tensor> quantize_group_stochastic(const at::Tensor& x_in, int64_t seed, int64_t group, int64_t bits) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(n < (int64_t{1} << 32), "quantize_group_stochastic: fewer than 2^32 elements");
  const int64_t groups = (n + group - 1) / group;
  at::Tensor codes = at::empty({groups * (group * bits / 8)}, x.options().dtype(at::kByte));
  at::Tensor bounds = at::empty({2 * groups}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {codes, bounds};
  const uint32_t key = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull));
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    quantize_stochastic_impl<T>(x.data_ptr<T>(), n, group, bits, codes.data_ptr<uint8_t>(),
                                bounds.data_ptr<c10::BFloat16>(), key);
  });
  return {codes, bounds};
}

// quantize_group(x - center) for a center along dim 1 (center.numel() == x.size(1)),
// float32 only.
std::vector<at::Tensor> quantize_group_centered(const at::Tensor& x_in, const at::Tensor& center_in, int64_t group,
                                                int64_t bits) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && center_in.scalar_type() == at::kFloat && x_in.dim() >= 2 &&
                  center_in.numel() == x_in.size(1),
              "quantize_group_centered: float32 x of 2+ dims and a float32 center of x.size(1) elements");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor center = center_in.contiguous();
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  at::Tensor codes = at::empty({groups * (group * bits / 8)}, x.options().dtype(at::kByte));
  at::Tensor bounds = at::empty({2 * groups}, x.options().dtype(at::kBFloat16));
  if (groups == 0) return {codes, bounds};
  const int64_t channels = x.size(1), inner = n / (x.size(0) * channels);
  quantize_centered_impl(x.data_ptr<float>(), center.data_ptr<float>(), n, channels, inner, group, bits,
                         codes.data_ptr<uint8_t>(), bounds.data_ptr<c10::BFloat16>());
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

at::Tensor quantize_uniform(const at::Tensor& x_in, int64_t bits, double lo, double hi) {
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor codes = at::empty({(n * bits + 7) / 8}, x.options().dtype(at::kByte));
  if (n == 0) return codes;
  const float step = static_cast<float>((hi - lo) / static_cast<double>((1 << bits) - 1));
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    quantize_uniform_impl<T>(x.data_ptr<T>(), n, bits, static_cast<float>(lo), step, codes.data_ptr<uint8_t>());
  });
  return codes;
}

at::Tensor dequantize_uniform(const at::Tensor& codes_in, int64_t n, int64_t bits, double lo, double hi,
                              at::ScalarType dtype) {
  const at::Tensor codes = codes_in.contiguous();
  at::Tensor out = at::empty({n}, codes.options().dtype(dtype));
  if (n == 0) return out;
  const float step = static_cast<float>((hi - lo) / static_cast<double>((1 << bits) - 1));
  RAZOR_FLOAT_TYPES(dtype, [&] {
    dequantize_uniform_impl<T>(codes.data_ptr<uint8_t>(), n, bits, static_cast<float>(lo), step, out.data_ptr<T>());
  });
  return out;
}

// The widest path the kernels may take (0: the portable code); returns the previous cap.
int64_t set_simd(int64_t cap) {
  const int64_t previous = simd_cap;
  simd_cap = static_cast<int>(cap);
  return previous;
}

int64_t simd_available() { return simd_level(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_group", &quantize_group, "per-group quantize (CPU)");
  m.def("quantize_group_stochastic", &quantize_group_stochastic, "per-group quantize, stochastic rounding (CPU)");
  m.def("quantize_normal", &quantize_normal, "normal-codebook quantize (CPU)");
  m.def("dequantize_normal", &dequantize_normal, "normal-codebook dequantize (CPU)");
  m.def("quantize_group_centered", &quantize_group_centered, "per-group quantize of x - center (CPU)");
  m.def("dequantize_group", &dequantize_group, "per-group dequantize (CPU)");
  m.def("quantize_uniform", &quantize_uniform, "uniform quantize on one fixed range (CPU)");
  m.def("dequantize_uniform", &dequantize_uniform, "uniform dequantize on one fixed range (CPU)");
  m.def("set_simd", &set_simd, "cap the vector path (0: portable code only); returns the previous cap");
  m.def("simd_available", &simd_available, "1 if this CPU has the AVX-512 / BMI2 paths");
}
