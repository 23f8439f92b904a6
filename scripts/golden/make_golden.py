#!/usr/bin/env python3
"""Generate the golden files that the Rust tests compare against (no Python ML stack in CI).

    python make_golden.py [--out DIR] [--smollm2 PATH_TO_GGUF]

Pinned stack: see requirements.txt. Default output: <repo>/testdata/golden. Everything is seeded and
the script is deterministic: running it twice gives byte-identical files (on the same kind of CPU,
see the findings below).

Outputs (see README.md for the schemas):
  quant/weights.safetensors       transformers BitNet weight quantization (WeightQuant), float32
  quant/weights_bf16.safetensors  the same for bfloat16 weights
  quant/activations.safetensors   transformers BitNet activation quantization (ActQuant), float32
  quant/activations_bf16.safetensors  the same for bfloat16 activations
  gguf/py_written.gguf            a GGUF written by gguf.GGUFWriter (all value types, 8 tensor types)
  gguf/py_written.expected.safetensors / .expected.json   what gguf.GGUFReader reads back
  smollm2/tensors.json, smollm2/tokenizer_golden.json       only with --smollm2

Findings encoded here (checked by asserts every run):
  * transformers' WeightQuant.forward / ActQuant.forward / BitLinear.activation_quant are decorated
    with @torch.compile. Calling them runs TorchInductor-generated C++, not the eager ATen kernels.
    For the weight scale mean|W| the compiled reduction order differs from eager torch, so the
    "real" transformers output (`dequant`) can differ from the eager one (`dequant_eager`, from
    `codes`/`scale`) by 1-3 ulps of the scale. Both are stored; `inductor_sum_abs` below is a
    verified model of the compiled sum (1 thread).
  * Activation scales have no such issue: max is order-independent and both paths compute
    127 / m as (1/m) * 127 (two roundings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

# torch's CPU float32 sum (eager) and Inductor's generated reductions both depend on the intra-op
# thread count: pin it before anything else touches torch.
import torch

torch.set_num_threads(1)

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers  # noqa: E402
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT  # noqa: E402

import torch._dynamo  # noqa: E402
from torch._inductor import cpu_vec_isa  # noqa: E402
from transformers.integrations.bitnet import ActQuant, BitLinear, WeightQuant  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_check  # noqa: E402  (shared metadata / tensor decoding)

# Each distinct input shape makes dynamo recompile (the first recompile switches to dynamic
# shapes). The default limit (8) would make later calls silently fall back to eager execution.
torch._dynamo.config.recompile_limit = 1000
torch._dynamo.config.accumulated_recompile_limit = 100000

F32 = np.float32
REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATOR = "scripts/golden/make_golden.py"


def pkg_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def inductor_lanes() -> int:
    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        return 1
    return int(isa.nelements(torch.float32))


def common_metadata() -> dict[str, str]:
    return {
        "generator": GENERATOR,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "gguf": pkg_version("gguf"),
        "torch_threads": str(torch.get_num_threads()),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_f32_lanes": str(inductor_lanes()),
    }


# ============================================================================================
# A numpy model of the reduction TorchInductor generates for `weight.abs().mean()` inside the
# compiled WeightQuant.forward (torch 2.15, CPU, one thread; see README.md). Used to recover the
# scale the compiled kernel actually used, and asserted against the real output every run.
# ============================================================================================

def _hsum_butterfly(v: np.ndarray) -> np.float32:
    """at::vec::vec_reduce_all(+) for AVX2 (8 lanes) / AVX-512 (16 lanes): at each step lane i
    adds lane i ^ d, for d = L/2, L/4, ..., 1; the result is lane 0."""
    v = v.astype(F32, copy=True)
    lanes = np.arange(v.size)
    d = v.size // 2
    while d >= 1:
        v = (v + v[lanes ^ d]).astype(F32)
        d //= 2
    return F32(v[0])


def _ceil_log2(n: int) -> int:
    return 0 if n <= 1 else int(n - 1).bit_length()


def inductor_sum_abs(x: np.ndarray, lanes: int, chunk: int = 4096) -> np.float32:
    """sum(|x|) in float32 as Inductor's vectorized reduction computes it (one thread):
    L-lane vector accumulators over the n // L full vectors (CascadeSumHelper with 4096-vector
    chunks: depth = ceil_log2(ceil(nv / 4096)); with depth <= 1 it is a plain running sum), the
    n % L tail added lane-wise into lanes 0..tail-1, then a butterfly horizontal sum."""
    a = np.abs(np.ascontiguousarray(x, dtype=F32).reshape(-1))
    n = a.size
    nv = n // lanes
    vecs = a[: nv * lanes].reshape(nv, lanes)
    depth = _ceil_log2((nv + chunk - 1) // chunk)
    stk = [np.zeros(lanes, F32) for _ in range(max(depth, 1))]
    num_chunks = 0
    for c0 in range(0, nv, chunk):
        blk = vecs[c0:c0 + chunk]
        acc = stk[0]
        for row in blk:
            acc = (acc + row).astype(F32)
        stk[0] = acc
        if depth > 0 and blk.shape[0] == chunk:
            num_chunks += 1
            mask, j = num_chunks, 1
            while j < depth and (mask & 1) == 0:
                stk[j] = (stk[j] + stk[j - 1]).astype(F32)
                stk[j - 1] = np.zeros(lanes, F32)
                mask >>= 1
                j += 1
    res = stk[0]
    for i in range(1, depth):
        res = (res + stk[i]).astype(F32)
    tail = np.zeros(lanes, F32)
    tail[: n - nv * lanes] = a[nv * lanes:]
    res = (res + tail).astype(F32)
    return F32(F32(0.0) + _hsum_butterfly(res))


def inductor_mean_abs_clamped(x: np.ndarray, lanes: int) -> np.float32:
    with np.errstate(over="ignore"):
        m = F32(inductor_sum_abs(x, lanes) / F32(x.size))  # true IEEE division by float(numel)
    return F32(max(m, F32(1e-5))) if not np.isnan(m) else m


# ============================================================================================
# helpers
# ============================================================================================

def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0 / 0.0), except that any NaN equals any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ia = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    same = a.view(ia) == b.view(ia)
    same |= torch.isnan(a) & torch.isnan(b)
    return bool(same.all())


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def as_f32_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=F32))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file, then make the header byte-deterministic: the Rust serializer
    writes the __metadata__ map in hash order, which changes from process to process. The header is
    re-serialized with sorted metadata keys; everything else (tensor entries, offsets, data) is kept,
    and the header length cannot change (same keys and values, only reordered)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen].decode("utf-8"), object_pairs_hook=dict)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = {"__metadata__": header.pop("__metadata__")}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(text) <= hlen, (len(text), hlen)
    text += b" " * (hlen - len(text))
    path.write_bytes(raw[:8] + text + raw[8 + hlen:])
    # the rewritten file must load to the very same tensors
    loaded = safetensors.torch.load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k


# ============================================================================================
# (a) weights
# ============================================================================================

def weight_cases() -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(0x5EED_0001)
    cases: list[tuple[str, str, np.ndarray]] = []

    def add(desc: str, arr: np.ndarray) -> None:
        cases.append((f"w{len(cases)}", desc, np.ascontiguousarray(arr, dtype=F32)))

    add("normal*0.02 (1,1)", rng.standard_normal((1, 1)) * 0.02)
    add("normal*0.02 (1,7)", rng.standard_normal((1, 7)) * 0.02)
    add("uniform[-1,1) (3,7)", rng.uniform(-1, 1, (3, 7)))
    add("normal*0.02 (4,256)", rng.standard_normal((4, 256)) * 0.02)
    add("uniform[-0.05,0.05) (64,96)", rng.uniform(-0.05, 0.05, (64, 96)))
    add("normal*0.02 (37,1000): > 32768 elements, n % 16 = 8", rng.standard_normal((37, 1000)) * 0.02)

    w = rng.standard_normal((48, 640)) * 0.02
    w[[0, 5, 6, 47]] = 0.0
    add("normal*0.02 (48,640) with all-zero rows 0, 5, 6, 47", w)

    add("all zeros (16,64): mean 0 is clamped to 1e-5", np.zeros((16, 64)))

    # extreme magnitudes: +-1e30, tiny normals, subnormals, signed zeros mixed with N(0, 0.02)
    w = (rng.standard_normal((8, 64)) * 0.02).astype(F32)
    specials = np.array([1e30, -1e30, 1e-30, -1e-30, 1e-38, 1e-40, -1e-40, 1.4e-45, -1.4e-45,
                         0.0, -0.0, 2.0e37, -2.5e-3, 7.0], dtype=F32)
    flat = w.reshape(-1)
    pos = rng.choice(flat.size, size=3 * specials.size, replace=False)
    flat[pos] = np.tile(specials, 3)
    w[7] = np.resize(np.array([1e-40, -1e-40, 1.4e-45, -0.0], dtype=F32), 64)  # a row of subnormals
    add("extremes (8,64): +-1e30, 2e37, 1e-30, subnormals, -0.0 mixed with normal*0.02", w)

    # the sum of |w| overflows float32 -> mean = inf -> s = 1/inf = 0 -> round(w*0)/0 = NaN
    add("overflow (1,40): sum|w| overflows to inf, transformers returns NaN everywhere",
        np.resize(np.array([3.0e38, -3.0e38, 1.0, -2.0e38], dtype=F32), (1, 40)))

    # exact ties: |w| in {0, .5, 1, 1.5, 2, 2.5} * 2^-6 with mean exactly 2^-6, so s = 64 exactly,
    # every partial sum is exact (order-independent) and w*s hits +-0.5, +-1.5, +-2.5 exactly.
    groups = [[0.5, 1.5], [0.0, 2.0], [1.0, 1.0], [2.5, 0.0, 0.5], [1.5, 0.5], [0.5, 2.5, 0.0]]
    mult: list[float] = []
    gi = 0
    while len(mult) < 32 * 96:
        g = groups[gi % len(groups)]
        gi += 1
        if len(mult) + len(g) > 32 * 96:
            g = [1.0] * (32 * 96 - len(mult))
        mult.extend(g)
    m = np.array(mult, dtype=np.float64)
    rng.shuffle(m)
    sign = rng.choice([-1.0, 1.0], size=m.size)
    add("ties (32,96): values in {0,.5,1,1.5,2,2.5}*2^-6 * sign, mean exactly 2^-6",
        (m * sign * 2.0 ** -6).reshape(32, 96))

    add("normal*0.02 (512,260): 133120 elements, Inductor cascade-sum depth 2",
        rng.standard_normal((512, 260)) * 0.02)

    while True:  # a draw whose eager and compiled means differ (about half of them do)
        w = (rng.standard_normal((64, 96)) * 0.02).astype(F32)
        if _eager_mean_clamped(w) != inductor_mean_abs_clamped(w, inductor_lanes()):
            break
    add("boundary (64,96): normal*0.02 with a few entries tuned so that round(w*s) differs between "
        "the eager and the compiled scale", tune_code_flips(w, 4))
    return cases


def _eager_mean_clamped(w: np.ndarray) -> np.float32:
    return F32(torch.from_numpy(w).abs().mean().clamp_(min=1e-5).item())


def tune_code_flips(w: np.ndarray, n_flips: int) -> np.ndarray:
    """Set a few entries next to the 0.5 rounding boundary so that the 1-3 ulp difference between the
    eager and the Inductor mean changes their ternary code (changing an entry moves both means a
    little, so candidates are re-checked with the recomputed means)."""
    w = np.ascontiguousarray(w, dtype=F32)
    lanes = inductor_lanes()
    flips = 0
    # entries already close to the boundary, so that moving them barely moves the mean
    half = F32(0.5) * inductor_mean_abs_clamped(w, lanes)
    order = np.argsort(np.abs(np.abs(w.reshape(-1)) - half), kind="stable")
    for pos in order[:200].tolist():
        if flips == n_flips:
            break
        flat = w.reshape(-1)
        old = flat[pos]
        sign = F32(1.0) if old >= 0 else F32(-1.0)
        for _ in range(4):  # fixed point: the entry itself moves the mean
            s_c = F32(F32(1.0) / inductor_mean_abs_clamped(w, lanes))
            flat[pos] = sign * F32(F32(0.5) / s_c)
        x0 = abs(flat[pos])
        cands = [x0]
        for _ in range(8):
            cands = [np.nextafter(cands[0], F32(0))] + cands + [np.nextafter(cands[-1], F32(1))]
        for x in cands:
            flat[pos] = sign * x
            s_e = F32(F32(1.0) / _eager_mean_clamped(w))
            s_c = F32(F32(1.0) / inductor_mean_abs_clamped(w, lanes))
            if np.round(F32(flat[pos] * s_e)) != np.round(F32(flat[pos] * s_c)):
                flips += 1
                break
        else:
            flat[pos] = old
    # re-check with the final means (a later edit can move an earlier entry off its boundary)
    s_e = F32(F32(1.0) / _eager_mean_clamped(w))
    s_c = F32(F32(1.0) / inductor_mean_abs_clamped(w, lanes))
    q_e = np.clip(np.round((w * s_e).astype(F32)), -1, 1)
    q_c = np.clip(np.round((w * s_c).astype(F32)), -1, 1)
    assert s_e != s_c and np.count_nonzero(q_e != q_c) >= 1, f"no code flips ({flips} during tuning)"
    return w


def bf16_weight_cases() -> list[tuple[str, str, torch.Tensor]]:
    rng = np.random.default_rng(0x5EED_0002)
    out = []
    for shape in [(64, 96), (24, 1000)]:
        w = torch.from_numpy((rng.standard_normal(shape) * 0.02).astype(F32)).to(torch.bfloat16)
        out.append((f"wb{len(out)}", f"bf16 normal*0.02 {shape}", w))
    return out


def quantize_weight(name: str, w: torch.Tensor, lanes: int) -> dict[str, torch.Tensor]:
    """Run the real transformers WeightQuant (compiled, and eager via set_stance) and derive
    codes/scales, asserting that codes / s reproduces each output bit for bit."""
    out_compiled = WeightQuant.apply(w)  # the real thing: @torch.compile'd forward
    with torch.compiler.set_stance("force_eager"):
        out_eager = WeightQuant.apply(w)  # same transformers code, eager ATen kernels

    wf = w.float()
    # eager: exactly the two lines of transformers' WeightQuant.forward
    mean_e = wf.abs().mean().clamp_(min=1e-5)
    s_e = 1.0 / mean_e
    q_e = (wf * s_e).round().clamp(-1, 1)  # float codes, keep the sign of zero
    assert bits_equal((q_e / s_e).to(w.dtype), out_eager), f"{name}: eager codes/s != WeightQuant (eager)"

    # compiled: the same formula with the mean as Inductor's reduction computes it
    mean_c = torch.tensor(inductor_mean_abs_clamped(wf.numpy(), lanes), dtype=torch.float32)
    s_c = 1.0 / mean_c
    q_c = (wf * s_c).round().clamp(-1, 1)
    assert bits_equal((q_c / s_c).to(w.dtype), out_compiled), \
        f"{name}: Inductor-model codes/s != compiled WeightQuant (lanes={lanes})"

    return {
        f"{name}.w": w.contiguous(),
        f"{name}.codes": q_e.to(torch.int8),
        f"{name}.scale": mean_e.reshape(1).clone(),
        f"{name}.dequant_eager": out_eager.contiguous(),
        f"{name}.dequant": out_compiled.contiguous(),
        f"{name}.codes_compiled": q_c.to(torch.int8),
        f"{name}.scale_compiled": mean_c.reshape(1).clone(),
    }


WEIGHT_LAYOUT = {
    "w": "input weight [out, in] (float32 in weights.safetensors, bfloat16 in weights_bf16.safetensors)",
    "codes": "int8 ternary codes, eager torch: clamp(round_half_even(w * (1/scale)), -1, 1)",
    "scale": "float32 [1]: max(mean|w|, 1e-5) as eager torch computes it (one thread; the ATen "
             "cascade sum of /work/notes/torch_sum.md)",
    "dequant_eager": "WeightQuant.apply(w) run eagerly (torch.compiler.set_stance('force_eager')); "
                     "== codes / (1/scale) bit for bit, incl. -0.0 where w < 0 rounds to 0",
    "dequant": "WeightQuant.apply(w) as transformers runs it: its forward is @torch.compile'd, so "
               "this is Inductor-generated code; == codes_compiled / (1/scale_compiled) bit for bit",
    "scale_compiled": "float32 [1]: max(mean|w|, 1e-5) as the Inductor kernel computed it "
                      "(16-lane AVX-512 reduction, see README.md); may differ from scale by a few ulps",
    "codes_compiled": "int8 codes from scale_compiled (differ from codes only for entries on a "
                      "rounding boundary, see w12)",
}


def _weight_file(out_path: Path, cases: list[tuple[str, str, torch.Tensor]], lanes: int) -> list[str]:
    tensors: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}
    scale_diff, deq_diff, code_diff = [], [], []
    for name, d, w in cases:
        t = quantize_weight(name, w, lanes)
        tensors.update(t)
        desc[name] = d
        if not bits_equal(t[f"{name}.scale_compiled"], t[f"{name}.scale"]):
            scale_diff.append(name)
        if not bits_equal(t[f"{name}.dequant"], t[f"{name}.dequant_eager"]):
            deq_diff.append(name)
        if not torch.equal(t[f"{name}.codes"], t[f"{name}.codes_compiled"]):
            code_diff.append(name)
    md = common_metadata()
    md["cases"] = json.dumps(desc)
    md["layout"] = json.dumps(WEIGHT_LAYOUT)
    md["scale_compiled_differs_from_scale"] = json.dumps(scale_diff)
    md["dequant_differs_from_dequant_eager"] = json.dumps(deq_diff)
    md["codes_compiled_differs_from_codes"] = json.dumps(code_diff)
    save_safetensors(tensors, out_path, md)
    return scale_diff


def gen_weights(out_dir: Path, lanes: int) -> dict[str, str]:
    f32 = [(n, d, torch.from_numpy(a)) for n, d, a in weight_cases()]
    diff = _weight_file(out_dir / "quant" / "weights.safetensors", f32, lanes)
    diff_bf16 = _weight_file(out_dir / "quant" / "weights_bf16.safetensors", bf16_weight_cases(), lanes)
    return {"weights_scale_compiled_differs": ",".join(diff + diff_bf16)}


# ============================================================================================
# (b) activations
# ============================================================================================

def _act_scale_np(m: np.float32) -> np.float32:
    """127 / max(m, 1e-5) as torch computes it: (1/m) then * 127 (two float32 roundings)."""
    m = F32(max(F32(m), F32(1e-5)))
    return F32(F32(F32(1.0) / m) * F32(127.0))


def _tie_row(rng: np.random.Generator, n: int, m: float) -> np.ndarray:
    """A row with max|x| == m (float32) where many x * scale land exactly on k + 0.5 (incl. -0.5,
    +-126.5) after float32 rounding, so round-half-even and clamping are exercised."""
    m = F32(m)
    s = _act_scale_np(m)
    row = np.empty(n, dtype=F32)
    row[0] = m
    row[1] = -m
    targets = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 125.5, -125.5, 63.5, -64.5]
    i = 2
    while i < n:
        t = F32(targets[(i - 2) % len(targets)] if i < 2 + 3 * len(targets)
                else rng.integers(-127, 127) + 0.5)
        cands = [F32(t / s)]
        cands += [np.nextafter(cands[0], F32(np.inf)), np.nextafter(cands[0], F32(-np.inf))]
        hit = [c for c in cands if F32(c * s) == t and abs(c) <= m]
        if hit:
            row[i] = hit[0]
            i += 1
        elif i >= 2 + 3 * len(targets):
            row[i] = F32(rng.uniform(-1, 1) * m)
            i += 1
        else:
            row[i] = F32(0.0)
            i += 1
    return row


def act_cases() -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(0x5EED_0003)
    cases: list[tuple[str, str, np.ndarray]] = []

    def add(desc: str, arr: np.ndarray) -> None:
        cases.append((f"a{len(cases)}", desc, np.ascontiguousarray(arr, dtype=F32)))

    add("normal (1,1)", rng.standard_normal((1, 1)))
    add("normal (1,64)", rng.standard_normal((1, 64)))
    add("normal*3 (5,2560)", rng.standard_normal((5, 2560)) * 3)
    x = rng.standard_normal((16, 6912))
    x[np.arange(16), rng.integers(0, 6912, 16)] *= 40.0  # one outlier per row
    add("normal with one x40 outlier per row (16,6912)", x)

    rows = np.zeros((6, 64), dtype=F32)
    rows[1] = rng.uniform(-1, 1, 64) * F32(1e-5)
    rows[1, 7] = F32(1e-5)                           # max exactly float32(1e-5)
    rows[2] = rng.uniform(-1, 1, 64) * F32(3e-6)     # max below 1e-5: clamped
    rows[3] = np.resize(np.array([1e-40, -1e-40, 1.4e-45, -1.4e-45, 0.0, -0.0], F32), 64)  # subnormals
    rows[4] = -0.0                                   # all negative zeros
    rows[5] = rng.uniform(-1, 1, 64) * F32(1e-5)
    rows[5, 3] = -F32(1e-5)                          # max exactly 1e-5, negative
    add("small rows (6,64): zeros, max == 1e-5, max < 1e-5, subnormals, -0.0, max == -1e-5", rows)

    rows = np.zeros((5, 96), dtype=F32)
    rows[0] = rng.standard_normal(96)
    rows[0, [3, 50]] = [1e30, -1e30]
    rows[1] = rng.standard_normal(96) * F32(1e-30)
    rows[2] = np.resize(np.array([3.4028235e38, -3.4028235e38, 1.0, -1e-30, 1e-40], F32), 96)
    rows[3] = rng.standard_normal(96)
    rows[3, 10] = 1e-30
    rows[3, 11] = -1e-40
    rows[4] = rng.standard_normal(96) * F32(1e20)
    add("extremes (5,96): +-1e30 with normals, all ~1e-30, float32 max, subnormals, ~1e20", rows)

    tie_max = [1.0, 127.0, 3.7, 0.0123, 127.0 / 64.0, 2.0 ** -10, 1000.0, 0.5]
    add("ties (8,128): x*scale lands exactly on k+0.5", np.stack([_tie_row(rng, 128, m) for m in tie_max]))
    add("negative-only rows (3,200)", -np.abs(rng.standard_normal((3, 200))) - F32(1e-3))
    add("uniform[-4,4) (3,1001): odd row length", rng.uniform(-4, 4, (3, 1001)))
    return cases


def quantize_act(name: str, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    out_compiled = ActQuant.apply(x)
    with torch.compiler.set_stance("force_eager"):
        out_eager = ActQuant.apply(x)
    xf = x.float()
    # exactly the expression of transformers' ActQuant.forward
    scale = 127 / xf.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    q = (xf * scale).round().clamp(-128, 127)
    deq = (q / scale).to(x.dtype)
    assert bits_equal(deq, out_compiled), f"{name}: codes/scale != compiled ActQuant"
    assert bits_equal(deq, out_eager), f"{name}: codes/scale != eager ActQuant"

    # the older BitLinear class (linear_class="bitlinear"): its own @torch.compile'd method
    # activation_quant (scale = Qp / max.clamp(min=1e-5), Qp = 127) returns (int8 codes, scale).
    bl = BitLinear(x.shape[-1], 4, bias=False, dtype=x.dtype)
    bl_q, bl_s = bl.activation_quant(x)
    with torch.compiler.set_stance("force_eager"):
        bl_qe, bl_se = bl.activation_quant(x)
    found = {
        "bitlinear_compiled_scale_equal": bits_equal(bl_s.float(), scale),
        "bitlinear_compiled_codes_equal": bool(torch.equal(bl_q, q.to(torch.int8))),
        "bitlinear_eager_scale_equal": bits_equal(bl_se.float(), scale),
        "bitlinear_eager_codes_equal": bool(torch.equal(bl_qe, q.to(torch.int8))),
    }
    return {
        f"{name}.x": x.contiguous(),
        f"{name}.codes": q.to(torch.int8),
        f"{name}.scale": scale.contiguous(),
        f"{name}.dequant": out_compiled.contiguous(),
    }, found


ACT_LAYOUT = {
    "x": "input activations [rows, cols] (float32 in activations.safetensors, bfloat16 in "
         "activations_bf16.safetensors)",
    "codes": "int8: clamp(round_half_even(x * scale), -128, 127)",
    "scale": "float32 [rows, 1]: 127 / max(max|x| over the row, 1e-5), computed as (1/m)*127 "
             "with two float32 roundings (computed from x.float())",
    "dequant": "the real transformers.integrations.bitnet.ActQuant.apply(x) output, same dtype as x "
               "(== codes / scale bit for bit, incl. -0.0 for negative x rounding to 0; compiled "
               "and eager agree)",
}


def gen_activations(out_dir: Path) -> dict[str, str]:
    findings: dict[str, dict[str, bool]] = {}

    def write(path: Path, cases: list[tuple[str, str, torch.Tensor]]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        desc: dict[str, str] = {}
        for name, d, x in cases:
            t, f = quantize_act(name, x)
            tensors.update(t)
            desc[name] = d
            fd = findings.setdefault(str(x.dtype).removeprefix("torch."), {})
            for k, v in f.items():
                fd[k] = fd.get(k, True) and v
        md = common_metadata()
        md["cases"] = json.dumps(desc)
        md["layout"] = json.dumps(ACT_LAYOUT)
        md["bitlinear_activation_quant_matches_actquant"] = json.dumps(
            findings[str(cases[0][2].dtype).removeprefix("torch.")])
        save_safetensors(tensors, path, md)

    write(out_dir / "quant" / "activations.safetensors",
          [(n, d, torch.from_numpy(a)) for n, d, a in act_cases()])
    rng = np.random.default_rng(0x5EED_0004)
    bf = [("ab0", "bf16 normal*2 (4,256)",
           torch.from_numpy((rng.standard_normal((4, 256)) * 2).astype(F32)).to(torch.bfloat16)),
          ("ab1", "bf16 ties and extremes (2,64)", torch.from_numpy(np.stack([
              _tie_row(rng, 64, 1.0), np.resize(np.array([1e30, -1e-30, 1e-40, -0.0, 3.0], F32), 64)]))
           .to(torch.bfloat16))]
    write(out_dir / "quant" / "activations_bf16.safetensors", bf)

    # Finding (torch 2.15 / transformers 5.23): for float32 input BitLinear.activation_quant produces
    # exactly the same scale bits and int8 codes as ActQuant for every case here, compiled and eager:
    # both write 127 / m.clamp(min=1e-5), which torch evaluates as reciprocal(m) * 127
    # (Tensor.__rtruediv__; Inductor lowers it the same way), so the older class needs no separate
    # golden data. (For bf16 input they differ by construction: BitLinear does not upcast, its
    # scale is computed and returned in bf16; recorded in the metadata, not asserted.)
    assert all(findings["float32"].values()), f"BitLinear.activation_quant differs: {findings}"
    return {"bitlinear_activation_quant_matches": json.dumps(findings)}


# ============================================================================================
# (c) GGUF written by gguf.GGUFWriter
# ============================================================================================

def add_gguf_metadata(w: gguf.GGUFWriter) -> None:
    a = "golden"
    w.add_uint8(f"{a}.u8", 255)
    w.add_int8(f"{a}.i8", -128)
    w.add_uint16(f"{a}.u16", 65535)
    w.add_int16(f"{a}.i16", -32768)
    w.add_uint32(f"{a}.u32", 4294967295)
    w.add_int32(f"{a}.i32", -2147483648)
    w.add_float32(f"{a}.f32", float(F32(3.14159265358979)))
    w.add_float32(f"{a}.f32_neg_zero", -0.0)
    w.add_float32(f"{a}.f32_max", float(np.finfo(F32).max))
    w.add_float32(f"{a}.f32_subnormal", float(F32(1.4e-45)))
    w.add_bool(f"{a}.bool_true", True)
    w.add_bool(f"{a}.bool_false", False)
    w.add_string(f"{a}.str", "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001F917 \"quoted\"\n\ttab")
    # add_string() silently skips empty strings; add_key_value writes one.
    w.add_key_value(f"{a}.str_empty", "", VT.STRING)
    w.add_uint64(f"{a}.u64", 18446744073709551615)
    w.add_int64(f"{a}.i64", -9223372036854775808)
    w.add_float64(f"{a}.f64", 0.1)
    w.add_float64(f"{a}.f64_big", 1e300)
    w.add_array(f"{a}.arr_i32", [1, -2, 3, 2147483647])  # ints default to INT32
    w.add_key_value(f"{a}.arr_u8", [0, 1, 255], VT.ARRAY, sub_type=VT.UINT8)
    w.add_key_value(f"{a}.arr_i8", [-128, 0, 127], VT.ARRAY, sub_type=VT.INT8)
    w.add_key_value(f"{a}.arr_u16", [0, 65535], VT.ARRAY, sub_type=VT.UINT16)
    w.add_key_value(f"{a}.arr_i16", [-32768, 32767], VT.ARRAY, sub_type=VT.INT16)
    w.add_key_value(f"{a}.arr_u32", [0, 4294967295], VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value(f"{a}.arr_u64", [0, 18446744073709551615], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value(f"{a}.arr_i64", [-9223372036854775808, 9223372036854775807], VT.ARRAY, sub_type=VT.INT64)
    w.add_array(f"{a}.arr_f32", [0.5, -1.25, float(F32(1e-7)), 65504.0])  # floats default to FLOAT32
    w.add_key_value(f"{a}.arr_f64", [0.1, -2.5e-300, 1e300], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_array(f"{a}.arr_bool", [True, False, True])
    w.add_array(f"{a}.arr_str", ["a", "", "\u00fc", "\U0001F917 emoji", "tab\there"])
    # Nested arrays: the writer recurses (each inner array carries its own element type);
    # gguf.GGUFReader parses them but ReaderField.contents() flattens them.
    w.add_key_value(f"{a}.arr_nested_i32", [[1, 2], [3], [4, 5, 6]], VT.ARRAY, sub_type=VT.ARRAY)
    w.add_key_value(f"{a}.arr_nested_str", [["x", "y"], ["z"]], VT.ARRAY, sub_type=VT.ARRAY)
    # Empty arrays cannot be written: add_array() skips them and _pack_val raises
    # "Invalid GGUF metadata array. Empty array" (checked in gen_gguf).


def gguf_tensors(rng: np.random.Generator) -> list[tuple[str, np.ndarray, QT]]:
    """(name, numpy data in numpy shape order (ne0 last), ggml type)."""
    out: list[tuple[str, np.ndarray, QT]] = []
    shape = (4, 512)  # 2 rows of 256-blocks per row for the K/TQ types

    def ternary_blocks() -> np.ndarray:
        n_blocks = shape[0] * shape[1] // 256
        codes = rng.integers(-1, 2, size=(n_blocks, 256)).astype(F32)
        codes[:, 0] = rng.choice([-1.0, 1.0], size=n_blocks)  # every block has a nonzero
        scales = np.abs(rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16).astype(F32)
        scales[scales == 0] = F32(0.01)
        x = codes * scales
        x[3] = 0.0  # one all-zero block (d = 0)
        return x.reshape(shape).astype(F32)

    out.append(("f32_1d", rng.standard_normal(37).astype(F32), QT.F32))
    out.append(("f32_3d", rng.standard_normal((2, 3, 5)).astype(F32), QT.F32))
    out.append(("f32_2d", rng.standard_normal((3, 256)).astype(F32), QT.F32))
    out.append(("f16", rng.standard_normal(shape).astype(F32), QT.F16))
    bf = rng.standard_normal(shape).astype(F32)
    bf[0, :4] = [np.inf, -np.inf, 3.0e38, -0.0]  # bf16 rounding up to inf, signed zero
    out.append(("bf16", bf, QT.BF16))
    out.append(("q8_0", rng.standard_normal(shape).astype(F32), QT.Q8_0))
    out.append(("q4_0", rng.standard_normal(shape).astype(F32), QT.Q4_0))
    out.append(("q4_1", rng.standard_normal(shape).astype(F32), QT.Q4_1))
    out.append(("tq1_0_ternary", ternary_blocks(), QT.TQ1_0))
    out.append(("tq2_0_ternary", ternary_blocks(), QT.TQ2_0))
    out.append(("tq1_0_normal", rng.standard_normal(shape).astype(F32), QT.TQ1_0))
    out.append(("tq2_0_normal", rng.standard_normal(shape).astype(F32), QT.TQ2_0))
    return out


def gen_gguf(out_dir: Path) -> dict[str, str]:
    d = out_dir / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "py_written.gguf"
    rng = np.random.default_rng(0x5EED_0005)

    w = gguf.GGUFWriter(str(path), arch="golden")
    add_gguf_metadata(w)
    try:  # document the writer's refusal of empty arrays
        w._pack_val([], VT.ARRAY, add_vtype=True)
        empty_array_ok = True
    except ValueError:
        empty_array_ok = False
    assert not empty_array_ok, "gguf writer now accepts empty arrays: add one to the golden file"

    src = gguf_tensors(rng)
    for name, data, qt in src:
        if qt == QT.F32:
            w.add_tensor(name, data)
        elif qt == QT.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            raw = gguf.quants.quantize(data, qt)  # uint8, byte shape
            w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # read back and record what gguf.GGUFReader / gguf.quants.dequantize give
    r = gguf.GGUFReader(str(path))
    meta = gguf_check.read_metadata(r)
    expected_t: dict[str, np.ndarray] = {}
    tinfo = []
    srcmap = {n: (a, q) for n, a, q in src}
    for t in r.tensors:
        vals = gguf_check.tensor_values(t)
        a, qt = srcmap[t.name]
        assert vals.shape == a.shape, (t.name, vals.shape, a.shape)
        if t.name.endswith("_ternary"):
            assert np.array_equal(vals.view(np.uint32), a.view(np.uint32)), f"{t.name}: ternary round trip"
        if qt == QT.F32:
            assert np.array_equal(vals.view(np.uint32), a.view(np.uint32)), t.name
        expected_t[t.name] = torch.from_numpy(np.array(vals, dtype=F32, order="C", copy=True))
        tinfo.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "type_id": int(t.tensor_type),
            "shape": [int(x) for x in t.shape],            # GGUF order, ne0 first, as stored
            "numpy_shape": list(vals.shape),               # ne0 last
            "n_elements": int(t.n_elements),
            "offset": int(t.field.parts[-1][0]),           # relative to the data section
            "absolute_offset": int(t.data_offset),
            "nbytes": int(t.n_bytes),
        })
    expected = {
        "generator": GENERATOR,
        "gguf_package": pkg_version("gguf"),
        "version": int(r.fields["GGUF.version"].parts[0][0]),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "tensor_count": len(r.tensors),
        "kv_count": int(r.fields["GGUF.kv_count"].parts[0][0]),
        "file_size": path.stat().st_size,
        "file_sha256": sha256_file(path),
        "metadata_keys": list(meta.keys()),
        "metadata": meta,
        "tensors": tinfo,
        "writer_notes": {
            "value_types_written": sorted({m["type"] for m in meta.values()}
                                          | {m.get("element_type") for m in meta.values()} - {None}),
            "empty_array": "not writable: GGUFWriter.add_array() skips it, _pack_val raises ValueError",
            "empty_string": "add_string() skips it; add_key_value(key, '', STRING) writes it",
            "nested_array": "writable (sub_type=ARRAY); GGUFReader.contents() flattens it",
            "bf16": "gguf.quants.quantize(x, BF16) + add_tensor(raw_dtype=BF16); round to nearest even",
        },
    }
    (d / "py_written.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    md = common_metadata()
    md["source"] = "gguf/py_written.gguf read back with gguf.GGUFReader + gguf.quants.dequantize"
    save_safetensors(expected_t, d / "py_written.expected.safetensors", md)
    return {"gguf_value_types": ",".join(expected["writer_notes"]["value_types_written"])}


# ============================================================================================
# (e) SmolLM2 GGUF: tensor digests and tokenizer goldens
# ============================================================================================

TOKENIZER_TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you?",
    "  two leading spaces",
    "trailing spaces   ",
    "\n",
    "\n\n\n",
    "line1\nline2\r\nline3\n",
    "def f(x):\n\treturn x  +  1\n\n\nclass A:\n    pass\n",
    "    indented    code\t\ttabs\t",
    "12345678",
    "I have 123 apples and 4567 oranges.",
    "3.14159 2024-01-01 1,000,000 0x1F",
    " 2024",
    "a1b2c3",
    "emoji \U0001F917\U0001F680\U0001F44D\U0001F3FD and ZWJ \U0001F468\u200D\U0001F469\u200D\U0001F467",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\u6d4b\u8bd5\uff0c\u6807\u70b9\u3002",
    "\ud55c\uad6d\uc5b4",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m e\u0301",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text with <|im_end|> inside and <|unknown|> too",
    "don't won't I'm you're it's",
    "https://example.com/path?q=1&r=2#frag",
    "\u00a0nbsp\u2003emspace\u3000ideographic",
    "MiXeD CASE, UPPER lower",
]


def _meta_summary(meta: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for k, v in meta.items():
        if v["type"] == "ARRAY" and len(v["value"]) > 32:
            out[k] = {"type": "ARRAY", "element_type": v["element_type"], "length": len(v["value"]),
                      "first5": v["value"][:5]}
        else:
            out[k] = v
    return out


def gen_smollm2(out_dir: Path, gguf_path: Path) -> dict[str, str]:
    d = out_dir / "smollm2"
    d.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(str(gguf_path))
    meta = gguf_check.read_metadata(r)
    tensors = []
    for t in r.tensors:
        vals = np.ascontiguousarray(gguf_check.tensor_values(t), dtype="<f4")
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "type_id": int(t.tensor_type),
            "shape": [int(x) for x in t.shape],
            "n_elements": int(t.n_elements),
            "offset": int(t.field.parts[-1][0]),
            "nbytes": int(t.n_bytes),
            "sha256_f32": hashlib.sha256(vals.tobytes()).hexdigest(),
            "first8": [float(v) for v in vals.reshape(-1)[:8]],
            "sum_f64": float(vals.astype(np.float64).sum()),
        })
    doc = {
        "generator": GENERATOR,
        "gguf_package": pkg_version("gguf"),
        "source_file": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "source_sha256": sha256_file(gguf_path),
        "version": int(r.fields["GGUF.version"].parts[0][0]),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata_keys": list(meta.keys()),
        "metadata": _meta_summary(meta),
        "notes": "sha256_f32: sha256 of the little-endian float32 bytes of gguf.quants.dequantize(...), "
                 "C order of the numpy shape (ne0 last); sum_f64: numpy float64 sum of those values "
                 "(pairwise summation: compare with a tolerance)",
        "tensors": tensors,
    }
    (d / "tensors.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- tokenizer (transformers converts the GGUF tokenizer metadata) ----
    from transformers import AutoTokenizer
    from tokenizers import pre_tokenizers

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cfg = json.loads(tok.backend_tokenizer.to_str())
    # llama.cpp's "smollm" pre-tokenizer (tokenizer.ggml.pre) first splits every \p{N} digit on its
    # own, then applies the GPT-2 regex; the transformers GGUF conversion keeps only ByteLevel.
    # Record the ids with individual digits too, so a divergence is visible.
    tok_digits = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok_digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        ids_sp = tok.encode(text, add_special_tokens=True)
        ids_dg = tok_digits.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": ids,
            "ids_add_special": ids_sp,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": tok.decode(ids),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            "decode_add_special": tok.decode(ids_sp),
            "decode_add_special_skip_special": tok.decode(ids_sp, skip_special_tokens=True),
            "ids_individual_digits": ids_dg,
            "individual_digits_differs": ids_dg != ids,
        })
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(rendered_ids, dict) or hasattr(rendered_ids, "keys"):
        rendered_ids = rendered_ids["input_ids"]
    raw_template = meta.get("tokenizer.chat_template", {}).get("value")
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        special[role] = {"token": getattr(tok, f"{role}_token"), "id": getattr(tok, f"{role}_token_id")}
    tdoc = {
        "generator": GENERATOR,
        "transformers": transformers.__version__,
        "tokenizers": pkg_version("tokenizers"),
        "source_file": gguf_path.name,
        "loader": "transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        "tokenizer_class": type(tok).__name__,
        "vocab_size": tok.vocab_size,
        "len_tokenizer": len(tok),
        "special_tokens": special,
        "all_special_tokens": list(tok.all_special_tokens),
        "added_tokens": [{"id": a["id"], "content": a["content"], "special": a["special"]}
                         for a in cfg.get("added_tokens", [])],
        "backend": {k: cfg.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
        "backend_model": {k: v for k, v in cfg["model"].items() if k not in ("vocab", "merges")},
        "cases": cases,
        "chat": {
            "messages": messages,
            "add_generation_prompt": True,
            "rendered": rendered,
            "rendered_ids": list(rendered_ids),
            "template_gguf_metadata": raw_template,
            "template_transformers": tok.chat_template,
        },
    }
    (d / "tokenizer_golden.json").write_text(json.dumps(tdoc, indent=1, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    ndiff = sum(c["individual_digits_differs"] for c in cases)
    return {"smollm2_tensors": str(len(tensors)), "tokenizer_cases": str(len(cases)),
            "individual_digit_cases_differing": str(ndiff)}


# ============================================================================================

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "testdata" / "golden")
    ap.add_argument("--smollm2", type=Path, default=None, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--any-isa", action="store_true",
                    help="allow an Inductor vector ISA other than AVX-512 (the compiled-path "
                         "weight goldens then differ from the committed ones)")
    args = ap.parse_args()

    assert torch.get_num_threads() == 1
    lanes = inductor_lanes()
    if lanes != 16 and not args.any_isa:
        print(f"error: Inductor picked {cpu_vec_isa.pick_vec_isa()} ({lanes} float lanes); the committed "
              "goldens were made with AVX-512 (16 lanes). Use an AVX-512 machine or pass --any-isa.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, str] = {}
    summary.update(gen_weights(out, lanes))
    summary.update(gen_activations(out))
    summary.update(gen_gguf(out))
    if args.smollm2 is not None:
        summary.update(gen_smollm2(out, args.smollm2))
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9}  {sha256_file(p)[:16]}  {p.relative_to(out)}")
    for k, v in summary.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
