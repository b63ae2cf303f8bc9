// SPDX-License-Identifier: MIT
#include <torch/extension.h>

#include "shim.h"
namespace autoqnn {
at::Tensor tensor_stats_cuda(const at::Tensor& x, bool per_channel);
at::Tensor scheme_params_cuda(const at::Tensor& x, const at::Tensor& bits, at::IntArrayRef schemes, bool per_channel,
                              bool need_bits_grad);
at::Tensor scheme_params_batched_cuda(const at::Tensor& x, at::IntArrayRef offsets, const at::Tensor& bits,
                                      at::IntArrayRef schemes, bool need_bits_grad);
namespace emu_q {
at::Tensor mixture(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::vector<int64_t>, bool);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                std::vector<int64_t>, bool, bool, bool);
at::Tensor quantize(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);
std::tuple<at::Tensor, at::Tensor> quantize_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, int64_t, bool, bool);
at::Tensor mixture_batched(const at::Tensor&, std::vector<int64_t>, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, std::vector<int64_t>);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_batched_backward(const at::Tensor&, const at::Tensor&,
                                                                        std::vector<int64_t>, const at::Tensor&,
                                                                        const at::Tensor&, const at::Tensor&,
                                                                        std::vector<int64_t>, bool, bool);
}  // namespace emu_q
}  // namespace autoqnn
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_order", &emu_set_order, "order of a block's threads between barriers: 0 forward, 1 reversed, 2 shuffled");
  m.def("tensor_stats", [](const at::Tensor& x, bool pc) { return autoqnn::tensor_stats_cuda(x, pc); });
  m.def("scheme_params", [](const at::Tensor& x, const at::Tensor& b, std::vector<int64_t> s, bool pc, bool nb) {
    return autoqnn::scheme_params_cuda(x, b, s, pc, nb);
  });
  m.def("scheme_params_batched", [](const at::Tensor& x, std::vector<int64_t> off, const at::Tensor& b,
                                    std::vector<int64_t> s, bool nb) {
    return autoqnn::scheme_params_batched_cuda(x, off, b, s, nb);
  });
  m.def("mixture", &autoqnn::emu_q::mixture);
  m.def("mixture_backward", &autoqnn::emu_q::mixture_backward);
  m.def("quantize", &autoqnn::emu_q::quantize);
  m.def("quantize_backward", &autoqnn::emu_q::quantize_backward);
  m.def("mixture_batched", &autoqnn::emu_q::mixture_batched);
  m.def("mixture_batched_backward", &autoqnn::emu_q::mixture_batched_backward);
}
