// The floating dtypes the razorpass CPU kernels handle, as a dispatch macro:
// RAZOR_FLOAT_TYPES(dtype, [&] { ... uses T ... }).
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define RAZOR_FLOAT_TYPES(NAME, ...)                                        \
  [&] {                                                                     \
    switch (NAME) {                                                         \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }           \
      case at::kBFloat16: { using T = c10::BFloat16; return __VA_ARGS__(); } \
      case at::kHalf: { using T = c10::Half; return __VA_ARGS__(); }        \
      default: TORCH_CHECK(false, "razorpass CPU kernel: unsupported dtype ", NAME); \
    }                                                                       \
  }()
