//! Exports of a trained model: a Hugging Face directory that transformers'
//! `BitNetForCausalLM` loads (float master weights, `quantization_mode: online`, so transformers
//! ternarizes at every forward exactly as training did), and our GGUF (`bitnet-25`, ternary
//! linears in TQ2_0, TQ1_0 or I2_S), made from that directory by the converter.

use crate::config::{ExportConfig, Quant};
use crate::error::{Result, TrainError, io_err};
use crate::model::TrainModel;
use bitnet_formats::atomic::write_atomic_bytes as write_file;
use bitnet_formats::gguf::GgmlType;
use bitnet_model::convert::{ConvertOptions, convert_hf_to_gguf};
use safetensors::{Dtype, tensor::TensorView};
use std::path::{Path, PathBuf};

/// The `config.json` transformers reads for this model.
pub fn hf_config(model: &TrainModel, special: Option<&Special>) -> serde_json::Value {
    let s = &model.shape;
    let mut c = serde_json::json!({
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "hidden_act": "relu2",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab,
        "max_position_embeddings": s.max_pos,
        "rms_norm_eps": s.rms_eps,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": s.tied,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    if s.quant == Quant::Ternary {
        c["quantization_config"] = serde_json::json!({
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
        });
    }
    if let Some(((_, bos), (_, eos))) = special {
        c["bos_token_id"] = (*bos).into();
        c["eos_token_id"] = (*eos).into();
    }
    c
}

/// The beginning- and end-of-text tokens: (content, id) each.
pub type Special = ((String, u64), (String, u64));

/// Write `dir/` as a Hugging Face model directory: `config.json`, `model.safetensors` (f32) and,
/// when given, `tokenizer.json`.
pub fn write_hf_dir(model: &TrainModel, dir: &Path, tokenizer_json: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors = model.tensors_f32()?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Checkpoint {
                    path: dir.into(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(views, Some(meta)).map_err(|e| TrainError::Checkpoint {
        path: dir.into(),
        message: e.to_string(),
    })?;
    write_file(&dir.join("model.safetensors"), &st)?;
    let mut special = None;
    if let Some(t) = tokenizer_json {
        let text = std::fs::read(t).map_err(io_err(t))?;
        special = crate::tokenizer::special_tokens(&text);
        write_file(&dir.join("tokenizer.json"), &text)?;
        // What transformers' AutoTokenizer and our loaders read the special tokens from.
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.shape.max_pos,
            "add_bos_token": false,
            "add_eos_token": false,
        });
        if let Some(((bos, _), (eos, _))) = &special {
            tc["bos_token"] = bos.clone().into();
            tc["eos_token"] = eos.clone().into();
        }
        write_file(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc)
                .expect("a JSON value serializes")
                .as_bytes(),
        )?;
    }
    let config = hf_config(model, special.as_ref());
    write_file(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("a JSON value serializes")
            .as_bytes(),
    )?;
    Ok(())
}

/// Convert the exported directory to a GGUF with the configured types.
pub fn write_gguf(hf_dir: &Path, out: &Path, e: &ExportConfig) -> Result<PathBuf> {
    let parse = |name: &str, what: &str| {
        GgmlType::from_name(name).ok_or_else(|| TrainError::Config {
            path: "export".into(),
            message: format!("unknown {what} {name:?}"),
        })
    };
    let opts = ConvertOptions {
        ternary: parse(&e.gguf_type, "export.gguf_type")?,
        float_type: parse(&e.float_type, "export.float_type")?,
        cancel: None,
    };
    convert_hf_to_gguf(hf_dir, out, &opts, &mut |_, _, _| {})?;
    Ok(out.to_path_buf())
}
