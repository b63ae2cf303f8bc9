// SPDX-License-Identifier: MIT
#pragma once
// CPU emulation of the CUDA execution model for tools/cuda_emu: a block's threads are user-level
// contexts (ucontext) run round-robin on one OS thread, switching at __syncthreads, one block
// at a time. Deterministic, and fast enough for tensors of a few thousand elements.
#include <ATen/ATen.h>
#include <ucontext.h>

#include <functional>
#include <memory>
#include <vector>
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
typedef void* cudaStream_t;

struct EmuBlock {
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<char> done;
  int cur = 0;
  std::function<void()> body;
};
inline EmuBlock* g_block = nullptr;

inline void emu_entry() {
  g_block->body();
  g_block->done[g_block->cur] = 1;
  swapcontext(&g_block->ctx[g_block->cur], &g_block->sched);
}

inline void __syncthreads() {  // back to the scheduler; it resumes this thread after all others
  swapcontext(&g_block->ctx[g_block->cur], &g_block->sched);
}

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10
namespace at {
namespace cuda {
using c10::cuda::getCurrentCUDAStream;
}
}  // namespace at

struct EmuLaunch {
  int64_t g, b;
  EmuLaunch(int64_t g_, int64_t b_, size_t = 0, cudaStream_t = nullptr) : g(g_), b(b_) {}
  template <class F, class... A>
  void operator()(F f, A... a) {
    constexpr size_t kStack = 256 * 1024;
    gridDim.x = static_cast<unsigned>(g);
    blockDim.x = static_cast<unsigned>(b);
    EmuBlock blk;
    blk.ctx.resize(b);
    blk.done.assign(b, 0);
    for (int64_t t = 0; t < b; ++t) blk.stacks.emplace_back(new char[kStack]);
    blk.body = [&] { f(a...); };
    g_block = &blk;
    for (int64_t bi = 0; bi < g; ++bi) {
      blockIdx.x = static_cast<unsigned>(bi);
      std::fill(blk.done.begin(), blk.done.end(), 0);
      for (int64_t t = 0; t < b; ++t) {
        getcontext(&blk.ctx[t]);
        blk.ctx[t].uc_stack.ss_sp = blk.stacks[t].get();
        blk.ctx[t].uc_stack.ss_size = kStack;
        blk.ctx[t].uc_link = nullptr;
        makecontext(&blk.ctx[t], emu_entry, 0);
      }
      // rounds: each thread runs to its next barrier (or its end); a barrier round is complete
      // when every thread has reached it, which is when the scheduler moves to the next round
      for (;;) {
        int live = 0;
        for (int64_t t = 0; t < b; ++t) {
          if (blk.done[t]) continue;
          blk.cur = static_cast<int>(t);
          threadIdx.x = static_cast<unsigned>(t);
          swapcontext(&blk.sched, &blk.ctx[t]);
          live += blk.done[t] ? 0 : 1;
        }
        if (live == 0) break;
      }
    }
    g_block = nullptr;
  }
};
