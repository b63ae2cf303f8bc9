// SPDX-License-Identifier: MIT
namespace autoqnn {
// Entry points of the emulated quantize.cu (its kernels and host functions live in an anonymous
// namespace of that translation unit): thin wrappers the bindings can name.
namespace emu_q {
at::Tensor mixture(const at::Tensor& x, const at::Tensor& p, const at::Tensor& w, const at::Tensor& bits,
                   std::vector<int64_t> s, bool pc) {
  return mixture_cuda(x, p, w, bits, s, pc);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_backward(const at::Tensor& gy, const at::Tensor& x,
                                                                const at::Tensor& p, const at::Tensor& w,
                                                                const at::Tensor& bits, std::vector<int64_t> s,
                                                                bool pc, bool nw, bool nb) {
  return mixture_backward_cuda(gy, x, p, w, bits, s, pc, nw, nb);
}
at::Tensor quantize(const at::Tensor& x, const at::Tensor& p, const at::Tensor& bits, int64_t s, bool pc) {
  return quantize_cuda(x, p, bits, s, pc);
}
std::tuple<at::Tensor, at::Tensor> quantize_backward(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& p,
                                                     const at::Tensor& bits, int64_t s, bool pc, bool nb) {
  return quantize_backward_cuda(gy, x, p, bits, s, pc, nb);
}
at::Tensor mixture_batched(const at::Tensor& x, std::vector<int64_t> off, const at::Tensor& p, const at::Tensor& w,
                           const at::Tensor& bits, std::vector<int64_t> s) {
  return mixture_batched_cuda(x, off, p, w, bits, s);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_batched_backward(const at::Tensor& gy, const at::Tensor& x,
                                                                        std::vector<int64_t> off, const at::Tensor& p,
                                                                        const at::Tensor& w, const at::Tensor& bits,
                                                                        std::vector<int64_t> s, bool nw, bool nb) {
  return mixture_batched_backward_cuda(gy, x, off, p, w, bits, s, nw, nb);
}
}  // namespace emu_q
}  // namespace autoqnn
