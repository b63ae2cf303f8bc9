# SPDX-License-Identifier: MIT
"""Triton kernels of autoqnn, installed as ``autoqnn.triton_kernels``.

This source folder is mapped to ``autoqnn.triton_kernels`` by ``setup.py`` (``package_dir``) and
must never be importable as a top-level ``triton_kernels``: OpenAI's Triton project ships a
distribution with exactly that import name. Modules here hold ``@triton.jit`` kernels and their
launchers only; the ops that use them are registered in ``autoqnn.ops``.
"""
