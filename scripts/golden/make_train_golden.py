#!/usr/bin/env python3
"""Reference quantization-aware training run for `bitnet train`, made with pinned PyTorch and
transformers (requirements.txt: torch, transformers, accelerate, safetensors, numpy).

    python make_train_golden.py [--out DIR]       # default <repo>/testdata/golden/train

The model is transformers' own BitNetForCausalLM loaded from testdata/models/tiny-bitnet-a-float
(float master weights, quantization_config autobitlinear/online): its linears are transformers'
AutoBitLinear, whose WeightQuant / ActQuant run the absmean ternary and per-token int8 forward
and pass the gradient straight through. The optimizer is torch.optim.AdamW (single-tensor path),
the clip torch.nn.utils.clip_grad_norm_, the schedule a LambdaLR with bitnet-train's formula
(linear warmup, then cosine to min_lr). Weight decay applies to parameters of rank >= 2.

Data: data.npy, int32 [rows, seq_len + 1] from a fixed random Markov chain over the vocabulary;
step s uses rows [s * batch, (s + 1) * batch) in order. Loss: mean next-token cross-entropy of the
last seq_len tokens of each row given the first seq_len.

Two runs of the same 50 steps:
    f32  transformers as shipped, float32 (its RMSNorm, rotary tables, attention softmax and
         BitLinear quantizers all compute in float32).
    f64  the same model code in float64 throughout: transformers computes a float64 model's
         RMSNorm, rotary tables, softmax and quantizers in float32 (`.float()` / `dtype=
         torch.float32`), so those five functions are replaced here by the same formulas in the
         input's dtype (see `exact_float64()`). Ternary training turns any rounding difference
         into flipped codes within a few steps, so only a run without float32 islands can be
         compared step by step to 1e-9; the f32 run shows what a user of transformers gets.
Written:
    reference.json          settings, versions, and per step: loss, lr, grad_norm
    grads_<dtype>.safetensors  every parameter's gradient at step 0 (before clipping), by name
The Rust test (crates/bitnet-train/tests/reference.rs) runs the same training from the same
files and compares with these.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

torch.set_num_threads(1)  # float sums depend on the thread count

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
INIT = REPO / "testdata/models/tiny-bitnet-a-float"

SETTINGS = dict(
    steps=50,
    batch_size=4,
    seq_len=32,
    lr=3e-3,
    min_lr=3e-4,
    weight_decay=0.1,
    betas=[0.9, 0.95],
    eps=1e-8,
    warmup=5,
    schedule="cosine",
    grad_clip=1.0,
)


def make_data(vocab: int) -> np.ndarray:
    """Rows of a random sparse Markov chain: each token has 4 likely successors."""
    rng = np.random.default_rng(1234)
    succ = rng.integers(0, vocab, size=(vocab, 4))
    rows = SETTINGS["steps"] * SETTINGS["batch_size"]
    width = SETTINGS["seq_len"] + 1
    out = np.zeros((rows, width), dtype=np.int32)
    for r in range(rows):
        t = int(rng.integers(0, vocab))
        for c in range(width):
            out[r, c] = t
            t = int(succ[t, rng.integers(0, 4)]) if rng.random() < 0.9 else int(rng.integers(0, vocab))
    return out


def exact_float64() -> None:
    """Make transformers' BitNet compute in the model's dtype where it casts to float32."""
    import transformers.integrations.bitnet as tb
    import transformers.models.bitnet.modeling_bitnet as mb

    def weight_quant(ctx, w):
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        return (w * scale).round().clamp(-1, 1) / scale

    def act_quant(ctx, x):
        scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        return (x * scale).round().clamp(-128, 127) / scale

    tb.WeightQuant.forward = staticmethod(weight_quant)
    tb.ActQuant.forward = staticmethod(act_quant)

    def rms_forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

    mb.BitNetRMSNorm.forward = rms_forward
    stock_eager = mb.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        k = mb.repeat_kv(key, module.num_key_value_groups)
        v = mb.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.nn.functional.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    assert stock_eager.__code__.co_varnames[:6] == eager.__code__.co_varnames[:6]
    mb.eager_attention_forward = eager

    @torch.no_grad()
    def rope_forward(self, x, position_ids):
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = cfg.rope_parameters["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    mb.BitNetRotaryEmbedding.forward = rope_forward


def lr_at(step: int) -> float:
    """bitnet-train's schedule (crates/bitnet-train/src/optim.rs), as a factor of lr."""
    s = SETTINGS
    if step < s["warmup"]:
        return (step + 1) / s["warmup"]
    span = max(s["steps"] - s["warmup"], 1)
    p = min(max((step - s["warmup"]) / span, 0.0), 1.0)
    lo = s["min_lr"] / s["lr"]
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


def run(dtype: torch.dtype, data: np.ndarray) -> tuple[dict, dict]:
    model = AutoModelForCausalLM.from_pretrained(INIT, dtype=dtype, attn_implementation="eager")
    model.to(dtype)
    model.train()
    named = [(n, p) for n, p in model.named_parameters()]
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    s = SETTINGS
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=s["lr"],
        betas=tuple(s["betas"]),
        eps=s["eps"],
        foreach=False,
        fused=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rows = torch.from_numpy(data.astype(np.int64))
    b = s["batch_size"]
    losses, lrs, norms = [], [], []
    grads0 = {}
    for step in range(s["steps"]):
        batch = rows[step * b : (step + 1) * b]
        inp, tgt = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads0 = {n: p.grad.detach().to(torch.float64).clone().contiguous() for n, p in named}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"], foreach=False)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        norms.append(float(norm))
    return {"loss": losses, "lr": lrs, "grad_norm": norms}, grads0


def versions() -> dict:
    """What made a golden file, recorded beside it."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "testdata/golden/train")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((INIT / "config.json").read_text())
    data = make_data(config["vocab_size"])
    np.save(args.out / "data.npy", data)
    result = {
        "settings": SETTINGS,
        "init": "testdata/models/tiny-bitnet-a-float",
        "versions": versions(),
        "runs": {},
    }
    for name, dtype in [("f32", torch.float32), ("f64", torch.float64)]:
        if name == "f64":
            exact_float64()
        torch.manual_seed(0)
        curves, grads = run(dtype, data)
        result["runs"][name] = curves
        safetensors.torch.save_file(grads, str(args.out / f"grads_{name}.safetensors"))
        print(name, "loss", curves["loss"][0], "->", curves["loss"][-1])
    (args.out / "reference.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
