// Top-k compress / decompress: the CPU kernel.
//
// Same format and selection rule as the PyTorch reference in topk_compress.py (whose
// docstring defines them): per group the k largest |x| are kept, ties to the lower
// index, NaN above +inf; mask bit j of byte i = element 8i+j; kept values in position
// order. Bit-identical to the reference (tests compare them).
//
// Selection per group works on the 31-bit magnitude key (|x| bit pattern, sign
// cleared), in at most three passes over the group:
//   1. keys + a histogram of their top 11 bits (8 exponent + 3 mantissa bits: a
//      bell-shaped activation spreads over dozens of bins, so the bin that holds the
//      k-th largest key holds a few percent of the group);
//   2. only when that bin is not kept whole: copy its keys out and nth_element them;
//   3. the mask, 8 comparisons per byte (AVX2 where the CPU has it), then the kept
//      values, visiting only the set bits (count-trailing-zeros).
// Decompress zero-fills the group and scatters the values to the set bits.
// Groups run in parallel (at::parallel_for).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "float_types.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RAZOR_X86 1
#endif

namespace {

constexpr int kBinShift = 20;                          // first-level bin = key >> 20
constexpr int64_t kBins = int64_t{1} << (31 - kBinShift);  // 2048

inline uint32_t magnitude_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7FFFFFFFu;
}

// Kept elements are those with key > threshold, plus, when `ties`, the first
// `need_equal` keys equal to it (position order); otherwise every key >= threshold.
struct Selection {
  uint32_t threshold;
  int64_t need_equal;
  bool ties;
};

// Copy the keys of first-level bin `bin` to cand (in order); returns how many.
inline int64_t collect_bin_scalar(const uint32_t* keys, int64_t n, uint32_t bin, uint32_t* cand, int64_t from,
                                  int64_t m) {
  for (int64_t i = from; i < n; ++i) {  // a few percent of the keys: the branch predicts well
    if ((keys[i] >> kBinShift) == bin) cand[m++] = keys[i];
  }
  return m;
}

#ifdef RAZOR_X86
__attribute__((target("avx2,bmi"))) int64_t collect_bin_avx2(const uint32_t* keys, int64_t n, uint32_t bin,
                                                             uint32_t* cand) {
  const __m256i want = _mm256_set1_epi32(static_cast<int32_t>(bin));
  int64_t m = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_srli_epi32(k, kBinShift), want);
    unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(hit)));
    while (bits) {
      cand[m++] = keys[i + __builtin_ctz(bits)];
      bits &= bits - 1;
    }
  }
  return collect_bin_scalar(keys, n, bin, cand, i, m);
}
#endif

inline int64_t collect_bin(const uint32_t* keys, int64_t n, uint32_t bin, uint32_t* cand);

// Select the `keep` largest of keys[0..n) (0 < keep < n). `hist` holds the counts of
// key >> kBinShift over the group for bins [lo, hi] and is zeroed again on return;
// `cand` has room for n keys.
Selection select_threshold(const uint32_t* keys, int64_t n, int64_t keep, uint32_t* hist, uint32_t lo,
                           uint32_t hi, uint32_t* cand) {
  int64_t remaining = keep;
  uint32_t bin = hi;
  for (; bin > lo; --bin) {
    if (hist[bin] >= remaining) break;
    remaining -= hist[bin];
  }
  const int64_t in_bin = hist[bin];
  std::memset(hist + lo, 0, (hi - lo + 1) * sizeof(uint32_t));
  if (in_bin == remaining) return {bin << kBinShift, 0, false};  // the whole bin is kept
  const int64_t m = collect_bin(keys, n, bin, cand);
  std::nth_element(cand, cand + (remaining - 1), cand + m, std::greater<uint32_t>());
  const uint32_t t = cand[remaining - 1];
  int64_t gt = 0, eq = 0;
  for (int64_t j = 0; j < m; ++j) {
    gt += cand[j] > t;
    eq += cand[j] == t;
  }
  const int64_t need_equal = remaining - gt;
  return {t, need_equal, need_equal != eq};
}

// mask byte i = bits (keys[8i + j] >= t), j = 0..7, for the n keys (n's last partial
// byte included); t > 0.
inline void mask_ge_scalar(const uint32_t* keys, int64_t n, uint32_t t, uint8_t* out, int64_t from) {
  for (int64_t i = from; i < n; i += 8) {
    uint32_t byte = 0;
    const int64_t end = std::min<int64_t>(8, n - i);
    for (int64_t j = 0; j < end; ++j) byte |= static_cast<uint32_t>(keys[i + j] >= t) << j;
    out[i >> 3] = static_cast<uint8_t>(byte);
  }
}

#ifdef RAZOR_X86
__attribute__((target("avx2"))) void mask_ge_avx2(const uint32_t* keys, int64_t n, uint32_t t, uint8_t* out) {
  // keys < 2^31: a signed compare orders them; key >= t  <=>  key > t - 1.
  const __m256i thr = _mm256_set1_epi32(static_cast<int32_t>(t - 1));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i c = _mm256_cmpgt_epi32(k, thr);
    out[i >> 3] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_castsi256_ps(c)));
  }
  mask_ge_scalar(keys, n, t, out, i);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

inline int64_t collect_bin(const uint32_t* keys, int64_t n, uint32_t bin, uint32_t* cand) {
#ifdef RAZOR_X86
  if (kHasAvx2) return collect_bin_avx2(keys, n, bin, cand);
#endif
  return collect_bin_scalar(keys, n, bin, cand, 0, 0);
}

inline void mask_ge(const uint32_t* keys, int64_t n, uint32_t t, uint8_t* out) {
#ifdef RAZOR_X86
  if (kHasAvx2) return mask_ge_avx2(keys, n, t, out);
#endif
  mask_ge_scalar(keys, n, t, out, 0);
}

// Call f(i) for every set bit i of the first `bits` bits of mask, in increasing order.
template <typename F>
inline void for_each_set_bit(const uint8_t* mask, int64_t bits, F&& f) {
  const int64_t nbytes = (bits + 7) / 8;
  for (int64_t b = 0; b < nbytes; b += 8) {
    uint64_t w = 0;
    std::memcpy(&w, mask + b, static_cast<size_t>(std::min<int64_t>(8, nbytes - b)));  // little endian
    while (w) {
      f(b * 8 + __builtin_ctzll(w));
      w &= w - 1;
    }
  }
}

// Logical (row-major) element order of a strided tensor: copies elements
// [start, start + count) into dst, walking the multi-index with carries (no division
// per element). Lets the kernel read permuted views (q, kᵀ, v of attention) without a
// separate full-size .contiguous() copy.
struct StridedReader {
  std::vector<int64_t> sizes, strides;
  template <typename scalar_t>
  void read(const scalar_t* base, int64_t start, int64_t count, scalar_t* dst) const {
    const int64_t nd = static_cast<int64_t>(sizes.size());
    std::vector<int64_t> idx(nd);
    int64_t rem = start, offset = 0;
    for (int64_t d = nd - 1; d >= 0; --d) {
      idx[d] = rem % sizes[d];
      rem /= sizes[d];
      offset += idx[d] * strides[d];
    }
    // Runs along the innermost dim (a plain copy when its stride is 1), then carry.
    const int64_t last = nd - 1, inner = sizes[last], s = strides[last];
    int64_t i = 0;
    while (i < count) {
      const int64_t run = std::min(inner - idx[last], count - i);
      const scalar_t* src = base + offset;
      if (s == 1) {
        std::memcpy(dst + i, src, run * sizeof(scalar_t));
      } else {
        for (int64_t j = 0; j < run; ++j) dst[i + j] = src[j * s];
      }
      i += run;
      idx[last] += run;
      offset += run * s;
      if (idx[last] < inner) break;  // count exhausted inside a run
      offset -= inner * s;
      idx[last] = 0;
      for (int64_t d = last - 1; d >= 0; --d) {
        offset += strides[d];
        if (++idx[d] < sizes[d]) break;
        offset -= strides[d] * sizes[d];
        idx[d] = 0;
      }
    }
  }
};

template <typename scalar_t, typename value_t>
void compress_impl(const scalar_t* x, int64_t n, int64_t group, int64_t k,
                   uint8_t* mask, value_t* values, const StridedReader* strided) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t mask_bytes = (group + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<uint32_t> keys(group), cand(group), hist(kBins, 0);
    std::vector<scalar_t> gathered(strided ? group : 0);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t real = std::min(group, n - g * group);
      const scalar_t* xg = x + g * group;
      if (strided) {
        strided->read(x, g * group, real, gathered.data());
        xg = gathered.data();
      }
      const int64_t keep = std::min(k, real);
      uint8_t* mg = mask + g * mask_bytes;
      value_t* vg = values + g * k;
      std::memset(mg, 0, mask_bytes);
      int64_t slot = 0;
      if (keep == real) {
        for (int64_t i = 0; i < real; ++i) mg[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
        for (int64_t i = 0; i < real; ++i) vg[slot++] = static_cast<value_t>(static_cast<float>(xg[i]));
      } else if (keep > 0) {
        uint32_t kmin = 0xFFFFFFFFu, kmax = 0;
        for (int64_t i = 0; i < real; ++i) {  // vectorises
          const uint32_t key = magnitude_key(static_cast<float>(xg[i]));
          keys[i] = key;
          kmin = std::min(kmin, key);
          kmax = std::max(kmax, key);
        }
        for (int64_t i = 0; i < real; ++i) hist[keys[i] >> kBinShift]++;
        const uint32_t lo = kmin >> kBinShift, hi = kmax >> kBinShift;
        const Selection sel = select_threshold(keys.data(), real, keep, hist.data(), lo, hi, cand.data());
        if (!sel.ties) {
          // threshold > 0 here: keep < real, so some key lies below it
          mask_ge(keys.data(), real, sel.threshold, mg);
        } else {
          int64_t need_equal = sel.need_equal;
          for (int64_t i = 0; i < real; ++i) {
            const uint32_t key = keys[i];
            const bool tie = (key == sel.threshold) & (need_equal > 0);
            const bool kept = (key > sel.threshold) | tie;
            need_equal -= tie;
            mg[i >> 3] |= static_cast<uint8_t>(static_cast<uint32_t>(kept) << (i & 7));
          }
        }
        for_each_set_bit(mg, real, [&](int64_t i) {
          vg[slot++] = static_cast<value_t>(static_cast<float>(xg[i]));
        });
      }
      for (; slot < k; ++slot) vg[slot] = static_cast<value_t>(0.0f);
    }
  });
}

template <typename value_t, typename out_t>
void decompress_impl(const uint8_t* mask, const value_t* values, int64_t n, int64_t group,
                     int64_t k, out_t* out) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t mask_bytes = (group + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const value_t* vg = values + g * k;
      out_t* og = out + g * group;
      const int64_t real = std::min(group, n - g * group);
      std::memset(og, 0, real * sizeof(out_t));  // +0.0 is all-zero bits in every float type
      int64_t slot = 0;
      for_each_set_bit(mask + g * mask_bytes, real, [&](int64_t i) {
        og[i] = static_cast<out_t>(static_cast<float>(vg[slot++]));
      });
    }
  });
}


// The offsets layout (topk_compress.py): per group, the positions of the mask's set
// bits in increasing order; slots past them hold `group`.
template <typename off_t>
void mask_to_offsets_impl(const uint8_t* mask, int64_t groups, int64_t group, int64_t k, off_t* out) {
  const int64_t mask_bytes = (group + 7) / 8;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      off_t* og = out + g * k;
      int64_t slot = 0;
      for_each_set_bit(mask + g * mask_bytes, group, [&](int64_t i) {
        if (slot < k) og[slot++] = static_cast<off_t>(i);
      });
      for (; slot < k; ++slot) og[slot] = static_cast<off_t>(group);
    }
  });
}

template <typename off_t, typename value_t, typename out_t>
void decompress_offsets_impl(const off_t* offsets, const value_t* values, int64_t n, int64_t group,
                             int64_t k, out_t* out) {
  const int64_t groups = (n + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const off_t* og = offsets + g * k;
      const value_t* vg = values + g * k;
      out_t* dg = out + g * group;
      const int64_t real = std::min(group, n - g * group);
      std::memset(dg, 0, real * sizeof(out_t));
      for (int64_t slot = 0; slot < k; ++slot) {
        const int64_t i = static_cast<int64_t>(og[slot]);
        if (i >= 0 && i < real) dg[i] = static_cast<out_t>(static_cast<float>(vg[slot]));
      }
    }
  });
}

#define RAZOR_OFFSET_TYPES(NAME, ...)                                           \
  [&] {                                                                         \
    switch (NAME) {                                                             \
      case at::kShort: { using O = int16_t; return __VA_ARGS__(); }             \
      case at::kInt: { using O = int32_t; return __VA_ARGS__(); }               \
      default: TORCH_CHECK(false, "razorpass CPU kernel: offsets must be int16 or int32, got ", NAME); \
    }                                                                           \
  }()

at::Tensor mask_to_offsets(const at::Tensor& mask_in, int64_t group, int64_t k, at::ScalarType dtype) {
  const at::Tensor mask = mask_in.contiguous();
  const int64_t groups = mask.size(0);
  at::Tensor out = at::empty({groups, k}, mask.options().dtype(dtype));
  if (groups == 0 || k == 0) return out;
  RAZOR_OFFSET_TYPES(dtype, [&] { mask_to_offsets_impl<O>(mask.data_ptr<uint8_t>(), groups, group, k, out.data_ptr<O>()); });
  return out;
}

at::Tensor decompress_offsets(const at::Tensor& offsets_in, const at::Tensor& values_in, int64_t n,
                              int64_t group, at::ScalarType dtype) {
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor out = at::empty({n}, values.options().dtype(dtype));
  if (n == 0) return out;
  const int64_t k = values.size(1);
  RAZOR_OFFSET_TYPES(offsets.scalar_type(), [&] {
    using off_t = O;
    RAZOR_FLOAT_TYPES(values.scalar_type(), [&] {
      using value_t = T;
      RAZOR_FLOAT_TYPES(dtype, [&] {
        decompress_offsets_impl<off_t, value_t, T>(offsets.data_ptr<off_t>(), values.data_ptr<value_t>(), n, group,
                                                   k, out.data_ptr<T>());
      });
    });
  });
  return out;
}

std::vector<at::Tensor> compress(const at::Tensor& x_in, int64_t group, int64_t k,
                                 at::ScalarType value_dtype) {
  // Dense non-overlapping strided inputs are read in place; anything else is copied.
  StridedReader reader;
  const bool in_place = x_in.is_contiguous() || x_in.is_non_overlapping_and_dense();
  const at::Tensor x = in_place ? x_in : x_in.contiguous();
  const bool strided = !x.is_contiguous();
  if (strided) {
    reader.sizes = x.sizes().vec();
    reader.strides = x.strides().vec();
  }
  const int64_t n = x.numel();
  const int64_t groups = (n + group - 1) / group;
  at::Tensor mask = at::empty({groups, (group + 7) / 8}, x.options().dtype(at::kByte));  // zeroed per group
  at::Tensor values = at::empty({groups, k}, x.options().dtype(value_dtype));
  if (groups == 0) return {mask, values};
  RAZOR_FLOAT_TYPES(x.scalar_type(), [&] {
    using scalar_t = T;
    RAZOR_FLOAT_TYPES(value_dtype, [&] {
      compress_impl<scalar_t, T>(x.data_ptr<scalar_t>(), n, group, k, mask.data_ptr<uint8_t>(),
                                 values.data_ptr<T>(), strided ? &reader : nullptr);
    });
  });
  return {mask, values};
}

at::Tensor decompress(const at::Tensor& mask_in, const at::Tensor& values_in, int64_t n,
                      int64_t group, at::ScalarType dtype) {
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor out = at::empty({n}, values.options().dtype(dtype));
  if (n == 0) return out;
  const int64_t k = values.size(1);
  RAZOR_FLOAT_TYPES(values.scalar_type(), [&] {
    using value_t = T;
    RAZOR_FLOAT_TYPES(dtype, [&] {
      decompress_impl<value_t, T>(mask.data_ptr<uint8_t>(), values.data_ptr<value_t>(), n, group, k,
                                  out.data_ptr<T>());
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress", &compress, "top-k compress (CPU)");
  m.def("decompress", &decompress, "top-k decompress (CPU)");
  m.def("mask_to_offsets", &mask_to_offsets, "top-k mask to offsets (CPU)");
  m.def("decompress_offsets", &decompress_offsets, "top-k decompress from offsets (CPU)");
}
