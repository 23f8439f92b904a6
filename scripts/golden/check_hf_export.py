#!/usr/bin/env python3
"""Check that transformers loads a `bitnet train` export and computes what our engine computes.

    python scripts/golden/check_hf_export.py RUN_DIR [--tokens 1,2,3,...]

RUN_DIR is a `bitnet train -o` directory: RUN_DIR/hf/ (config.json with quantization_mode online,
float masters, tokenizer) and RUN_DIR/model.gguf. Loads RUN_DIR/hf with transformers'
AutoModelForCausalLM (BitNetForCausalLM, AutoBitLinear online quantization), runs the tokens, runs
`bitnet logits` on the GGUF with the same tokens, and prints the largest difference relative to
the largest logit (the GGUF's embeddings are F16 unless the run exported F32). Exits 1 above 1e-2.
Pinned stack: requirements.txt. Needs target/release/bitnet (or BITNET=path).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--tokens", default="1,5,9,40,2,77,3,18,250,11")
    args = ap.parse_args()
    ids = [int(t) for t in args.tokens.split(",")]
    model = AutoModelForCausalLM.from_pretrained(args.run / "hf", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    bitnet = os.environ.get("BITNET", str(Path(__file__).resolve().parents[2] / "target/release/bitnet"))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.npy"
        subprocess.run(
            [bitnet, "logits", "-m", str(args.run / "model.gguf"), "--tokens", args.tokens, "-o", str(out)],
            check=True,
            capture_output=True,
        )
        ours = np.load(out)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    same_argmax = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{type(model).__name__}: max |ours - transformers| / max |logit| = {err:.2e}; "
          f"argmax agrees at {same_argmax:.0%} of {len(ids)} positions")
    sys.exit(0 if err < 1e-2 else 1)


if __name__ == "__main__":
    main()
