//! Hugging Face BitNet / llama directory → ternary GGUF, one tensor at a time.
//!
//! Linear layers are ternarized (float masters, absmean as transformers does) or unpacked (the
//! 2B-4T layout, exact) and packed into TQ2_0, TQ1_0 or I2_S; embeddings and the lm_head stay in
//! higher precision (F16 by default); norms stay F32. The file follows bitnet.cpp's `bitnet-25`
//! layout (the 2B-4T graph: squared ReLU, sub-norms, NeoX RoPE, Q/K not permuted). Each tensor is produced inside the writer's stream, so memory holds one tensor
//! at a time and the output appears only when complete (temp file, fsync, rename).

use crate::error::{ModelError, Result};
use crate::load::HfLoader;
use crate::spec::{Activation, Family, ModelSpec};
use bitnet_core::f16;
use bitnet_core::packed::{self, Fidelity, TernaryFormat};
use bitnet_core::quant::ScaleConvention;
use bitnet_formats::FormatError;
use bitnet_formats::gguf::{GgmlType, GgufWriter, TensorData, quantize_q8_0};
use bitnet_formats::safetensors_dir::HfModelDir;
use bitnet_formats::tokenizer::TextTokenizer;
use std::cell::RefCell;
use std::io::Write;
use std::path::Path;

/// What to write.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Ternary type of the linear layers: TQ2_0, TQ1_0 or I2_S.
    pub ternary: GgmlType,
    /// Type of the embeddings and lm_head: F16, BF16, F32 or Q8_0.
    pub float_type: GgmlType,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            ternary: GgmlType::TQ2_0,
            float_type: GgmlType::F16,
        }
    }
}

/// What the conversion did, tensor by tensor.
#[derive(Debug, Clone, Default)]
pub struct ConvertReport {
    pub tensors: Vec<TensorReport>,
    pub bytes_written: u64,
}

#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub ty: GgmlType,
    pub shape: Vec<usize>,
    /// For ternary tensors: what the target format changed about the scales.
    pub fidelity: Option<Fidelity>,
}

/// The GGUF architecture name a model is written under. BitNet b1.58 with squared ReLU is
/// bitnet.cpp's `bitnet-25` graph; llama-family models are `llama`.
pub fn gguf_arch(spec: &ModelSpec) -> &'static str {
    match (spec.family, spec.activation) {
        (Family::BitNet, Activation::Relu2) => "bitnet-25",
        (Family::BitNet, Activation::Silu) => "bitnet",
        (Family::Llama, _) => "llama",
    }
}

fn fmt_err(e: impl std::fmt::Display) -> FormatError {
    FormatError::Config {
        path: "conversion".into(),
        message: e.to_string(),
    }
}

/// Convert the Hugging Face directory `src` to a GGUF file `dst`. `progress(done, total)` is
/// called with tensor counts as each tensor is written.
pub fn convert_hf_to_gguf(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<ConvertReport> {
    let format = match opts.ternary {
        GgmlType::TQ2_0 => TernaryFormat::Tq2_0,
        GgmlType::TQ1_0 => TernaryFormat::Tq1_0,
        GgmlType::I2_S => TernaryFormat::I2S,
        other => {
            return Err(ModelError::Unsupported(format!(
                "ternary target {other} (choose TQ2_0, TQ1_0 or I2_S)"
            )));
        }
    };
    if !matches!(
        opts.float_type,
        GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 | GgmlType::Q8_0
    ) {
        return Err(ModelError::Unsupported(format!(
            "embedding type {} (choose F16, BF16, F32 or Q8_0)",
            opts.float_type
        )));
    }
    let dir = HfModelDir::open(src)?;
    let (loader, spec) = HfLoader::new(&dir)?;
    let s = &spec;
    if s.family != Family::BitNet {
        return Err(ModelError::Unsupported(format!(
            "{} is not a BitNet model: nothing to ternarize",
            s.arch_name
        )));
    }
    let untied = !s.tied_embeddings && dir.weights.get("lm_head.weight").is_some();
    let total = 2 + s.n_layers * 11 + usize::from(untied);
    let cx = Ctx {
        loader: &loader,
        report: RefCell::new(ConvertReport::default()),
        done: RefCell::new(0),
        total,
        progress: RefCell::new(progress),
        opts,
        format,
    };
    let arch = gguf_arch(s);
    let mut w = GgufWriter::new();
    w.set("general.architecture", arch)
        .set(
            "general.name",
            dir.config
                .architectures
                .first()
                .cloned()
                .unwrap_or_else(|| s.arch_name.clone()),
        )
        .set("general.quantization_version", 2u32)
        .set(format!("{arch}.context_length"), s.context as u32)
        .set(format!("{arch}.embedding_length"), s.hidden as u32)
        .set(format!("{arch}.feed_forward_length"), s.intermediate as u32)
        .set(format!("{arch}.block_count"), s.n_layers as u32)
        .set(format!("{arch}.attention.head_count"), s.n_heads as u32)
        .set(
            format!("{arch}.attention.head_count_kv"),
            s.n_kv_heads as u32,
        )
        .set(format!("{arch}.attention.key_length"), s.head_dim as u32)
        .set(format!("{arch}.attention.value_length"), s.head_dim as u32)
        .set(format!("{arch}.rope.dimension_count"), s.head_dim as u32)
        .set(format!("{arch}.rope.freq_base"), s.rope_theta)
        .set(
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            s.rms_eps,
        )
        .set(format!("{arch}.vocab_size"), s.vocab as u32);
    if let Some(p) = dir.tokenizer_json() {
        let tok = TextTokenizer::from_file(p)?;
        for (k, v) in tok.to_gguf_metadata()? {
            w.set(k, v);
        }
    }
    cx.float(
        &mut w,
        "token_embd.weight",
        "model.embed_tokens.weight",
        s.vocab,
        s.hidden,
    )?;
    for i in 0..s.n_layers {
        let (p, b) = (format!("model.layers.{i}"), format!("blk.{i}"));
        cx.norm(
            &mut w,
            format!("{b}.attn_norm.weight"),
            format!("{p}.input_layernorm.weight"),
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.attn_q.weight"),
            format!("{p}.self_attn.q_proj"),
            s.q_dim(),
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.attn_k.weight"),
            format!("{p}.self_attn.k_proj"),
            s.kv_dim(),
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.attn_v.weight"),
            format!("{p}.self_attn.v_proj"),
            s.kv_dim(),
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.attn_output.weight"),
            format!("{p}.self_attn.o_proj"),
            s.hidden,
            s.q_dim(),
        )?;
        cx.norm(
            &mut w,
            format!("{b}.attn_sub_norm.weight"),
            format!("{p}.self_attn.attn_sub_norm.weight"),
            s.q_dim(),
        )?;
        cx.norm(
            &mut w,
            format!("{b}.ffn_norm.weight"),
            format!("{p}.post_attention_layernorm.weight"),
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.ffn_gate.weight"),
            format!("{p}.mlp.gate_proj"),
            s.intermediate,
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.ffn_up.weight"),
            format!("{p}.mlp.up_proj"),
            s.intermediate,
            s.hidden,
        )?;
        cx.linear(
            &mut w,
            format!("{b}.ffn_down.weight"),
            format!("{p}.mlp.down_proj"),
            s.hidden,
            s.intermediate,
        )?;
        cx.norm(
            &mut w,
            format!("{b}.ffn_sub_norm.weight"),
            format!("{p}.mlp.ffn_sub_norm.weight"),
            s.intermediate,
        )?;
    }
    cx.norm(
        &mut w,
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        s.hidden,
    )?;
    if !s.tied_embeddings && dir.weights.get("lm_head.weight").is_some() {
        cx.float(&mut w, "output.weight", "lm_head.weight", s.vocab, s.hidden)?;
    }
    w.write_to_path(dst)?;
    let mut r = cx.report.into_inner();
    r.bytes_written = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
    Ok(r)
}

/// Called with (tensors done, tensors in all, name of the tensor just written).
pub type Progress<'p> = &'p mut dyn FnMut(usize, usize, &str);

/// Shared state of one conversion; each method registers one tensor whose bytes are produced
/// while the file is written.
struct Ctx<'a, 'p> {
    loader: &'a HfLoader<'a>,
    report: RefCell<ConvertReport>,
    done: RefCell<usize>,
    total: usize,
    progress: RefCell<Progress<'p>>,
    opts: &'a ConvertOptions,
    format: TernaryFormat,
}

impl<'a, 'p> Ctx<'a, 'p> {
    fn finish(&self, name: &str, ty: GgmlType, shape: Vec<usize>, fidelity: Option<Fidelity>) {
        self.report.borrow_mut().tensors.push(TensorReport {
            name: name.to_string(),
            ty,
            shape,
            fidelity,
        });
        *self.done.borrow_mut() += 1;
        let done = *self.done.borrow();
        (self.progress.borrow_mut())(done, self.total, name);
    }

    fn float<'w>(
        &'w self,
        w: &mut GgufWriter<'w>,
        name: &str,
        hf: &'static str,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let ty = self.opts.float_type;
        let n = name.to_string();
        w.add_tensor(
            name,
            ty,
            &[cols as u64, rows as u64],
            TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                let m = self.loader.dense(hf, rows, cols).map_err(fmt_err)?;
                let mut row = vec![0.0f32; cols];
                for r in 0..rows {
                    m.row_into(r, &mut row);
                    write_floats(out, ty, &row)?;
                }
                self.finish(&n, ty, vec![rows, cols], None);
                Ok(())
            })),
        )?;
        Ok(())
    }

    fn norm<'w>(
        &'w self,
        w: &mut GgufWriter<'w>,
        name: String,
        hf: String,
        len: usize,
    ) -> Result<()> {
        let n = name.clone();
        w.add_tensor(
            name,
            GgmlType::F32,
            &[len as u64],
            TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                let v = self.loader.vector(&hf, len).map_err(fmt_err)?;
                write_floats(out, GgmlType::F32, &v)?;
                self.finish(&n, GgmlType::F32, vec![len], None);
                Ok(())
            })),
        )?;
        Ok(())
    }

    fn linear<'w>(
        &'w self,
        w: &mut GgufWriter<'w>,
        name: String,
        hf: String,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.format.check_shape(rows, cols)?;
        let n = name.clone();
        let format = self.format;
        w.add_tensor(name, self.opts.ternary, &[cols as u64, rows as u64], TensorData::Stream(Box::new(move |out: &mut dyn Write| {
            let Some((mut m, convention)) = self.loader.ternary(&hf, rows, cols).map_err(fmt_err)? else {
                return Err(fmt_err(format!("{hf} is not ternary in the source; only BitNet checkpoints convert to {format}")));
            };
            if convention == ScaleConvention::Divide {
                // GGUF ternary types multiply by their scale.
                m.scales.iter_mut().for_each(|s| *s = 1.0 / *s);
            }
            let (p, fidelity) = packed::pack(&m, format).map_err(fmt_err)?;
            out.write_all(&p.data).map_err(|e| FormatError::Io { path: "output".into(), source: e })?;
            self.finish(&n, self.opts.ternary, vec![rows, cols], Some(fidelity));
            Ok(())
        })))?;
        Ok(())
    }
}

fn write_floats(out: &mut dyn Write, ty: GgmlType, v: &[f32]) -> Result<(), FormatError> {
    let io = |e| FormatError::Io {
        path: "output".into(),
        source: e,
    };
    match ty {
        GgmlType::F32 => v
            .iter()
            .try_for_each(|x| out.write_all(&x.to_le_bytes()))
            .map_err(io),
        GgmlType::F16 => v
            .iter()
            .try_for_each(|x| out.write_all(&f16::from_f32(*x).to_le_bytes()))
            .map_err(io),
        GgmlType::BF16 => v
            .iter()
            .try_for_each(|x| out.write_all(&half::bf16::from_f32(*x).to_le_bytes()))
            .map_err(io),
        GgmlType::Q8_0 => out.write_all(&quantize_q8_0(v)?).map_err(io),
        other => Err(fmt_err(format!("cannot write {other}"))),
    }
}
