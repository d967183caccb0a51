// Top-k compress / decompress: the CPU kernel.
//
// Same format and selection rule as the PyTorch reference in topk_compress.py (whose
// docstring defines them): per group the k largest |x| are kept, ties to the lower
// index, NaN above +inf; mask bit j of byte i = element 8i+j; kept values in position
// order. Bit-identical to the reference (tests compare them).
//
// Selection per group is an MSD radix select over the 31-bit magnitude key (|x| bit
// pattern, sign cleared) with 8-bit digits: the first pass histograms every key, later
// passes only the keys that share the digits chosen so far, so a 1024-element group
// costs about one histogram pass plus one output pass. Groups run in parallel.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline uint32_t magnitude_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits & 0x7FFFFFFFu;
}

// The `want`-th largest key (1-based) of keys[0..n) and how many keys equal to it
// must be kept (ties: the first ones in position order). `hist0` is the histogram of
// the top digit (bits 24..31) of all n keys; `scratch` holds >= n keys.
inline uint32_t select_threshold(const uint32_t* keys, int64_t n, int64_t want, const int64_t* hist0,
                                 uint32_t* scratch, int64_t* need_equal) {
  const uint32_t* cand = keys;
  int64_t ncand = n;
  uint32_t prefix = 0;
  int64_t remaining = want;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t local[256];
    const int64_t* hist = hist0;
    if (shift != 24) {
      std::fill(local, local + 256, 0);
      for (int64_t i = 0; i < ncand; ++i) local[(cand[i] >> shift) & 0xFF]++;
      hist = local;
    }
    int digit = 255;
    for (; digit > 0; --digit) {
      if (hist[digit] >= remaining) break;
      remaining -= hist[digit];
    }
    prefix |= static_cast<uint32_t>(digit) << shift;
    if (shift == 0) break;
    // keep the candidates whose digits so far equal the chosen prefix (branch-free)
    const uint32_t hi_mask = ~((1u << shift) - 1u);
    int64_t m = 0;
    for (int64_t i = 0; i < ncand; ++i) {
      scratch[m] = cand[i];
      m += (cand[i] & hi_mask) == prefix;
    }
    cand = scratch;
    ncand = m;
  }
  *need_equal = remaining;
  return prefix;
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
    for (int64_t i = 0; i < count; ++i) {
      dst[i] = base[offset];
      for (int64_t d = nd - 1; d >= 0; --d) {
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
  std::memset(mask, 0, groups * mask_bytes);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    std::vector<uint32_t> keys(group), scratch(group);
    std::vector<scalar_t> tmp(std::min(group, k) + 1);
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
      int64_t hist0[256] = {0};
      for (int64_t i = 0; i < real; ++i) {
        const uint32_t key = magnitude_key(static_cast<float>(xg[i]));
        keys[i] = key;
        hist0[key >> 24]++;
      }
      uint32_t threshold = 0;
      int64_t need_equal = real;  // keep == real: every key >= 0 is kept
      if (keep == 0) {
        threshold = 0xFFFFFFFFu;
        need_equal = 0;
      } else if (keep < real) {
        threshold = select_threshold(keys.data(), real, keep, hist0, scratch.data(), &need_equal);
      }
      // Output pass, branch-free: a kept element sets its mask bit and is written at
      // `slot` (a write at an unkept element is overwritten by the next kept one; the
      // one extra slot at the end absorbs the last such write).
      int64_t slot = 0;
      for (int64_t i = 0; i < real; ++i) {
        const uint32_t key = keys[i];
        const bool tie = (key == threshold) & (need_equal > 0);
        const bool kept = (key > threshold) | tie;
        need_equal -= tie;
        mg[i >> 3] |= static_cast<uint8_t>(static_cast<uint32_t>(kept) << (i & 7));
        tmp[slot] = xg[i];
        slot += kept;
      }
      for (int64_t j = 0; j < slot; ++j) vg[j] = static_cast<value_t>(static_cast<float>(tmp[j]));
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
      const uint8_t* mg = mask + g * mask_bytes;
      const value_t* vg = values + g * k;
      out_t* og = out + g * group;
      const int64_t real = std::min(group, n - g * group);
      int64_t slot = 0;
      for (int64_t i = 0; i < real; ++i) {
        if ((mg[i >> 3] >> (i & 7)) & 1) {
          og[i] = static_cast<out_t>(static_cast<float>(vg[slot++]));
        } else {
          og[i] = static_cast<out_t>(0.0f);
        }
      }
    }
  });
}

#define RAZOR_FLOAT_TYPES(NAME, ...)                                        \
  [&] {                                                                     \
    switch (NAME) {                                                         \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }           \
      case at::kBFloat16: { using T = c10::BFloat16; return __VA_ARGS__(); } \
      case at::kHalf: { using T = c10::Half; return __VA_ARGS__(); }        \
      default: TORCH_CHECK(false, "razorpass CPU kernel: unsupported dtype ", NAME); \
    }                                                                       \
  }()

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
  at::Tensor mask = at::empty({groups, (group + 7) / 8}, x.options().dtype(at::kByte));
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
}
