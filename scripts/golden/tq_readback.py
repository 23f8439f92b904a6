#!/usr/bin/env python3
"""Read a ternary GGUF back with the PyPI `gguf` package and compare its BitLinear weights with
transformers' ternarized weights (golden/models/tiny-bitnet-c-ternary.npz, from
make_model_golden.py part C).

    tq_readback.py FILE.gguf GOLDEN.npz

Prints one JSON object: per tensor, the GGUF type, whether the codes (signs of the dequantized
values) equal transformers' codes, and the largest relative difference between a non-zero
dequantized value and transformers' magnitude (the file's scales are f16 for TQ types, so up to
2^-11 is rounding). Needs only gguf + numpy (requirements-ci.txt).
"""

import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def main() -> int:
    path, golden = sys.argv[1], sys.argv[2]
    gold = np.load(golden)
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    out = {}
    for key in sorted(k for k in gold.files if k.endswith(".codes")):
        hf = key[: -len(".codes")]
        layer = hf.split(".")[2]
        module = ".".join(hf.split(".")[3:])
        name = f"blk.{layer}.{HF_TO_GGUF[module]}.weight"
        t = tensors[name]
        deq = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(gold[key].shape)
        codes = np.sign(deq).astype(np.int8)
        value = float(gold[hf + ".value"][0])
        nz = deq[deq != 0]
        rel = float(np.max(np.abs(np.abs(nz) - value)) / value) if nz.size else 0.0
        out[name] = {
            "type": t.tensor_type.name,
            "codes_equal": bool(np.array_equal(codes, gold[key])),
            "max_rel": rel,
            "nonzero": int(nz.size),
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
