// SPDX-License-Identifier: MIT
#pragma once
// CPU emulation of the CUDA execution model for tools/cuda_emu: a block's threads are user-level
// contexts (ucontext) run on one OS thread, switching at __syncthreads, one block at a time.
// Deterministic, and fast enough for tensors of a few thousand elements.
//
// Checks beyond the values (see compare.py):
// - the order in which a block's threads run between two barriers, and the order of the blocks,
//   is selectable (emu_set_order: 0 in index order, 1 reversed, 2 shuffled): a kernel whose
//   result depends on it reads shared memory another thread writes in the same barrier interval
//   (a missing __syncthreads), or depends on which block finishes a grid reduction;
// - shared memory, static and dynamic, starts every block filled with 0xFF bytes (NaN in floating
//   point): a slot read before this block wrote it shows as NaN;
// - dynamic shared memory is a heap buffer of exactly the launch's size: under AddressSanitizer
//   (build.py --asan) a read or write past it is reported, as are those past global tensors.
#include <ATen/ATen.h>
#include <ucontext.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
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

inline int g_emu_order = 0;
inline void emu_set_order(int o) { g_emu_order = o; }
inline std::unique_ptr<unsigned char[]> g_dyn_smem;      // this block's dynamic shared memory
inline std::set<const void*> g_poisoned;                 // static shared arrays filled in this block
// The first thread of a block to reach a static __shared__ declaration fills it (build.py puts a
// call after each one).
inline void emu_shared_poison(void* p, size_t n) {
  if (g_poisoned.insert(p).second) std::memset(p, 0xFF, n);
}

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

// Blocks run one at a time, so a device-wide fence orders nothing further and an atomic is a
// plain read-modify-write; __ldcg (a load through L2 only) is a plain load.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
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
  size_t smem;
  unsigned gx, gy;  // a 2-D grid (x fastest); 1-D: gy == 1
  EmuLaunch(int64_t g_, int64_t b_, size_t smem_ = 0, cudaStream_t = nullptr)
      : g(g_), b(b_), smem(smem_), gx(static_cast<unsigned>(g_)), gy(1) {}
  EmuLaunch(dim3 g_, int64_t b_, size_t smem_ = 0, cudaStream_t = nullptr)
      : g(int64_t(g_.x) * g_.y), b(b_), smem(smem_), gx(g_.x), gy(g_.y) {}
  template <class F, class... A>
  void operator()(F f, A... a) {
    constexpr size_t kStack = 256 * 1024;
    gridDim.x = gx;
    gridDim.y = gy;
    blockDim.x = static_cast<unsigned>(b);
    EmuBlock blk;
    blk.ctx.resize(b);
    blk.done.assign(b, 0);
    for (int64_t t = 0; t < b; ++t) blk.stacks.emplace_back(new char[kStack]);
    blk.body = [&] { f(a...); };
    g_block = &blk;
    std::vector<int64_t> order(b);
    std::mt19937 rng(12345);
    // blocks in the same order as threads (a GPU promises none: a kernel whose result depends
    // on which block runs first or last shows up as a difference between the orders)
    std::vector<int64_t> blocks(g);
    for (int64_t bi = 0; bi < g; ++bi) blocks[bi] = g_emu_order == 1 ? g - 1 - bi : bi;
    if (g_emu_order == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (int64_t bi : blocks) {
      blockIdx.x = static_cast<unsigned>(bi % gx);
      blockIdx.y = static_cast<unsigned>(bi / gx);
      std::fill(blk.done.begin(), blk.done.end(), 0);
      g_dyn_smem.reset(new unsigned char[smem ? smem : 1]);  // exactly the launch's size
      std::memset(g_dyn_smem.get(), 0xFF, smem);
      g_poisoned.clear();
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
        for (int64_t t = 0; t < b; ++t) order[t] = g_emu_order == 1 ? b - 1 - t : t;
        if (g_emu_order == 2) std::shuffle(order.begin(), order.end(), rng);
        for (int64_t t : order) {
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
