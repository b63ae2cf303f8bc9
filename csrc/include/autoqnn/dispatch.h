// SPDX-License-Identifier: MIT
// dtype dispatch used by every kernel: float32, float64, float16, bfloat16 (scalar_t in __VA_ARGS__).
#pragma once

#include <ATen/Dispatch.h>

#define AUTOQNN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
