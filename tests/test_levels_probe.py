# SPDX-License-Identifier: MIT
"""tools/levels_probe.py, the groundwork for a levels-table output kernel: the mixture of the
eight candidates is a step function whose thresholds, found by bisection on the float32 order
with the reference's own math, reproduce the reference mixture bit for bit; and the probe does
notice a missing threshold."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import levels_probe as L  # noqa: E402


@pytest.mark.parametrize("bits,seed", [(3, 0), (3, 1), (8, 1)])
def test_table_lookup_reproduces_the_reference_mixture(bits, seed):
    per, size, bad, npts = L.probe(bits, 1024, seed)
    assert bad == 0 and npts > 20000
    assert per["clip"] == 2**bits - 1 and per["binary"] == 1
    assert size <= sum(per.values())


def test_probe_notices_a_missing_threshold(monkeypatch):
    real = L.steps
    monkeypatch.setattr(L, "steps", lambda sid, p, b, seeds: real(sid, p, b, seeds)[1:] if sid == 6 else
                        real(sid, p, b, seeds))
    _, _, bad, _ = L.probe(3, 1024, 0)
    assert bad > 0
