#!/usr/bin/env python3
"""PyTorch's training step time on the demo model's shape, beside `bitnet train`'s.

    python scripts/bench/train_step_torch.py [--threads 2] [--steps 6] [--float] [--device cuda]

Pinned stack: scripts/golden/requirements.txt. The model is transformers' BitNetForCausalLM with
the shape of scripts/train/shakespeare.toml (AutoBitLinear online quantization, as transformers
trains it, unless --float), the batch 32 rows of 128 random tokens, AdamW; it prints tokens/s
over the steps after the first two (warm-up; transformers compiles its quantizers on the first).
Compare with the tokens/s `bitnet train` prints for the same config on the same machine:

    target/release/bitnet train -c scripts/train/shakespeare.toml -o /tmp/probe --stop-after 8 --no-export
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, BitNetConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--float", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU run synchronizes per step)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cfg = BitNetConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="relu2",
    )
    if not args.float:
        cfg.quantization_config = {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        }
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        from transformers import BitNetForCausalLM

        plain = BitNetConfig(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
        BitNetForCausalLM(plain).save_pretrained(d)
        cfg.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    model.to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    b, t = 32, 128
    times = []
    for step in range(args.steps):
        rows = torch.randint(0, 4096, (b, t + 1)).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 4096), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[2:] or times
    per = sum(steady) / len(steady)
    kind = "float" if args.float else "ternary (AutoBitLinear)"
    print(
        f"torch {torch.__version__}, {kind}, {args.device} ({args.threads} threads): "
        f"{per:.3f} s/step, {b * t / per:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
