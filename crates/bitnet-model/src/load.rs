//! Loading models from Hugging Face directories and GGUF files.

use crate::error::{ModelError, Result};
use crate::linear::{DenseMatrix, Linear, TernaryLinear, WeightBytes};
use crate::model::{Layer, Model};
use crate::sampling::SamplingDefaults;
use crate::spec::{Family, ModelSpec};
use bitnet_core::packed::{self, PackedTensor, TernaryFormat};
use bitnet_core::quant::{Granularity, ScaleConvention, TernaryMatrix, ternarize_read};
use bitnet_core::reduce::TorchReduce;
use bitnet_formats::gguf::{GgmlType, GgufFile, TensorInfo};
use bitnet_formats::names::{self, LayerTensor};
use bitnet_formats::safetensors_dir::{Dtype, HfModelDir, StTensorInfo};
use bitnet_formats::tokenizer::TextTokenizer;
use std::path::Path;
use std::sync::Arc;

/// A model with its tokenizer (when the checkpoint ships one).
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
    /// Where the weights came from and how they are held, for reports.
    pub description: String,
    /// The sampling settings the checkpoint ships (none when it says nothing).
    pub sampling: SamplingDefaults,
}

/// Load a GGUF file or a Hugging Face model directory.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedModel> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(ModelError::Load {
            path: path.to_path_buf(),
            message: "no such file or directory".into(),
        });
    }
    if path.is_dir() {
        load_hf(path)
    } else {
        load_gguf(path)
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directories
// ---------------------------------------------------------------------------------------------

/// How the linear layers of a Hugging Face checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HfQuant {
    /// Plain float linears (llama).
    None,
    /// Float master weights, ternarized at load (`quantization_mode: online`).
    Online,
    /// Ternary weights stored with a `weight_scale` (`quantization_mode: offline`), applied as
    /// the class says (`bitlinear` divides, `autobitlinear` multiplies). Each weight is read as
    /// it is stored, as transformers' loader does: packed uint8 `[out/4, in]` (the 2B-4T
    /// layout, four rows per byte) or ternary values as floats `[out, in]`.
    Offline(ScaleConvention),
}

pub(crate) struct HfLoader<'a> {
    pub(crate) dir: &'a HfModelDir,
    quant: HfQuant,
    skip: Vec<String>,
}

fn hf_dtype(d: Dtype) -> Option<GgmlType> {
    match d {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

impl HfLoader<'_> {
    fn info(&self, name: &str) -> Result<&StTensorInfo> {
        self.dir
            .weights
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = self.dir.weights.to_f32(name)?;
        if v.len() != len {
            return Err(ModelError::Shape {
                name: name.into(),
                expected: vec![len],
                found: vec![v.len()],
            });
        }
        Ok(v)
    }

    pub(crate) fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let t = self.info(name)?;
        if t.shape != [rows, cols] {
            return Err(ModelError::Shape {
                name: name.into(),
                expected: vec![rows, cols],
                found: t.shape.clone(),
            });
        }
        let ty = hf_dtype(t.dtype).ok_or_else(|| {
            ModelError::Unsupported(format!("tensor {name:?} has dtype {:?}", t.dtype))
        })?;
        let map: Arc<dyn AsRef<[u8]> + Send + Sync> = self.dir.weights.shard_mapping(t.shard);
        DenseMatrix::new(
            name,
            rows,
            cols,
            ty,
            WeightBytes::mapped(map, t.range.clone()),
        )
    }

    pub(crate) fn linear(&self, module: &str, rows: usize, cols: usize) -> Result<Linear> {
        Ok(match self.ternary(module, rows, cols)? {
            Some((m, conv)) => Linear::Ternary(TernaryLinear::new(m, conv)),
            None => Linear::Dense(self.dense(&format!("{module}.weight"), rows, cols)?),
        })
    }

    /// The ternary codes and scales of a linear layer, or `None` for a float layer.
    pub(crate) fn ternary(
        &self,
        module: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<(TernaryMatrix, ScaleConvention)>> {
        let wname = format!("{module}.weight");
        let quant = if self
            .skip
            .iter()
            .any(|s| module.ends_with(s.as_str()) || module == s)
        {
            HfQuant::None
        } else {
            self.quant
        };
        match quant {
            HfQuant::None => Ok(None),
            HfQuant::Online => {
                let w = self.dense(&wname, rows, cols)?;
                // transformers' AutoBitLinear runs the @torch.compile'd WeightQuant, whose
                // mean|W| sums in TorchInductor's order (16 lanes on AVX-512 hosts); eager
                // PyTorch's order can differ by an ulp and flip a code that sits on a tie.
                // The weights are widened a block at a time, never as one f32 matrix.
                let mut failed = None;
                let m = ternarize_read(
                    rows,
                    cols,
                    TorchReduce::Inductor { lanes: 16 },
                    &mut |start, out| {
                        if let Err(e) = w.flat_into(start, out) {
                            failed.get_or_insert(e);
                        }
                    },
                )?;
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(Some((m, ScaleConvention::Multiply)))
            }
            HfQuant::Offline(conv) => {
                let t = self.info(&wname)?;
                let m = if t.dtype == Dtype::U8 {
                    if t.shape != [rows.div_ceil(4), cols] {
                        return Err(ModelError::Shape {
                            name: wname,
                            expected: vec![rows.div_ceil(4), cols],
                            found: t.shape.clone(),
                        });
                    }
                    let p = PackedTensor {
                        format: TernaryFormat::HfPacked,
                        rows,
                        cols,
                        data: self.dir.weights.bytes(t).to_vec(),
                        scale: Some(self.scale(module)?),
                    };
                    packed::unpack(&p)?
                } else {
                    let w = self.dense(&wname, rows, cols)?;
                    let mut codes = Vec::with_capacity(rows * cols);
                    let mut row = vec![0.0f32; cols];
                    for r in 0..rows {
                        w.row_into(r, &mut row);
                        for (c, &v) in row.iter().enumerate() {
                            if v != -1.0 && v != 0.0 && v != 1.0 {
                                return Err(ModelError::Invalid(format!(
                                    "{wname}[{r}, {c}] is {v}: an offline BitNet checkpoint stores \
                                     ternary values (-1, 0, 1) or packed uint8 codes"
                                )));
                            }
                            codes.push(v as i8);
                        }
                    }
                    TernaryMatrix::new(
                        rows,
                        cols,
                        codes,
                        Granularity::PerTensor,
                        vec![self.scale(module)?],
                    )?
                };
                Ok(Some((m, conv)))
            }
        }
    }

    fn scale(&self, module: &str) -> Result<f32> {
        let name = format!("{module}.weight_scale");
        let v = self.dir.weights.to_f32(&name)?;
        match v.as_slice() {
            [s] => Ok(*s),
            _ => Err(ModelError::Shape {
                name,
                expected: vec![1],
                found: vec![v.len()],
            }),
        }
    }
}

impl<'a> HfLoader<'a> {
    pub(crate) fn new(dir: &'a HfModelDir) -> Result<(Self, ModelSpec)> {
        let spec = ModelSpec::from_hf(&dir.config)?;
        let (quant, skip) = hf_quant(dir)?;
        Ok((Self { dir, quant, skip }, spec))
    }
}

fn hf_quant(dir: &HfModelDir) -> Result<(HfQuant, Vec<String>)> {
    Ok(match &dir.config.quantization_config {
        None => (HfQuant::None, Vec::new()),
        Some(q) if q.quant_method.as_deref() == Some("bitnet") => {
            let conv = ScaleConvention::from_linear_class(
                q.linear_class.as_deref().unwrap_or("bitlinear"),
            )?;
            let mode = if q.quantization_mode.as_deref() == Some("online") {
                HfQuant::Online
            } else {
                HfQuant::Offline(conv)
            };
            (
                mode,
                q.modules_to_not_convert
                    .clone()
                    .unwrap_or_else(|| vec!["lm_head".into()]),
            )
        }
        Some(q) => {
            return Err(ModelError::Unsupported(format!(
                "quantization_config.quant_method {:?} (supported: bitnet, or none)",
                q.quant_method
            )));
        }
    })
}

/// A GGUF's `general.sampling.*` settings (llama.cpp writes them from the model's
/// generation config).
fn gguf_sampling(h: &bitnet_formats::gguf::GgufHeader) -> SamplingDefaults {
    use bitnet_formats::names::key;
    let f = |k: &str| h.get(k).and_then(|v| v.as_f64()).map(|x| x as f32);
    let u = |k: &str| h.get_u64(k).map(|x| x as usize);
    let d = SamplingDefaults {
        temperature: f(key::SAMPLING_TEMP),
        top_k: u(key::SAMPLING_TOP_K),
        top_p: f(key::SAMPLING_TOP_P),
        min_p: f(key::SAMPLING_MIN_P),
        repetition_penalty: f(key::SAMPLING_PENALTY_REPEAT),
        penalty_last_n: u(key::SAMPLING_PENALTY_LAST_N),
        source: Some("GGUF general.sampling".into()),
    };
    if d.is_empty() {
        SamplingDefaults::default()
    } else {
        d
    }
}

/// A model's layers from its tensors, named by the table: `vector(tensor, layer, len)` and
/// `linear(tensor, layer, rows, cols)` read one from the file at hand.
fn build_layers(
    s: &ModelSpec,
    vector: impl Fn(&LayerTensor, usize, usize) -> Result<Vec<f32>>,
    linear: impl Fn(&LayerTensor, usize, usize, usize) -> Result<Linear>,
) -> Result<Vec<Layer>> {
    let d = s.dims();
    let bitnet = s.family == Family::BitNet;
    (0..s.n_layers)
        .map(|i| {
            let v = |t: LayerTensor| vector(&t, i, d.get(t.rows));
            let lin = |t: LayerTensor| linear(&t, i, d.get(t.rows), t.cols.map_or(0, |c| d.get(c)));
            let sub = |t: LayerTensor| bitnet.then(|| v(t)).transpose();
            Ok(Layer {
                attn_norm: v(names::ATTN_NORM)?,
                q: lin(names::Q)?,
                k: lin(names::K)?,
                v: lin(names::V)?,
                o: lin(names::O)?,
                attn_sub_norm: sub(names::ATTN_SUB_NORM)?,
                ffn_norm: v(names::FFN_NORM)?,
                gate: lin(names::GATE)?,
                up: lin(names::UP)?,
                down: lin(names::DOWN)?,
                ffn_sub_norm: sub(names::FFN_SUB_NORM)?,
            })
        })
        .collect()
}

fn load_hf(path: &Path) -> Result<LoadedModel> {
    let dir = HfModelDir::open(path)?;
    let (l, spec) = HfLoader::new(&dir)?;
    let quant = l.quant;
    let s = &spec;
    let layers = build_layers(
        s,
        |t, i, n| l.vector(&t.hf_weight(i), n),
        |t, i, rows, cols| l.linear(&t.hf_module(i), rows, cols),
    )?;
    let embed = l.dense(names::EMBED.hf, s.vocab, s.hidden)?;
    let lm_head = if s.tied_embeddings || dir.weights.get(names::LM_HEAD.hf).is_none() {
        Linear::Dense(embed.clone())
    } else {
        Linear::Dense(l.dense(names::LM_HEAD.hf, s.vocab, s.hidden)?)
    };
    let norm = l.vector(names::OUTPUT_NORM.hf, s.hidden)?;
    let tokenizer = dir
        .tokenizer_json()
        .map(TextTokenizer::from_file)
        .transpose()?;
    let description = format!(
        "{} ({:?} linears) from {}",
        s.arch_name,
        quant,
        path.display()
    );
    let sampling = match std::fs::read_to_string(path.join("generation_config.json")) {
        Ok(text) => serde_json::from_str(&text)
            .map(|v| SamplingDefaults::from_generation_config(&v))
            .map_err(|e| {
                ModelError::Invalid(format!(
                    "{}: {e}",
                    path.join("generation_config.json").display()
                ))
            })?,
        Err(_) => SamplingDefaults::default(),
    };
    Ok(LoadedModel {
        sampling,
        model: Model::new(spec, embed, layers, norm, lm_head)?,
        tokenizer,
        description,
    })
}

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

struct GgufLoader<'a> {
    f: &'a GgufFile,
}

impl GgufLoader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.f
            .header
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn check(&self, t: &TensorInfo, rows: usize, cols: usize) -> Result<()> {
        let want = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        if t.dims != want {
            return Err(ModelError::Shape {
                name: t.name.clone(),
                expected: want.iter().rev().map(|&d| d as usize).collect(),
                found: t.shape().iter().map(|&d| d as usize).collect(),
            });
        }
        Ok(())
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.info(name)?;
        self.check(t, 1, len)?;
        Ok(self.f.dequantize(name)?)
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let t = self.info(name)?;
        self.check(t, rows, cols)?;
        let map: Arc<dyn AsRef<[u8]> + Send + Sync> = self.f.mapping();
        DenseMatrix::new(
            name,
            rows,
            cols,
            t.ty,
            WeightBytes::mapped(map, self.f.header.tensor_range(t)),
        )
    }

    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let t = self.info(name)?;
        self.check(t, rows, cols)?;
        let format = match t.ty {
            GgmlType::TQ2_0 => TernaryFormat::Tq2_0,
            GgmlType::TQ1_0 => TernaryFormat::Tq1_0,
            GgmlType::I2_S => TernaryFormat::I2S,
            GgmlType::TL1 | GgmlType::TL2 => {
                return Err(ModelError::Unsupported(format!(
                    "tensor {name:?} is {}, a bitnet.cpp lookup-table layout tied to the kernels that wrote it; \
                     convert the model to I2_S or TQ2_0 instead",
                    t.ty
                )));
            }
            _ => return Ok(Linear::Dense(self.dense(name, rows, cols)?)),
        };
        let p = PackedTensor {
            format,
            rows,
            cols,
            data: self.f.tensor_bytes(t).to_vec(),
            scale: None,
        };
        let mut m = packed::unpack(&p)?;
        // llama.cpp's BitNet graph multiplies some projections by a separate scale tensor.
        let scale_name = name.replace(".weight", ".scale");
        if let Some(st) = self.f.header.tensor(&scale_name) {
            let s = self.f.dequantize(&st.name)?;
            if s.len() != 1 {
                return Err(ModelError::Unsupported(format!(
                    "{scale_name} has {} values; one was expected",
                    s.len()
                )));
            }
            for v in &mut m.scales {
                *v *= s[0];
            }
        }
        Ok(Linear::Ternary(TernaryLinear::new(
            m,
            ScaleConvention::Multiply,
        )))
    }
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let f = GgufFile::open(path)?;
    let spec = ModelSpec::from_gguf(&f.header)?;
    let l = GgufLoader { f: &f };
    let s = &spec;
    let layers = build_layers(
        s,
        |t, i, n| l.vector(&t.gguf_weight(i), n),
        |t, i, rows, cols| l.linear(&t.gguf_weight(i), rows, cols),
    )?;
    let embed = l.dense(names::EMBED.gguf, s.vocab, s.hidden)?;
    let lm_head = match f.header.tensor(names::LM_HEAD.gguf) {
        Some(_) => l.linear(names::LM_HEAD.gguf, s.vocab, s.hidden)?,
        None => Linear::Dense(embed.clone()),
    };
    let norm = l.vector(names::OUTPUT_NORM.gguf, s.hidden)?;
    let tokenizer = match TextTokenizer::from_gguf(&f.header) {
        Ok(t) => Some(t),
        Err(_) if f.header.get(names::key::TOKENIZER_MODEL).is_none() => None,
        Err(e) => return Err(e.into()),
    };
    let description = format!(
        "{} GGUF ({}) from {}",
        s.arch_name,
        f.header.dialect,
        path.display()
    );
    let sampling = gguf_sampling(&f.header);
    Ok(LoadedModel {
        sampling,
        model: Model::new(spec, embed, layers, norm, lm_head)?,
        tokenizer,
        description,
    })
}
