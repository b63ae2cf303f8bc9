# SPDX-License-Identifier: MIT
"""Triton kernels for autoqnn's quantize/mixture ops (forward and backward, one pass each).

Math: a line-by-line twin of csrc/include/autoqnn/scheme_math.h (itself the twin of
autoqnn/ops/reference.py::eval_scheme): round half to even by clamp-then-(c + 1.5·2^23) − 1.5·2^23,
PotQ's level from the float bit pattern, ZoomQ's floor as rint minus overshoot, IEEE division
(``tl.div_rn``), no libdevice (so the kernels also run in TRITON_INTERPRET=1 on CPU).

The candidate schemes and their integer bits are compile-time constants packed 4 bits per
candidate (SCHEMES, BITS), so each combination compiles one specialised kernel.
"""
import torch
import triton
import triton.language as tl

NUM_PARAMS = 12
_MAGIC = 12582912.0  # 1.5 * 2^23


@triton.jit
def _safe_div(a, s):
    ok = s > 0.0
    v = tl.div_rn(a, tl.where(ok, s, 1.0))
    return tl.where(ok, v, 0.0)


@triton.jit
def _round_clamped(u, lo, hi):
    c = tl.where(u < lo, lo, tl.where(u > hi, hi, u))
    return (c + 12582912.0) - 12582912.0


@triton.jit
def _sgn(v):  # +1 for v > 0, -1 otherwise
    return tl.where(v > 0.0, 1.0, -1.0)


@triton.jit
def _sign0(v):
    return tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0))


@triton.jit
def _eval(x, p_ptr, SID: tl.constexpr, B: tl.constexpr, CB, NEED_D: tl.constexpr):
    """(q, ste, d) of candidate SID at B bits on a block x (fp32)."""
    finite = (x - x) == 0.0
    d = tl.zeros_like(x)
    ste = finite
    if SID == 0:  # binary
        q = tl.load(p_ptr) * _sgn(x)
    elif SID == 1:  # ternary
        ax = tl.where(x < 0.0, -x, x)
        q = tl.load(p_ptr + 1) * tl.where(ax > tl.load(p_ptr), _sign0(x), 0.0)
    elif SID == 2:  # quaternary
        q = tl.load(p_ptr + 1) * _round_clamped(_safe_div(x, tl.load(p_ptr)), -2.0, 1.0)
    elif SID == 3:  # fixed
        scale = tl.load(p_ptr)
        lim: tl.constexpr = 1 << (B - 1)
        q = _round_clamped(_safe_div(x, scale), -lim * 1.0, lim - 1.0) * scale
        if NEED_D:
            d = tl.where(scale > 0.0, CB * (q - x), 0.0)
    elif SID == 4:  # residual
        r = x
        q = tl.zeros_like(x)
        s_prev = tl.zeros_like(x)
        for i in tl.static_range(B):
            s = tl.load(p_ptr + i) * _sgn(r)
            q = q + s
            r = r - s
            s_prev = s
        if NEED_D:
            d = 0.5 * (s_prev + tl.load(p_ptr + B) * _sgn(r))
    elif SID == 5:  # zoom
        mn = tl.load(p_ptr)
        scale = tl.load(p_ptr + 1)
        top: tl.constexpr = (1 << B) - 1
        v = _safe_div(x - mn, scale)
        c = tl.where(v > 0.0, v, 0.0)
        c = tl.where(c < top * 1.0, c, top * 1.0)
        rr = (c + 12582912.0) - 12582912.0
        k = tl.where(rr > c, rr - 1.0, rr)
        q = mn + scale * (k + 0.5)
        if NEED_D:
            d = tl.where(scale > 0.0, CB * (q - x), 0.0)
    elif SID == 6:  # clip
        scale = tl.load(p_ptr)
        lim: tl.constexpr = 1 << (B - 1)
        q = scale * (_round_clamped(_safe_div(x, scale) - 0.5, -lim * 1.0, lim - 1.0) + 0.5)
        ax = tl.where(x < 0.0, -x, x)
        ste = ax <= (lim - 0.5) * scale
        if NEED_D:
            d = tl.where(scale > 0.0, CB * (q - x), 0.0)
    else:  # pot
        scale = tl.load(p_ptr)
        lmax: tl.constexpr = (1 << (B - 1)) - 1
        u = _safe_div(x, scale)
        a = tl.where(u < 0.0, -u, u)
        bits = a.to(tl.int32, bitcast=True)
        e = (bits >> 23) & 0xFF
        m = bits & 0x7FFFFF
        lv = e - 127 + tl.where(m > 0x3504F3, 1, 0)
        lv = tl.where(e == 255, lmax, lv)
        lv = tl.where(lv < 0, 0, lv)
        lv = tl.where(lv > lmax, lmax, lv)
        mag = tl.where(lv == 0, 126, lv + 127) << 23
        q = scale * _sign0(u) * mag.to(tl.float32, bitcast=True)
        if NEED_D:
            d = tl.where(scale > 0.0, CB * (q - x), 0.0)
    q = tl.where(x != x, x, q)
    if NEED_D:
        d = tl.where(finite, d, 0.0)
    return q, ste, d


@triton.jit
def _mixture_fwd_kernel(x_ptr, y_ptr, p_ptr, w_ptr, C, N,
                        K: tl.constexpr, SCHEMES: tl.constexpr, BITS: tl.constexpr, HAS_W: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros_like(x)
    for k in tl.static_range(K):
        SID: tl.constexpr = (SCHEMES >> (4 * k)) & 15
        B: tl.constexpr = (BITS >> (4 * k)) & 15
        q, ste, d = _eval(x, p_ptr + (k * C + row) * 12, SID, B, 0.0, False)
        if HAS_W:
            q = q * tl.load(w_ptr + k)
        if k == 0:
            acc = q
        else:
            acc = acc + q
    tl.store(y_ptr + row * N + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixture_bwd_kernel(g_ptr, x_ptr, gx_ptr, p_ptr, w_ptr, part_ptr, C, N, CBS_PTR,
                        K: tl.constexpr, SCHEMES: tl.constexpr, BITS: tl.constexpr, HAS_W: tl.constexpr,
                        NEED_D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    w_id = 0.0
    masked = tl.zeros_like(x)
    pid = row * tl.num_programs(1) + blk
    for k in tl.static_range(K):
        SID: tl.constexpr = (SCHEMES >> (4 * k)) & 15
        B: tl.constexpr = (BITS >> (4 * k)) & 15
        if HAS_W:
            wk = tl.load(w_ptr + k)
        else:
            wk = 1.0
        cb = tl.load(CBS_PTR + k)
        q, ste, d = _eval(x, p_ptr + (k * C + row) * 12, SID, B, cb, NEED_D)
        if SID == 6:
            masked = masked + tl.where(ste, wk, 0.0)
        else:
            w_id = w_id + wk
        tl.store(part_ptr + pid * 2 * K + k, tl.sum(tl.where(mask, g * q, 0.0), axis=0))
        if NEED_D:
            tl.store(part_ptr + pid * 2 * K + K + k, tl.sum(tl.where(mask, g * d, 0.0), axis=0))
        else:
            tl.store(part_ptr + pid * 2 * K + K + k, 0.0)
    finite = (x - x) == 0.0
    gx = tl.where(finite, g * (masked + w_id), 0.0)
    tl.store(gx_ptr + row * N + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _pack(vals):
    out = 0
    for i, v in enumerate(vals):
        out |= (int(v) & 15) << (4 * i)
    return out


def _rows(x, per_channel):
    C = int(x.shape[0]) if (per_channel and x.dim() > 0) else 1
    return C, (x.numel() // C if C else 0)


def _block(N):
    return max(16, min(4096 if _interpreting() else 1024, triton.next_power_of_2(max(N, 1))))


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mixture_fwd(x, params, weights, bits_int, schemes, per_channel):
    """y = sum_k w_k q_k(x) (weights None: a single scheme with weight 1), in x's dtype."""
    C, N = _rows(x, per_channel)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    xc = x.contiguous()
    p = params.to(device=x.device, dtype=torch.float32).contiguous()
    w = p if weights is None else weights.detach().to(device=x.device, dtype=torch.float32).contiguous()
    BLOCK = _block(N)
    grid = (C, triton.cdiv(N, BLOCK))
    _mixture_fwd_kernel[grid](xc, y, p, w, C, N, K=len(schemes), SCHEMES=_pack(schemes), BITS=_pack(bits_int),
                              HAS_W=weights is not None, BLOCK=BLOCK)
    return y


def mixture_bwd(grad_y, x, params, weights, bits_int, schemes, per_channel, need_bits_grad, cbs):
    """(grad_x, sums[2K] float64): sums[:K] = <g, q_k>, sums[K:] = <g, dq_k/db> (unweighted)."""
    K = len(schemes)
    C, N = _rows(x, per_channel)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return gx, torch.zeros(2 * K, dtype=torch.float64, device=x.device)
    xc = x.contiguous()
    gc = grad_y.to(x.dtype).contiguous()
    p = params.to(device=x.device, dtype=torch.float32).contiguous()
    w = p if weights is None else weights.detach().to(device=x.device, dtype=torch.float32).contiguous()
    cb = torch.tensor(cbs, dtype=torch.float32, device=x.device)
    BLOCK = _block(N)
    nb = triton.cdiv(N, BLOCK)
    part = torch.empty(C * nb, 2 * K, dtype=torch.float32, device=x.device)
    _mixture_bwd_kernel[(C, nb)](gc, xc, gx, p, w, part, C, N, cb, K=K, SCHEMES=_pack(schemes),
                                 BITS=_pack(bits_int), HAS_W=weights is not None, NEED_D=bool(need_bits_grad),
                                 BLOCK=BLOCK)
    return gx, part.double().sum(0)
