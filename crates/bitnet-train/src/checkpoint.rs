//! Checkpoints: one safetensors file holding the master weights and AdamW's moments, with the
//! step and the run's fingerprint in its metadata, written atomically (a full disk leaves the
//! previous checkpoint as it was). Restoring one continues the run bit for bit.

use crate::error::{Result, TrainError};
use crate::model::TrainModel;
use crate::optim::AdamW;
use bitnet_core::bf16;
use candle_core::{DType, Tensor};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

pub const FILE: &str = "checkpoint.safetensors";
/// The one metadata key (one, so that the header's bytes do not depend on a map's order): a
/// JSON object with `format`, `step`, `adam_t` and `fingerprint`.
const META: &str = "bitnet.train";

fn raw(t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
    let dims = t.dims().to_vec();
    Ok(match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            dims,
            t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            dims,
            t.flatten_all()?
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            dims,
            t.flatten_all()?
                .to_vec1::<bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(TrainError::Checkpoint {
                path: FILE.into(),
                message: format!("cannot store a {other:?} tensor"),
            });
        }
    })
}

/// Write `dir/checkpoint.safetensors` after `step` updates.
pub fn save(
    dir: &Path,
    model: &TrainModel,
    opt: &AdamW,
    step: u64,
    fingerprint: &str,
) -> Result<()> {
    let mut parts = Vec::new();
    for (i, name) in model.names.iter().enumerate() {
        parts.push((format!("param/{name}"), raw(model.vars[i].as_tensor())?));
        parts.push((format!("adam_m/{name}"), raw(&opt.m[i])?));
        parts.push((format!("adam_v/{name}"), raw(&opt.v[i])?));
    }
    let views = parts
        .iter()
        .map(|(n, (d, s, b))| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Checkpoint {
                    path: dir.join(FILE),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let state = serde_json::json!({
        "format": 1,
        "step": step,
        "adam_t": opt.t,
        "fingerprint": fingerprint,
    });
    let meta = HashMap::from([(META.to_string(), state.to_string())]);
    let path = dir.join(FILE);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    bitnet_formats::atomic::write_atomic_bytes(&path, &bytes)?;
    Ok(())
}

/// Restore the model and optimizer from `dir/checkpoint.safetensors`; returns the step to
/// continue from. A checkpoint of another model or other optimizer settings is refused.
pub fn load(dir: &Path, model: &TrainModel, opt: &mut AdamW, fingerprint: &str) -> Result<u64> {
    let path = dir.join(FILE);
    let bad = |message: String| TrainError::Checkpoint {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state: serde_json::Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| {
            bad(format!(
                "not a bitnet training checkpoint (no {META} metadata)"
            ))
        })?;
    let theirs = state["fingerprint"].as_str().unwrap_or_default();
    if theirs != fingerprint {
        return Err(bad(format!(
            "it belongs to another run: {}",
            fingerprint_diff(theirs, fingerprint)
        )));
    }
    let (Some(step), Some(adam_t)) = (state["step"].as_u64(), state["adam_t"].as_u64()) else {
        return Err(bad("its step count is missing".into()));
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let load = |name: &str, like: &Tensor| -> Result<Tensor> {
        let v = st
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor {name}")))?;
        if v.shape() != like.dims() {
            return Err(bad(format!(
                "{name} has shape {:?}, the model's is {:?}",
                v.shape(),
                like.dims()
            )));
        }
        let d = v.data();
        let t = match (v.dtype(), like.dtype()) {
            (Dtype::F32, DType::F32) => Tensor::from_vec(
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect::<Vec<_>>(),
                v.shape(),
                like.device(),
            )?,
            (Dtype::F64, DType::F64) => Tensor::from_vec(
                d.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect::<Vec<_>>(),
                v.shape(),
                like.device(),
            )?,
            (Dtype::BF16, DType::BF16) => Tensor::from_vec(
                d.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect::<Vec<_>>(),
                v.shape(),
                like.device(),
            )?,
            (a, b) => return Err(bad(format!("{name} is {a:?}, the run trains in {b:?}"))),
        };
        Ok(t)
    };
    let mut m = Vec::new();
    let mut v = Vec::new();
    let mut params = Vec::new();
    for (i, name) in model.names.iter().enumerate() {
        let like = model.vars[i].as_tensor();
        params.push(load(&format!("param/{name}"), like)?);
        m.push(load(&format!("adam_m/{name}"), &opt.m[i])?);
        v.push(load(&format!("adam_v/{name}"), &opt.v[i])?);
    }
    // Only now that everything has been read: set the state.
    for (var, p) in model.vars.iter().zip(&params) {
        var.set(p)?;
    }
    opt.m = m;
    opt.v = v;
    opt.t = adam_t;
    Ok(step)
}

/// The settings that differ between two fingerprints, as `key: theirs -> ours`.
fn fingerprint_diff(theirs: &str, ours: &str) -> String {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let parse = |s: &str| {
        let mut out = Vec::new();
        flatten("", &serde_json::from_str(s).unwrap_or_default(), &mut out);
        out
    };
    let (a, b) = (parse(theirs), parse(ours));
    let mut diffs: Vec<String> = b
        .iter()
        .filter_map(|(k, v)| {
            let old = a.iter().find(|(ka, _)| ka == k).map(|(_, v)| v.as_str());
            (old != Some(v.as_str()))
                .then(|| format!("{k} was {}, is {v}", old.unwrap_or("absent")))
        })
        .collect();
    if diffs.is_empty() {
        diffs.push("its settings are unreadable".into());
    }
    format!(
        "the checkpoint's settings differ from this run's: {}",
        diffs.join("; ")
    )
}
