# SPDX-License-Identifier: MIT
"""Child process for tests/test_search_faults.py: one search on toy data, optionally killed with
SIGKILL at a global step, optionally resumed, optionally under torchrun (gloo). Writes the final
plan and a model fingerprint as JSON (rank 0)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from torch import nn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--compile", help="SearchConfig.compile backend (e.g. aot_eager)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    import autoqnn
    from autoqnn.config import QuantConfig

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 1, 8, 8, generator=g)
    w = torch.randn(64, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, (x.flatten(1) @ w).argmax(1))
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Dropout(0.2), nn.Flatten(), nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = autoqnn.SearchConfig(search_epochs=2, precision_epochs=2, finetune_epochs=1, batch_size=32,
                               weight_target=2.5, act_target=2.5, bits_lr=0.05, seed=3, checkpoint_dir=args.ckpt,
                               checkpoint_every_steps=2, resume="auto" if args.resume else None,
                               compile=args.compile or False,
                               quant=QuantConfig(exclude_first_last=False))

    def killer(event, info):
        if event == "step" and info["global_step"] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    res = autoqnn.search(model, ds, ds, cfg, callbacks=[killer], quiet=True)
    rank = int(os.environ.get("RANK", 0))
    probe = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    out = {
        "plan": [[p.name, p.scheme, p.bits] for p in res.plan],
        "probs": res.schemes_searched,
        "logits": res.model(probe).tolist(),
        "acc": res.quant_accuracy,
        "rank": rank,
    }
    path = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(path, "w") as f:
        json.dump(out, f)
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
