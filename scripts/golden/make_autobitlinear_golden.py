#!/usr/bin/env python3
"""tiny-bitnet-a as an offline AutoBitLinear checkpoint, and what transformers computes with it.

    python make_autobitlinear_golden.py [--out-root DIR] [--any-isa]

Pinned stack: requirements.txt (the same pins as make_model_golden.py, accelerate included).
Default output root: <repo>/testdata. Deterministic: two runs give byte-identical files.

Writes
  models/tiny-bitnet-a-autobitlinear/   config.json (tiny-bitnet-a's, with quantization_config
                                        {bitnet, autobitlinear, offline}) + model.safetensors: the 7
                                        linears per layer as uint8 [out/4, in] (pack_weights layout,
                                        byte-identical to tiny-bitnet-a-packed) and weight_scale =
                                        mean|W| (f32 [1], a MULTIPLIER: see below); embeddings and
                                        norms float32 as in tiny-bitnet-a-float.
  golden/models/tiny-bitnet-a-autobitlinear.safetensors
                                        ids, logits, per-layer x / xq / xs / y of every linear,
                                        hidden states, 16 greedy tokens with per-step logits and
                                        margins; metadata: facts (closed forms checked).

How transformers 5.23 runs this checkpoint (integrations/bitnet.py, quantizers/quantizer_bitnet.py):
  * replace_with_bitnet_linear makes AutoBitLinear(online_quant=False) modules: an nn.Linear with a
    float weight [out, in] plus a weight_scale buffer (f32 [1], initialised to ones).
  * BitNetHfQuantizer.get_load_operations returns BitNetDeserialize for autobitlinear+offline. It
    unpacks a stored weight whose rows * 4 == out_features with the (compiled) unpack_weights into
    float codes {-1, 0, 1}; a weight already [out, in] would be loaded as is.
  * AutoBitLinear.forward (offline): y = F.linear(ActQuant.apply(x), W) * weight_scale, where
    ActQuant(x) = round(x * xs).clamp(-128, 127) / xs (dequantized activations, xs = 127 / max|x|).
    weight_scale MULTIPLIES the output, so the value that matches the online model is mean|W|. This
    is the inverse of BitLinear's convention (bitlinear+offline divides: y / (xs * weight_scale),
    so there weight_scale = 1/mean|W|, as in tiny-bitnet-a-packed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

torch.set_num_threads(1)  # before anything else: float sums and Inductor kernels depend on it

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.bitnet import ActQuant, AutoBitLinear, pack_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import bits_equal, save_safetensors, sha256_file  # noqa: E402
from make_model_golden import (  # noqa: E402
    N_GEN,
    N_PROMPT,
    TINY_CONFIGS,
    Recorder,
    act_quant_eager,
    compare_f32,
    inductor_lanes,
    jdump,
    linear_weight_names,
    margins_of,
    metadata_base,
    ternarize_eager,
    tiny_weights,
    unpack_np,
)
from torch._inductor import cpu_vec_isa  # noqa: E402

F32 = np.float32
REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = "scripts/golden/make_autobitlinear_golden.py"
QCFG_AUTO_OFFLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
NAME = "tiny-bitnet-a-autobitlinear"

LAYOUT = {
    "ids": "int64 [12]: the input ids, the same as golden/models/tiny-bitnet-a-{float,packed}.safetensors",
    "<module>.x": "float32 [T, in]: the linear's input (= what goes into ActQuant; use_rms_norm is false)",
    "<module>.xq": "int8 [T, in]: activation codes clamp(round_half_even(x * xs), -128, 127)",
    "<module>.xs": "float32 [T, 1]: activation scale (a multiplier) 127 / max(max|x|, 1e-5), as (1/m)*127",
    "<module>.y": "float32 [T, out]: the layer output = F.linear(xq / xs, codes) * weight_scale (MKL sgemm)",
    "<module>.weight_scale": "float32 [1]: the checkpoint's weight_scale = mean|W| (eager ATen, 1 thread)",
    "embed": "float32 [T, hidden]: embedding output",
    "hidden.<i>": "float32 [T, hidden]: output of decoder layer i (before the final norm)",
    "final_norm": "float32 [T, hidden]: model.norm output",
    "logits": "float32 [T, vocab]: full forward (use_cache=False)",
    "gen.tokens": "int64 [16]: greedy tokens (generate, do_sample=False, use_cache=True)",
    "gen.logits": "float32 [16, vocab]: logits of each step (step 0 = prefill's last position)",
    "gen.margin": "float32 [16]: top1 - top2 of gen.logits per step",
}


def build_dir(spec: dict, models_dir: Path) -> tuple[Path, dict, dict]:
    """Write models/tiny-bitnet-a-autobitlinear from tiny-bitnet-a-float's weights.
    Returns (dir, saved tensors, per-linear {codes, mean, s})."""
    src = models_dir / "tiny-bitnet-a-float"
    w = safetensors.torch.load_file(str(src / "model.safetensors"))
    regen = tiny_weights(spec)  # the committed float file is what make_model_golden.py draws
    assert w.keys() == regen.keys() and all(bits_equal(w[k], regen[k]) for k in w), "float weights moved"
    packed_ref = safetensors.torch.load_file(str(models_dir / "tiny-bitnet-a-packed" / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = dict(QCFG_AUTO_OFFLINE)
    tensors = dict(w)
    info = {}
    for lin in linear_weight_names(spec):
        codes, mean, s = ternarize_eager(w[lin + ".weight"])
        packed = pack_weights(codes.clone())  # adds 1 in place: hand it a copy
        assert packed.dtype == torch.uint8 and packed.shape == (codes.shape[0] // 4, codes.shape[1])
        assert torch.equal(torch.from_numpy(unpack_np(packed.numpy())).float(), codes), lin
        # same bytes as tiny-bitnet-a-packed; only the scale convention differs
        assert torch.equal(packed, packed_ref[lin + ".weight"]), lin
        assert bits_equal(s, packed_ref[lin + ".weight_scale"]), lin
        tensors[lin + ".weight"] = packed
        tensors[lin + ".weight_scale"] = mean.clone()  # AutoBitLinear MULTIPLIES by it: mean|W|
        info[lin] = {"codes": codes, "mean": mean, "s": s}
    d = models_dir / NAME
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(jdump(cfg), encoding="utf-8")
    save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())}, d / "model.safetensors",
                     {"format": "pt"})
    return d, safetensors.torch.load_file(str(d / "model.safetensors")), info


def load_and_check(spec: dict, d: Path, saved: dict, info: dict) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    assert type(model).__name__ == "BitNetForCausalLM", type(model)
    q = model.config.quantization_config
    qd = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    assert qd["linear_class"] == "autobitlinear" and qd["quantization_mode"] == "offline", qd
    lins = set(linear_weight_names(spec))
    seen = 0
    for name, mod in model.named_modules():
        if name in lins:
            seen += 1
            assert type(mod) is AutoBitLinear, f"{name}: {type(mod).__name__}"
            assert mod.online_quant is False and mod.rms_norm is None and mod.bias is None, name
            assert mod.weight.dtype == torch.float32, (name, mod.weight.dtype)
            assert mod.weight.shape == info[name]["codes"].shape, name
            # BitNetDeserialize unpacked the uint8 rows to exactly the ternary codes; a zero code is
            # +0.0 (uint8 1 - 1), while the eager ternarization keeps -0.0 where w < 0 rounds to 0
            wl = mod.weight.detach()
            assert torch.equal(wl, info[name]["codes"]), f"{name}: weight != codes"
            assert not bool((torch.signbit(wl) & (wl == 0)).any()), f"{name}: -0.0 in the unpacked weight"
            assert mod.weight_scale.dtype == torch.float32 and mod.weight_scale.shape == (1,), name
            assert bits_equal(mod.weight_scale, saved[name + ".weight_scale"]), name
        elif isinstance(mod, AutoBitLinear):
            raise AssertionError(f"unexpected AutoBitLinear {name}")
    assert seen == len(lins), seen
    assert type(model.lm_head) is nn.Linear
    emb = model.model.embed_tokens.weight
    assert bits_equal(emb.detach(), saved["model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied
    for k, v in saved.items():
        if k.endswith("norm.weight"):
            assert bits_equal(model.get_parameter(k).detach(), v), k
    return model


def run(spec: dict, model: nn.Module, ids: torch.Tensor, info: dict) -> tuple[dict, dict]:
    rec = Recorder(model)
    T = ids.numel()
    with torch.no_grad():
        rec.on = True
        out = model(ids[None], use_cache=False)
        rec.on = False
    tensors: dict[str, torch.Tensor] = {"ids": ids.clone()}
    forms = {  # candidate closed forms from the integer dot, all in f32 with one rounding per op
        "f32(dot)/xs*ws": lambda dot, xs, ws: ((dot / xs).astype(F32) * ws).astype(F32),
        "f32(dot)*ws/xs": lambda dot, xs, ws: ((dot * ws).astype(F32) / xs).astype(F32),
        "f32(dot)*f32(ws/xs)": lambda dot, xs, ws: (dot * (ws / xs).astype(F32)).astype(F32),
        "f32(dot)/f32(xs/ws)": lambda dot, xs, ws: (dot / (xs / ws).astype(F32)).astype(F32),
        # the exact dot of the dequantized f32 operands (xq/xs rounded to f32) rounded once, then * ws
        "f32(exact(xdq . codes))*ws": None,
    }
    acc = {k: {"bit_identical": 0, "max_abs_diff": 0.0, "max_err_over_abs_sum_in_eps": 0.0} for k in forms}
    facts: dict = {"layers": {}}
    n_el = 0
    eager_differs = 0
    for name in linear_weight_names(spec):
        mod = model.get_submodule(name)
        x_in, y = rec.lin[name]
        x2, y2 = x_in[0], y[0]
        xq_f, xs = act_quant_eager(x2)
        xq = xq_f.to(torch.int8)
        x_dq = ActQuant.apply(x2)  # compiled, as AutoBitLinear.forward calls it
        assert bits_equal(x_dq, xq_f / xs), f"{name}: ActQuant != xq/xs"
        codes = mod.weight.detach()  # the unpacked codes as loaded (+0.0 for zero)
        ws = mod.weight_scale.detach()
        # the forward reproduced through torch: F.linear on the dequantized activations, then * ws
        assert bits_equal(F.linear(x_dq, codes) * ws, y2), f"{name}: y != F.linear(ActQuant(x), codes) * ws"
        dot = xq.numpy().astype(np.float64) @ codes.numpy().astype(np.float64).T  # exact integers
        assert np.all(np.abs(dot) < 2 ** 24)
        dot32 = dot.astype(F32)
        xs_np = xs.numpy().astype(F32)
        ws_np = ws.numpy().astype(F32)
        abs_sum = (np.abs(x_dq.numpy().astype(np.float64)) @ np.abs(codes.numpy().astype(np.float64)).T) \
            * float(ws_np[0])
        lf = {}
        for key, fn in forms.items():
            if fn is None:
                exact = x_dq.numpy().astype(np.float64) @ codes.numpy().astype(np.float64).T
                ref = (exact.astype(F32) * ws_np).astype(F32)
            else:
                ref = fn(dot32, xs_np, ws_np)
            c = compare_f32(y2.numpy(), ref, abs_sum)
            lf[key] = c
            a = acc[key]
            a["bit_identical"] += int(round(c["bit_identical_fraction"] * y2.numel()))
            a["max_abs_diff"] = max(a["max_abs_diff"], c["max_abs_diff"])
            a["max_err_over_abs_sum_in_eps"] = max(a["max_err_over_abs_sum_in_eps"], c["max_err_over_abs_sum_in_eps"])
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            y_eager = mod(x_in)[0]
        dd = int((y_eager.view(torch.int32) != y2.view(torch.int32)).sum())
        lf["elements_differing_from_eager_path"] = dd
        eager_differs += dd
        n_el += y2.numel()
        tensors[f"{name}.x"] = x2.contiguous()
        tensors[f"{name}.xq"] = xq.contiguous()
        tensors[f"{name}.xs"] = xs.contiguous()
        tensors[f"{name}.y"] = y2.contiguous()
        tensors[f"{name}.weight_scale"] = ws.clone().contiguous()
        facts["layers"][name] = lf
    tensors["logits"] = out.logits[0].contiguous()
    tensors["embed"] = rec.hidden["embed"][0].contiguous()
    for i in range(spec["num_hidden_layers"]):
        tensors[f"hidden.{i}"] = rec.hidden[f"hidden.{i}"][0].contiguous()
    tensors["final_norm"] = rec.hidden["final_norm"][0].contiguous()
    rec.remove()
    with torch.no_grad():
        g = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                           max_new_tokens=N_GEN, min_new_tokens=N_GEN, use_cache=True, output_logits=True,
                           return_dict_in_generate=True, eos_token_id=None, pad_token_id=None)
        gen = g.sequences[0, T:].clone()
        step_logits = torch.stack([s[0] for s in g.logits]).contiguous()
        assert gen.numel() == N_GEN and torch.equal(step_logits.argmax(-1), gen)
        full = model(g.sequences[:, :-1], use_cache=False).logits[0, T - 1:]
    tensors["gen.tokens"] = gen
    tensors["gen.logits"] = step_logits
    tensors["gen.margin"] = margins_of(step_logits)
    for key, a in acc.items():
        a["bit_identical_fraction"] = a.pop("bit_identical") / n_el
    facts["closed_forms_vs_y"] = acc
    facts["closed_forms_note"] = (
        "dot = sum_k xq[t,k] * code[o,k] (exact integer, |dot| < 2^24); xs = per-token activation scale "
        "(multiplier); ws = weight_scale = mean|W|. y itself is F.linear(xq/xs, codes) * ws: MKL sgemm over "
        "the dequantized (non-integer) activations, then one f32 multiply, so no closed form from the integer "
        "dot is bit-exact in general. max_err_over_abs_sum_in_eps = max |y - ref| / (ws * sum_k |xdq_k * code_k|) "
        "in units of 2^-23.")
    facts["y_equals_F.linear(ActQuant(x), codes)*weight_scale"] = True  # asserted per layer
    facts["unpacked_weight_zero_sign"] = "+0.0 (unpack_weights computes uint8 code+1 -> float, minus 1)"
    facts["elements_differing_compiled_vs_eager_path"] = eager_differs
    facts["output_elements_checked"] = n_el
    facts["gen_step0_max_abs_diff_vs_forward_last"] = float((step_logits[0] - tensors["logits"][-1]).abs().max())
    facts["gen_cached_vs_full_recompute_max_abs_diff"] = float((step_logits - full).abs().max())
    facts["gen_cached_vs_full_recompute_same_argmax"] = bool(torch.equal(full.argmax(-1), gen))
    facts["attn_implementation"] = model.config._attn_implementation
    return tensors, facts


def compare_with_existing(spec: dict, tensors: dict, gold_dir: Path) -> dict:
    """Against golden/models/tiny-bitnet-a-{float,packed}.safetensors (same ids, same codes)."""
    res = {}
    for form in ("float", "packed"):
        p = gold_dir / f"{spec['name']}-{form}.safetensors"
        g = safetensors.torch.load_file(str(p))
        assert torch.equal(g["ids"], tensors["ids"]), f"ids differ from {p.name}"
        xq_mis = {}
        for lin in linear_weight_names(spec):
            n = int((g[f"{lin}.xq"] != tensors[f"{lin}.xq"]).sum())
            if n:
                xq_mis[lin] = n
        res[form] = {
            "max_abs_logits_diff": float((g["logits"] - tensors["logits"]).abs().max()),
            "greedy": g["gen.tokens"].tolist(),
            "greedy_agree": bool(torch.equal(g["gen.tokens"], tensors["gen.tokens"])),
            "activation_code_mismatches": xq_mis,
            "max_abs_y_diff": max(float((g[f"{lin}.y"] - tensors[f"{lin}.y"]).abs().max())
                                  for lin in linear_weight_names(spec)),
        }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO_ROOT / "testdata")
    ap.add_argument("--any-isa", action="store_true", help="allow an Inductor vector ISA other than AVX-512")
    args = ap.parse_args()
    assert torch.get_num_threads() == 1
    lanes = inductor_lanes()
    if lanes != 16 and not args.any_isa:
        print(f"error: Inductor picked {cpu_vec_isa.pick_vec_isa()} ({lanes} float lanes); the committed "
              "goldens were made with AVX-512 (16 lanes). Use an AVX-512 machine or pass --any-isa.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    spec = next(s for s in TINY_CONFIGS if s["name"] == "tiny-bitnet-a")
    models_dir = args.out_root / "models"
    gold_dir = args.out_root / "golden" / "models"
    d, saved, info = build_dir(spec, models_dir)
    model = load_and_check(spec, d, saved, info)
    rng = np.random.default_rng(spec["seed"] + 1)  # the draw make_model_golden.py uses for its ids
    ids = torch.from_numpy(rng.integers(0, spec["vocab_size"], N_PROMPT).astype(np.int64))
    tensors, facts = run(spec, model, ids, info)
    facts["vs_existing_goldens"] = compare_with_existing(spec, tensors, gold_dir)
    facts["weight_scale_convention"] = (
        "AutoBitLinear (offline) computes F.linear(ActQuant(x), W) * weight_scale, so weight_scale = mean|W| "
        "(= max(mean|W|, 1e-5), eager ATen, one thread); BitLinear divides by (xs * weight_scale), so "
        "tiny-bitnet-a-packed stores 1/mean|W|. The packed uint8 bytes of both checkpoints are identical.")
    facts["load_path"] = (
        "BitNetHfQuantizer.get_load_operations -> BitNetDeserialize (autobitlinear+offline only): a stored "
        "weight with rows*4 == out_features is unpacked by the compiled unpack_weights to float32 codes; "
        "weight_scale is loaded into AutoBitLinear's f32 [1] buffer. lm_head stays a plain nn.Linear "
        "tied to embed_tokens.")
    md = metadata_base()
    md["generator"] = GENERATOR
    md["model"] = NAME
    md["model_dir"] = f"testdata/models/{NAME}"
    md["model_dir_sha256"] = sha256_file(d / "model.safetensors")
    md["layout"] = json.dumps(LAYOUT, sort_keys=True)
    md["facts"] = json.dumps(facts, sort_keys=True)
    md["ids"] = json.dumps(ids.tolist())
    md["quant_path"] = ("compiled: transformers' @torch.compile'd ActQuant and (at load) unpack_weights, "
                        "TorchInductor C++, torch_threads=1")
    gold = gold_dir / f"{NAME}.safetensors"
    save_safetensors(tensors, gold, md)
    cf = facts["closed_forms_vs_y"]
    print(json.dumps({"closed_forms_vs_y": cf, "vs_existing": facts["vs_existing_goldens"],
                      "eager_differs": facts["elements_differing_compiled_vs_eager_path"],
                      "gen": tensors["gen.tokens"].tolist(),
                      "min_margin": float(tensors["gen.margin"].min())}, indent=1))
    for p in sorted(d.iterdir()) + [gold]:
        print(f"{p.stat().st_size:>9}  {sha256_file(p)[:16]}  {p.relative_to(args.out_root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
