# SPDX-License-Identifier: MIT
"""autoqnn: automatic quantization of PyTorch models (AutoQNN: QAG, QSS, QPL).

The extension ``autoqnn._C`` (C++/CUDA kernels) is loaded first when it was built for this
torch; without it every op runs through the pure-PyTorch reference (one warning says why).
"""
from . import _ext  # noqa: F401  (loads autoqnn._C before the op schemas are declared)
from . import ops  # noqa: F401
try:  # Triton kernels (optional): registers autoqnn::*_triton and sets backends.TRITON_ERROR
    from .ops import _triton  # noqa: F401
except Exception:  # pragma: no cover - never let an optional backend break the import
    pass
from . import kernel_choice  # noqa: E402
try:  # backend="auto" on GPUs: route each op to the faster of the C++/CUDA and Triton kernels
    kernel_choice.install_router()
except Exception as _e:  # pragma: no cover - GPUs then run the reference
    import warnings as _w

    _w.warn(f"autoqnn: the GPU kernel router could not be installed ({type(_e).__name__}: {_e}); "
            "backend='auto' runs the reference on GPUs", RuntimeWarning)
from . import functional, schemes  # noqa: F401
from .backends import BackendUnavailableError  # noqa: F401
from .functional import quantize, quantize_mixture  # noqa: F401
from .schemes import ACTIVATION_CANDIDATES, SCHEMES, WEIGHT_CANDIDATES  # noqa: F401
from .config import LayerOverride, QuantConfig  # noqa: F401
from .pipeline import (  # noqa: F401
    BudgetError,
    SearchConfig,
    SearchResult,
    clamp_bits_,
    compile_model,
    finalize,
    fix_schemes,
    on_epoch_end,
    precision_loss,
    prepare,
    search,
)

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "quantize_mixture",
    "functional",
    "schemes",
    "SCHEMES",
    "WEIGHT_CANDIDATES",
    "ACTIVATION_CANDIDATES",
    "BackendUnavailableError",
    "QuantConfig",
    "LayerOverride",
    "SearchConfig",
    "SearchResult",
    "BudgetError",
    "prepare",
    "precision_loss",
    "on_epoch_end",
    "fix_schemes",
    "clamp_bits_",
    "finalize",
    "search",
    "compile_model",
    "__version__",
]
