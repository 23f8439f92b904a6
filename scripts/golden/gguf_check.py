#!/usr/bin/env python3
"""Check a GGUF file (typically written by the Rust side) against an expected JSON.

    python gguf_check.py FILE EXPECTED_JSON

Needs only `gguf` and `numpy` (see requirements-ci.txt). Exit status: 0 on match, 1 on mismatch,
2 on usage / unreadable input.

EXPECTED_JSON schema (all top-level keys except "tensors"/"metadata" are optional):

    {
      "version": 3,                      # optional: GGUF version
      "alignment": 32,                   # optional: data alignment
      "metadata": {                      # every key of the file (except GGUF.* pseudo keys)
        "some.key": VALUE,               # plain value: compared by value
        "other.key": {"type": "UINT32", "value": 7},   # typed form (same as make_golden.py writes)
        "arr.key": {"type": "ARRAY", "element_type": "INT32", "value": [1, 2]}
      },
      "tensors": {                       # every tensor of the file
        "name": {
          "type": "Q4_0",                # ggml type name (or "type_id": 2)
          "shape": [ne0, ne1, ...],      # GGUF order: ne0 (the contiguous row length) first
          "values": [floats ...]         # dequantized values, C order of the numpy shape [.., ne1, ne0]
          # optional: "offset" (relative to the data section), "nbytes",
          #           "sha256" (of the little-endian float32 bytes, instead of or besides "values")
        }
      },
      "tensor_order": ["name", ...]      # optional: tensor order in the file
    }

Plain metadata values are compared according to the type found in the file: integers and bools
exactly, FLOAT32 as float32 (the JSON number is rounded to float32 first), FLOAT64 exactly, strings
exactly, arrays element by element (nested arrays as nested lists). Tensor values are compared
exactly as float32 (bit patterns, so -0.0 != 0.0; any NaN matches any NaN). JSON cannot hold
non-finite numbers, so "NaN", "Infinity", "-Infinity" (also "nan", "inf", "-inf") strings are
accepted as values.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from typing import Any

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

# --------------------------------------------------------------------------------------------
# Metadata decoding that keeps nested arrays nested (GGUFReader.contents() flattens them).
# --------------------------------------------------------------------------------------------

_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


def _decode_value(buf: memoryview, off: int, vtype: GGUFValueType) -> tuple[dict[str, Any], int]:
    """Decode one value at buf[off:]. Returns ({"type", "value"[, "element_type"]}, new offset)."""
    if vtype in _SCALAR_FMT:
        fmt = _SCALAR_FMT[vtype]
        (val,) = struct.unpack_from(fmt, buf, off)
        if vtype == GGUFValueType.BOOL:
            raw = buf[off]
            if raw not in (0, 1):
                raise ValueError(f"bool byte {raw} at offset {off} is neither 0 nor 1")
        return {"type": vtype.name, "value": val}, off + struct.calcsize(fmt)
    if vtype == GGUFValueType.STRING:
        (n,) = struct.unpack_from("<Q", buf, off)
        off += 8
        s = bytes(buf[off:off + n]).decode("utf-8")
        return {"type": "STRING", "value": s}, off + n
    if vtype == GGUFValueType.ARRAY:
        (et,) = struct.unpack_from("<I", buf, off)
        (n,) = struct.unpack_from("<Q", buf, off + 4)
        off += 12
        etype = GGUFValueType(et)
        items = []
        for _ in range(n):
            item, off = _decode_value(buf, off, etype)
            if etype == GGUFValueType.ARRAY:
                items.append({"element_type": item["element_type"], "value": item["value"]})
            else:
                items.append(item["value"])
        return {"type": "ARRAY", "element_type": etype.name, "value": items}, off
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_metadata(reader: GGUFReader) -> dict[str, dict[str, Any]]:
    """{key: {"type": NAME, "value": v[, "element_type": NAME]}} in file order, GGUF.* keys excluded."""
    if reader.byte_order != "I" or sys.byteorder != "little":
        raise ValueError("only little-endian GGUF files on little-endian hosts are supported here")
    buf = memoryview(reader.data)
    out: dict[str, dict[str, Any]] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        off = field.offset
        (klen,) = struct.unpack_from("<Q", buf, off)
        off += 8
        k = bytes(buf[off:off + klen]).decode("utf-8")
        assert k == key, (k, key)
        off += klen
        (vt,) = struct.unpack_from("<I", buf, off)
        off += 4
        val, _ = _decode_value(buf, off, GGUFValueType(vt))
        out[key] = val
    return out


# --------------------------------------------------------------------------------------------
# Tensor decoding
# --------------------------------------------------------------------------------------------

_PLAIN_NUMERIC = {
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
    GGMLQuantizationType.F64: np.float64,
}


def tensor_values(t) -> np.ndarray:
    """Dequantized values of a ReaderTensor, numpy shape order (ne0 last). float32 for float and
    quantized types; the integer types and F64 keep their own dtype."""
    if t.tensor_type in _PLAIN_NUMERIC:
        return np.asarray(t.data)
    vals = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(vals, dtype=np.float32)


def gguf_shape(t) -> list[int]:
    return [int(d) for d in t.shape]


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

_NONFINITE = {"nan": math.nan, "+nan": math.nan, "-nan": math.nan, "inf": math.inf, "+inf": math.inf,
              "infinity": math.inf, "+infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}


def _as_float(v: Any) -> float:
    if isinstance(v, str):
        key = v.strip().lower()
        if key in _NONFINITE:
            return _NONFINITE[key]
        raise ValueError(f"not a number: {v!r}")
    if isinstance(v, bool):
        raise ValueError(f"bool where a number is expected: {v!r}")
    return float(v)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f64_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def _same_float(a: float, b: float, width: int) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    if width == 32:
        with np.errstate(over="ignore"):
            return _f32_bits(float(np.float32(a))) == _f32_bits(float(np.float32(b)))
    return _f64_bits(a) == _f64_bits(b)


def _cmp_value(path: str, got: dict[str, Any], exp: Any, diffs: list[str]) -> None:
    """got: typed dict from read_metadata (or an inner array dict); exp: plain or typed JSON value."""
    gtype = got.get("type", "ARRAY")
    if isinstance(exp, dict) and "value" in exp:
        if "type" in exp and exp["type"] != gtype:
            diffs.append(f"{path}: type {gtype} in file, expected {exp['type']}")
            return
        if "element_type" in exp and exp["element_type"] != got.get("element_type"):
            diffs.append(f"{path}: element type {got.get('element_type')} in file, expected {exp['element_type']}")
            return
        exp = exp["value"]
    gval = got["value"]
    if gtype == "ARRAY":
        etype = got["element_type"]
        if not isinstance(exp, list):
            diffs.append(f"{path}: file has an array of {len(gval)} {etype}, expected {exp!r}")
            return
        if len(exp) != len(gval):
            diffs.append(f"{path}: array length {len(gval)} in file, expected {len(exp)}")
        for i, (g, e) in enumerate(zip(gval, exp)):
            if etype == "ARRAY":
                _cmp_value(f"{path}[{i}]", {"type": "ARRAY", **g}, e, diffs)
            else:
                _cmp_value(f"{path}[{i}]", {"type": etype, "value": g}, e, diffs)
            if len(diffs) > 200:
                return
        return
    try:
        if gtype in ("FLOAT32", "FLOAT64"):
            ok = _same_float(float(gval), _as_float(exp), 32 if gtype == "FLOAT32" else 64)
        elif gtype == "BOOL":
            ok = isinstance(exp, bool) and exp == gval
        elif gtype == "STRING":
            ok = isinstance(exp, str) and exp == gval
        else:
            ok = isinstance(exp, int) and not isinstance(exp, bool) and exp == gval
    except ValueError:
        ok = False
    if not ok:
        diffs.append(f"{path}: {gtype} {gval!r} in file, expected {exp!r}")


def _cmp_tensor(name: str, t, exp: dict[str, Any], diffs: list[str], max_elem_diffs: int = 10) -> None:
    tname = t.tensor_type.name
    if "type" in exp and exp["type"] != tname:
        diffs.append(f"tensor {name}: type {tname} in file, expected {exp['type']}")
        return
    if "type_id" in exp and int(exp["type_id"]) != int(t.tensor_type):
        diffs.append(f"tensor {name}: type id {int(t.tensor_type)} in file, expected {exp['type_id']}")
        return
    shape = gguf_shape(t)
    if "shape" in exp and list(exp["shape"]) != shape:
        diffs.append(f"tensor {name}: shape (GGUF order) {shape} in file, expected {exp['shape']}")
        return
    if "offset" in exp:
        rel = int(t.field.parts[-1][0])
        if rel != int(exp["offset"]):
            diffs.append(f"tensor {name}: offset {rel} in file, expected {exp['offset']}")
    if "nbytes" in exp and int(exp["nbytes"]) != int(t.n_bytes):
        diffs.append(f"tensor {name}: nbytes {t.n_bytes} in file, expected {exp['nbytes']}")
    if "values" not in exp and "sha256" not in exp:
        return
    try:
        vals = tensor_values(t)
    except NotImplementedError as e:
        diffs.append(f"tensor {name}: cannot dequantize {tname} with gguf {gguf_version()}: {e}")
        return
    if "sha256" in exp:
        h = hashlib.sha256(np.ascontiguousarray(vals, dtype="<f4").tobytes()).hexdigest()
        if h != exp["sha256"]:
            diffs.append(f"tensor {name}: sha256 {h} of dequantized float32, expected {exp['sha256']}")
    if "values" not in exp:
        return
    flat = vals.reshape(-1)
    ev = exp["values"]
    if len(ev) != flat.size:
        diffs.append(f"tensor {name}: {flat.size} values in file, expected {len(ev)}")
        return
    if flat.dtype.kind in "iu":
        bad = [i for i, (g, e) in enumerate(zip(flat.tolist(), ev)) if g != e]
        fmt = lambda i: f"{flat[i]} vs expected {ev[i]}"  # noqa: E731
    else:
        is64 = flat.dtype == np.float64
        e = np.array([_as_float(v) for v in ev], dtype=np.float64 if is64 else np.float32)
        g = flat.astype(e.dtype)
        bits = np.uint64 if is64 else np.uint32
        neq = g.view(bits) != e.view(bits)
        neq &= ~(np.isnan(g) & np.isnan(e))
        bad = np.flatnonzero(neq).tolist()
        fmt = lambda i: f"{float(g[i])!r} (0x{int(g.view(bits)[i]):x}) vs expected {float(e[i])!r} (0x{int(e.view(bits)[i]):x})"  # noqa: E731
    if bad:
        nshape = list(reversed(shape))
        diffs.append(f"tensor {name} ({tname}, numpy shape {nshape}): {len(bad)} of {flat.size} values differ")
        for i in bad[:max_elem_diffs]:
            idx = np.unravel_index(i, nshape) if nshape else ()
            diffs.append(f"    flat[{i}] {list(map(int, idx))}: {fmt(i)}")
        if len(bad) > max_elem_diffs:
            diffs.append(f"    ... and {len(bad) - max_elem_diffs} more")


def gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "?"


def check(path: str, expected: dict[str, Any]) -> list[str]:
    diffs: list[str] = []
    reader = GGUFReader(path)
    if "version" in expected:
        v = int(reader.fields["GGUF.version"].parts[0][0])
        if v != int(expected["version"]):
            diffs.append(f"GGUF version {v} in file, expected {expected['version']}")
    if "alignment" in expected and int(reader.alignment) != int(expected["alignment"]):
        diffs.append(f"alignment {reader.alignment} in file, expected {expected['alignment']}")

    meta = read_metadata(reader)
    exp_meta = expected.get("metadata", {})
    for k in meta:
        if k not in exp_meta:
            diffs.append(f"metadata {k}: present in file ({meta[k]['type']}), not expected")
    for k, ev in exp_meta.items():
        if k not in meta:
            diffs.append(f"metadata {k}: missing from file")
            continue
        _cmp_value(f"metadata {k}", meta[k], ev, diffs)

    tensors = {t.name: t for t in reader.tensors}
    exp_t = expected.get("tensors", {})
    for name in tensors:
        if name not in exp_t:
            diffs.append(f"tensor {name}: present in file, not expected")
    for name, et in exp_t.items():
        if name not in tensors:
            diffs.append(f"tensor {name}: missing from file")
            continue
        _cmp_tensor(name, tensors[name], et, diffs)
    if "tensor_order" in expected:
        order = [t.name for t in reader.tensors]
        if order != list(expected["tensor_order"]):
            diffs.append(f"tensor order {order} in file, expected {expected['tensor_order']}")
    return diffs


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    path, exp_path = argv[1], argv[2]
    try:
        with open(exp_path, encoding="utf-8") as f:
            expected = json.load(f)
        diffs = check(path, expected)
    except (OSError, ValueError, KeyError) as e:
        print(f"gguf_check: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if diffs:
        print(f"gguf_check: {path} does NOT match {exp_path}: {len(diffs)} difference(s)")
        for d in diffs:
            print("  " + d)
        return 1
    n_t = len(expected.get("tensors", {}))
    n_m = len(expected.get("metadata", {}))
    print(f"gguf_check: {path} matches {exp_path} ({n_m} metadata keys, {n_t} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
