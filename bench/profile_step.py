# SPDX-License-Identifier: MIT
"""Where the time of one QSS mixture step goes (8 weight candidates, 3 bits, fwd + bwd), by
torch.profiler: host (CPU) time per op and device time per kernel, for a small and a large tensor.
On a GPU the small size shows the fixed per-call cost (launches, host work, syncs).

    python bench/profile_step.py --device cuda
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import autoqnn
import autoqnn.functional as AF


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--log2", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--backend", default=None, help="autoqnn backend (default: auto)")
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args(argv)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for k in args.log2:
        x = torch.randn(2**k, device=args.device, requires_grad=True)
        theta = torch.randn(8, device=args.device, requires_grad=True)
        gy = torch.randn(2**k, device=args.device)

        def step():
            w = torch.softmax(theta, 0)
            y = AF.quantize_mixture(x, w, autoqnn.WEIGHT_CANDIDATES, 3, backend=args.backend)
            torch.autograd.grad(y, [x, theta], gy)

        for _ in range(5):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(10):
                step()
            if args.device == "cuda":
                torch.cuda.synchronize()
        print(f"\n### 2^{k} elements, 10 steps ({args.device}, backend {args.backend or 'auto'})")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=48))
        if args.device == "cuda":
            print(prof.key_averages().table(sort_by=sort, row_limit=8, max_name_column_width=48))


if __name__ == "__main__":
    main()
