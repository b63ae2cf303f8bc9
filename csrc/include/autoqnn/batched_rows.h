// SPDX-License-Identifier: MIT
// Host side of the batched CUDA ops: the ragged rows of a flat x, validated and copied to the
// device once per call (defined in csrc/cuda/tensor_stats.cu, used by csrc/cuda/quantize.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "autoqnn/row_map.h"

namespace autoqnn {

struct BatchedRows {
  RowMap map;          // ragged: map.off / map.cfirst point into dev
  int64_t chunks = 0;  // chunks of stats::kChunk elements over all rows
  at::Tensor dev;      // int64 [2 (R + 1)] on x's device: offsets, then chunk starts
};

// ValueError naming `op` for offsets that do not start at 0, end at x.numel() and never decrease.
BatchedRows batched_rows(const at::Tensor& x, at::IntArrayRef offsets, const char* op);

}  // namespace autoqnn
