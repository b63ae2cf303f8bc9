# SPDX-License-Identifier: MIT
"""The C++/CUDA statistics kernel ``scheme_params`` (csrc/cuda/tensor_stats.cu) against the
pure-PyTorch reference: every scheme, ResQ at 2/3/8 bits, every dtype and awkward shape, per tensor
and per channel, non-finite / constant / all-zero rows; determinism, opcheck, errors, and that the
output kernels fed its scales give the reference's levels. GPU only (skipped without one)."""
import pytest
import torch

from kernel_inputs import bits8 as _bits
from kernel_inputs import check_params_without_bits_grad, sample

from autoqnn import _ext
from autoqnn.ops import has_kernel
from autoqnn.ops import reference as ref
from autoqnn.schemes import scheme_info

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (_ext.HAS_CUDA_KERNELS and has_kernel("scheme_params", "CUDA")),
                       reason=f"autoqnn._C has no CUDA kernels: {_ext.LOAD_ERROR}"),
]

OPS = torch.ops.autoqnn
SIDS = list(range(8))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# sizes straddle the kernels' block (256 threads) and chunk (4096) boundaries
SHAPES = [(1,), (2,), (255,), (257,), (769,), (4097,), (5125,), (16, 3, 3, 3), (3, 7000), (0,), (4, 0), ()]


def _x(shape, dtype, special=True, seed=0):
    return sample(shape, dtype, special, seed).cuda()


def _check(x, bits, per_channel, sids=SIDS):
    got = OPS.scheme_params(x, bits, sids, per_channel)
    exp = ref.scheme_params_ref(x, bits, sids, per_channel)
    assert got.device.type == "cuda" and got.dtype == exp.dtype and got.shape == exp.shape
    torch.testing.assert_close(got, exp, rtol=2e-5, atol=1e-7)
    assert torch.equal(got, OPS.scheme_params(x, bits, sids, per_channel))  # deterministic
    return got


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scheme_params_cuda_matches_reference(dtype, shape, per_channel):
    x = _x(shape, dtype)
    for b in (2, 3, 8):
        _check(x, _bits(b).cuda(), per_channel)
        _check(x, _bits(b), per_channel)  # bits on the host (the functional API's integer bits)


@pytest.mark.parametrize("sids", [[4], [1], [2], [6, 7], [0, 3, 5], [4, 2]], ids=str)
def test_scheme_params_cuda_subsets_chain_the_passes_like_the_cpu_kernel(sids):
    x = _x((5, 3001), torch.float32)
    for b in (2, 3, 5, 8):
        bits = torch.tensor([b if scheme_info(s).max_bits >= b else scheme_info(s).max_bits for s in sids],
                            dtype=torch.float32)
        got = _check(x, bits, True, sids)
        torch.testing.assert_close(got.cpu(), OPS.scheme_params(x.cpu(), bits, sids, True), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("fill", [0.0, 1.5, -2.0, float("nan"), float("inf")], ids=str)
def test_scheme_params_cuda_degenerate_rows(fill):
    bits = _bits(3)
    _check(torch.full((300,), fill, device="cuda"), bits, False)
    x = torch.randn(4, 50, device="cuda")
    x[1] = fill
    _check(x, bits, True)
    _check(torch.tensor([1e30, -1e30, 3.0], device="cuda"), bits, False)


def test_scheme_params_cuda_constant_rows_have_zero_sigma():
    """σ = 0 exactly for a row of one repeated value whose rounded mean is not that value."""
    sig = [2, 6, 7]  # quaternary, clip, pot
    bits = torch.tensor([2.0, 2.0, 2.0])
    for dtype in (torch.float32, torch.float64):
        for n in (17, 100, 5000):
            rows = torch.tensor([0.1, -1 / 3, 0.002, 7.3], dtype=dtype)[:, None].expand(4, n).clone()
            rows[0, 0] = float("nan")
            for pc, x in ((True, rows), (False, rows[1])):
                p = OPS.scheme_params(x.cuda(), bits, sig, pc)
                assert not p.any(), (dtype, n, pc)
                assert torch.equal(p.cpu(), ref.scheme_params_ref(x, bits, sig, pc))


def test_scheme_params_cuda_noncontiguous_and_large():
    x = torch.randn(64, 3000, device="cuda").t()  # non-contiguous, per channel = 3000 rows
    _check(x, _bits(3), True)
    _check(torch.randn(1 << 21, device="cuda") * 3, _bits(8), False)


def test_scheme_params_cuda_feeds_the_output_kernels():
    x = _x((3, 2000), torch.float32)
    bits = _bits(3)
    w = torch.softmax(torch.randn(8), 0).cuda()
    p = OPS.scheme_params(x, bits, SIDS, True)
    y = OPS.mixture(x, p, w, bits, SIDS, True)
    y_ref = ref.mixture_ref(x, ref.scheme_params_ref(x, bits, SIDS, True), w, bits, SIDS, True)
    bad = (~torch.isclose(y, y_ref, rtol=1e-5, atol=1e-6, equal_nan=True)).sum().item()
    assert bad <= 3, f"{bad} of {y.numel()} outputs differ"


def test_scheme_params_cuda_opcheck_and_errors():
    x = torch.randn(4, 5, device="cuda")
    torch.library.opcheck(OPS.scheme_params.default, (x, _bits(3).cuda(), SIDS, True))
    with pytest.raises(TypeError, match="Int|int"):
        OPS.scheme_params(torch.arange(10, device="cuda"), _bits(3), SIDS, False)
    with pytest.raises(ValueError, match="finite"):
        OPS.scheme_params(x, torch.full((8,), float("nan")), SIDS, False)
    with pytest.raises(ValueError, match="unknown scheme"):
        OPS.scheme_params(x, torch.tensor([3.0]), [11], False)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("shape", [(769,), (3, 7000), (0,)], ids=lambda s: "x".join(map(str, s)))
def test_scheme_params_cuda_without_bits_grad(shape, per_channel):
    """need_bits_grad=False: ResQ's α_{b+1} slot is 0, every other slot bit-identical, and the
    values match the CPU kernel's (same passes, fewer of them)."""
    x = _x(shape, torch.float32)
    for b in (2, 3, 8):
        bits = _bits(b)
        for sids, bb in ((SIDS, bits), ([4], bits[4:5])):
            _, nb = check_params_without_bits_grad(
                lambda x_, g: OPS.scheme_params(x_, bb, sids, per_channel, g), x, bb, sids,
                ref_fn=lambda g: ref.scheme_params_ref(x, bb, sids, per_channel, g))
            torch.testing.assert_close(nb.cpu(), OPS.scheme_params(x.cpu(), bb, sids, per_channel, False),
                                       rtol=2e-5, atol=1e-7)


def test_scheme_params_cuda_one_launch_passes_equal_the_two_stage_ones(tmp_path):
    """Each statistics pass is one launch (the row's last block finalizes it); the partial +
    finalize launches (AUTOQNN_CUDA_STATS_TWO_STAGE=1, read once per process: a subprocess
    here) merge the same partials in the same order, so both give the same scales bit for bit,
    for uniform rows with many chunks and for batched ragged rows with an empty one."""
    import os
    import subprocess
    import sys

    script = tmp_path / "params.py"
    script.write_text(
        "import sys, torch\n"
        "import autoqnn  # noqa: F401  (registers the ops)\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x = (torch.randn(3, 40000, generator=g) * 2).cuda()\n"
        "b = torch.full((8,), 3.0)\n"
        "out = [torch.ops.autoqnn.scheme_params(x, b, list(range(8)), pc, True).cpu() for pc in (False, True)]\n"
        "flat = x.reshape(-1)[:50000].contiguous()\n"
        "off = [0, 9000, 9000, 50000]\n"
        "out.append(torch.ops.autoqnn.scheme_params_batched(flat, off, torch.full((3, 8), 4.0), list(range(8)), True)"
        ".cpu())\n"
        "torch.save(out, sys.argv[1])\n")
    res = {}
    for mode in ("0", "1"):
        path = tmp_path / f"out{mode}.pt"
        env = dict(os.environ, AUTOQNN_CUDA_STATS_TWO_STAGE=mode)
        subprocess.run([sys.executable, str(script), str(path)], check=True, env=env, timeout=300)
        res[mode] = torch.load(path, weights_only=True)
    for one, two in zip(res["0"], res["1"]):
        assert torch.equal(one, two)


def _on_steps(x, P, sids, b_int, per_channel, seed=0):
    """x with its first elements replaced by every candidate's steps (bisection on the
    reference's math, tools/levels_probe.py) and both float32 neighbours, with ±0, ±Inf, NaN."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import levels_probe as LP

    g = torch.Generator().manual_seed(seed)
    rows = x.reshape(x.shape[0], -1).clone() if per_channel else x.reshape(1, -1).clone()
    ninf, pinf = torch.tensor(-float("inf")), torch.tensor(float("inf"))
    for r in range(rows.shape[0]):
        seeds = torch.cat([rows[r], torch.linspace(-8, 8, 4001) * float(rows[r].abs().max())])
        ts = torch.cat([LP.steps(s, P[k, r].float().cpu(), b_int[k], seeds) for k, s in enumerate(sids)])
        ts = ts[torch.isfinite(ts)]
        pts = torch.cat([ts, torch.nextafter(ts, ninf), torch.nextafter(ts, pinf),
                         torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
        pts = pts[torch.randperm(pts.numel(), generator=g)][: rows.shape[1]]
        rows[r, : pts.numel()] = pts
    return rows.reshape(x.shape)


def _same_nan(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
        torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_levels_table_pass_equals_the_arithmetic_kernels(bits, dtype, monkeypatch):
    """AUTOQNN_CUDA_LEVELS=1 (read at every call): the output kernels look each element's
    segment up in a per-row table of every candidate's steps instead of evaluating the schemes.
    Values, grad_x and the gradient sums equal the arithmetic kernels' bit for bit, also on the
    steps themselves and their neighbours, per tensor and per channel."""
    for sids in (SIDS, [3, 4, 5, 6, 7], [4], [6]):
        b_int = [min(max(bits, scheme_info(s).min_bits), scheme_info(s).max_bits) for s in sids]
        if len(sids) == 1 and b_int[0] != bits:
            continue
        bt = torch.tensor([float(b) for b in b_int])
        for pc, heavy in ((False, False), (False, True), (True, False)):
            g = torch.Generator().manual_seed(bits)
            x = torch.randn(3, 30000, generator=g) * 1.7
            if heavy:  # ResQ's scales need not decrease: its value is not monotone
                x = x.abs() ** 1.5 * torch.sign(x)
            if not pc:
                x = x.reshape(-1)
            P = OPS.scheme_params(x, bt, sids, pc, True)
            x = _on_steps(x, P, sids, b_int, pc).to(dtype).cuda()
            P, w = P.cuda(), torch.softmax(torch.randn(len(sids), generator=g), 0).cuda()
            gy = torch.randn(x.shape, generator=g).to(dtype).cuda()
            out = {}
            for mode in ("0", "1"):
                monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", mode)
                out[mode] = [OPS.mixture(x, P, w, bt, sids, pc),
                             *OPS.mixture_backward(gy, x, P, w, bt, sids, pc, True, True),
                             OPS.quantize(x, P[:1], bt[:1], sids[0], pc),
                             *OPS.quantize_backward(gy, x, P[:1], bt[:1], sids[0], pc, True)]
            for i, (a, b) in enumerate(zip(out["1"], out["0"])):
                assert _same_nan(a, b), (sids, bits, pc, heavy, i)


def test_levels_table_pass_switch(monkeypatch):
    """float64 keeps the arithmetic kernels under AUTOQNN_CUDA_LEVELS=1; a bad value is an error
    naming the variable; auto takes the table for long rows only (same values either way)."""
    x = torch.randn(70000, dtype=torch.float64, device="cuda")
    bt = torch.full((8,), 3.0)
    P = OPS.scheme_params(x, bt, SIDS, False, True)
    w = torch.full((8,), 0.125, dtype=torch.float64, device="cuda")
    monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", "1")
    y64 = OPS.mixture(x, P, w, bt, SIDS, False)
    monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", "0")
    assert torch.equal(y64, OPS.mixture(x, P, w, bt, SIDS, False))
    xf, Pf, wf = x.float(), P.float(), w.float()
    base = OPS.mixture(xf, Pf, wf, bt, SIDS, False)
    monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", "auto")
    assert torch.equal(OPS.mixture(xf, Pf, wf, bt, SIDS, False), base)
    # a bad value: an error naming the variable (in a subprocess: an exception raised inside a C++
    # op once crashed a lent machine's torch build, see tools/raise_check.py)
    import os
    import subprocess
    import sys

    code = ("import torch, autoqnn\n"
            "x = torch.randn(100, device='cuda'); b = torch.full((1,), 3.0)\n"
            "P = torch.ops.autoqnn.scheme_params(x, b, [3], False, True)\n"
            "torch.ops.autoqnn.quantize(x, P, b, 3, False)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, AUTOQNN_CUDA_LEVELS="sometimes"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    if r.returncode > 0:  # not a crash: the message must name the variable
        assert "AUTOQNN_CUDA_LEVELS" in r.stderr and "ValueError" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("levels", ["0", "1"], ids=["arith", "levels"])
def test_cuda_kernels_on_random_cases(levels, monkeypatch):
    """The randomised differential cases of the C++/Triton kernel tests (tests/fuzz_cases.py) on
    the CUDA ops (the same 300 cases as the C++ test), with the output kernels' arithmetic pass
    and with their levels-table pass (``AUTOQNN_CUDA_LEVELS=1``)."""
    pytest.importorskip("hypothesis")
    from fuzz_cases import cases, check_ops_case
    from hypothesis import HealthCheck, given, settings

    monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", levels)
    ops = {name: getattr(OPS, name) for name in ("scheme_params", "mixture", "mixture_backward", "quantize")}

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(c=cases())
    def run(c):
        check_ops_case(c, ops, "cuda")

    run()


def test_cuda_batched_ops_on_random_cases():
    """The random batched cases of tests/fuzz_cases.py on the CUDA batched ops against one
    per-tensor CUDA call per tensor: statistics, y and grad_x bit for bit, the sums close."""
    pytest.importorskip("hypothesis")
    from fuzz_cases import batched_cases, check_batched_case
    from hypothesis import HealthCheck, given, settings

    names = ("scheme_params", "mixture", "mixture_backward", "scheme_params_batched", "mixture_batched",
             "mixture_batched_backward")
    ops = {name: getattr(OPS, name) for name in names}

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(c=batched_cases())
    def run(c):
        check_batched_case(c, ops, "cuda", exact_sums=False)

    run()


@pytest.mark.parametrize("levels", ["0", "1"], ids=["arith", "levels"])
@pytest.mark.parametrize("family", ["cuda", "routed"])
def test_cuda_ops_keep_dense_layouts(family, levels, monkeypatch):
    """Channels-last, permuted, transposed and sliced inputs (tests/kernel_inputs.py) on the C++
    CUDA kernels (``<op>_cuda``, statistics from the main ops) and on the main ops (the router):
    a dense x read in memory order, y and grad_x laid out like it, bit for bit equal to the same
    elements handed over contiguously in that order; fp32 and bf16, both output passes."""
    from kernel_inputs import check_op_layouts

    monkeypatch.setenv("AUTOQNN_CUDA_LEVELS", levels)
    monkeypatch.setenv("AUTOQNN_TRITON_LEVELS", levels)

    def op(name):
        if family == "cuda" and hasattr(OPS, name + "_cuda"):
            return getattr(OPS, name + "_cuda")
        return getattr(OPS, name)

    for dtype in (torch.float32, torch.bfloat16):
        check_op_layouts(op, "cuda", dtype)
