#!/usr/bin/env python3
"""Export tiny-bitnet-c to ONNX with torch's dynamo exporter (torch.onnx.export(..., dynamo=True),
the default since torch 2.9), and record how that exporter names and stores the weights.

    python make_onnx_dynamo_model.py [--out DIR] [--facts FILE]

Pinned stack: requirements.txt plus requirements-onnx.txt (onnx, onnxscript: the dynamo exporter
translates through onnxscript and runs its optimizer). Writes:
  testdata/models/tiny-bitnet-c-onnx-dynamo/
    model.onnx        opset 20, dynamic batch/seq axes, exported with the defaults (optimize=True,
                      external_data=True): the linear weights come out constant-folded and transposed
                      ([in, out], MatMul operand) under generated names (val_N); parameters used as
                      they are keep their Hugging Face names (norms, lm_head.weight);
    model.onnx.data   every initializer over 256 bytes (the exporter's own file name: <model>.data);
    config.json       tiny-bitnet-c's, as in tiny-bitnet-c-onnx (online quantization_config).
  testdata/golden/onnx/tiny-bitnet-c-onnx-dynamo.json
    the initializer table (name, dtype, dims, storage, derived HF name and layout, how derived) and
    the facts checked below.

Checked every run (asserts): every initializer that holds a model weight maps to a Hugging Face
parameter through three independent routes that must agree (value_info metadata
pkg.onnxscript.optimizer.folded_from / the parameter's own name, the consuming node's
pkg.torch.onnx.name_scopes, and the fx_node's p_<name> argument), and its values equal the
safetensors tensor exactly (transposed where the exporter transposed it). The graph is also run
with onnx's reference evaluator and compared with the torch forward.

The network is BitNetForCausalLM with plain float linears (the float master weights of
testdata/models/tiny-bitnet-c-float loaded without a quantization_config), as make_onnx_model.py
exports it with the older TorchScript exporter.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.numpy_helper  # noqa: E402
import safetensors.torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BitNetConfig, BitNetForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SRC = REPO_ROOT / "testdata" / "models" / "tiny-bitnet-c-float"
GENERATOR = "scripts/golden/make_onnx_dynamo_model.py"
IDS = [[3, 50, 100, 7, 64, 9, 1, 77]]  # the example input make_onnx_model.py traces with

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pkg_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def build_model() -> tuple[BitNetForCausalLM, dict[str, torch.Tensor]]:
    cfg = json.loads((SRC / "config.json").read_text())
    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "model_type")}
    model = BitNetForCausalLM(BitNetConfig(**plain)).eval()
    state = safetensors.torch.load_file(str(SRC / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    model.config.use_cache = False  # logits only: no cache outputs in the graph
    return model, state


def export(model: torch.nn.Module, out: Path) -> None:
    ids = torch.tensor(IDS)
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            # An explicit all-ones mask, as in make_onnx_model.py. Everything else is the default:
            # dynamo=True, optimize=True, external_data=True, the exporter's default opset.
            torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], dynamo=True,
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
        files = sorted(p.name for p in Path(tmp).iterdir())
        assert files == ["model.onnx", "model.onnx.data"], files
        out.mkdir(parents=True, exist_ok=True)
        for f in ("model.onnx", "model.onnx.data", "model.onnx_data"):
            (out / f).unlink(missing_ok=True)
        for f in files:
            shutil.copyfile(Path(tmp) / f, out / f)
    shutil.copy(SRC / "config.json", out / "config.json")


def md(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def dtype_name(t: int) -> str:
    return onnx.TensorProto.DataType.Name(t)


def inspect(out: Path, state: dict[str, torch.Tensor]) -> dict:
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    g = m.graph
    full = onnx.load(str(out / "model.onnx"), load_external_data=True)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    vi = {v.name: md(v) for v in list(g.value_info) + list(g.input) + list(g.output)}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))

    rows = []
    hf_seen: dict[str, str] = {}
    for t in g.initializer:
        loc = {e.key: e.value for e in t.external_data}
        storage = (f"external {loc['location']} @{loc['offset']}+{loc['length']}"
                   if t.data_location == onnx.TensorProto.EXTERNAL else f"inline raw_data ({len(t.raw_data)} B)")
        meta = vi.get(t.name, {})
        kind = meta.get("pkg.torch.export.graph_signature.InputSpec.kind")
        folded = meta.get("pkg.onnxscript.optimizer.folded_from")
        users = consumers.get(t.name, [])
        row = {"name": t.name, "dtype": dtype_name(t.data_type), "dims": [int(d) for d in t.dims],
               "storage": storage, "users": [f"{n.op_type}:{n.name}[{i}]" for n, i in users],
               "value_info_metadata": meta}
        hf, layout, how = None, None, None
        if kind in ("PARAMETER", "BUFFER"):
            hf, layout, how = t.name, "as is", f"initializer name; value_info InputSpec.kind={kind}"
            assert meta["pkg.torch.onnx.original_node_name"] == ("p_" if kind == "PARAMETER" else "b_") + \
                t.name.replace(".", "_"), meta
        elif folded is not None:
            src = ast.literal_eval(folded)
            if len(src) == 1 and src[0] in state:
                hf, how = src[0], "value_info pkg.onnxscript.optimizer.folded_from"
                # the consumer: a MatMul taking this initializer as its right operand
                assert len(users) == 1 and users[0][0].op_type == "MatMul" and users[0][1] == 1, row
                node = users[0][0]
                nmd = md(node)
                scopes = ast.literal_eval(nmd["pkg.torch.onnx.name_scopes"])
                assert scopes[-2] + ".weight" == hf, (scopes, hf)  # module path of the linear
                assert f"%p_{hf.replace('.', '_')})" in nmd["pkg.torch.onnx.fx_node"], nmd["pkg.torch.onnx.fx_node"]
                assert "aten.linear.default" in nmd["pkg.torch.onnx.fx_node"]
                row["consumer_name_scopes"] = scopes
                row["consumer_fx_node"] = nmd["pkg.torch.onnx.fx_node"]
                want = state[hf].numpy()
                got = values[t.name]
                if tuple(got.shape) == want.shape[::-1] and np.array_equal(got.T.view(np.uint32), want.view(np.uint32)):
                    layout = "transposed [in, out] (MatMul B operand)"
                elif tuple(got.shape) == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                    layout = "as is"
                else:
                    raise AssertionError(f"{t.name} does not hold {hf}")
        if hf is not None:
            assert hf not in hf_seen, (hf, hf_seen[hf], t.name)
            hf_seen[hf] = t.name
            if layout == "as is" and hf in state:
                assert np.array_equal(values[t.name].view(np.uint32), state[hf].numpy().view(np.uint32)), hf
        row.update({"hf_name": hf, "layout": layout, "derived_by": how})
        rows.append(row)

    # every HF linear weight found, exactly once, transposed
    linears = [k for k in state if k.endswith(tuple(f"{s}.weight" for s in LINEAR_SUFFIXES))]
    for k in linears:
        assert k in hf_seen, f"{k}: no initializer"
        r = next(r for r in rows if r["hf_name"] == k)
        assert r["layout"].startswith("transposed") and r["name"].startswith("val_"), r
    # the tied embedding: one initializer, named lm_head.weight, equal to model.embed_tokens.weight
    assert "model.embed_tokens.weight" not in hf_seen and "lm_head.weight" in hf_seen
    assert np.array_equal(values["lm_head.weight"].view(np.uint32),
                          state["model.embed_tokens.weight"].numpy().view(np.uint32))
    lm_users = sorted((n.op_type, i) for n, i in consumers["lm_head.weight"])
    assert lm_users == [("Gather", 0), ("Transpose", 0)], lm_users
    for k in state:
        if k != "model.embed_tokens.weight":
            assert k in hf_seen, f"{k}: not in the graph under its name or folded_from"

    # node metadata: keys and an example (the q_proj MatMul)
    keys: dict[str, int] = {}
    for n in g.node:
        for k in md(n):
            keys[k] = keys.get(k, 0) + 1
    q_node = next(n for n in g.node if n.op_type == "MatMul" and
                  "model.layers.0.self_attn.q_proj" in md(n).get("pkg.torch.onnx.name_scopes", ""))
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    gmd = md(g)
    facts = {
        "ir_version": m.ir_version,
        "opset_import": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}",
        "graph_name": g.name,
        "inputs": [{"name": i.name, "elem_type": dtype_name(i.type.tensor_type.elem_type),
                    "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim],
                    "metadata": md(i)} for i in g.input],
        "outputs": [{"name": o.name, "elem_type": dtype_name(o.type.tensor_type.elem_type),
                     "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim],
                     "metadata": md(o)} for o in g.output],
        "n_nodes": len(g.node), "op_counts": dict(sorted(ops.items())),
        "n_initializers": len(g.initializer),
        "node_names_example": [n.name for n in g.node[:6]],
        "node_metadata_keys_count": dict(sorted(keys.items())),
        "node_metadata_example_q_proj_matmul": {"op_type": q_node.op_type, "name": q_node.name,
                                                "inputs": list(q_node.input), "metadata": md(q_node)},
        "model_metadata_props": md(m),
        "graph_metadata_props_keys": sorted(gmd),
        "graph_signature": gmd.get("pkg.torch.export.ExportedProgram.graph_signature"),
        "functions": len(m.functions),
        "initializer_metadata_props_present": any(len(t.metadata_props) for t in g.initializer),
        "external_data_file": sorted({e.value for t in g.initializer for e in t.external_data
                                      if e.key == "location"}),
        "external_data_offsets_dense": True,
    }
    # external data is packed densely (onnx_ir default: no alignment), in initializer order
    off = 0
    for t in g.initializer:
        loc = {e.key: e.value for e in t.external_data}
        if loc:
            facts["external_data_offsets_dense"] &= int(loc["offset"]) == off
            off = int(loc["offset"]) + int(loc["length"])
    facts["external_data_total_bytes"] = off
    inline = [r for r in rows if r["storage"].startswith("inline")]
    external = [r for r in rows if r["storage"].startswith("external")]
    facts["largest_inline_bytes"] = max(int(r["storage"].split("(")[1].split()[0]) for r in inline)
    facts["smallest_external_bytes"] = min(int(r["storage"].rsplit("+", 1)[1]) for r in external)
    return {"rows": rows, "facts": facts}


def check_numerics(out: Path, model: torch.nn.Module) -> dict:
    """Run the exported graph with onnx's reference evaluator (another batch/length than the
    trace, to exercise the dynamic axes) and compare with torch."""
    from onnx.reference import ReferenceEvaluator
    ids = torch.tensor([[5, 17, 99, 3, 120, 64, 2, 8, 11, 40, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.numpy()
    sess = ReferenceEvaluator(str(out / "model.onnx"))
    (got,) = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return {"input_shape": list(ids.shape), "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
            "max_abs_logit": float(np.abs(ref).max())}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| initializer | dtype | dims | storage | HF parameter | layout |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['dtype']} | {r['dims']} | {r['storage']} | "
                     f"{'`' + r['hf_name'] + '`' if r['hf_name'] else '- (constant)'} | {r['layout'] or '-'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "testdata" / "models" / "tiny-bitnet-c-onnx-dynamo")
    ap.add_argument("--facts", type=Path,
                    default=REPO_ROOT / "testdata" / "golden" / "onnx" / "tiny-bitnet-c-onnx-dynamo.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, state = build_model()
    export(model, args.out)
    onnx.checker.check_model(str(args.out / "model.onnx"))
    res = inspect(args.out, state)
    res["facts"]["reference_evaluator"] = check_numerics(args.out, model)
    doc = {"generator": GENERATOR,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "onnx": onnx.__version__, "onnxscript": pkg_version("onnxscript"),
                        "onnx_ir": pkg_version("onnx_ir")},
           "export_call": "torch.onnx.export(model, (input_ids, attention_mask), path, input_names=[input_ids, "
                          "attention_mask], output_names=[logits], dynamo=True, dynamic_shapes=({0: batch, 1: seq}, "
                          "{0: batch, 1: seq})); defaults otherwise (optimize=True, external_data=True, opset default)",
           "source": "testdata/models/tiny-bitnet-c-float",
           "facts": res["facts"], "initializers": res["rows"]}
    args.facts.parent.mkdir(parents=True, exist_ok=True)
    args.facts.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(markdown_table(res["rows"]))
    print(json.dumps(res["facts"]["reference_evaluator"]))
    for f in sorted(args.out.iterdir()) + [args.facts]:
        print(f"{f.stat().st_size:>9}  {f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
