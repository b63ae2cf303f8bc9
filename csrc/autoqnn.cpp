// SPDX-License-Identifier: MIT
// The Python module autoqnn._C. It defines no functions (no pybind11): importing it loads this
// shared library, whose static initialisers (the TORCH_LIBRARY_IMPL blocks at the bottom of
// csrc/cpu/*.cpp and csrc/cuda/*.cu) register the kernels with the PyTorch dispatcher. The op
// schemas are declared in Python (autoqnn/ops/_schema.py); autoqnn/_ext.py does the import.
#include <Python.h>

#define AUTOQNN_STR2(x) #x
#define AUTOQNN_STR(x) AUTOQNN_STR2(x)

PyMODINIT_FUNC PyInit__C(void) {  // the name must be PyInit_<TORCH_EXTENSION_NAME>
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "autoqnn." AUTOQNN_STR(TORCH_EXTENSION_NAME),
      "autoqnn C++/CUDA kernels; importing this module registers them with torch.ops.autoqnn.",
      -1,       // no per-module state
      nullptr,  // no methods
  };
  return PyModule_Create(&module);
}
