# SPDX-License-Identifier: MIT
"""Compare the emulated CUDA kernels of two builds (tools/cuda_emu/build.py new/old) with each
other and with the C++ CPU ops. Prints a line per case and FAIL lines; exits 1 on any failure.

    python tools/cuda_emu/compare.py [--dtypes float32,bfloat16,float64] [--exact-sums]
    python tools/cuda_emu/compare.py --levels   # levels-table pass vs arithmetic, new build only

Every call of the new build runs three times, its blocks' threads in forward, reversed and
shuffled order between barriers, and must give bitwise the same result (a missing __syncthreads
shows as a difference). Tensors the kernels allocate start as NaN (torch's deterministic mode
fills uninitialised memory), shared memory as 0xFF bytes: an output slot never written or a
shared slot read before it is written shows up against the CPU ops. The guard-band checks of
tests/guard_band.py run on the new build (out-of-bounds reads). Under AddressSanitizer
(``build.py new WORK --asan``, then this script with the LD_PRELOAD that build.py prints) reads
and writes past a tensor or past dynamic shared memory are reported and abort the run.

Expected: statistics, scheme_params, forward values and grad_x identical between builds whose
kernels keep each thread's element order; --exact-sums also requires identical backward sums
(drop it when the change re-partitions the per-tensor backward's grid).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(ROOT, "build", "cuda_emu", "new"), os.path.join(ROOT, "build", "cuda_emu", "old")]

import emu_new  # noqa: E402

try:
    import emu_old as O  # noqa: E402
except ImportError:  # --levels needs only the new build
    O = None

import autoqnn.functional as AF  # noqa: E402
from autoqnn.schemes import scheme_id  # noqa: E402

FAILS = 0
ORDERS = (0, 1, 2)  # threads between barriers: forward, reversed, shuffled


class _EveryOrder:
    """The new build's functions, each call run in every thread order and required to agree."""

    def __getattr__(self, name):
        fn = getattr(emu_new, name)

        def call(*args):
            global FAILS
            out = []
            for o in ORDERS:
                emu_new.set_order(o)
                out.append(fn(*args))
            emu_new.set_order(0)
            for o, r in zip(ORDERS[1:], out[1:]):
                if not all(same(u, v) for u, v in zip(_tup(out[0]), _tup(r))):
                    FAILS += 1
                    print(f"FAIL {name}: thread order {o} changes the result (a shared-memory race)", flush=True)
            return out[0]
        return call


def _tup(r):
    return r if isinstance(r, (tuple, list)) else (r,)


N = _EveryOrder()


def same(u, v):
    return u.shape == v.shape and torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(7.0), v.nan_to_num(7.0))


def check(name, a, b, tol=None):
    global FAILS
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    for i, (u, v) in enumerate(zip(a, b)):
        ok = u.dtype == v.dtype and u.shape == v.shape and u.device == v.device
        ok = ok and (same(u, v) if tol is None else
                     torch.allclose(u.double(), v.double(), rtol=tol, atol=tol, equal_nan=True))
        if not ok:
            FAILS += 1
            print("FAIL", name, i, (u.double() - v.double()).abs().max().item() if u.shape == v.shape else (u.shape, v.shape),
                  flush=True)


def _report(check, c, *args, **kwargs):
    """check(c, ...), printing the case (and the error) when it fails: hypothesis replays it
    while shrinking, so the last case printed is the smallest failing one."""
    try:
        check(c, *args, **kwargs)
    except Exception as e:
        print("case:", c, "->", type(e).__name__, str(e)[:1500], flush=True)
        raise


def fuzz(n: int, seed: int | None = None) -> int:
    """The random cases of the kernel tests (tests/fuzz_cases.py) on the emulated CUDA ops, every
    call in every thread order: statistics, mixture, its backward and single-scheme outputs
    against the reference; then n/3 batched cases against one per-tensor call per tensor.
    Without a seed the cases are the derandomised ones of the tests; a seed draws others."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fuzz_cases import batched_cases, cases, check_batched_case, check_ops_case
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    names = ("scheme_params", "mixture", "mixture_backward", "quantize", "scheme_params_batched", "mixture_batched",
             "mixture_batched_backward")
    ops = {name: getattr(N, name) for name in names}
    seen = [0, 0]

    derand = seed is None
    seeded = (lambda f: f) if derand else hseed(seed)

    @seeded
    @settings(max_examples=n, deadline=None, derandomize=derand, suppress_health_check=list(HealthCheck),
              print_blob=True, database=None)
    @given(c=cases())
    def run(c):
        seen[0] += 1
        _report(check_ops_case, c, ops)

    @seeded
    @settings(max_examples=max(n // 3, 1), deadline=None, derandomize=derand,
              suppress_health_check=list(HealthCheck), print_blob=True, database=None)
    @given(c=batched_cases())
    def run_batched(c):
        seen[1] += 1
        _report(check_batched_case, c, ops, exact_sums=False)

    try:
        layouts()
        run()
        run_batched()
    except Exception as e:  # hypothesis has printed the shrunk failing case
        print("FAIL fuzz:", type(e).__name__, str(e)[:2000])
        return 1
    print(f".. fuzz: {seen[0]} cases, {seen[1]} batched cases")
    print("failures:", FAILS)
    return 1 if FAILS else 0


def layouts():
    """Channels-last, permuted, transposed and sliced inputs (tests/kernel_inputs.py, the check the
    C++, Triton and GPU tests run): the emulated ops read a dense x in memory order and lay y and
    grad_x out like it, bit for bit equal to the same elements handed over contiguously."""
    from kernel_inputs import check_op_layouts

    def op(name):
        if name == "scheme_params":
            return lambda x, b, s, pc: N.scheme_params(x, b, s, pc, True)
        return getattr(N, name)

    for dtype in (torch.float32, torch.bfloat16):
        check_op_layouts(op, "cpu", dtype)
    print(".. layouts: passed", flush=True)


def constant_rows(dtypes):
    """Rows of one repeated value whose rounded mean is not that value: σ is 0 exactly (the
    QuaternaryQ, ClipQ and PotQ scales 0), per tensor, per channel and batched, like the C++ ops."""
    sig = [scheme_id(s) for s in ("quaternary", "clip", "pot")]
    bits = torch.full((3,), 2.0)
    for dn in dtypes:
        dtype = getattr(torch, dn)
        for n in (17, 5000):
            rows = torch.tensor([0.1, -1 / 3, 0.002, 7.3], dtype=torch.float64)[:, None].expand(4, n).to(dtype).clone()
            rows[0, 0] = float("nan")
            tag = f"constant rows {dn} n={n}"
            print("..", tag, flush=True)
            for pc, x in ((True, rows), (False, rows[1])):
                pn = N.scheme_params(x, bits, sig, pc, True)
                check(f"scheme_params new/cpu per_channel={pc} " + tag, pn, torch.ops.autoqnn.scheme_params(x, bits, sig, pc, True))
                check(f"scheme_params zero per_channel={pc} " + tag, pn, torch.zeros_like(pn))
            flat = rows.reshape(-1)
            off = [0, n, 2 * n, 3 * n, 4 * n]
            pb = N.scheme_params_batched(flat, off, bits.expand(4, 3).contiguous(), sig, True)
            check("scheme_params_batched zero " + tag, pb, torch.zeros_like(pb))


def guard_bands(dtypes):
    """tests/guard_band.py on the new build: inputs inside poisoned guard bands and strided views
    with poisoned gaps give bitwise the results of clean copies (no out-of-bounds reads)."""
    global FAILS
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import guard_band as GB  # noqa: PLC0415

    def op(name):
        return getattr(N, name)
    for dn in dtypes:
        dtype = getattr(torch, dn)
        cases = [(shape, pc, sids, False) for shape, pc in GB.SHAPES for sids in (GB.WEIGHT_SIDS, GB.ACT_SIDS)]
        cases.append(((7, 130), True, GB.WEIGHT_SIDS, True))
        for shape, pc, sids, strided in cases:
            print(".. guard band", dn, shape, pc, len(sids), "strided" if strided else "", flush=True)
            try:
                GB.check_per_tensor_ops(op, "cpu", dtype, shape, pc, sids, strided=strided)
            except AssertionError as e:
                FAILS += 1
                print("FAIL", e, flush=True)
        for sids in (GB.WEIGHT_SIDS, GB.ACT_SIDS):
            print(".. guard band batched", dn, len(sids), flush=True)
            try:
                GB.check_batched_ops(op, "cpu", dtype, sids)
            except AssertionError as e:
                FAILS += 1
                print("FAIL", e, flush=True)


def threshold_cases(dtypes):
    """Inputs on the quantizers' steps: every step of every candidate (found by bisection on the
    reference's math, tools/levels_probe.py) and both float32 neighbours, with ±0, ±Inf and NaN.
    A levels-table pass (AUTOQNN_CUDA_LEVELS=1 for the new build) must match the arithmetic
    kernels there too, bit for bit, sums included; random inputs almost never land on a step."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import levels_probe as LP  # noqa: PLC0415

    from autoqnn.schemes import scheme_info  # noqa: PLC0415

    W = [scheme_id(s) for s in AF.WEIGHT_CANDIDATES]
    A = [scheme_id(s) for s in AF.ACTIVATION_CANDIDATES]
    ninf, pinf = torch.tensor(-float("inf")), torch.tensor(float("inf"))
    for dn in dtypes:
        dtype = getattr(torch, dn)
        for bits_i in (2, 3, 4, 8):
            for sids in (list(range(8)), W, A, *([s] for s in range(8))):
                b_int = [min(max(bits_i, scheme_info(s).min_bits), scheme_info(s).max_bits) for s in sids]
                if len(sids) == 1 and b_int[0] != bits_i:
                    continue
                for heavy, pc in ((False, False), (True, False), (False, True)):
                    g = torch.Generator().manual_seed(bits_i + 10 * len(sids))
                    x = torch.randn(3, 700, generator=g) * 1.7
                    if heavy:
                        x = x.abs() ** 1.5 * torch.sign(x)
                    if not pc:
                        x = x.reshape(-1)
                    bits = torch.tensor([float(b) for b in b_int])
                    P = torch.ops.autoqnn.scheme_params(x, bits, sids, pc, True)
                    rows = x.reshape(3, -1).clone() if pc else x.reshape(1, -1).clone()
                    for r in range(rows.shape[0]):
                        seeds = torch.cat([rows[r], torch.linspace(-8, 8, 4001) * float(rows[r].abs().max())])
                        ts = torch.cat([LP.steps(s, P[k, r].float(), b_int[k], seeds) for k, s in enumerate(sids)])
                        ts = ts[torch.isfinite(ts)]
                        pts = torch.cat([ts, torch.nextafter(ts, ninf), torch.nextafter(ts, pinf),
                                         torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
                        pts = pts[torch.randperm(pts.numel(), generator=g)][: rows.shape[1]]
                        rows[r, : pts.numel()] = pts
                    xt = rows.reshape(x.shape).to(dtype)
                    gy = torch.randn(xt.shape, generator=g).to(dtype)
                    w = torch.softmax(torch.randn(len(sids), generator=g), 0)
                    tag = f"steps {dn} bits={bits_i} K={len(sids)} heavy={heavy} per_channel={pc}"
                    print("..", tag, flush=True)
                    check("mixture new/old " + tag, N.mixture(xt, P, w, bits, sids, pc), O.mixture(xt, P, w, bits, sids, pc))
                    check("mixture_backward new/old " + tag, N.mixture_backward(gy, xt, P, w, bits, sids, pc, True, True),
                          O.mixture_backward(gy, xt, P, w, bits, sids, pc, True, True))
                    if len(sids) == 1:
                        check("quantize new/old " + tag, N.quantize(xt, P, bits, sids[0], pc),
                              O.quantize(xt, P, bits, sids[0], pc))
                        check("quantize_backward new/old " + tag, N.quantize_backward(gy, xt, P, bits, sids[0], pc, True),
                              O.quantize_backward(gy, xt, P, bits, sids[0], pc, True))


class _WithEnv:
    """The new build's functions with AUTOQNN_CUDA_LEVELS set to ``mode`` around each call (the
    kernels read it at every call)."""

    def __init__(self, inner, mode):
        self.inner, self.mode = inner, mode

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def call(*args):
            old = os.environ.get("AUTOQNN_CUDA_LEVELS")
            os.environ["AUTOQNN_CUDA_LEVELS"] = self.mode
            try:
                return fn(*args)
            finally:
                if old is None:
                    os.environ.pop("AUTOQNN_CUDA_LEVELS")
                else:
                    os.environ["AUTOQNN_CUDA_LEVELS"] = old
        return call


def main(argv=None) -> int:
    global N, O
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16,float64")
    ap.add_argument("--exact-sums", action="store_true")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N",
                    help="only N random cases of tests/fuzz_cases.py (hypothesis, derandomised) on the new "
                         "build against the reference: no old build needed")
    ap.add_argument("--seed", type=int, default=None,
                    help="with --fuzz: draw other cases than the tests' derandomised ones")
    ap.add_argument("--levels", action="store_true",
                    help="only the step cases, the new build's levels-table pass (AUTOQNN_CUDA_LEVELS=1) "
                         "against its own arithmetic kernels (=0): no old build needed")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # tensors the kernels allocate start as NaN (integers as their max), never as leftover values
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    if args.fuzz:
        return fuzz(args.fuzz, args.seed)
    if args.levels:
        N, O = _WithEnv(N, "1"), _WithEnv(emu_new, "0")
        threshold_cases([d for d in args.dtypes.split(",") if d != "float64"])
        print("failures:", FAILS)
        return 1 if FAILS else 0
    if O is None:
        sys.exit("no old build: run tools/cuda_emu/build.py old <rev> first (or use --levels)")
    W = [scheme_id(s) for s in AF.WEIGHT_CANDIDATES]
    A = [scheme_id(s) for s in AF.ACTIVATION_CANDIDATES]
    for dn in args.dtypes.split(","):
        dtype = getattr(torch, dn)
        lo = dtype == torch.bfloat16
        sum_tol = None if args.exact_sums else (2e-2 if lo else 1e-4)
        for shape, pc in [((1,), False), ((769,), False), ((5125,), False), ((12293,), False), ((6, 3, 3, 3), True), ((7, 130), True)]:
            for sids in (W, A, [scheme_id("residual")], [scheme_id("clip")]):
                x = (torch.randn(shape) * 2).to(dtype)
                if x.numel() > 5:
                    x.view(-1)[3] = float("nan")
                    x.view(-1)[4] = float("inf")
                gy = torch.randn(shape).to(dtype)
                K = len(sids)
                bits = torch.full((K,), 3.0)
                w = torch.softmax(torch.randn(K), 0)
                P = torch.ops.autoqnn.scheme_params(x, bits, sids, pc, True)
                tag = f"{dn} {tuple(shape)} per_channel={pc} K={K}"
                print("..", tag, flush=True)
                pn = N.scheme_params(x, bits, sids, pc, True)
                check("scheme_params new/old " + tag, pn, O.scheme_params(x, bits, sids, pc, True))
                check("scheme_params new/cpu " + tag, pn.to(P.dtype), P, tol=1e-4)
                check("tensor_stats new/old " + tag, N.tensor_stats(x, pc), O.tensor_stats(x, pc))
                yn = N.mixture(x, P, w, bits, sids, pc)
                check("mixture new/old " + tag, yn, O.mixture(x, P, w, bits, sids, pc))
                check("mixture new/cpu " + tag, yn, torch.ops.autoqnn.mixture(x, P, w, bits, sids, pc),
                      tol=1e-2 if lo else 1e-5)
                for nw, nb in ((True, True), (True, False), (False, False)):
                    bn = N.mixture_backward(gy, x, P, w, bits, sids, pc, nw, nb)
                    bo = O.mixture_backward(gy, x, P, w, bits, sids, pc, nw, nb)
                    check(f"mixture_backward grad_x new/old {nw},{nb} " + tag, bn[0], bo[0])
                    check(f"mixture_backward sums new/old {nw},{nb} " + tag, bn[1:], bo[1:], tol=sum_tol)
                    bc = torch.ops.autoqnn.mixture_backward(gy, x, P, w, bits, sids, pc, nw, nb)
                    check(f"mixture_backward new/cpu {nw},{nb} " + tag, bn, bc, tol=5e-2 if lo else 1e-4)
                # weights and bits in other dtypes than x (the gradients come back in theirs)
                w2, bits2 = w.to(torch.bfloat16), bits.double()
                for nw, nb in ((True, True), (False, True)):
                    check(f"mixture_backward bf16 weights, fp64 bits {nw},{nb} " + tag,
                          N.mixture_backward(gy, x, P, w2, bits2, sids, pc, nw, nb),
                          O.mixture_backward(gy, x, P, w2, bits2, sids, pc, nw, nb), tol=sum_tol or 1e-4)
                s0, P1, b1 = sids[0], P[:1], bits[:1]
                qn0 = N.quantize_backward(gy, x, P1, bits[0], s0, pc, True)  # 0-d bits
                check("quantize_backward 0-d bits " + tag, qn0, O.quantize_backward(gy, x, P1, bits[0], s0, pc, True),
                      tol=sum_tol or 1e-4)
                check("quantize new/old " + tag, N.quantize(x, P1, b1, s0, pc), O.quantize(x, P1, b1, s0, pc))
                qn = N.quantize_backward(gy, x, P1, b1, s0, pc, True)
                qo = O.quantize_backward(gy, x, P1, b1, s0, pc, True)
                check("quantize_backward grad_x " + tag, qn[0], qo[0])
                check("quantize_backward grad_bits " + tag, qn[1], qo[1], tol=sum_tol)
        # batched: ragged rows, one empty
        sizes = [5, 0, 4100, 33, 1]
        off = [0]
        for n in sizes:
            off.append(off[-1] + n)
        x = (torch.randn(off[-1]) * 1.5).to(dtype)
        gy = torch.randn(off[-1]).to(dtype)
        R = len(sizes)
        for sids in (W, A):
            K = len(sids)
            tag = f"batched {dn} K={K}"
            print("..", tag, flush=True)
            bits = torch.randint(2, 5, (R, K)).float()
            w = torch.softmax(torch.randn(R, K), 1)
            P = N.scheme_params_batched(x, off, bits, sids, True)
            check("scheme_params_batched new/old " + tag, P, O.scheme_params_batched(x, off, bits, sids, True))
            yb = N.mixture_batched(x, off, P, w, bits, sids)
            check("mixture_batched new/old " + tag, yb, O.mixture_batched(x, off, P, w, bits, sids))
            for nw, nb in ((True, True), (False, False)):
                check(f"mixture_batched_backward new/old {nw},{nb} " + tag,
                      N.mixture_batched_backward(gy, x, off, P, w, bits, sids, nw, nb),
                      O.mixture_batched_backward(gy, x, off, P, w, bits, sids, nw, nb))
            for r in range(R):  # the batched forward equals one per-tensor call per row, bit for bit
                if sizes[r]:
                    yr = N.mixture(x[off[r]:off[r + 1]], P[:, r:r + 1], w[r], bits[r], sids, False)
                    check(f"mixture_batched vs per tensor, row {r} " + tag, yb[off[r]:off[r + 1]], yr)
    threshold_cases([d for d in args.dtypes.split(",") if d != "float64"])
    guard_bands(args.dtypes.split(","))
    constant_rows(args.dtypes.split(","))
    print("failures:", FAILS)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
