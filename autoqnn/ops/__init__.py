# SPDX-License-Identifier: MIT
"""The ``autoqnn::`` custom ops (schemas, fakes and autograd in :mod:`._schema`, the pure-PyTorch
reference in :mod:`.reference`). Algorithm code should use :mod:`autoqnn.functional`."""
from . import _schema, reference  # noqa: F401
from ._schema import OPS, SCHEMAS, has_kernel, qualname  # noqa: F401

__all__ = ["OPS", "SCHEMAS", "has_kernel", "qualname", "reference"]
