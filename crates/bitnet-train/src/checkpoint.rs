//! Checkpoints: one safetensors file holding the master weights and AdamW's moments, with the
//! step and the run's fingerprint in its metadata, written atomically (a full disk leaves the
//! previous checkpoint as it was). Restoring one continues the run bit for bit.

use crate::error::{Result, TrainError};
use crate::model::TrainModel;
use crate::optim::AdamW;
use candle_core::{DType, Tensor};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

pub const FILE: &str = "checkpoint.safetensors";
const STEP: &str = "bitnet.train.step";
const ADAM_T: &str = "bitnet.train.adam_t";
const FINGERPRINT: &str = "bitnet.train.fingerprint";
const FORMAT: &str = "bitnet.train.format";

fn raw(t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
    let dims = t.dims().to_vec();
    Ok(match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            dims,
            t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            dims,
            t.flatten_all()?.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
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
pub fn save(dir: &Path, model: &TrainModel, opt: &AdamW, step: u64, fingerprint: &str) -> Result<()> {
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
    let meta = HashMap::from([
        (STEP.to_string(), step.to_string()),
        (ADAM_T.to_string(), opt.t.to_string()),
        (FINGERPRINT.to_string(), fingerprint.to_string()),
        (FORMAT.to_string(), "1".to_string()),
    ]);
    let path = dir.join(FILE);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| TrainError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    bitnet_formats::atomic::write_atomic(&path, |w| {
        w.write_all(&bytes).map_err(|source| bitnet_formats::FormatError::Io {
            path: path.clone(),
            source,
        })
    })?;
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
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| bad(format!("not a bitnet training checkpoint (no {k})")))
    };
    let theirs = get(FINGERPRINT)?;
    if theirs != fingerprint {
        return Err(bad(format!(
            "it belongs to another run: its model and optimizer settings are {theirs}, this run's are {fingerprint}"
        )));
    }
    let step: u64 = get(STEP)?.parse().map_err(|_| bad("bad step".into()))?;
    let adam_t: u64 = get(ADAM_T)?.parse().map_err(|_| bad("bad adam_t".into()))?;
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
        m.push(load(&format!("adam_m/{name}"), like)?);
        v.push(load(&format!("adam_v/{name}"), like)?);
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
