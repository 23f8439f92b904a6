#!/usr/bin/env python3
"""Golden model outputs for the inference engine, made with pinned Hugging Face transformers.

    python make_model_golden.py [--out-root DIR] [--smollm2 PATH_TO_GGUF] [--any-isa]

Pinned stack: requirements.txt (the same pins as make_golden.py, plus accelerate, which transformers
insists on before it loads a BitNet-quantized checkpoint). Default output root: <repo>/testdata.
Deterministic: two runs give byte-identical files (same kind of CPU; see README.md).

A. Tiny random BitNet b1.58 models (BitNetForCausalLM, float32), each saved twice:
     models/<name>-float/   float master weights, quantization_config autobitlinear/online
                            (transformers ternarizes at every forward: AutoBitLinear, online_quant)
     models/<name>-packed/  the same weights ternarized (absmean, eager) and packed with
                            transformers' pack_weights into uint8 [out/4, in] + weight_scale = 1/mean|W|,
                            quantization_config bitlinear/offline (the microsoft/bitnet-b1.58-2B-4T layout)
   and for each form golden/models/<name>-<form>.safetensors: every BitLinear's input, int8
   activation codes, per-token activation scale and output; logits; hidden states; 16 greedy tokens
   with per-step logits and top-2 margins. golden/models/summary.json: float-vs-packed spread and the
   formulas verified.
C. tiny-bitnet-c: a float-master BitNet with TQ-sized rows (hidden 256, intermediate 256, 1 layer):
     models/tiny-bitnet-c-float/ and golden/models/tiny-bitnet-c-ternary.npz: for every BitLinear,
     transformers' ternarized weight as AutoBitLinear computes it (compiled WeightQuant), split into
     codes (int8) and the one magnitude of its non-zero entries. TQ2_0 / TQ1_0 files converted from
     the directory are read back with gguf-py (scripts/golden/tq_readback.py) and compared to these.
B. SmolLM2-135M-Instruct from its Q4_1 GGUF (only with --smollm2):
     golden/smollm2/model_golden.safetensors + model_golden.json: chat prompt ids and logits, 32
     greedy tokens, hidden states, a plain-text prompt's logits, and the llama.cpp-style perplexity of
     testdata/text/tiny.txt with n_ctx = 128.

Everything runs with torch.set_num_threads(1), and transformers' BitNet quantization functions run
compiled (@torch.compile, TorchInductor C++), exactly as transformers calls them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader draws a tqdm bar

import torch

torch.set_num_threads(1)  # before anything else: float sums and Inductor kernels depend on it

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitNetConfig  # noqa: E402
from transformers.integrations.bitnet import (  # noqa: E402
    ActQuant,
    AutoBitLinear,
    BitLinear,
    WeightQuant,
    pack_weights,
    unpack_weights,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import (  # noqa: E402  (shared helpers; importing sets the dynamo recompile limits)
    bits_equal,
    common_metadata,
    inductor_lanes,
    inductor_mean_abs_clamped,
    pkg_version,
    save_safetensors,
    sha256_file,
)

import torch._dynamo  # noqa: E402
from torch._inductor import cpu_vec_isa  # noqa: E402

# make_golden.py raises these too; repeated here so this script does not depend on import order.
torch._dynamo.config.recompile_limit = 1000
torch._dynamo.config.accumulated_recompile_limit = 100000

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

F32 = np.float32
REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = "scripts/golden/make_model_golden.py"

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm")

QCFG_FLOAT = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
QCFG_PACKED = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}

TINY_CONFIGS = [
    {
        "name": "tiny-bitnet-a", "seed": 0xB17_0A, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 250,
        "tie_word_embeddings": True,
        # config.json in the older hand-written style of microsoft/bitnet-b1.58-2B-4T:
        # top-level "rope_theta" and "torch_dtype"
        "config_style": "legacy",
    },
    {
        "name": "tiny-bitnet-b", "seed": 0xB17_0B, "hidden_size": 96, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 317,
        "tie_word_embeddings": False,
        # config.json as transformers 5.23 writes it: "rope_parameters" and "dtype"
        "config_style": "transformers",
    },
]
TINY_COMMON = {"hidden_act": "relu2", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0}
# init scales (std of N(0, std^2)); norms are 1 + NORM_NOISE * N(0, 1)
# Chosen so that the models do something non-trivial: with embeddings at std 1 the residual stream is
# mostly the input embedding and the tied model just repeats one token; q/k at 0.3 make attention
# position-dependent (not uniform), o/down at 0.15 let the layers dominate the residual stream.
STD = {"embed": 0.3, "q_proj": 0.3, "k_proj": 0.3, "v_proj": 0.05, "o_proj": 0.15,
       "gate_proj": 0.05, "up_proj": 0.05, "down_proj": 0.15, "lm_head": 0.2}
NORM_NOISE = 0.1
N_PROMPT = 12
N_GEN = 16


def metadata_base() -> dict[str, str]:
    md = common_metadata()
    md["generator"] = GENERATOR
    md["accelerate"] = pkg_version("accelerate")
    md["tokenizers"] = pkg_version("tokenizers")
    return md


def jdump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def compare_f32(y: np.ndarray, ref: np.ndarray, abs_sum: np.ndarray) -> dict:
    """How far float32 y is from a reference: share of bit-identical elements, max |y - ref|, and the
    max of |y - ref| / sum_k |x_k w_k| in units of float32 epsilon (2^-23), the natural scale of a
    float32 dot product's rounding error (ulps are useless where the sum cancels to near zero)."""
    same = y.view(np.int32) == np.ascontiguousarray(ref, dtype=F32).view(np.int32)
    err = np.abs(y.astype(np.float64) - ref.astype(np.float64))
    rel = err / np.maximum(abs_sum, np.finfo(np.float64).tiny)
    return {"bit_identical_fraction": float(same.mean()), "max_abs_diff": float(err.max()),
            "max_err_over_abs_sum_in_eps": float(rel.max() / 2.0 ** -23)}


def margins_of(step_logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(step_logits, 2, dim=-1).values
    return (top[:, 0] - top[:, 1]).contiguous()


# ============================================================================================
# A. tiny BitNet models
# ============================================================================================

def tiny_config_dict(spec: dict, form: str) -> dict:
    """config.json contents for one form. Both styles are checked to parse to the same config."""
    qcfg = QCFG_FLOAT if form == "float" else QCFG_PACKED
    base = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "vocab_size": spec["vocab_size"],
        "tie_word_embeddings": spec["tie_word_embeddings"],
        "hidden_act": TINY_COMMON["hidden_act"],
        "max_position_embeddings": TINY_COMMON["max_position_embeddings"],
        "rms_norm_eps": TINY_COMMON["rms_norm_eps"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if spec["config_style"] == "legacy":
        d = dict(base)
        d["rope_theta"] = TINY_COMMON["rope_theta"]
        d["torch_dtype"] = "float32"
        d["quantization_config"] = dict(qcfg)
        return d
    cfg = BitNetConfig(**{k: v for k, v in base.items() if k not in ("architectures", "model_type")},
                       rope_parameters={"rope_type": "default", "rope_theta": TINY_COMMON["rope_theta"]})
    d = json.loads(cfg.to_json_string(use_diff=True))  # what save_pretrained writes
    d["architectures"] = ["BitNetForCausalLM"]
    d["dtype"] = "float32"
    d["quantization_config"] = dict(qcfg)
    d.pop("transformers_version", None)  # keep the file free of the generating version
    return d


def tiny_weights(spec: dict) -> dict[str, torch.Tensor]:
    """Seeded float32 master weights, HF names. Tied models have no lm_head.weight."""
    rng = np.random.default_rng(spec["seed"])
    h, i, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    nh, nkv = spec["num_attention_heads"], spec["num_key_value_heads"]
    hd = h // nh
    w: dict[str, np.ndarray] = {}

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(F32)

    def norm(n):
        return (1.0 + NORM_NOISE * rng.standard_normal(n)).astype(F32)

    w["model.embed_tokens.weight"] = normal((v, h), STD["embed"])
    shapes = {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h),
              "self_attn.v_proj": (nkv * hd, h), "self_attn.o_proj": (h, nh * hd),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    norm_sizes = {"input_layernorm": h, "post_attention_layernorm": h,
                  "self_attn.attn_sub_norm": h, "mlp.ffn_sub_norm": i}
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name in LINEAR_NAMES:
            w[p + name + ".weight"] = normal(shapes[name], STD[name.split(".")[1]])
        for name in NORM_NAMES:
            w[p + name + ".weight"] = norm(norm_sizes[name])
    w["model.norm.weight"] = norm(h)
    if not spec["tie_word_embeddings"]:
        w["lm_head.weight"] = normal((v, h), STD["lm_head"])
    return {k: torch.from_numpy(a) for k, a in w.items()}


def linear_weight_names(spec: dict) -> list[str]:
    return [f"model.layers.{layer}.{n}" for layer in range(spec["num_hidden_layers"]) for n in LINEAR_NAMES]


def ternarize_eager(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two lines of WeightQuant.forward, run with eager ATen kernels (one thread):
    mean = max(mean|W|, 1e-5), s = 1/mean (float32 division), codes = clamp(round_half_even(W*s), -1, 1).
    Returns (codes as float32, mean [1], s [1])."""
    mean = w.abs().mean().clamp_(min=1e-5)
    s = 1.0 / mean
    codes = (w * s).round().clamp(-1, 1)
    return codes, mean.reshape(1).clone(), s.reshape(1).clone()


def unpack_np(packed: np.ndarray) -> np.ndarray:
    """Independent unpack of transformers' layout: bits 2i+1:2i of packed[r, c] hold row i*R + r
    (R = out/4) as code + 1."""
    r = packed.shape[0]
    out = np.zeros((4 * r, packed.shape[1]), dtype=np.int8)
    for i in range(4):
        out[i * r:(i + 1) * r] = ((packed >> (2 * i)) & 3).astype(np.int8) - 1
    return out


def write_model_dir(d: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(jdump(config), encoding="utf-8")
    save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())}, d / "model.safetensors",
                     {"format": "pt"})


def build_tiny_dirs(spec: dict, models_dir: Path) -> dict:
    """Write <name>-float and <name>-packed; returns the float weights, codes and scales."""
    w = tiny_weights(spec)
    float_dir = models_dir / f"{spec['name']}-float"
    packed_dir = models_dir / f"{spec['name']}-packed"
    write_model_dir(float_dir, tiny_config_dict(spec, "float"), w)

    packed_tensors = {k: v for k, v in w.items()}
    codes_all, scale_all = {}, {}
    for lin in linear_weight_names(spec):
        codes, mean, s = ternarize_eager(w[lin + ".weight"])
        packed = pack_weights(codes.clone())  # pack_weights adds 1 in place: hand it a copy
        assert packed.dtype == torch.uint8 and packed.shape == (codes.shape[0] // 4, codes.shape[1])
        assert torch.equal(torch.from_numpy(unpack_np(packed.numpy())).float(), codes), lin
        assert torch.equal(unpack_weights(packed, dtype=torch.float32), codes), lin  # compiled unpack
        packed_tensors[lin + ".weight"] = packed
        packed_tensors[lin + ".weight_scale"] = s  # BitLinear divides by it: store 1/mean|W|
        codes_all[lin] = codes.to(torch.int8)
        scale_all[lin] = (mean, s)
    write_model_dir(packed_dir, tiny_config_dict(spec, "packed"), packed_tensors)
    return {"weights": w, "codes": codes_all, "scales": scale_all,
            "dirs": {"float": float_dir, "packed": packed_dir}}


def load_and_check(spec: dict, form: str, d: Path, saved: dict[str, torch.Tensor]) -> nn.Module:
    """from_pretrained(dir, dtype=float32) and check the layer classes, the config and the weights."""
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    cfg = model.config
    assert type(model).__name__ == "BitNetForCausalLM", type(model)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": TINY_COMMON["rope_theta"]}, \
        cfg.rope_parameters
    assert cfg.hidden_act == "relu2" and cfg.rms_norm_eps == TINY_COMMON["rms_norm_eps"]
    assert cfg.tie_word_embeddings == spec["tie_word_embeddings"]
    cls = AutoBitLinear if form == "float" else BitLinear
    lins = set(linear_weight_names(spec))
    for name, mod in model.named_modules():
        if name in lins:
            assert type(mod) is cls, f"{d.name}: {name} is {type(mod).__name__}, expected {cls.__name__}"
            assert mod.rms_norm is None, name
            if form == "float":
                assert mod.online_quant is True, name
                assert bits_equal(mod.weight.detach(), saved[name + ".weight"]), name
            else:
                assert mod.weight.dtype == torch.uint8, name
                assert torch.equal(mod.weight, saved[name + ".weight"]), name
                assert mod.weight_scale.dtype == torch.float32, name
                assert bits_equal(mod.weight_scale, saved[name + ".weight_scale"]), name
        elif isinstance(mod, (AutoBitLinear, BitLinear)):
            raise AssertionError(f"{d.name}: unexpected quantized module {name}")
    assert type(model.lm_head) is nn.Linear, type(model.lm_head)
    assert model.lm_head.weight.dtype == torch.float32
    emb = model.model.embed_tokens.weight
    assert bits_equal(emb.detach(), saved["model.embed_tokens.weight"])
    if spec["tie_word_embeddings"]:
        assert model.lm_head.weight is emb or model.lm_head.weight.data_ptr() == emb.data_ptr()
    else:
        assert bits_equal(model.lm_head.weight.detach(), saved["lm_head.weight"])
    for k, v in saved.items():
        if k.endswith("norm.weight"):
            assert bits_equal(model.get_parameter(k).detach(), v), k
    return model


class Recorder:
    """Forward hooks on every BitLinear/AutoBitLinear, the embedding, each decoder layer and the
    final norm; active only while `on`."""

    def __init__(self, model: nn.Module):
        self.on = False
        self.lin: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hidden: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, (AutoBitLinear, BitLinear)):
                self.handles.append(mod.register_forward_hook(self._lin_hook(name)))
        inner = model.model
        self.handles.append(inner.embed_tokens.register_forward_hook(self._hid_hook("embed")))
        for i, layer in enumerate(inner.layers):
            self.handles.append(layer.register_forward_hook(self._hid_hook(f"hidden.{i}")))
        self.handles.append(inner.norm.register_forward_hook(self._hid_hook("final_norm")))

    def _lin_hook(self, name):
        def hook(mod, args, out):
            if self.on:
                self.lin[name] = (args[0].detach().clone(), out.detach().clone())
        return hook

    def _hid_hook(self, name):
        def hook(mod, args, out):
            if self.on:
                t = out[0] if isinstance(out, tuple) else out
                self.hidden[name] = t.detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def act_quant_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ActQuant / BitLinear.activation_quant written out eagerly: s = 127 / max(max|x|, 1e-5) per
    row (ATen computes (1/m)*127), codes = clamp(round_half_even(x*s), -128, 127). The codes are
    returned as float32 (keeping -0.0, which ActQuant's q / s also keeps)."""
    s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    q = (x * s).round().clamp(-128, 127)
    return q, s


def run_tiny_form(spec: dict, form: str, model: nn.Module, ids: torch.Tensor, built: dict) -> tuple[dict, dict]:
    """One forward pass with hooks, then greedy generation. Returns (tensors, facts)."""
    rec = Recorder(model)
    T = ids.numel()
    with torch.no_grad():
        rec.on = True
        out = model(ids[None], output_hidden_states=True, use_cache=False)
        rec.on = False
    tensors: dict[str, torch.Tensor] = {"ids": ids.clone()}
    facts: dict = {"layers": {}}
    lanes = inductor_lanes()
    all_packed_exact = True
    packed_alt = {"y_times_reciprocal_denom": True, "y_div_ws_then_div_xs": True}
    float_cmp = {k: {"bit_identical": 0.0, "max_abs_diff": 0.0, "max_err_over_abs_sum_in_eps": 0.0}
                 for k in ("a", "b")}
    eager_differs = 0
    n_el = 0
    for name in linear_weight_names(spec):
        mod = model.get_submodule(name)
        x_in, y = rec.lin[name]
        x = mod.rms_norm(x_in) if mod.rms_norm is not None else x_in  # what goes into activation quant
        x2, y2 = x[0], y[0]
        xq_f, xs = act_quant_eager(x2)
        xq = xq_f.to(torch.int8)
        lf: dict = {}
        if form == "packed":
            # the layer's own (compiled) activation_quant
            xq_c, xs_c = mod.activation_quant(x2)
            assert torch.equal(xq_c, xq) and bits_equal(xs_c, xs), f"{name}: activation_quant != eager"
            codes = unpack_np(mod.weight.numpy()).astype(np.float64)
            assert np.array_equal(codes, built["codes"][name].numpy().astype(np.float64))
            dot = xq.numpy().astype(np.float64) @ codes.T  # exact integers
            assert np.all(np.abs(dot) < 2 ** 24)
            ws = mod.weight_scale.numpy().astype(F32)  # [1]
            denom = (ws * xs.numpy()).astype(F32)      # (weight_scale * input_scale) rounded to f32
            y_ref = (dot.astype(F32) / denom).astype(F32)
            exact = bool(np.array_equal(y_ref.view(np.int32), y2.numpy().view(np.int32)))
            all_packed_exact &= exact
            alt1 = (dot.astype(F32) * (F32(1.0) / denom).astype(F32)).astype(F32)
            alt2 = ((dot.astype(F32) / ws).astype(F32) / xs.numpy()).astype(F32)
            packed_alt["y_times_reciprocal_denom"] &= bool(np.array_equal(alt1.view(np.int32), y2.numpy().view(np.int32)))
            packed_alt["y_div_ws_then_div_xs"] &= bool(np.array_equal(alt2.view(np.int32), y2.numpy().view(np.int32)))
            lf["y_equals_dot_div_f32(ws*xs)"] = exact
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                y_eager = mod(x_in)[0]
            d = int((y_eager.view(torch.int32) != y2.view(torch.int32)).sum())
            lf["elements_differing_from_eager_path"] = d
            eager_differs += d
        else:
            w = mod.weight.detach()
            w_dq = WeightQuant.apply(w)  # compiled, as in AutoBitLinear.forward
            x_dq = ActQuant.apply(x2)    # compiled
            assert bits_equal(x_dq, xq_f / xs), f"{name}: ActQuant != codes/scale"
            assert bits_equal(F.linear(x_dq, w_dq), y2), f"{name}: y != F.linear(ActQuant(x), WeightQuant(W))"
            mean_c = torch.tensor(inductor_mean_abs_clamped(w.numpy(), lanes), dtype=torch.float32)
            s_c = 1.0 / mean_c
            codes_c = (w * s_c).round().clamp(-1, 1)
            assert bits_equal(codes_c / s_c, w_dq), f"{name}: Inductor-model scale does not reproduce WeightQuant"
            codes_e = built["codes"][name].float()
            mean_e, s_e = built["scales"][name]
            lf["codes_compiled_vs_eager_differ"] = int((codes_c != codes_e).sum())
            lf["mean_compiled_differs_from_eager"] = not bits_equal(mean_c.reshape(1), mean_e)
            tensors[f"{name}.wmean_compiled"] = mean_c.reshape(1).clone()
            tensors[f"{name}.wmean_eager"] = mean_e.clone()
            # candidate closed forms for the online output
            xd = x_dq.numpy().astype(np.float64)
            wd = w_dq.numpy().astype(np.float64)
            abs_sum = np.abs(xd) @ np.abs(wd).T
            y_a = (xd @ wd.T).astype(F32)  # exact dot of the dequantized f32 operands, rounded once
            dot = xq.numpy().astype(np.float64) @ codes_c.numpy().astype(np.float64).T
            denom = (s_c.numpy().astype(F32) * xs.numpy()).astype(F32)
            y_b = (dot.astype(F32) / denom).astype(F32)  # the packed formula with the compiled scale
            ca, cb = compare_f32(y2.numpy(), y_a, abs_sum), compare_f32(y2.numpy(), y_b, abs_sum)
            lf["vs_exact_dot_of_dequant"] = ca
            lf["vs_int_dot_div_f32(s_c*xs)"] = cb
            for key, c in (("a", ca), ("b", cb)):
                acc = float_cmp[key]
                acc["bit_identical"] += c["bit_identical_fraction"] * y2.numel()
                acc["max_abs_diff"] = max(acc["max_abs_diff"], c["max_abs_diff"])
                acc["max_err_over_abs_sum_in_eps"] = max(acc["max_err_over_abs_sum_in_eps"],
                                                         c["max_err_over_abs_sum_in_eps"])
            with torch.compiler.set_stance("force_eager"):
                y_eager = F.linear(ActQuant.apply(x2), WeightQuant.apply(w))
            d = int((y_eager.view(torch.int32) != y2.view(torch.int32)).sum())
            lf["elements_differing_from_eager_path"] = d
            eager_differs += d
        n_el += y2.numel()
        tensors[f"{name}.x"] = x2.contiguous()
        tensors[f"{name}.xq"] = xq.contiguous()
        tensors[f"{name}.xs"] = xs.contiguous()
        tensors[f"{name}.y"] = y2.contiguous()
        facts["layers"][name] = lf

    logits = out.logits[0].contiguous()
    tensors["logits"] = logits
    tensors["embed"] = rec.hidden["embed"][0].contiguous()
    L = spec["num_hidden_layers"]
    for i in range(L):
        tensors[f"hidden.{i}"] = rec.hidden[f"hidden.{i}"][0].contiguous()
    tensors["final_norm"] = rec.hidden["final_norm"][0].contiguous()
    # what output_hidden_states returns, checked against the hooks
    hs = out.hidden_states
    assert len(hs) == L + 1, len(hs)
    assert bits_equal(hs[0][0], tensors["embed"])
    for i in range(1, L):
        assert bits_equal(hs[i][0], tensors[f"hidden.{i - 1}"]), i
    last_is_normed = bits_equal(hs[L][0], tensors["final_norm"])
    last_is_raw = bits_equal(hs[L][0], tensors[f"hidden.{L - 1}"])
    assert last_is_normed or last_is_raw
    facts["output_hidden_states_last_entry"] = "final_norm output" if last_is_normed else "last layer output"

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
    facts["gen_step0_logits_bitwise_equal_forward_last"] = bits_equal(step_logits[0], logits[-1])
    facts["gen_step0_max_abs_diff_vs_forward_last"] = float((step_logits[0] - logits[-1]).abs().max())
    facts["gen_cached_vs_full_recompute_max_abs_diff"] = float((step_logits - full).abs().max())
    facts["gen_cached_vs_full_recompute_same_argmax"] = bool(torch.equal(full.argmax(-1), gen))
    facts["gen_cached_vs_full_recompute_argmax_differs_at_steps"] = (
        (full.argmax(-1) != gen).nonzero()[:, 0].tolist())
    facts["attn_implementation"] = model.config._attn_implementation
    if form == "packed":
        facts["all_bitlinear_y_equal_dot_div_f32(ws*xs)"] = all_packed_exact
        facts["elements_differing_compiled_vs_eager_path"] = eager_differs
        facts["alternative_formulas_bit_exact"] = packed_alt
        facts["bitlinear_output_elements_checked"] = n_el
    else:
        for key, label in (("a", "y_vs_exact_dot_of_dequant_operands"), ("b", "y_vs_int_dot_div_f32(s_c*xs)")):
            c = dict(float_cmp[key])
            c["bit_identical_fraction"] = c.pop("bit_identical") / n_el
            facts[label] = c
        facts["elements_differing_compiled_vs_eager_path"] = eager_differs
        facts["autobitlinear_output_elements_checked"] = n_el
    return tensors, facts


TINY_LAYOUT = {
    "ids": "int64 [T]: the input token ids (T = 12, drawn with a seeded RNG inside the vocab)",
    "<module>.x": "float32 [T, in]: the tensor that goes into the layer's activation quantization "
                  "(the module input; quantization_config.use_rms_norm is false, so no extra norm)",
    "<module>.xq": "int8 [T, in]: activation codes clamp(round_half_even(x * xs), -128, 127)",
    "<module>.xs": "float32 [T, 1]: per-token activation scale (a multiplier) = 127 / max(max|x|, 1e-5), "
                   "computed as (1/m)*127; the layer's own compiled quantization gives these bits",
    "<module>.y": "float32 [T, out]: the layer output (what the layer returned in the forward pass)",
    "<module>.wmean_compiled": "(float form only) float32 [1]: max(mean|W|, 1e-5) as the compiled "
                               "WeightQuant computed it (Inductor reduction, see README.md)",
    "<module>.wmean_eager": "(float form only) float32 [1]: the same, eager ATen; the packed form's "
                            "weight_scale is 1/wmean_eager",
    "embed": "float32 [T, hidden]: embedding output",
    "hidden.<i>": "float32 [T, hidden]: output of decoder layer i (residual stream, before the final norm)",
    "final_norm": "float32 [T, hidden]: model.norm output (what lm_head sees)",
    "logits": "float32 [T, vocab]: forward pass logits for every position (use_cache=False)",
    "gen.tokens": "int64 [16]: greedy tokens generated after ids (generate, do_sample=False, use_cache=True)",
    "gen.logits": "float32 [16, vocab]: logits of each generation step (step 0 = prefill's last position)",
    "gen.margin": "float32 [16]: top1 - top2 of gen.logits per step",
}


def gen_tiny(out_root: Path) -> dict:
    models_dir = out_root / "models"
    gold_dir = out_root / "golden" / "models"
    summary: dict = {"generator": GENERATOR, "versions": {
        k: v for k, v in metadata_base().items() if k not in ("generator", "cases", "layout")},
        "models": {}}
    for spec in TINY_CONFIGS:
        built = build_tiny_dirs(spec, models_dir)
        rng = np.random.default_rng(spec["seed"] + 1)
        ids = torch.from_numpy(rng.integers(0, spec["vocab_size"], N_PROMPT).astype(np.int64))
        results = {}
        for form in ("float", "packed"):
            d = built["dirs"][form]
            saved = safetensors.torch.load_file(str(d / "model.safetensors"))
            model = load_and_check(spec, form, d, saved)
            tensors, facts = run_tiny_form(spec, form, model, ids, built)
            results[form] = (tensors, facts)
            del model
        tf, tp = results["float"][0], results["packed"][0]
        spread = {
            "max_abs_logits_float_minus_packed": float((tf["logits"] - tp["logits"]).abs().max()),
            "max_abs_logits": float(tf["logits"].abs().max()),
            "greedy_float": tf["gen.tokens"].tolist(),
            "greedy_packed": tp["gen.tokens"].tolist(),
            "greedy_agree": bool(torch.equal(tf["gen.tokens"], tp["gen.tokens"])),
            "min_margin_float": float(tf["gen.margin"].min()),
            "min_margin_packed": float(tp["gen.margin"].min()),
            "codes_eager_vs_compiled_differ_total": sum(
                v["codes_compiled_vs_eager_differ"] for v in results["float"][1]["layers"].values()),
        }
        xq_diff = {}
        for lin in linear_weight_names(spec):
            n = int((tf[f"{lin}.xq"] != tp[f"{lin}.xq"]).sum())
            if n:
                xq_diff[lin] = n
        spread["activation_code_mismatches_float_vs_packed"] = xq_diff
        spread["max_abs_logits_diff_per_position"] = [
            float(v) for v in (tf["logits"] - tp["logits"]).abs().amax(dim=-1)]
        if not spread["greedy_agree"]:
            k = int((tf["gen.tokens"] != tp["gen.tokens"]).nonzero()[0, 0])
            spread["first_disagreement_step"] = k
            spread["margins_at_disagreement"] = [float(tf["gen.margin"][k]), float(tp["gen.margin"][k])]
        for form in ("float", "packed"):
            tensors, facts = results[form]
            md = metadata_base()
            md["model"] = spec["name"]
            md["form"] = form
            md["model_dir"] = f"testdata/models/{spec['name']}-{form}"
            md["model_dir_sha256"] = sha256_file(built["dirs"][form] / "model.safetensors")
            md["quant_path"] = ("compiled: transformers' @torch.compile'd WeightQuant/ActQuant (float form) or "
                                "BitLinear.activation_quant/post_quant_process/unpack_weights (packed form), "
                                "TorchInductor C++, torch_threads=1")
            md["layout"] = json.dumps(TINY_LAYOUT, sort_keys=True)
            md["facts"] = json.dumps(facts, sort_keys=True)
            md["float_vs_packed"] = json.dumps(spread, sort_keys=True)
            md["ids"] = json.dumps(tensors["ids"].tolist())
            save_safetensors(tensors, gold_dir / f"{spec['name']}-{form}.safetensors", md)
        summary["models"][spec["name"]] = {
            "config": {k: v for k, v in spec.items() if k not in ("seed",)} | TINY_COMMON,
            "seed": spec["seed"], "ids": tf["ids"].tolist(),
            "float_vs_packed": spread,
            "float": results["float"][1], "packed": results["packed"][1],
        }
    summary["init"] = {"std": STD, "norm": f"1 + {NORM_NOISE} * N(0, 1)"}
    (gold_dir / "summary.json").write_text(jdump(summary), encoding="utf-8")
    return summary


# ============================================================================================
# B. SmolLM2-135M-Instruct from the GGUF
# ============================================================================================

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PLAIN_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
SMOL_GEN = 32
PPL_CTX = 128
TOPK = 8


TINY_C = {
    "name": "tiny-bitnet-c", "seed": 0xB17_0C, "hidden_size": 256, "intermediate_size": 256,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
    "tie_word_embeddings": True, "config_style": "transformers",
}


def gen_tiny_c(out_root: Path) -> Path:
    """C: the float directory and transformers' ternarized weights of each BitLinear."""
    spec = TINY_C
    w = tiny_weights(spec)
    d = out_root / "models" / f"{spec['name']}-float"
    write_model_dir(d, tiny_config_dict(spec, "float"), w)
    saved = safetensors.torch.load_file(str(d / "model.safetensors"))
    model = load_and_check(spec, "float", d, saved)
    arrays: dict[str, np.ndarray] = {}
    for lin in linear_weight_names(spec):
        mod = model.get_submodule(lin)
        assert isinstance(mod, AutoBitLinear), lin
        with torch.no_grad():
            w_dq = WeightQuant.apply(mod.weight)  # compiled, as AutoBitLinear.forward runs it
        mags = w_dq.abs()[w_dq != 0].unique()
        assert mags.numel() == 1, f"{lin}: non-zero entries take {mags.numel()} magnitudes"
        codes = torch.sign(w_dq).to(torch.int8)
        assert torch.equal(codes.float() * mags[0], w_dq), lin
        arrays[lin + ".codes"] = codes.numpy()
        arrays[lin + ".value"] = mags.numpy().astype(F32)
    gold = out_root / "golden" / "models" / f"{spec['name']}-ternary.npz"
    gold.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(gold, **arrays)
    return gold


def llama_cpp_perplexity(model, ids: list[int], n_ctx: int) -> dict:
    """llama.cpp's perplexity tool (tools/perplexity): n_chunk = len(ids) // n_ctx non-overlapping
    chunks, each evaluated from an empty cache (no BOS inserted: add_bos_token is false for this
    vocab); with first = n_ctx/2, logits at chunk positions first .. n_ctx-2 score the tokens at
    positions first+1 .. n_ctx-1, i.e. n_ctx - first - 1 tokens per chunk. NLL = logsumexp(l) - l[tok]
    computed here in float64 from the float32 logits."""
    first = n_ctx // 2
    n_chunk = len(ids) // n_ctx
    per_tok = np.zeros((n_chunk, n_ctx - first - 1), dtype=np.float64)
    for c in range(n_chunk):
        toks = torch.tensor(ids[c * n_ctx:(c + 1) * n_ctx], dtype=torch.int64)
        with torch.no_grad():
            logits = model(toks[None], use_cache=False).logits[0].double()
        lse = torch.logsumexp(logits[first:n_ctx - 1], dim=-1)
        tgt = logits[first:n_ctx - 1].gather(1, toks[first + 1:n_ctx, None])[:, 0]
        per_tok[c] = (lse - tgt).numpy()
    nll = float(per_tok.mean())
    return {"n_ctx": n_ctx, "first": first, "n_tokens": len(ids), "n_chunks": n_chunk,
            "scored_per_chunk": n_ctx - first - 1, "scored_total": int(per_tok.size),
            "mean_nll": nll, "ppl": math.exp(nll),
            "chunk_mean_nll": [float(v) for v in per_tok.mean(axis=1)],
            "chunk_ppl_running": [math.exp(float(per_tok[:c + 1].mean())) for c in range(n_chunk)],
            "per_token_nll": per_tok}


def gen_smollm2(out_root: Path, gguf_path: Path, text_path: Path) -> dict:
    d, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=fname, dtype=torch.float32)
    model.eval()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert type(mod) is nn.Linear and mod.weight.dtype == torch.float32, name
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tensors: dict[str, torch.Tensor] = {}
    doc: dict = {"generator": GENERATOR,
                 "versions": {k: v for k, v in metadata_base().items() if k != "generator"},
                 "gguf_file": fname, "gguf_sha256": sha256_file(gguf_path)}

    # --- chat prompt
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_text, add_special_tokens=False).input_ids
    T = len(chat_ids)
    ids_t = torch.tensor(chat_ids, dtype=torch.int64)
    layers = model.model.layers
    hid: dict[str, torch.Tensor] = {}
    hooks = [
        model.model.embed_tokens.register_forward_hook(lambda m, a, o: hid.__setitem__("embed", o[0].clone())),
        layers[0].register_forward_hook(lambda m, a, o: hid.__setitem__("layer0", (o[0] if isinstance(o, tuple) else o)[0].clone())),
        layers[-1].register_forward_hook(lambda m, a, o: hid.__setitem__("last", (o[0] if isinstance(o, tuple) else o)[0].clone())),
        model.model.norm.register_forward_hook(lambda m, a, o: hid.__setitem__("final_norm", o[0].clone())),
    ]
    with torch.no_grad():
        out = model(ids_t[None], use_cache=False, output_hidden_states=True)
    for h in hooks:
        h.remove()
    logits = out.logits[0]
    hs = out.hidden_states
    assert bits_equal(hs[1][0], hid["layer0"]) and bits_equal(hs[0][0], hid["embed"])
    hs_last_normed = bits_equal(hs[-1][0], hid["final_norm"])
    pos0 = 0 if T <= 32 else T - 16
    tensors["chat.ids"] = ids_t
    tensors["chat.logits"] = logits[pos0:].contiguous()
    tensors["chat.logits_positions"] = torch.arange(pos0, T, dtype=torch.int64)
    tensors["chat.embed"] = hid["embed"].contiguous()
    tensors["chat.hidden.layer0"] = hid["layer0"].contiguous()
    tensors[f"chat.hidden.layer{cfg.num_hidden_layers - 1}"] = hid["last"].contiguous()
    tensors["chat.final_norm"] = hid["final_norm"].contiguous()

    # --- greedy continuation (EOS does not stop it: all 32 tokens are generated)
    with torch.no_grad():
        g = model.generate(ids_t[None], attention_mask=torch.ones_like(ids_t[None]), do_sample=False,
                           max_new_tokens=SMOL_GEN, min_new_tokens=SMOL_GEN, use_cache=True,
                           output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                           pad_token_id=cfg.pad_token_id)
    gen = g.sequences[0, T:].clone()
    step_logits = torch.stack([s[0] for s in g.logits])
    assert gen.numel() == SMOL_GEN and torch.equal(step_logits.argmax(-1), gen)
    top = torch.topk(step_logits, TOPK, dim=-1)
    tensors["gen.tokens"] = gen
    tensors["gen.margin"] = margins_of(step_logits)
    tensors["gen.topk_ids"] = top.indices.contiguous()
    tensors["gen.topk_logits"] = top.values.contiguous()
    eos = cfg.eos_token_id
    gen_list = gen.tolist()
    first_eos = gen_list.index(eos) if eos in gen_list else None

    # --- plain-text prompt
    plain_ids = tok(PLAIN_PROMPT, add_special_tokens=False).input_ids
    with torch.no_grad():
        plain_logits = model(torch.tensor([plain_ids]), use_cache=False).logits[0]
    tensors["plain.ids"] = torch.tensor(plain_ids, dtype=torch.int64)
    tensors["plain.logits"] = plain_logits.contiguous()

    # --- perplexity of tiny.txt
    text = text_path.read_text(encoding="utf-8")
    ppl_ids = tok(text, add_special_tokens=False).input_ids
    ppl = llama_cpp_perplexity(model, ppl_ids, PPL_CTX)
    tensors["ppl.ids"] = torch.tensor(ppl_ids, dtype=torch.int64)
    tensors["ppl.per_token_nll"] = torch.from_numpy(ppl.pop("per_token_nll"))

    gguf_perm = (
        "transformers 5.23 loads arch 'llama' GGUFs through the legacy path "
        "(modeling_gguf_pytorch_utils.load_gguf_checkpoint): every tensor is dequantized to float32 with "
        "gguf-py's dequantize, then LlamaTensorProcessor undoes llama.cpp's q/k row permutation with "
        "_reverse_permute_weights(w, n_head, n_kv): for attn_q n = num_attention_heads, for attn_k "
        "n = num_key_value_heads; with d = rows / n / 2, w.reshape(n, d, 2, in).swapaxes(1, 2).reshape(rows, in). "
        "So within each head, HF row j (j < d) = GGUF row 2j and HF row d + j = GGUF row 2j + 1: llama.cpp "
        "stores each rotary pair (j, j + d) of the HF NeoX/rotate_half layout as adjacent rows (2j, 2j+1), "
        "which its interleaved (GPT-J style) RoPE rotates. attn_v, attn_output and the FFN are not permuted.")
    doc.update({
        "model_class": type(model).__name__,
        "linear_layers": "torch.nn.Linear, float32, dense (dequantized from Q4_1 at load)",
        "attn_implementation": cfg._attn_implementation,
        "config": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
        "derived": {
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rope_type": cfg.rope_parameters["rope_type"],
            "rms_norm_eps": cfg.rms_norm_eps,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings, "lm_head_shares_embedding_storage": tied,
            "hidden_act": cfg.hidden_act,
            "qk_unpermute": gguf_perm,
        },
        "chat": {"messages": CHAT_MESSAGES, "text": chat_text, "ids": chat_ids, "n_tokens": T,
                 "logits_positions": [pos0, T - 1],
                 "output_hidden_states_last_entry": "final_norm output" if hs_last_normed else "last layer output"},
        "greedy": {"n": SMOL_GEN, "tokens": gen_list,
                   "text": tok.decode(gen_list, skip_special_tokens=False),
                   "text_until_eos": tok.decode(gen_list[:first_eos] if first_eos is not None else gen_list,
                                                skip_special_tokens=False),
                   "first_eos_step": first_eos, "eos_token_id": eos, "eos_stops_generation": False,
                   "margins": [float(v) for v in tensors["gen.margin"]],
                   "min_margin": float(tensors["gen.margin"].min()),
                   "step0_logits_bitwise_equal_chat_logits_last": bits_equal(step_logits[0], logits[-1]),
                   "step0_max_abs_diff_vs_chat_logits_last": float((step_logits[0] - logits[-1]).abs().max())},
        "plain": {"text": PLAIN_PROMPT, "ids": plain_ids, "n_tokens": len(plain_ids)},
        "perplexity": dict(ppl, text_file="testdata/text/tiny.txt",
                           text_sha256=sha256_file(text_path),
                           tokenization="tokenizer(text, add_special_tokens=False): the whole file incl. "
                                        "its final newline, no BOS (add_bos_token is false)",
                           scored="per chunk c (tokens ids[c*128:(c+1)*128], fresh context): logits at "
                                  "positions 64..126 predict tokens 65..127 (63 per chunk); tokens 0..64 "
                                  "are context only; the tail after the last full chunk is dropped"),
    })
    layout = {
        "chat.ids": "int64 [T]: chat prompt ids (chat template, add_generation_prompt, no extra specials)",
        "chat.logits": "float32 [P, vocab]: logits at positions chat.logits_positions (all if T <= 32, else the last 16)",
        "chat.logits_positions": "int64 [P]",
        "chat.embed": "float32 [T, hidden]: embedding output",
        "chat.hidden.layer0": "float32 [T, hidden]: output of decoder layer 0",
        f"chat.hidden.layer{cfg.num_hidden_layers - 1}": "float32 [T, hidden]: output of the last decoder layer (before model.norm)",
        "chat.final_norm": "float32 [T, hidden]: model.norm output",
        "gen.tokens": "int64 [32]: greedy continuation (use_cache=True; EOS does not stop it)",
        "gen.margin": "float32 [32]: top1 - top2 logit per step",
        "gen.topk_ids": "int64 [32, 8]", "gen.topk_logits": "float32 [32, 8]: top-8 logits per step",
        "plain.ids": "int64 [N]", "plain.logits": "float32 [N, vocab]: every position",
        "ppl.ids": "int64 [n]: tiny.txt tokens",
        "ppl.per_token_nll": "float64 [n_chunks, 63]: NLL of each scored token (see model_golden.json)",
    }
    md = metadata_base()
    md["layout"] = json.dumps(layout, sort_keys=True)
    md["gguf_file"] = fname
    sdir = out_root / "golden" / "smollm2"
    save_safetensors(tensors, sdir / "model_golden.safetensors", md)
    doc["layout"] = layout
    (sdir / "model_golden.json").write_text(jdump(doc), encoding="utf-8")
    return doc


# ============================================================================================

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO_ROOT / "testdata",
                    help="writes models/ and golden/models/ (and golden/smollm2/) under it")
    ap.add_argument("--smollm2", type=Path, default=None, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=REPO_ROOT / "testdata" / "text" / "tiny.txt",
                    help="the perplexity text (committed)")
    ap.add_argument("--skip-tiny", action="store_true", help="only part B")
    ap.add_argument("--any-isa", action="store_true",
                    help="allow an Inductor vector ISA other than AVX-512")
    args = ap.parse_args()

    assert torch.get_num_threads() == 1
    lanes = inductor_lanes()
    if lanes != 16 and not args.any_isa:
        print(f"error: Inductor picked {cpu_vec_isa.pick_vec_isa()} ({lanes} float lanes); the committed "
              "goldens were made with AVX-512 (16 lanes). Use an AVX-512 machine or pass --any-isa.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = args.out_root
    written: list[Path] = []
    if not args.skip_tiny:
        s = gen_tiny(out)
        for name, m in s["models"].items():
            sp = m["float_vs_packed"]
            print(f"{name}: max|logits float - packed| = {sp['max_abs_logits_float_minus_packed']:.3e} "
                  f"(max |logit| {sp['max_abs_logits']:.2f}); greedy agree: {sp['greedy_agree']}; "
                  f"packed y == dot / f32(ws*xs) bit-exact: "
                  f"{m['packed']['all_bitlinear_y_equal_dot_div_f32(ws*xs)']}; "
                  f"online y vs exact dot of dequantized operands: "
                  f"{m['float']['y_vs_exact_dot_of_dequant_operands']}")
        written += sorted((out / "models").rglob("*")) + sorted((out / "golden" / "models").rglob("*"))
    gold_c = gen_tiny_c(out)
    print(f"tiny-bitnet-c: {gold_c.relative_to(out)}")
    written += [gold_c] + sorted((out / "models" / "tiny-bitnet-c-float").glob("*"))
    if args.smollm2 is not None:
        doc = gen_smollm2(out, args.smollm2, args.text)
        print(f"smollm2 greedy: {doc['greedy']['text']!r}")
        print(f"smollm2 ppl(tiny.txt, n_ctx={PPL_CTX}) = {doc['perplexity']['ppl']:.4f} over "
              f"{doc['perplexity']['n_chunks']} chunks")
        written += sorted((out / "golden" / "smollm2").glob("model_golden.*"))
    for p in written:
        if p.is_file():
            print(f"{p.stat().st_size:>9}  {sha256_file(p)[:16]}  {p.relative_to(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
