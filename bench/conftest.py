# SPDX-License-Identifier: MIT
"""Shared benchmark plumbing: providers side by side per group, and a ratio table at the end.

Run: ``python -m pytest bench/ -q`` (add ``-k cpu`` / ``-k cuda`` to select devices). Every
benchmark calls :func:`record` so the terminal summary can print, per group, each provider's
median and its speed-up over the eager reference and over ``torch.compile`` of the reference.
"""
import platform
from collections import defaultdict

import pytest
import torch

_RESULTS: dict = defaultdict(dict)  # group -> provider -> median seconds


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def record(benchmark, group: str, provider: str, fn, device: str, rounds: int = 5, warmup: int = 1):
    """Time ``fn`` (synchronised on CUDA) with pytest-benchmark and remember the median."""
    benchmark.group = group
    benchmark.extra_info["provider"] = provider

    def run():
        fn()
        sync(device)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        _RESULTS[group][provider] = stats.stats.median


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["cpu"] = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
        machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        pass


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", "autoqnn providers side by side (median; speed-up = baseline / provider)")
    tr.write_line(f"{'group':<44}{'provider':<12}{'median ms':>11}{'vs eager':>10}{'vs compiled':>13}"
                  f"{'/ float':>10}")
    for group in sorted(_RESULTS):
        res = _RESULTS[group]
        eager, comp, flt = res.get("eager"), res.get("compiled"), res.get("float")
        for prov, med in sorted(res.items(), key=lambda kv: kv[1]):
            ve = f"{eager / med:9.2f}x" if eager else "        -"
            vc = f"{comp / med:12.2f}x" if comp else "           -"
            vf = f"{med / flt:9.2f}x" if flt else "        -"  # cost relative to a float step
            tr.write_line(f"{group:<44}{prov:<12}{med * 1e3:>11.2f}{ve:>10}{vc:>13}{vf:>10}")


@pytest.fixture
def device_skip():
    def check(device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("no CUDA GPU")

    return check
