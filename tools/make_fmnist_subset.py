#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Regenerate the Fashion-MNIST subset shipped in autoqnn/datasets/fashion_mnist_subset/.

    python tools/make_fmnist_subset.py [--src DIR] [--out DIR] [--train-per-class 300]
                                        [--test-per-class 100]

From the full set (``--src``, default: found by autoqnn.data.find_fashion_mnist, e.g. the Debian
package dataset-fashion-mnist), take per class the first N images in file order
(autoqnn.data.stratified_indices: round-robin over classes, then file order) and write them as
gzipped IDX files (compression level 9, no name, mtime 0). Deterministic: the same source gives
byte-identical files; the SHA-256 of each is printed. LICENSE and README.md in the output
directory are not touched.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoqnn.data import (FASHION_MNIST_FILES, _load_split, find_fashion_mnist,  # noqa: E402
                          stratified_indices, write_idx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=None, help="directory with the four full IDX files")
    ap.add_argument("--out", type=Path, default=ROOT / "autoqnn" / "datasets" / "fashion_mnist_subset")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args(argv)

    src = find_fashion_mnist(args.src)
    if src is None:
        ap.error("full Fashion-MNIST not found: install dataset-fashion-mnist or pass --src DIR")
    if src.resolve() == args.out.resolve():
        ap.error("--src and --out are the same directory")
    print(f"source: {src}")
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = _load_split(src, split)
        idx = stratified_indices(labels, 10 * per_class)
        counts = np.bincount(labels[idx], minlength=10)
        if not (counts == per_class).all():
            raise SystemExit(f"{split}: not {per_class} per class: {counts.tolist()}")
        for array, base in zip((images[idx], labels[idx]), FASHION_MNIST_FILES[split]):
            out = args.out / (base + ".gz")
            write_idx(out, array)
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            print(f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: "
                  f"{list(array.shape)} {out.stat().st_size} bytes sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
