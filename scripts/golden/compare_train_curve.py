#!/usr/bin/env python3
"""Compare a `bitnet train` metrics CSV with the PyTorch reference curve (standard library only).

    python3 scripts/golden/compare_train_curve.py f64 runs/ref64/metrics.csv [f32 runs/ref32/metrics.csv]

The reference is testdata/golden/train/reference.json (scripts/golden/make_train_golden.py:
transformers' BitNetForCausalLM, torch.optim.AdamW, 50 steps). For each run it prints the worst
relative difference of the loss, the learning rate and the gradient norm over the steps, and
PyTorch's own float32-against-float64 spread of the loss beside them; the exit status is 1 when
a float64 run's loss differs by more than 1e-9 or a float32 run's by more than twice that spread.
Used where `cargo test` cannot run: a CUDA build on the GPU machine (scripts/gpu/train-cuda.sh).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REF = Path(__file__).resolve().parents[2] / "testdata/golden/train/reference.json"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> int:
    args = sys.argv[1:]
    if not args or len(args) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    ref = json.loads(REF.read_text())["runs"]
    spread = max(rel(a, b) for a, b in zip(ref["f32"]["loss"], ref["f64"]["loss"]))
    ok = True
    for precision, path in zip(args[::2], args[1::2]):
        rows = list(csv.DictReader(open(path)))
        want = ref[precision]
        if len(rows) != len(want["loss"]):
            print(f"{path}: {len(rows)} steps, the reference has {len(want['loss'])}")
            ok = False
            continue
        worst = {
            k: max(rel(float(r[k]), w) for r, w in zip(rows, want[k]))
            for k in ("loss", "lr", "grad_norm")
        }
        limit = 1e-9 if precision == "f64" else 2 * spread
        good = worst["loss"] <= limit
        ok &= good
        print(
            f"{precision}: worst relative difference from PyTorch over {len(rows)} steps: "
            f"loss {worst['loss']:.3e}, lr {worst['lr']:.3e}, grad_norm {worst['grad_norm']:.3e} "
            f"(limit {limit:.1e}; PyTorch's own f32-vs-f64 loss spread {spread:.3e}) "
            f"{'ok' if good else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
