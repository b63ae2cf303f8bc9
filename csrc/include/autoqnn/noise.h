// SPDX-License-Identifier: MIT
// The counter-based integer hash behind the Gumbel noise of the scheme search (QSS): a pure
// function of (seed, step, candidate), identical on the host and the device and bit for bit equal
// to the reference autoqnn/ops/reference.py::uniform48_ref (int64 tensor ops there, uint64 here:
// every intermediate stays below 2^59, so the two agree exactly).
//
//   h   = mix32(mix32(mix32(mix32(hi(seed) ^ C0) ^ lo(seed)) ^ hi(t) ^ C1) ^ lo(t))
//   u_j = mix32(h ^ mix32(j + C2)) >> 8            (24 bits, j = 0 .. 2k-1)
//   n_i = u_{2i} * 2^24 + u_{2i+1}                 (48 bits, candidate i = 0 .. k-1)
//
// hi/lo are the upper and lower 32 bits of the two's-complement 64-bit value.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace autoqnn {
namespace noise {

constexpr uint64_t kM32 = 0xFFFFFFFFull;
constexpr uint64_t kMul = 0x45D9F3Bull;
constexpr uint64_t kSeedSalt = 0x3C6EF372ull;
constexpr uint64_t kStepSalt = 0x7F4A7C15ull;
constexpr uint64_t kLaneSalt = 0x2545F491ull;
// Largest k the ops accept: keeps j + kLaneSalt far below 2^63 (the reference's int64 shifts are
// arithmetic, these logical: they agree for non-negative values).
constexpr int64_t kMaxK = int64_t(1) << 20;

// A bijective hash of v in [0, 2^32) (xor-shift / multiply rounds; products < 2^59).
C10_HOST_DEVICE inline uint64_t mix32(uint64_t v) {
  v ^= v >> 16;
  v = (v * kMul) & kM32;
  v ^= v >> 16;
  v = (v * kMul) & kM32;
  return v ^ (v >> 16);
}

// The 32-bit state of one (seed, step).
C10_HOST_DEVICE inline uint64_t step_hash(int64_t seed, int64_t step) {
  const uint64_t s = static_cast<uint64_t>(seed), t = static_cast<uint64_t>(step);
  uint64_t h = mix32(((s >> 32) & kM32) ^ kSeedSalt);
  h = mix32(h ^ (s & kM32));
  h = mix32(h ^ ((t >> 32) & kM32) ^ kStepSalt);
  return mix32(h ^ (t & kM32));
}

// Candidate i's 48-bit integer for the state h: uniform in [0, 2^48).
C10_HOST_DEVICE inline int64_t uniform48(uint64_t h, int64_t i) {
  const uint64_t j = 2 * static_cast<uint64_t>(i);
  const uint64_t hi = mix32(h ^ mix32(j + kLaneSalt)) >> 8;
  const uint64_t lo = mix32(h ^ mix32(j + 1 + kLaneSalt)) >> 8;
  return static_cast<int64_t>((hi << 24) | lo);
}

}  // namespace noise
}  // namespace autoqnn
