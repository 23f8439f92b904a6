//! ONNX models: a `model.onnx` graph (protobuf) whose initializers hold the weights, inline or in
//! external data files beside it.
//!
//! The protobuf is read with a small wire-format walker over the mapped file instead of a
//! generated decoder, because a decoder copies every `raw_data` field into memory, and a model's
//! weights must stay in the mapping (zero copy, pages released behind a conversion) as they do
//! for safetensors and GGUF. Only the fields needed are read (`onnx/onnx.proto`: ModelProto 1
//! ir_version, 2 producer_name, 7 graph, 8 opset_import; GraphProto 1 node, 5 initializer;
//! NodeProto 1 input, 3 name, 4 op_type; TensorProto 1 dims, 2 data_type, 4 float_data,
//! 8 name, 9 raw_data, 13 external_data, 14 data_location; NodeProto 9 and ValueInfoProto 4
//! metadata_props, GraphProto 13 value_info); every other field, node attributes
//! (and so subgraphs) included, is skipped by its wire type without being parsed. Every length
//! is checked against the bytes left, and external data locations must be plain file names in
//! the model's directory.
//!
//! [`OnnxModel::to_safetensors_set`] gives the float initializers Hugging Face names, so an ONNX
//! export loads and converts like the checkpoint it came from: initializers exported under their
//! parameter names are used as they are; weights the exporter stored transposed for a `MatMul`
//! (`onnx::MatMul_123`, shape `[in, out]`) are named from the node's module path
//! (`/model/layers.0/self_attn/q_proj/MatMul` → `model.layers.0.self_attn.q_proj.weight`) and
//! transposed back into memory.
//!
//! torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default since torch 2.9)
//! names nodes `node_linear_3` and folds each Linear's transpose into an initializer `val_76`
//! (`[in, out]`, a `MatMul` operand); the parameter it came from is in the metadata instead:
//! the value's `pkg.onnxscript.optimizer.folded_from` (`['model.layers.0.self_attn.q_proj.weight']`),
//! else the node's `pkg.torch.onnx.name_scopes`, whose second-to-last scope is the module
//! (`[..., 'model.layers.0.self_attn.q_proj', 'linear']`). A tied embedding is exported once,
//! as `lm_head.weight`; the initializer a `Gather` reads rows of is also named
//! `model.embed_tokens.weight` when no initializer has that name.

use crate::error::{FormatError, Result, io_err};
use crate::safetensors_dir::{Dtype, SafetensorsSet, StTensorInfo};
use bitnet_kernels::mmap::MappedFile;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// ONNX `TensorProto.DataType` values read as weights.
const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;
const DOUBLE: i32 = 11;
const BFLOAT16: i32 = 16;

/// One initializer: where its bytes are (file 0 is the `.onnx` itself).
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub data_type: i32,
    pub file: usize,
    pub range: Range<usize>,
}

/// One graph node: what the name mapping needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OnnxNode {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    /// The dynamo exporter's `pkg.torch.onnx.name_scopes` (a Python list literal).
    pub name_scopes: Option<String>,
}

/// A parsed ONNX model over its mapped files.
#[derive(Debug)]
pub struct OnnxModel {
    pub path: PathBuf,
    pub ir_version: i64,
    pub producer: String,
    /// The default-domain opset version.
    pub opset: i64,
    pub initializers: Vec<OnnxTensor>,
    pub nodes: Vec<OnnxNode>,
    /// Value name → the `pkg.onnxscript.optimizer.folded_from` of its value_info (the
    /// parameters a constant-folded initializer was computed from, as a Python list literal).
    pub folded_from: HashMap<String, String>,
    files: Vec<Arc<MappedFile>>,
}

struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Absolute offset of `buf[0]` in the file.
    base: usize,
}

enum Field {
    Varint(u64),
    /// A length-delimited field: absolute byte range in the file.
    Bytes(Range<usize>),
    Fixed,
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The next (field number, value), `Ok(None)` at the end, an error message on bad bytes.
    fn next(&mut self) -> std::result::Result<Option<(u64, Field)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.base + self.pos;
        let key = self.varint().ok_or(format!("bad field key at byte {at}"))?;
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Field::Varint(
                self.varint()
                    .ok_or(format!("bad varint at byte {}", self.base + self.pos))?,
            ),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if self.buf.len() - self.pos < n {
                    return Err(format!("field {field} at byte {at} runs past its message"));
                }
                self.pos += n;
                Field::Fixed
            }
            2 => {
                let len = self
                    .varint()
                    .ok_or(format!("bad length at byte {}", self.base + self.pos))?;
                let left = (self.buf.len() - self.pos) as u64;
                if len > left {
                    return Err(format!(
                        "field {field} at byte {at} claims {len} bytes, {left} are left"
                    ));
                }
                let s = self.base + self.pos;
                self.pos += len as usize;
                Field::Bytes(s..s + len as usize)
            }
            w => return Err(format!("unsupported wire type {w} at byte {at}")),
        };
        Ok(Some((field, value)))
    }
}

fn text(bytes: &[u8], r: &Range<usize>, what: &str) -> std::result::Result<String, String> {
    std::str::from_utf8(&bytes[r.clone()])
        .map(str::to_string)
        .map_err(|_| format!("{what} at byte {} is not UTF-8", r.start))
}

fn elem_size(data_type: i32) -> Option<usize> {
    match data_type {
        FLOAT => Some(4),
        FLOAT16 | BFLOAT16 => Some(2),
        DOUBLE => Some(8),
        _ => None,
    }
}

/// A parsed TensorProto before its external data is resolved.
#[derive(Default)]
struct RawTensor {
    name: String,
    dims: Vec<usize>,
    data_type: i32,
    inline: Option<Range<usize>>,
    external: Vec<(String, String)>,
    location_external: bool,
}

/// The metadata key of a dynamo export's node module scopes.
const NAME_SCOPES: &str = "pkg.torch.onnx.name_scopes";
/// The metadata key naming the parameters a folded constant came from.
const FOLDED_FROM: &str = "pkg.onnxscript.optimizer.folded_from";

/// A `StringStringEntryProto` (1 key, 2 value).
fn string_entry(
    b: &[u8],
    r: Range<usize>,
) -> std::result::Result<Option<(String, String)>, String> {
    let (mut k, mut v) = (None, String::new());
    let mut w = Wire::new(&b[r.clone()], r.start);
    while let Some((f, val)) = w.next()? {
        match (f, val) {
            (1, Field::Bytes(q)) => k = Some(text(b, &q, "metadata key")?),
            (2, Field::Bytes(q)) => v = text(b, &q, "metadata value")?,
            _ => {}
        }
    }
    Ok(k.map(|k| (k, v)))
}

/// The quoted strings of a Python list literal of strings (`['a', 'b']`), as the exporters write
/// their list-valued metadata; `None` when it is not one.
fn py_strings(s: &str) -> Option<Vec<&str>> {
    let inner = s.trim().strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|p| {
            let p = p.trim();
            p.strip_prefix('\'')
                .and_then(|q| q.strip_suffix('\''))
                .or_else(|| p.strip_prefix('"').and_then(|q| q.strip_suffix('"')))
        })
        .collect()
}

fn parse_tensor(b: &[u8], r: Range<usize>) -> std::result::Result<RawTensor, String> {
    let mut t = RawTensor::default();
    let mut w = Wire::new(&b[r.clone()], r.start);
    while let Some((f, v)) = w.next()? {
        match (f, v) {
            (1, Field::Varint(d)) => t.dims.push(usize::try_from(d).map_err(|_| "dim")?),
            (1, Field::Bytes(p)) => {
                let mut pw = Wire::new(&b[p.clone()], p.start);
                while pw.pos < pw.buf.len() {
                    let d = pw.varint().ok_or("bad packed dims")?;
                    t.dims.push(usize::try_from(d).map_err(|_| "dim")?);
                }
            }
            (2, Field::Varint(d)) => t.data_type = d as i32,
            (4, Field::Bytes(p)) => t.inline = Some(p), // packed float_data: little-endian f32s
            (8, Field::Bytes(p)) => t.name = text(b, &p, "tensor name")?,
            (9, Field::Bytes(p)) => t.inline = Some(p),
            (13, Field::Bytes(p)) => {
                let (mut k, mut val) = (String::new(), String::new());
                let mut ew = Wire::new(&b[p.clone()], p.start);
                while let Some((ef, ev)) = ew.next()? {
                    match (ef, ev) {
                        (1, Field::Bytes(q)) => k = text(b, &q, "external_data key")?,
                        (2, Field::Bytes(q)) => val = text(b, &q, "external_data value")?,
                        _ => {}
                    }
                }
                t.external.push((k, val));
            }
            (14, Field::Varint(d)) => t.location_external = d == 1,
            (3, _) => {
                return Err(format!(
                    "tensor {:?}: segmented tensors are not supported",
                    t.name
                ));
            }
            _ => {}
        }
    }
    Ok(t)
}

impl OnnxModel {
    /// Map and parse `path` (and its external data files).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let err = |message: String| FormatError::Config {
            path: path.clone(),
            message,
        };
        let map = MappedFile::open(&path).map_err(io_err(&path))?;
        let b: &[u8] = &map;
        let mut model = OnnxModel {
            path: path.clone(),
            ir_version: 0,
            producer: String::new(),
            opset: 0,
            initializers: Vec::new(),
            nodes: Vec::new(),
            folded_from: HashMap::new(),
            files: Vec::new(),
        };
        let mut graph = None;
        let mut w = Wire::new(b, 0);
        while let Some((f, v)) = w.next().map_err(&err)? {
            match (f, v) {
                (1, Field::Varint(x)) => model.ir_version = x as i64,
                (2, Field::Bytes(r)) => model.producer = text(b, &r, "producer").map_err(&err)?,
                (7, Field::Bytes(r)) => graph = Some(r),
                (8, Field::Bytes(r)) => {
                    let (mut domain, mut version) = (String::new(), 0i64);
                    let mut ow = Wire::new(&b[r.clone()], r.start);
                    while let Some((of, ov)) = ow.next().map_err(&err)? {
                        match (of, ov) {
                            (1, Field::Bytes(q)) => domain = text(b, &q, "domain").map_err(&err)?,
                            (2, Field::Varint(x)) => version = x as i64,
                            _ => {}
                        }
                    }
                    if domain.is_empty() || domain == "ai.onnx" {
                        model.opset = version;
                    }
                }
                _ => {}
            }
        }
        if model.ir_version == 0 {
            return Err(err("not an ONNX model: no ir_version".into()));
        }
        let graph = graph.ok_or_else(|| err("the model has no graph".into()))?;
        let mut raw = Vec::new();
        let mut gw = Wire::new(&b[graph.clone()], graph.start);
        while let Some((f, v)) = gw.next().map_err(&err)? {
            match (f, v) {
                (1, Field::Bytes(r)) => {
                    let mut node = OnnxNode::default();
                    let mut nw = Wire::new(&b[r.clone()], r.start);
                    while let Some((nf, nv)) = nw.next().map_err(&err)? {
                        match (nf, nv) {
                            (1, Field::Bytes(q)) => {
                                node.inputs.push(text(b, &q, "node input").map_err(&err)?)
                            }
                            (3, Field::Bytes(q)) => {
                                node.name = text(b, &q, "node name").map_err(&err)?
                            }
                            (4, Field::Bytes(q)) => {
                                node.op_type = text(b, &q, "op_type").map_err(&err)?
                            }
                            (9, Field::Bytes(q)) => {
                                if let Some((k, v)) = string_entry(b, q).map_err(&err)?
                                    && k == NAME_SCOPES
                                {
                                    node.name_scopes = Some(v);
                                }
                            }
                            _ => {}
                        }
                    }
                    model.nodes.push(node);
                }
                (5, Field::Bytes(r)) => raw.push(parse_tensor(b, r).map_err(&err)?),
                (13, Field::Bytes(r)) => {
                    let (mut name, mut folded) = (String::new(), None);
                    let mut vw = Wire::new(&b[r.clone()], r.start);
                    while let Some((vf, vv)) = vw.next().map_err(&err)? {
                        match (vf, vv) {
                            (1, Field::Bytes(q)) => {
                                name = text(b, &q, "value name").map_err(&err)?
                            }
                            (4, Field::Bytes(q)) => {
                                if let Some((k, v)) = string_entry(b, q).map_err(&err)?
                                    && k == FOLDED_FROM
                                {
                                    folded = Some(v);
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(f) = folded {
                        model.folded_from.insert(name, f);
                    }
                }
                _ => {}
            }
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        model.files.push(Arc::new(map));
        let mut external: HashMap<String, usize> = HashMap::new();
        for t in raw {
            let Some(size) = elem_size(t.data_type) else {
                continue; // integer initializers (shapes, indices) are not weights
            };
            let n = t
                .dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_mul(size))
                .ok_or_else(|| err(format!("tensor {:?}: size overflows", t.name)))?;
            let (file, range) = if t.location_external {
                let get = |k: &str| t.external.iter().find(|(key, _)| key == k).map(|(_, v)| v);
                let loc = get("location").ok_or_else(|| {
                    err(format!(
                        "tensor {:?}: external data without a location",
                        t.name
                    ))
                })?;
                let p = Path::new(loc);
                if p.is_absolute() || p.components().count() != 1 || loc.contains("..") {
                    return Err(err(format!(
                        "tensor {:?}: external data location {loc:?} is not a plain file name in the model's directory",
                        t.name
                    )));
                }
                let file = match external.get(loc) {
                    Some(&i) => i,
                    None => {
                        let full = dir.join(p);
                        let m = MappedFile::open(&full).map_err(io_err(&full))?;
                        model.files.push(Arc::new(m));
                        external.insert(loc.clone(), model.files.len() - 1);
                        model.files.len() - 1
                    }
                };
                let num = |k: &str| -> Result<usize> {
                    get(k).map_or(Ok(0), |v| {
                        v.parse()
                            .map_err(|_| err(format!("tensor {:?}: external {k} {v:?}", t.name)))
                    })
                };
                let offset = num("offset")?;
                let length = match get("length") {
                    Some(_) => num("length")?,
                    None => n,
                };
                (file, offset..offset.saturating_add(length))
            } else {
                (0, t.inline.clone().unwrap_or(0..0))
            };
            if range.len() != n || range.end > model.files[file].len() {
                return Err(err(format!(
                    "tensor {:?}: {} bytes of data for {:?} (needs {n}, file has {})",
                    t.name,
                    range.len(),
                    t.dims,
                    model.files[file].len()
                )));
            }
            model.initializers.push(OnnxTensor {
                name: t.name,
                dims: t.dims,
                data_type: t.data_type,
                file,
                range,
            });
        }
        Ok(model)
    }

    /// The float initializers under Hugging Face parameter names (see the module docs), as a
    /// weight set the Hugging Face loaders read.
    pub fn to_safetensors_set(&self) -> Result<SafetensorsSet> {
        let dtype = |t: &OnnxTensor| match t.data_type {
            FLOAT => Dtype::F32,
            FLOAT16 => Dtype::F16,
            BFLOAT16 => Dtype::BF16,
            _ => Dtype::F64,
        };
        let mut shards = self.files.clone();
        let mut tensors = Vec::new();
        let by_name: HashMap<&str, &OnnxTensor> = self
            .initializers
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut used = std::collections::HashSet::new();
        // Weights a MatMul reads transposed under a generated name: name them from the node.
        for node in &self.nodes {
            if node.op_type != "MatMul" || node.inputs.len() != 2 {
                continue;
            }
            let Some(t) = by_name.get(node.inputs[1].as_str()) else {
                continue;
            };
            if t.dims.len() != 2 || t.name.ends_with(".weight") {
                continue;
            }
            let Some(weight) = self.matmul_weight_name(node, &t.name) else {
                continue;
            };
            let (k, n) = (t.dims[0], t.dims[1]);
            let size = elem_size(t.data_type).unwrap_or(4);
            let src = &self.files[t.file][t.range.clone()];
            let mut out = vec![0u8; src.len()];
            for i in 0..k {
                for j in 0..n {
                    let (from, to) = ((i * n + j) * size, (j * k + i) * size);
                    out[to..to + size].copy_from_slice(&src[from..from + size]);
                }
            }
            let len = out.len();
            shards.push(Arc::new(MappedFile::from_bytes(
                self.path.join(format!("#{}", t.name)),
                out,
            )));
            tensors.push(StTensorInfo {
                name: weight,
                dtype: dtype(t),
                shape: vec![n, k],
                shard: shards.len() - 1,
                range: 0..len,
            });
            used.insert(t.name.as_str());
        }
        for t in &self.initializers {
            if used.contains(t.name.as_str()) || tensors.iter().any(|x| x.name == t.name) {
                continue;
            }
            tensors.push(StTensorInfo {
                name: t.name.clone(),
                dtype: dtype(t),
                shape: t.dims.clone(),
                shard: t.file,
                range: t.range.clone(),
            });
        }
        // A tied embedding exported once under the head's name: the matrix a Gather reads rows
        // of is the embedding too.
        const EMBED: &str = "model.embed_tokens.weight";
        if !tensors.iter().any(|x| x.name == EMBED) {
            let gathered = self.nodes.iter().find_map(|n| {
                let data = n.inputs.first()?;
                let t = tensors
                    .iter()
                    .find(|x| &x.name == data && x.shape.len() == 2)?;
                (n.op_type == "Gather").then(|| t.clone())
            });
            if let Some(t) = gathered {
                tensors.push(StTensorInfo {
                    name: EMBED.into(),
                    ..t
                });
            }
        }
        SafetensorsSet::from_parts(shards, tensors)
    }

    /// The Hugging Face name of the weight a `MatMul` reads as `initializer` (stored `[in, out]`).
    fn matmul_weight_name(&self, node: &OnnxNode, initializer: &str) -> Option<String> {
        // Dynamo export: the folded constant names its parameter...
        if let Some(from) = self.folded_from.get(initializer)
            && let Some([p]) = py_strings(from).as_deref()
            && p.ends_with(".weight")
        {
            return Some((*p).to_string());
        }
        // ...or the node's scopes name the module (the last scope is the op itself).
        if let Some(scopes) = &node.name_scopes
            && let Some(s) = py_strings(scopes)
            && s.len() >= 2
            && !s[s.len() - 2].is_empty()
        {
            return Some(format!("{}.weight", s[s.len() - 2]));
        }
        // TorchScript export: the node name is the module path.
        module_path(&node.name).map(|m| format!("{m}.weight"))
    }
}

/// `model.layers.0.self_attn.q_proj` from an exporter's node name such as
/// `/model/layers.0/self_attn/q_proj/MatMul`.
fn module_path(node: &str) -> Option<String> {
    let parts: Vec<&str> = node.trim_start_matches('/').split('/').collect();
    if parts.len() < 2 {
        return None;
    }
    let module = parts[..parts.len() - 1].join(".");
    (!module.is_empty()).then_some(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field(n: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    fn tensor(name: &str, dims: &[u64], data: &[f32]) -> Vec<u8> {
        let mut t = Vec::new();
        for &d in dims {
            varint(1 << 3, &mut t);
            varint(d, &mut t);
        }
        varint(2 << 3, &mut t);
        varint(1, &mut t);
        field(8, name.as_bytes(), &mut t);
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        field(9, &raw, &mut t);
        t
    }

    fn model(graph: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        varint(1 << 3, &mut m);
        varint(8, &mut m);
        field(7, graph, &mut m);
        m
    }

    #[test]
    fn reads_initializers_and_transposes_matmul_weights() {
        let mut g = Vec::new();
        field(
            5,
            &tensor("model.norm.weight", &[3], &[1.0, 2.0, 3.0]),
            &mut g,
        );
        // A [2 in, 3 out] MatMul weight under a generated name.
        field(
            5,
            &tensor("onnx::MatMul_7", &[2, 3], &[1., 2., 3., 4., 5., 6.]),
            &mut g,
        );
        let mut node = Vec::new();
        field(1, b"x", &mut node);
        field(1, b"onnx::MatMul_7", &mut node);
        field(3, b"/model/layers.0/mlp/up_proj/MatMul", &mut node);
        field(4, b"MatMul", &mut node);
        field(1, &node, &mut g);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.onnx");
        std::fs::write(&p, model(&g)).unwrap();
        let m = OnnxModel::open(&p).unwrap();
        assert_eq!(m.initializers.len(), 2);
        let set = m.to_safetensors_set().unwrap();
        assert_eq!(
            set.to_f32("model.norm.weight").unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        let up = set.get("model.layers.0.mlp.up_proj.weight").unwrap();
        assert_eq!(up.shape, vec![3, 2]);
        assert_eq!(
            set.to_f32("model.layers.0.mlp.up_proj.weight").unwrap(),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }

    #[test]
    fn hostile_files_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.onnx");
        let mut g = Vec::new();
        field(5, &tensor("w", &[4], &[1.0, 2.0, 3.0, 4.0]), &mut g);
        let good = model(&g);
        // Every truncation fails cleanly (or parses a prefix that is still consistent).
        for cut in 0..good.len() {
            std::fs::write(&p, &good[..cut]).unwrap();
            let _ = OnnxModel::open(&p);
        }
        // A length past the end.
        let mut bad = good.clone();
        bad.extend_from_slice(&[7 << 3 | 2, 0xff, 0xff, 0x03]);
        std::fs::write(&p, &bad).unwrap();
        assert!(
            OnnxModel::open(&p)
                .unwrap_err()
                .to_string()
                .contains("claims")
        );
        // Data shorter than the dims say.
        let mut g = Vec::new();
        field(5, &tensor("w", &[5], &[1.0, 2.0]), &mut g);
        std::fs::write(&p, model(&g)).unwrap();
        assert!(
            OnnxModel::open(&p)
                .unwrap_err()
                .to_string()
                .contains("needs 20")
        );
        // External data that escapes the directory.
        let mut t = tensor("w", &[1], &[]);
        let mut e = Vec::new();
        field(1, b"location", &mut e);
        field(2, b"../../etc/passwd", &mut e);
        field(13, &e, &mut t);
        varint(14 << 3, &mut t);
        varint(1, &mut t);
        let mut g = Vec::new();
        field(5, &t, &mut g);
        std::fs::write(&p, model(&g)).unwrap();
        assert!(
            OnnxModel::open(&p)
                .unwrap_err()
                .to_string()
                .contains("plain file name")
        );
        // Random bytes.
        let mut s = 7u64;
        for _ in 0..200 {
            let junk: Vec<u8> = (0..64)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            std::fs::write(&p, &junk).unwrap();
            let _ = OnnxModel::open(&p);
        }
    }
}
