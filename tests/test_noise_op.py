# SPDX-License-Identifier: MIT
"""``autoqnn::uniform48``: the integer hash of the search's Gumbel noise as one op.

The C++ (CPU) and CUDA kernels must give the reference's integers bit for bit (the noise of a
step must not depend on the device, the backend or whether the step was compiled); a compiled
forward keeps the op as one call instead of tracing ~75 int64 ops per quantizer (which cost
Inductor seconds of compile time each).
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from autoqnn import _ext
from autoqnn.nn.quantizers import gumbel_noise
from autoqnn.ops import has_kernel
from autoqnn.ops import reference as ref

op = torch.ops.autoqnn.uniform48

needs_cpu_kernel = pytest.mark.skipif(
    not (_ext.HAS_EXT and has_kernel("uniform48", "CPU")), reason=f"C++ CPU kernels not built: {_ext.LOAD_ERROR}"
)

SEEDS = [0, 1, -1, 77, 2**32, 2**32 - 1, 2**62 + 7, -(2**63), 2**63 - 1]
KS = [0, 1, 5, 8, 13]


def _steps_cases():
    return [
        torch.tensor(0),
        torch.tensor(2**33 + 5),
        torch.arange(256),
        torch.arange(12).reshape(3, 4) + (2**32 - 6),  # crosses the 32-bit boundary
        torch.tensor([-1, -(2**63), 2**63 - 1, -(2**31)]),
        torch.empty(0, dtype=torch.int64),
        torch.arange(40)[::3],  # not contiguous
    ]


# Pinned values: the noise of a saved search must stay reproducible across releases (a change of
# the hash changes every search's trajectory, so it has to be deliberate).
GOLDEN = {  # (seed, step) -> uniform48 for k = 3
    (0, 0): [249874117689785, 176074803668174, 150815606979248],
    (77, 5): [278808005414299, 160777983445950, 127354117288447],
    (-1, 2**33 + 5): [236739139571080, 158140647357742, 65923205185416],
}


def test_reference_golden_values():
    for (s, t), want in GOLDEN.items():
        got = ref.uniform48_ref(torch.tensor(s), torch.tensor(t), 3)
        assert got.tolist() == want, (s, t)


def test_reference_properties():
    n = ref.uniform48_ref(torch.tensor(3), torch.arange(20_000), 8)
    assert n.dtype == torch.int64 and n.shape == (20_000, 8)
    assert int(n.min()) >= 0 and int(n.max()) < 2**48
    assert n.unique().numel() == n.numel()
    for bit in (0, 23, 24, 47):  # both 24-bit halves, low and high bits: fair coins
        p = ((n >> bit) & 1).double().mean().item()
        assert abs(p - 0.5) < 0.01, bit
    # different seeds, steps and candidates give different streams
    a = ref.uniform48_ref(torch.tensor(4), torch.arange(20_000), 8)
    assert (a != n).double().mean().item() > 0.999


@needs_cpu_kernel
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", KS)
def test_cpu_kernel_equals_reference(seed, k):
    s = torch.tensor(seed)
    for t in _steps_cases():
        got, want = op(s, t, k), ref.uniform48_ref(s, t, k)
        assert got.dtype == torch.int64 and got.shape == (*t.shape, k) and got.device == t.device
        assert torch.equal(got, want), (seed, t.shape, k)


@pytest.mark.parametrize("impl", ["op", "ref"])
def test_integer_dtypes_and_seed_shapes(impl):
    f = op if impl == "op" else ref.uniform48_ref
    want = f(torch.tensor(9), torch.arange(50), 4)
    for dt in (torch.int32, torch.int16, torch.uint8, torch.int8):
        assert torch.equal(f(torch.tensor(9, dtype=dt), torch.arange(50).to(dt), 4), want), dt
    assert torch.equal(f(torch.tensor([9]), torch.arange(50), 4), want)  # one-element seed
    assert torch.equal(f(torch.tensor([[9]]), torch.arange(50), 4), want)


@pytest.mark.parametrize("impl", ["op", "ref"])
def test_bad_arguments(impl):
    f = op if impl == "op" else ref.uniform48_ref
    s, t = torch.tensor(1), torch.arange(4)
    with pytest.raises(TypeError, match="steps must be an integer tensor"):
        f(s, t.float(), 3)
    with pytest.raises(TypeError, match="seed must be an integer tensor"):
        f(torch.tensor(1.0), t, 3)
    with pytest.raises(TypeError, match="seed must be an integer tensor"):
        f(torch.tensor(True), t, 3)
    with pytest.raises(TypeError, match="steps must be an integer tensor"):
        f(s, torch.zeros(4, dtype=torch.complex64), 3)
    with pytest.raises(ValueError, match="seed must have one element"):
        f(torch.tensor([1, 2]), t, 3)
    with pytest.raises(ValueError, match="seed must have one element"):
        f(torch.empty(0, dtype=torch.int64), t, 3)
    with pytest.raises(ValueError, match=r"k must be in \[0, "):
        f(s, t, -1)
    with pytest.raises(ValueError, match=r"k must be in \[0, "):
        f(s, t, ref.UNIFORM48_MAX_K + 1)


def test_opcheck():
    for args in [(torch.tensor(5), torch.arange(7), 8), (torch.tensor(-3), torch.tensor(2**40), 1),
                 (torch.tensor(5), torch.empty(0, dtype=torch.int64), 3)]:
        torch.library.opcheck(op.default, args)


def test_gumbel_noise_uses_the_op():
    s, t = torch.tensor(11), torch.arange(300)
    n = op(s, t, 8).double()
    want = (((n + 0.5) * 2.0**-48).log().neg().log().neg()).float()
    assert torch.equal(gumbel_noise(s, t, 8), want)


class _Capture:
    def __init__(self):
        self.targets = []

    def __call__(self, gm, example_inputs):
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_traced_noise_is_one_op_where_a_kernel_serves_the_device(device):
    torch._dynamo.reset()
    cap = _Capture()
    f = torch.compile(lambda s, t: gumbel_noise(s, t, 8), fullgraph=True, backend=cap)
    s, t = torch.tensor(77, device=device), torch.tensor(2**33 + 5, device=device)
    assert torch.equal(f(s, t), gumbel_noise(s, t, 8))
    xor = [x for x in cap.targets if "xor" in x]
    if has_kernel("uniform48", device.upper()):
        assert any("uniform48" in x for x in cap.targets), cap.targets
        assert not xor, xor
    else:  # no kernel: the reference's integer ops are traced (and fused by the compiler)
        assert xor and not any("uniform48" in x for x in cap.targets)
    torch._dynamo.reset()


@needs_cpu_kernel
def test_inductor_compiles_the_op():
    torch._dynamo.reset()
    f = torch.compile(lambda s, t: gumbel_noise(s, t, 8), fullgraph=True)
    for step in (0, 255, 2**33 + 5):
        s, t = torch.tensor(77), torch.tensor(step)
        assert torch.equal(f(s, t), gumbel_noise(s, t, 8)), step
    torch._dynamo.reset()


@requires_cuda
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_kernel_equals_reference(seed):
    if not has_kernel("uniform48", "CUDA"):
        pytest.skip("CUDA kernels not built")
    for t in _steps_cases():
        want = ref.uniform48_ref(torch.tensor(seed), t, 8)
        for sdev in ("cpu", "cuda"):  # seed on the host or on the device
            got = op(torch.tensor(seed, device=sdev), t.cuda(), 8)
            assert got.is_cuda and torch.equal(got.cpu(), want), (seed, sdev, t.shape)
    with pytest.raises(RuntimeError, match="steps must be on a CUDA device"):
        op(torch.tensor(1, device="cuda"), torch.arange(3), 2)
