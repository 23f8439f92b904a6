#!/usr/bin/env python3
"""Export tiny-bitnet-c to ONNX, for the ONNX import tests.

    /opt/mlvenv/bin/python make_onnx_model.py [--out DIR]

Pinned stack: requirements.txt (torch, transformers) plus onnx (see requirements-onnx.txt).
Writes testdata/models/tiny-bitnet-c-onnx/:
  model.onnx        the graph, exported by torch.onnx's TorchScript exporter (dynamo=False), which
                    stores every Linear weight transposed for MatMul under a generated name
                    (onnx::MatMul_N) and names nodes by module path (/model/layers.0/mlp/up_proj/
                    MatMul): the case an importer has to work hardest for;
  model.onnx_data   every initializer, as external data (what exports over 2 GB must use);
  config.json       tiny-bitnet-c's, as optimum puts it beside the graph.

The exported network is BitNetForCausalLM with plain float linears (the float master weights of
testdata/models/tiny-bitnet-c-float, loaded without a quantization_config): an exporter traces
float graphs, and the ternarization is the converter's job (config.json keeps the online
quantization_config, so `bitnet convert` ternarizes exactly as for the safetensors directory).
The tests check that the ONNX directory converts to the same GGUF bytes as the safetensors one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import onnx
import safetensors.torch
import torch
from transformers import BitNetConfig, BitNetForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "testdata" / "models" / "tiny-bitnet-c-float"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "testdata" / "models" / "tiny-bitnet-c-onnx")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = json.loads((SRC / "config.json").read_text())
    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type")}
    model = BitNetForCausalLM(BitNetConfig(**plain)).eval()
    state = safetensors.torch.load_file(str(SRC / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    model.config.use_cache = False  # logits only: no cache outputs in the graph
    ids = torch.tensor([[3, 50, 100, 7, 64, 9, 1, 77]])
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            # An explicit all-ones mask keeps transformers off its packed-sequence detection
            # (torch.diff, which the TorchScript exporter cannot express).
            mask = torch.ones_like(ids)
            torch.onnx.export(model, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamo=False, opset_version=17)
        m = onnx.load(str(raw))
        for f in ("model.onnx", "model.onnx_data"):
            (args.out / f).unlink(missing_ok=True)
        onnx.save_model(m, str(args.out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
    shutil.copy(SRC / "config.json", args.out / "config.json")
    names = [t.name for t in onnx.load(str(args.out / "model.onnx"), load_external_data=False).graph.initializer]
    print(f"{len(names)} initializers, e.g. {names[:4]}")
    for f in sorted(args.out.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
