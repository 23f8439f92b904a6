#!/usr/bin/env python3
"""Reference distillation run for `bitnet train` with a teacher (crates/bitnet-train/src/distill.rs),
made with the pins of requirements.txt and the model, data and f64 setup of make_train_golden.py.

    python make_distill_golden.py [--out DIR]     # default <repo>/testdata/golden/train

The student is transformers' BitNetForCausalLM from testdata/models/tiny-bitnet-a-float, in float64
throughout (make_train_golden.exact_float64). The teacher is a fixed function of the input tokens,
so that the Rust test can compute the same logits without a file: for row r, position p (0-based)
and vocabulary entry v, with x[p] the input token and x[-1] = 0,

    k = (31 * x[p] + 17 * v + 7 * x[p - 1] + 3 * p) mod 97
    teacher[r, p, v] = float32(k / 97 * 8 - 4)

(integer arithmetic, one float64 division and product, rounded to float32 as an engine's logits are).
The objective is

    loss = alpha * T**2 * kl_div(log_softmax(student / T), log_softmax(teacher / T),
                                 reduction="batchmean", log_target=True)
         + (1 - alpha) * cross_entropy(student, next tokens)

over [positions, vocab], with AdamW, clipping and the schedule of make_train_golden.py.
Written:
    distill.json                   settings, versions, and per step: loss, ce, kl, lr, grad_norm
    distill_grads_f64.safetensors  every parameter's gradient at step 0 (before clipping)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_train_golden as mtg  # noqa: E402  (sets the thread count and env first)
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

DISTILL = dict(steps=20, alpha=0.7, temperature=2.0)


def teacher_logits(inp: np.ndarray, vocab: int) -> torch.Tensor:
    """The formula above, for input tokens [rows, seq]."""
    rows, seq = inp.shape
    x = inp.astype(np.int64)
    prev = np.concatenate([np.zeros((rows, 1), dtype=np.int64), x[:, :-1]], axis=1)
    p = np.arange(seq, dtype=np.int64)[None, :, None]
    v = np.arange(vocab, dtype=np.int64)[None, None, :]
    k = (31 * x[:, :, None] + 17 * v + 7 * prev[:, :, None] + 3 * p) % 97
    t = (k.astype(np.float64) / 97.0 * 8.0 - 4.0).astype(np.float32)
    return torch.from_numpy(t.astype(np.float64))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=mtg.REPO / "testdata/golden/train")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((mtg.INIT / "config.json").read_text())
    vocab = config["vocab_size"]
    data = mtg.make_data(vocab)
    assert (args.out / "data.npy").exists() and np.array_equal(np.load(args.out / "data.npy"), data)
    mtg.exact_float64()
    torch.manual_seed(0)
    dtype = torch.float64
    model = AutoModelForCausalLM.from_pretrained(mtg.INIT, dtype=dtype, attn_implementation="eager")
    model.to(dtype)
    model.train()
    named = list(model.named_parameters())
    s = mtg.SETTINGS
    opt = torch.optim.AdamW(
        [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": s["weight_decay"]},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=s["lr"],
        betas=tuple(s["betas"]),
        eps=s["eps"],
        foreach=False,
        fused=False,
    )
    # The schedule of the 50-step reference (the Rust test keeps train.steps = 50 and stops
    # after DISTILL["steps"]), so the learning rates are those of its first steps.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, mtg.lr_at)
    alpha, temp = DISTILL["alpha"], DISTILL["temperature"]
    b = s["batch_size"]
    curve = {"loss": [], "ce": [], "kl": [], "lr": [], "grad_norm": []}
    grads0 = {}
    for step in range(DISTILL["steps"]):
        batch = data[step * b : (step + 1) * b]
        inp = torch.from_numpy(batch[:, :-1].astype(np.int64))
        tgt = torch.from_numpy(batch[:, 1:].astype(np.int64))
        logits = model(input_ids=inp).logits.reshape(-1, vocab)
        teacher = teacher_logits(batch[:, :-1], vocab).reshape(-1, vocab)
        ce = F.cross_entropy(logits, tgt.reshape(-1))
        kl = F.kl_div(
            F.log_softmax(logits / temp, dim=-1),
            F.log_softmax(teacher / temp, dim=-1),
            reduction="batchmean",
            log_target=True,
        ) * (temp * temp)
        loss = alpha * kl + (1 - alpha) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads0 = {n: p.grad.detach().clone().contiguous() for n, p in named}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"], foreach=False)
        curve["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        curve["loss"].append(loss.item())
        curve["ce"].append(ce.item())
        curve["kl"].append(kl.item())
        curve["grad_norm"].append(float(norm))
    safetensors.torch.save_file(grads0, str(args.out / "distill_grads_f64.safetensors"))
    result = {
        "settings": {**s, **DISTILL},
        "init": "testdata/models/tiny-bitnet-a-float",
        "versions": mtg.versions(),
        "f64": curve,
    }
    (args.out / "distill.json").write_text(json.dumps(result, indent=1) + "\n")
    print("loss", curve["loss"][0], "->", curve["loss"][-1], "kl", curve["kl"][0], "->", curve["kl"][-1])


if __name__ == "__main__":
    main()
