// SPDX-License-Identifier: MIT
// Rows of x for the CUDA kernels that work chunk by chunk (one block per chunk of kChunk
// elements): uniform rows (C rows of N elements: per tensor or per channel) or, for the batched
// ops, ragged rows (row c = x[off[c], off[c+1]), its chunks numbered from cfirst[c]; both arrays
// [R + 1] int64 on the device). A chunk never spans two rows, so every per-row reduction merges
// a fixed, contiguous range of chunk partials: deterministic.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "autoqnn/tensor_stats.h"  // stats::kChunk

namespace autoqnn {

// One chunk: its row, where it starts in x and how many elements it has.
struct ChunkSpan {
  int64_t row, start, len;
};

struct RowMap {
  int64_t R = 0;               // rows
  int64_t N = 0;               // uniform: elements per row
  int64_t chunks_per_row = 0;  // uniform
  const int64_t* off = nullptr;     // ragged (device): [R + 1]
  const int64_t* cfirst = nullptr;  // ragged (device): [R + 1], cfirst[R] = all chunks

  // Row owning chunk b: the last row with cfirst[r] <= b (empty rows own no chunk).
  C10_HOST_DEVICE int64_t row_of_chunk(int64_t b) const {
    if (!off) return b / chunks_per_row;
    int64_t lo = 0, hi = R - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (cfirst[mid] <= b) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
  C10_HOST_DEVICE int64_t begin(int64_t c) const { return off ? off[c] : c * N; }
  C10_HOST_DEVICE int64_t len(int64_t c) const { return off ? off[c + 1] - off[c] : N; }
  C10_HOST_DEVICE int64_t first(int64_t c) const { return off ? cfirst[c] : c * chunks_per_row; }
  C10_HOST_DEVICE int64_t chunks(int64_t c) const { return off ? cfirst[c + 1] - cfirst[c] : chunks_per_row; }
  // Chunk b (of stats::kChunk elements; the last one of a row may be shorter).
  C10_HOST_DEVICE ChunkSpan chunk(int64_t b) const {
    const int64_t c = row_of_chunk(b);
    const int64_t begin = (b - first(c)) * stats::kChunk;
    const int64_t n = len(c) - begin;
    return {c, this->begin(c) + begin, n < stats::kChunk ? n : stats::kChunk};
  }
};

}  // namespace autoqnn
