# SPDX-License-Identifier: MIT
"""Random cases for the differential kernel tests (tests/test_kernel_fuzz.py for the C++ kernels,
tests/triton_cases.py for the Triton ones): hypothesis strategies, inputs, and the comparison of
one backend's ops with the pure-PyTorch reference. Needs hypothesis (imported by the callers
through ``pytest.importorskip`` first)."""
import math

import torch
from hypothesis import strategies as st

from autoqnn.ops import reference as ref
from autoqnn.schemes import scheme_info

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SCALES = [1e-30, 1e-3, 1.0, 1e3, 1e30, 1e-40]  # 1e-40: float32 subnormals
ROW_KINDS = ["random", "random", "random", "constant", "zero", "nan", "inf", "tiny"]


@st.composite
def cases(draw):
    sids = draw(st.permutations(range(8)))[: draw(st.integers(1, 8))]
    bits = [draw(st.integers(scheme_info(s).min_bits, scheme_info(s).max_bits)) for s in sids]
    if draw(st.booleans()):  # learned bits: any float, used as clip(round(b)) (SPEC 4.1); no .5 ties
        bits = [b + draw(st.sampled_from([-2.3, -0.4, 0.0, 0.3, 0.45, 1.2, 7.0])) for b in bits]
    w = draw(st.lists(st.sampled_from([0.0, 1.0, -0.5, 0.125, 2.0, 0.3]), min_size=len(sids), max_size=len(sids)))
    rows = draw(st.integers(1, 5))
    n = draw(st.sampled_from([1, 2, 3, 17, 255, 257, 769, 1030]))
    return dict(sids=sids, bits=bits, w=w, rows=rows, n=n,
                dtype=draw(st.sampled_from(DTYPES)),
                per_channel=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "inner_permuted"])),
                kinds=[draw(st.sampled_from(ROW_KINDS)) for _ in range(rows)],
                scales=[draw(st.sampled_from(SCALES)) for _ in range(rows)],
                specials=draw(st.integers(0, 3)),
                need=(draw(st.booleans()), draw(st.booleans())),  # weights grad, bits grad
                seed=draw(st.integers(0, 2**16)))


def make_x(c):
    g = torch.Generator().manual_seed(c["seed"])
    rows, n = c["rows"], c["n"]
    x = torch.empty(rows, n, dtype=torch.float64)
    for r, (kind, scale) in enumerate(zip(c["kinds"], c["scales"])):
        if kind == "random":
            x[r] = torch.randn(n, generator=g, dtype=torch.float64) * scale
        elif kind == "constant":
            x[r] = scale * (1 + r)
        elif kind == "zero":
            x[r] = 0.0
        elif kind == "nan":
            x[r] = math.nan
        elif kind == "inf":
            x[r] = torch.where(torch.rand(n, generator=g) < 0.5, -math.inf, math.inf)
        else:  # tiny: around the smallest float32 normal
            x[r] = torch.randn(n, generator=g, dtype=torch.float64) * 1.2e-38
        for _ in range(c["specials"]):
            x[r, int(torch.randint(n, (1,), generator=g))] = [math.nan, math.inf, -math.inf, 0.0][
                int(torch.randint(4, (1,), generator=g))]
    x = x.to(c["dtype"])
    if c["layout"] == "transposed":  # same values, columns-first storage
        x = x.t().contiguous().t()
    elif c["layout"] == "strided":  # every other element of a wider buffer
        wide = torch.zeros(rows, 2 * n, dtype=c["dtype"])
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif c["layout"] == "inner_permuted":  # [rows, a, n/a] stored [rows, n/a, a]: dim 0 outermost,
        a = next(d for d in range(2, n + 1) if n % d == 0) if n > 1 else 1  # like channels-last
        x = x.reshape(rows, a, n // a).transpose(1, 2).contiguous().transpose(1, 2)
    return x


def assert_params_close(p, p_ref, x, per_channel):
    """Close to the reference relative to each slot and, for the slots of the dependent passes,
    relative to the row's max|x|: ResQ's α_i after the first are means of residuals, where a
    1-ulp difference of α_1 (the kernels' sums are more accurate than torch.sum in float32, whose
    order also changes with where the NaN are) is the whole of α_3 when the residuals cancel."""
    rows = x.detach().double().reshape(x.shape[0] if per_channel else 1, -1)
    m = torch.where(torch.isfinite(rows), rows.abs(), 0).amax(1)
    a, b = p.double(), p_ref.double()
    bound = 2e-5 * b.abs() + 1e-7 + 1e-6 * m[None, :, None]
    ok = ((a - b).abs() <= bound) | (a.isnan() & b.isnan()) | (a == b)
    assert bool(ok.all()), f"params differ at {ok.logical_not().nonzero().tolist()[:5]}: {a[~ok][:5]} vs {b[~ok][:5]}"


def close_levels(a, b, what, frac=1e-3):
    """Equal but for a bounded count of rounding ties. float16/bfloat16 outputs are an fp32 result
    rounded once: one unit in the last place of the output dtype apart is a tie decided by the
    fp32 value's last bit (sums of the weights in another order), not an error."""
    rtol = torch.finfo(a.dtype).eps if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
    a, b = a.double(), b.double()
    ok = torch.isclose(a, b, rtol=rtol, atol=1e-7, equal_nan=True)
    bad = int((~ok).sum())
    assert bad <= max(2, int(frac * a.numel())), f"{what}: {bad}/{a.numel()} differ"


def check_ops_case(c, ops, device="cpu", prep=None):
    """One random case: ``ops`` (``scheme_params``, ``mixture``, ``mixture_backward``,
    ``quantize`` of one backend) against the reference. The statistics close to the reference's;
    on the reference's statistics the levels equal but for bounded rounding ties, the gradients
    close, every single-scheme output bit-identical for float32/float64. ``prep`` edits the
    input in place first (a backend's documented limitation)."""
    x = make_x(c)
    if prep is not None:
        prep(x)
    if c["layout"] == "strided" and c["n"] > 1 or c["layout"] == "transposed" and min(c["rows"], c["n"]) > 1:
        assert not x.is_contiguous()
    sids, pc = c["sids"], c["per_channel"]
    bits = torch.tensor(c["bits"], dtype=torch.float32)
    w = torch.tensor(c["w"], dtype=torch.float32)
    if device != "cpu":  # a GPU backend: the reference runs on the same device
        x, bits, w = x.to(device), bits.to(device), w.to(device)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(c["seed"] + 1)).to(x.dtype).to(x.device)

    nw, nb = c["need"]
    p = ops["scheme_params"](x, bits, sids, pc, nb)
    p_ref = ref.scheme_params_ref(x, bits, sids, pc, nb)
    assert p.shape == p_ref.shape and p.dtype == p_ref.dtype
    assert_params_close(p, p_ref, x, pc)

    want = ref.out_like(x, pc)  # the fakes' strides: x's for a dense x in memory order, else contiguous

    def laid_out(t, what):
        assert [s for s, m in zip(t.stride(), t.shape) if m > 1] == \
            [s for s, m in zip(want.stride(), want.shape) if m > 1], (what, t.stride(), want.stride())

    y = ops["mixture"](x, p_ref, w, bits, sids, pc)
    assert y.dtype == x.dtype and y.shape == x.shape
    laid_out(y, "mixture")
    close_levels(y, ref.mixture_ref(x, p_ref, w, bits, sids, pc), "mixture")
    got = ops["mixture_backward"](gy, x, p_ref, w, bits, sids, pc, nw, nb)
    exp = ref.mixture_backward_ref(gy, x, p_ref, w, bits, sids, pc, nw, nb)
    close_levels(got[0], exp[0], "grad_x")
    laid_out(got[0], "grad_x")
    torch.testing.assert_close(got[1], exp[1], rtol=1e-3, atol=1e-3, equal_nan=True)
    torch.testing.assert_close(got[2], exp[2], rtol=1e-3, atol=1e-3, equal_nan=True)
    for k, s in enumerate(sids):
        pk, bk = p_ref[k : k + 1], bits[k : k + 1]
        q = ops["quantize"](x, pk, bk, s, pc)
        qr = ref.quantize_ref(x, pk, bk, s, pc)
        laid_out(q, scheme_info(s).name)
        if x.dtype in (torch.float32, torch.float64):
            assert torch.equal(q.nan_to_num(), qr.nan_to_num()), scheme_info(s).name
        else:
            close_levels(q, qr, scheme_info(s).name)


@st.composite
def batched_cases(draw):
    sids = draw(st.permutations(range(8)))[: draw(st.integers(1, 8))]
    R = draw(st.integers(1, 6))
    sizes = [draw(st.sampled_from([0, 1, 2, 31, 300, 4097])) for _ in range(R)]
    bits = [[draw(st.integers(scheme_info(s).min_bits, scheme_info(s).max_bits)) for s in sids] for _ in range(R)]
    return dict(sids=sids, sizes=sizes, bits=bits, dtype=draw(st.sampled_from(DTYPES)),
                kinds=[draw(st.sampled_from(ROW_KINDS)) for _ in range(R)],
                scales=[draw(st.sampled_from(SCALES)) for _ in range(R)],
                need=(draw(st.booleans()), draw(st.booleans())), seed=draw(st.integers(0, 2**16)))


def check_batched_case(c, ops, device="cpu", prep=None, exact_sums=True):
    """One random batched case: ``ops``' batched ops (``*_batched``) against one per-tensor call of
    the same backend per tensor: statistics, y and grad_x bit for bit, the per-tensor weights'
    and bits' gradients bit for bit too unless ``exact_sums`` is False."""
    sids, sizes, nw, nb = c["sids"], c["sizes"], *c["need"]
    K, R = len(sids), len(sizes)
    xs = [make_x(dict(rows=1, n=max(n, 1), kinds=[k], scales=[sc], specials=1, seed=c["seed"] + r,
                      dtype=c["dtype"], layout="contiguous"))[0, :n].contiguous()
          for r, (n, k, sc) in enumerate(zip(sizes, c["kinds"], c["scales"]))]
    if prep is not None:
        for t in xs:
            prep(t)
    xs = [t.to(device) for t in xs]
    x = torch.cat(xs)
    off = [0]
    for n in sizes:
        off.append(off[-1] + n)
    g = torch.Generator().manual_seed(c["seed"])
    bits = torch.tensor(c["bits"], dtype=torch.float32).to(device)
    w = torch.randn(R, K, generator=g).to(device)
    gy = torch.randn(x.shape, generator=g).to(x.dtype).to(device)
    P = ops["scheme_params_batched"](x, off, bits, sids, nb)
    y = ops["mixture_batched"](x, off, P, w, bits, sids)
    gx, gw, gb = ops["mixture_batched_backward"](gy, x, off, P, w, bits, sids, nw, nb)
    for r in range(R):
        a, b = off[r], off[r + 1]
        pr = ops["scheme_params"](xs[r], bits[r], sids, False, nb)
        assert torch.equal(P[:, r : r + 1].nan_to_num(), pr.nan_to_num()), ("params", r)
        if a == b:
            continue
        assert torch.equal(y[a:b].nan_to_num(), ops["mixture"](xs[r], pr, w[r], bits[r], sids, False).nan_to_num()), r
        e = ops["mixture_backward"](gy[a:b], xs[r], pr, w[r], bits[r], sids, False, nw, nb)
        assert torch.equal(gx[a:b].nan_to_num(), e[0].nan_to_num()), ("grad_x", r)
        for need, got, exp, what in ((nw, gw[r], e[1], "grad_w"), (nb, gb[r], e[2], "grad_bits")):
            if not need:
                continue
            if exact_sums:
                assert torch.equal(got.nan_to_num(), exp.nan_to_num()), (what, r)
            else:  # another partition of the row into blocks: the same sums in another order, whose
                # rounding is relative to the size of the terms (Σ|g|·|x|), not to a sum that cancels
                xr = xs[r].double()
                mag = float((gy[a:b].double().abs() * torch.where(torch.isfinite(xr), xr.abs(), 0)).sum())
                torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5 * mag + 1e-6, equal_nan=True, msg=what)
