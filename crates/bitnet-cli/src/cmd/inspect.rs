//! `bitnet inspect PATH`: what a GGUF file or Hugging Face model directory holds.

use anyhow::{Context, Result};
use bitnet_formats::gguf::{GgufFile, MetaValue};
use bitnet_formats::names::key;
use bitnet_formats::safetensors_dir::{HfModelDir, SafetensorsSet};
use bitnet_formats::tokenizer::TextTokenizer;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file, a .safetensors file, or a Hugging Face model directory (config.json + safetensors).
    pub path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print every metadata array in full instead of the first few items.
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    /// Outermost dimension first (numpy order).
    shape: Vec<u64>,
    bytes: u64,
    /// Weights the tensor holds (packed 2-bit HF tensors hold 4 per byte).
    weights: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<String>,
}

#[derive(Debug, Serialize)]
struct Summary {
    n_tensors: usize,
    n_params: u64,
    tensor_bytes: u64,
    linear_params: u64,
    linear_bytes: u64,
    /// Bits per weight of the linear (projection) layers.
    linear_bits_per_weight: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    path: String,
    format: &'static str,
    architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gguf_version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dialect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alignment: Option<u64>,
    metadata: BTreeMap<String, Value>,
    tokenizer: Value,
    summary: Summary,
    tensors: Vec<TensorRow>,
}

/// Where a tensor goes in a listing: the ones before the blocks, each block in numeric order
/// (`blk.10` after `blk.9`), then the ones after (the final norm and the head).
fn listing_order(name: &str) -> (u8, usize) {
    let block = name
        .strip_prefix("blk.")
        .or_else(|| name.split_once("layers.").map(|(_, r)| r))
        .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
    match block {
        Some(n) => (1, n),
        None if ["output", "lm_head", "model.norm"]
            .iter()
            .any(|p| name.starts_with(p)) =>
        {
            (2, 0)
        }
        None => (0, 0),
    }
}

pub fn run(args: Args) -> Result<()> {
    let mut report = if args.path.is_dir() {
        inspect_dir(&args.path, args.full)?
    } else if args.path.extension().is_some_and(|e| e == "safetensors") {
        inspect_safetensors(&args.path)?
    } else {
        inspect_gguf(&args.path, args.full)?
    };
    report.tensors.sort_by_key(|t| listing_order(&t.name));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &report)?;
    }
    out.flush()?;
    Ok(())
}

/// Projection weights: 2-D tensors inside a transformer block that are not norms.
fn is_linear(name: &str, ndim: usize) -> bool {
    let in_block = name.starts_with("blk.") || name.contains(".layers.");
    in_block && ndim == 2 && !name.contains("norm") && name.ends_with("weight")
}

fn summarise(tensors: &[TensorRow]) -> Summary {
    let lin: Vec<&TensorRow> = tensors
        .iter()
        .filter(|t| is_linear(&t.name, t.shape.len()))
        .collect();
    let linear_params: u64 = lin.iter().map(|t| t.weights).sum();
    let linear_bytes: u64 = lin.iter().map(|t| t.bytes).sum();
    Summary {
        n_tensors: tensors.len(),
        n_params: tensors.iter().map(|t| t.weights).sum(),
        tensor_bytes: tensors.iter().map(|t| t.bytes).sum(),
        linear_params,
        linear_bytes,
        linear_bits_per_weight: if linear_params == 0 {
            0.0
        } else {
            linear_bytes as f64 * 8.0 / linear_params as f64
        },
    }
}

fn meta_json(v: &MetaValue, full: bool) -> Value {
    match v {
        MetaValue::Array(ty, items) if !full && items.len() > 16 => json!({
            "type": format!("array<{}>", ty.name()),
            "len": items.len(),
            "first": items.iter().take(8).map(MetaValue::to_json).collect::<Vec<_>>(),
        }),
        other => other.to_json(),
    }
}

fn inspect_gguf(path: &Path, full: bool) -> Result<Report> {
    let f =
        GgufFile::open(path).with_context(|| format!("cannot read {} as GGUF", path.display()))?;
    let h = &f.header;
    let tensors: Vec<TensorRow> = h
        .tensors
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            dtype: t.ty.to_string(),
            shape: t.shape(),
            bytes: t.nbytes,
            weights: t.n_elements(),
            shard: None,
        })
        .collect();
    let metadata = h
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), meta_json(v, full)))
        .collect();
    let tokenizer = match TextTokenizer::from_gguf(h) {
        Ok(t) => json!({
            "source": t.source,
            "pre": h.get_str(key::TOKENIZER_PRE),
            "vocab_size": t.vocab_size(),
            "bos": t.bos_id.map(|i| json!({"id": i, "token": t.id_to_token(i)})),
            "eos": t.eos_id.map(|i| json!({"id": i, "token": t.id_to_token(i)})),
            "add_bos": t.add_bos,
            "merges": h.get(key::MERGES).and_then(MetaValue::as_array).map(<[_]>::len),
            "chat_template": t.chat_template.is_some(),
        }),
        Err(e) => json!({"error": e.to_string()}),
    };
    Ok(Report {
        path: path.display().to_string(),
        format: "gguf",
        architecture: h.architecture().to_string(),
        name: h.get_str(key::NAME).map(str::to_string),
        gguf_version: Some(h.version),
        dialect: Some(h.dialect.to_string()),
        alignment: Some(h.alignment),
        metadata,
        tokenizer,
        summary: summarise(&tensors),
        tensors,
    })
}

fn st_rows(set: &SafetensorsSet) -> Vec<TensorRow> {
    let shards = set.shard_paths();
    set.tensors()
        .iter()
        .map(|t| {
            let n = t.n_elements() as u64;
            // The 2B-4T packed layout stores 4 ternary weights per uint8, next to a weight_scale.
            let packed = t.dtype == bitnet_formats::safetensors_dir::Dtype::U8
                && set
                    .get(&t.name.replace(".weight", ".weight_scale"))
                    .is_some();
            TensorRow {
                name: t.name.clone(),
                dtype: if packed {
                    "U8 (packed ternary)".into()
                } else {
                    format!("{:?}", t.dtype)
                },
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                bytes: t.range.len() as u64,
                weights: if packed { 4 * n } else { n },
                shard: shards
                    .get(t.shard)
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned()),
            }
        })
        .collect()
}

fn inspect_safetensors(path: &Path) -> Result<Report> {
    let set = SafetensorsSet::open(&[path.to_path_buf()])
        .with_context(|| format!("cannot read {}", path.display()))?;
    let tensors = st_rows(&set);
    let metadata = set.metadata[0]
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(Report {
        path: path.display().to_string(),
        format: "safetensors",
        architecture: "unknown (no config.json)".into(),
        name: None,
        gguf_version: None,
        dialect: None,
        alignment: None,
        metadata,
        tokenizer: Value::Null,
        summary: summarise(&tensors),
        tensors,
    })
}

fn inspect_dir(dir: &Path, _full: bool) -> Result<Report> {
    let m = HfModelDir::open(dir).with_context(|| {
        format!(
            "cannot open {} as a Hugging Face model directory",
            dir.display()
        )
    })?;
    let tensors = st_rows(&m.weights);
    let c = &m.config;
    let mut metadata = BTreeMap::new();
    for (k, v) in [
        ("hidden_size", json!(c.hidden_size)),
        ("intermediate_size", json!(c.intermediate_size)),
        ("num_hidden_layers", json!(c.num_hidden_layers)),
        ("num_attention_heads", json!(c.num_attention_heads)),
        ("num_key_value_heads", json!(c.num_kv_heads())),
        ("head_dim", json!(c.head_dim())),
        ("vocab_size", json!(c.vocab_size)),
        ("max_position_embeddings", json!(c.max_position_embeddings)),
        ("rms_norm_eps", json!(c.rms_norm_eps)),
        ("rope_theta", json!(c.rope_theta())),
        ("hidden_act", json!(c.hidden_act)),
        ("tie_word_embeddings", json!(c.tie_word_embeddings())),
        ("quantization_config", serde_json::to_value(c.quantization_config.as_ref().map(|q| json!({
            "quant_method": q.quant_method, "linear_class": q.linear_class, "quantization_mode": q.quantization_mode
        })))?),
    ] {
        metadata.insert(k.to_string(), v);
    }
    let tokenizer = match m.tokenizer_json() {
        Some(p) => match TextTokenizer::from_file(&p) {
            Ok(t) => json!({"source": "tokenizer.json", "vocab_size": t.vocab_size(),
                            "bos": t.bos_id, "eos": t.eos_id, "chat_template": t.chat_template.is_some()}),
            Err(e) => json!({"error": e.to_string()}),
        },
        None => json!({"error": "no tokenizer.json in the directory"}),
    };
    Ok(Report {
        path: dir.display().to_string(),
        format: "hf-dir",
        architecture: c.architecture().to_string(),
        name: c.architectures.first().cloned(),
        gguf_version: None,
        dialect: None,
        alignment: None,
        metadata,
        tokenizer,
        summary: summarise(&tensors),
        tensors,
    })
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn human_count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn print_text(out: &mut impl Write, r: &Report) -> Result<()> {
    writeln!(out, "{}  ({})", r.path, r.format)?;
    writeln!(out, "  architecture   {}", r.architecture)?;
    if let Some(n) = &r.name {
        writeln!(out, "  name           {n}")?;
    }
    if let Some(v) = r.gguf_version {
        writeln!(
            out,
            "  gguf version   {v}, alignment {}",
            r.alignment.unwrap_or(0)
        )?;
    }
    if let Some(d) = &r.dialect {
        writeln!(out, "  type ids       {d}")?;
    }
    let s = &r.summary;
    writeln!(
        out,
        "  parameters     {} ({} in {} tensors)",
        human_count(s.n_params),
        human_bytes(s.tensor_bytes),
        s.n_tensors
    )?;
    writeln!(
        out,
        "  linear layers  {} weights, {}, {:.4} bits/weight",
        human_count(s.linear_params),
        human_bytes(s.linear_bytes),
        s.linear_bits_per_weight
    )?;
    writeln!(out, "  tokenizer      {}", tokenizer_line(&r.tokenizer))?;
    writeln!(out, "\nmetadata ({} keys)", r.metadata.len())?;
    for (k, v) in &r.metadata {
        let text = match v {
            Value::Object(o) if o.contains_key("len") => format!(
                "{} of {} {}",
                o["type"].as_str().unwrap_or("array"),
                o["len"],
                compact(&o["first"]).trim_end_matches(']').to_string() + ", …]"
            ),
            Value::String(s) if s.len() > 100 => format!(
                "{:?}… ({} chars)",
                s.chars().take(80).collect::<String>(),
                s.chars().count()
            ),
            other => compact(other),
        };
        writeln!(out, "  {k:<40} {text}")?;
    }
    let w = r
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(out, "\ntensors ({})", r.tensors.len())?;
    writeln!(
        out,
        "  {:<w$}  {:<20}  {:<22}  {:>12}",
        "name", "type", "shape", "bytes"
    )?;
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        writeln!(
            out,
            "  {:<w$}  {:<20}  {:<22}  {:>12}",
            t.name, t.dtype, shape, t.bytes
        )?;
    }
    Ok(())
}

fn tokenizer_line(t: &Value) -> String {
    if let Some(e) = t.get("error").and_then(Value::as_str) {
        return format!("unavailable: {e}");
    }
    if t.is_null() {
        return "none".into();
    }
    let tok = |k: &str| match &t[k] {
        Value::Object(o) => format!("{} ({})", o["token"].as_str().unwrap_or("?"), o["id"]),
        Value::Number(n) => format!("id {n}"),
        _ => "none".into(),
    };
    let mut s = t["source"].as_str().unwrap_or("?").to_string();
    if let Some(pre) = t.get("pre").and_then(Value::as_str) {
        s += &format!(" (pre-tokenizer {pre})");
    }
    s += &format!(", {} tokens", t["vocab_size"]);
    if let Some(m) = t.get("merges").and_then(Value::as_u64) {
        s += &format!(", {m} merges");
    }
    s += &format!(", bos {}, eos {}", tok("bos"), tok("eos"));
    if t["chat_template"] == Value::Bool(true) {
        s += ", chat template";
    }
    s
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}
