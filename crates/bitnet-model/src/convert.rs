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
use bitnet_core::quant::{ScaleConvention, TernaryMatrix};
use bitnet_formats::FormatError;
use bitnet_formats::gguf::{GgmlType, GgufWriter, TensorData, quantize_q8_0};
use bitnet_formats::names::{self, key};
use bitnet_formats::safetensors_dir::HfModelDir;
use bitnet_formats::tokenizer::TextTokenizer;
use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};

/// What to write.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Ternary type of the linear layers: TQ2_0, TQ1_0 or I2_S.
    pub ternary: GgmlType,
    /// Type of the embeddings and lm_head: F16, BF16, F32 or Q8_0.
    pub float_type: GgmlType,
    /// Set from another thread to stop the conversion after the tensor being written (the
    /// output file is then never made).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl ConvertOptions {
    fn check_cancelled(&self) -> std::result::Result<(), FormatError> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(fmt_err("the conversion was cancelled")),
            _ => Ok(()),
        }
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            ternary: GgmlType::TQ2_0,
            float_type: GgmlType::F16,
            cancel: None,
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

/// Convert the Hugging Face directory `src` to a GGUF file `dst`. `progress(done, total, name)`
/// is called with bytes of tensor data written and in all as each tensor is written.
pub fn convert_hf_to_gguf(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertReport> {
    let format = ternary_format(opts.ternary).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "ternary target {} (choose TQ2_0, TQ1_0 or I2_S)",
            opts.ternary
        ))
    })?;
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
    let mut plan = Plan {
        loader: &loader,
        opts,
        format,
        tensors: Vec::new(),
    };
    let arch = gguf_arch(s);
    let mut w = GgufWriter::new();
    let k = |suffix: &str| key::arch(arch, suffix);
    w.set(key::ARCHITECTURE, arch)
        .set(
            key::NAME,
            dir.config
                .architectures
                .first()
                .cloned()
                .unwrap_or_else(|| s.arch_name.clone()),
        )
        .set(key::QUANTIZATION_VERSION, 2u32)
        .set(k(key::CONTEXT_LENGTH), s.context as u32)
        .set(k(key::EMBEDDING_LENGTH), s.hidden as u32)
        .set(k(key::FEED_FORWARD_LENGTH), s.intermediate as u32)
        .set(k(key::BLOCK_COUNT), s.n_layers as u32)
        .set(k(key::HEAD_COUNT), s.n_heads as u32)
        .set(k(key::HEAD_COUNT_KV), s.n_kv_heads as u32)
        .set(k(key::KEY_LENGTH), s.head_dim as u32)
        .set(k(key::VALUE_LENGTH), s.head_dim as u32)
        .set(k(key::ROPE_DIMENSION_COUNT), s.head_dim as u32)
        .set(k(key::ROPE_FREQ_BASE), s.rope_theta)
        .set(k(key::RMS_EPS), s.rms_eps)
        .set(k(key::VOCAB_SIZE), s.vocab as u32);
    if let Some(p) = dir.tokenizer_json() {
        let tok = TextTokenizer::from_file(p)?;
        for (k, v) in tok.to_gguf_metadata()? {
            w.set(k, v);
        }
    }
    plan.float(names::EMBED.gguf, names::EMBED.hf, s.vocab, s.hidden)?;
    let d = s.dims();
    for i in 0..s.n_layers {
        for t in names::LAYER {
            let rows = d.get(t.rows);
            match t.cols {
                Some(c) => plan.linear(t.gguf_weight(i), t.hf_module(i), rows, d.get(c))?,
                None => plan.norm(t.gguf_weight(i), t.hf_weight(i), rows)?,
            }
        }
    }
    plan.norm(
        names::OUTPUT_NORM.gguf.into(),
        names::OUTPUT_NORM.hf.into(),
        s.hidden,
    )?;
    if !s.tied_embeddings && dir.weights.get(names::LM_HEAD.hf).is_some() {
        plan.float(names::LM_HEAD.gguf, names::LM_HEAD.hf, s.vocab, s.hidden)?;
    }
    let tensors = write_planned(w, plan.tensors, dst, opts, progress)?;
    Ok(ConvertReport {
        tensors,
        bytes_written: std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0),
    })
}

/// Called with (bytes of tensor data written, bytes in all, name of the tensor just written).
pub type Progress<'p> = &'p mut dyn FnMut(u64, u64, &str);

/// Bytes a tensor of `ty` and `shape` (outermost first) takes in a GGUF file.
fn tensor_bytes(ty: GgmlType, shape: &[usize]) -> u64 {
    let n: u64 = shape.iter().map(|&d| d as u64).product();
    ty.nbytes(n, shape.last().copied().unwrap_or(1) as u64)
        .unwrap_or(0)
}

/// A tensor's bytes, produced on a worker thread: the job writes them into its sink and returns
/// what packing changed, for ternary tensors.
type Job<'a> = Box<dyn FnOnce(&mut dyn Write) -> Result<Option<Fidelity>, FormatError> + Send + 'a>;

/// One output tensor: its header and the job that produces its bytes.
struct Planned<'a> {
    name: String,
    ty: GgmlType,
    /// Outermost first: `[rows, cols]` or `[len]`.
    shape: Vec<usize>,
    job: Job<'a>,
}

/// The tensors of one conversion, in file order.
struct Plan<'a> {
    loader: &'a HfLoader<'a>,
    opts: &'a ConvertOptions,
    format: TernaryFormat,
    tensors: Vec<Planned<'a>>,
}

/// A float tensor's mapped source pages are released every this many rows (an embedding of
/// 128k rows is 650 MB of bf16).
const RELEASE_ROWS: usize = 4096;

impl<'a> Plan<'a> {
    fn float(&mut self, name: &str, hf: &'static str, rows: usize, cols: usize) -> Result<()> {
        let (loader, ty) = (self.loader, self.opts.float_type);
        self.tensors.push(Planned {
            name: name.to_string(),
            ty,
            shape: vec![rows, cols],
            job: Box::new(move |out| {
                let m = loader.dense(hf, rows, cols).map_err(fmt_err)?;
                let mut row = vec![0.0f32; cols];
                for r in 0..rows {
                    m.row_into(r, &mut row);
                    write_floats(out, ty, &row)?;
                    if (r + 1) % RELEASE_ROWS == 0 {
                        loader
                            .dir
                            .weights
                            .release_rows(hf, r + 1 - RELEASE_ROWS..r + 1, rows);
                    }
                }
                loader.dir.weights.release(hf);
                Ok(None)
            }),
        });
        Ok(())
    }

    fn norm(&mut self, name: String, hf: String, len: usize) -> Result<()> {
        let loader = self.loader;
        self.tensors.push(Planned {
            name,
            ty: GgmlType::F32,
            shape: vec![len],
            job: Box::new(move |out| {
                let v = loader.vector(&hf, len).map_err(fmt_err)?;
                write_floats(out, GgmlType::F32, &v)?;
                loader.dir.weights.release(&hf);
                Ok(None)
            }),
        });
        Ok(())
    }

    fn linear(&mut self, name: String, hf: String, rows: usize, cols: usize) -> Result<()> {
        let (loader, format) = (self.loader, self.format);
        format.check_shape(rows, cols)?;
        self.tensors.push(Planned {
            name,
            ty: self.opts.ternary,
            shape: vec![rows, cols],
            job: Box::new(move |out| {
                let Some((mut m, convention)) = loader
                    .ternary(&hf, rows, cols)
                    .map_err(fmt_err)?
                else {
                    return Err(fmt_err(format!(
                        "{hf} is not ternary in the source; only BitNet checkpoints convert to {format}"
                    )));
                };
                if convention == ScaleConvention::Divide {
                    // GGUF ternary types multiply by their scale.
                    m.scales.iter_mut().for_each(|s| *s = 1.0 / *s);
                }
                let (p, fidelity) = packed::pack(&m, format).map_err(fmt_err)?;
                out.write_all(&p.data).map_err(|e| FormatError::Io {
                    path: "output".into(),
                    source: e,
                })?;
                for part in ["weight", "weight_scale"] {
                    loader.dir.weights.release(&format!("{hf}.{part}"));
                }
                Ok(Some(fidelity))
            }),
        });
        Ok(())
    }
}

/// What a worker sends the writer: a piece of the current tensor, or its end.
enum Piece {
    Bytes(Vec<u8>),
    Done(Result<Option<Fidelity>, FormatError>),
}

/// Bytes a worker hands the writer at a time, and how many pieces may wait per worker: a
/// worker runs at most 16 MiB ahead of the file, whatever the tensor's size.
const PIECE_BYTES: usize = 1 << 20;
const PIECES_AHEAD: usize = 16;

/// A worker's sink: fills pieces and sends them; fails once the writer has stopped listening.
struct PieceSink<'c> {
    buf: Vec<u8>,
    tx: &'c SyncSender<Piece>,
}

impl PieceSink<'_> {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE_BYTES));
        self.tx
            .send(Piece::Bytes(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer stopped"))
    }
}

impl Write for PieceSink<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(PIECE_BYTES - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == PIECE_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Write `plan` into `w` and `dst`. Tensors are produced by up to two worker threads (tensor
/// `i` on worker `i % workers`, each a bounded number of pieces ahead) while this thread
/// writes them in file order, so reading and packing overlap writing. Returns each tensor's
/// report, in file order.
fn write_planned(
    mut w: GgufWriter<'_>,
    plan: Vec<Planned<'_>>,
    dst: &Path,
    opts: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<Vec<TensorReport>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 2);
    let total: u64 = plan.iter().map(|t| tensor_bytes(t.ty, &t.shape)).sum();
    let mut jobs: Vec<Vec<Job<'_>>> = (0..workers).map(|_| Vec::new()).collect();
    let mut headers = Vec::with_capacity(plan.len());
    for (i, t) in plan.into_iter().enumerate() {
        headers.push((t.name, t.ty, t.shape));
        jobs[i % workers].push(t.job);
    }
    let reports = RefCell::new(Vec::with_capacity(headers.len()));
    let done = RefCell::new(0u64);
    let progress = RefCell::new(progress);
    std::thread::scope(|scope| {
        let mut rxs = Vec::with_capacity(workers);
        for queue in jobs {
            let (tx, rx) = sync_channel::<Piece>(PIECES_AHEAD);
            rxs.push(rx);
            scope.spawn(move || {
                for job in queue {
                    let mut sink = PieceSink {
                        buf: Vec::with_capacity(PIECE_BYTES),
                        tx: &tx,
                    };
                    let r = job(&mut sink);
                    let r = r.and_then(|f| {
                        sink.flush().map_err(|e| FormatError::Io {
                            path: "output".into(),
                            source: e,
                        })?;
                        Ok(f)
                    });
                    // A failed send means the writer gave up: stop.
                    if tx.send(Piece::Done(r)).is_err() {
                        return;
                    }
                }
            });
        }
        let result = (|| -> Result<()> {
            for (i, (name, ty, shape)) in headers.into_iter().enumerate() {
                let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
                let (rx, reports, done, progress) = (&rxs[i % workers], &reports, &done, &progress);
                let n = name.clone();
                w.add_tensor(
                    name,
                    ty,
                    &dims,
                    TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                        loop {
                            match rx.recv() {
                                Ok(Piece::Bytes(b)) => {
                                    out.write_all(&b).map_err(|e| FormatError::Io {
                                        path: "output".into(),
                                        source: e,
                                    })?
                                }
                                Ok(Piece::Done(r)) => {
                                    let fidelity = r?;
                                    *done.borrow_mut() += tensor_bytes(ty, &shape);
                                    (progress.borrow_mut())(*done.borrow(), total, &n);
                                    opts.check_cancelled()?;
                                    reports.borrow_mut().push(TensorReport {
                                        name: n.clone(),
                                        ty,
                                        shape: shape.clone(),
                                        fidelity,
                                    });
                                    return Ok(());
                                }
                                Err(_) => return Err(fmt_err("a conversion worker stopped early")),
                            }
                        }
                    })),
                )?;
            }
            w.write_to_path(dst)?;
            Ok(())
        })();
        // Dropping the receivers stops workers still producing (after an error).
        drop(rxs);
        result
    })?;
    Ok(reports.into_inner())
}

fn write_floats(out: &mut dyn Write, ty: GgmlType, v: &[f32]) -> Result<(), FormatError> {
    let io = |e| FormatError::Io {
        path: "output".into(),
        source: e,
    };
    // Each row is encoded into one buffer and written at once (a `write_all` per value cost
    // more than the conversion).
    fn encode<const N: usize>(v: &[f32], f: impl Fn(f32) -> [u8; N]) -> Vec<u8> {
        let mut bytes = vec![0u8; v.len() * N];
        for (b, &x) in bytes.chunks_exact_mut(N).zip(v) {
            b.copy_from_slice(&f(x));
        }
        bytes
    }
    let bytes = match ty {
        GgmlType::F32 => encode(v, f32::to_le_bytes),
        GgmlType::F16 => encode(v, |x| f16::from_f32(x).to_le_bytes()),
        GgmlType::BF16 => encode(v, |x| half::bf16::from_f32(x).to_le_bytes()),
        GgmlType::Q8_0 => quantize_q8_0(v)?,
        other => return Err(fmt_err(format!("cannot write {other}"))),
    };
    out.write_all(&bytes).map_err(io)
}

/// The packed layout of a GGUF ternary type.
fn ternary_format(ty: GgmlType) -> Option<TernaryFormat> {
    match ty {
        GgmlType::TQ2_0 => Some(TernaryFormat::Tq2_0),
        GgmlType::TQ1_0 => Some(TernaryFormat::Tq1_0),
        GgmlType::I2_S => Some(TernaryFormat::I2S),
        _ => None,
    }
}

/// Convert a BitNet GGUF to another GGUF: ternary tensors are re-packed through their exact
/// codes (TQ2_0 ↔ TQ1_0 ↔ I2_S; what a target format changes about the scales is reported),
/// float BitLinear weights are ternarized (absmean per tensor, as BitNet does), the embeddings
/// and lm_head are re-encoded when `keep_float` is false, and everything else (norms, metadata,
/// tokenizer, chat template) is copied unchanged.
pub fn convert_gguf_to_gguf(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    keep_float: bool,
    progress: Progress<'_>,
) -> Result<ConvertReport> {
    let format = ternary_format(opts.ternary).ok_or_else(|| {
        ModelError::Unsupported(format!(
            "ternary target {} (choose TQ2_0, TQ1_0 or I2_S)",
            opts.ternary
        ))
    })?;
    let file = bitnet_formats::gguf::GgufFile::open(src)?;
    let h = &file.header;
    let arch = h.architecture().to_string();
    if !bitnet_formats::gguf::BITNET_CPP_ARCHS.contains(&arch.as_str()) {
        return Err(ModelError::Unsupported(format!(
            "{arch} is not a BitNet architecture: nothing to ternarize"
        )));
    }
    let report = RefCell::new(ConvertReport::default());
    let done = RefCell::new(0u64);
    let total = RefCell::new(0u64);
    let progress = RefCell::new(progress);
    let finish = |name: &str, ty: GgmlType, shape: Vec<usize>, fidelity: Option<Fidelity>| {
        *done.borrow_mut() += tensor_bytes(ty, &shape);
        report.borrow_mut().tensors.push(TensorReport {
            name: name.to_string(),
            ty,
            shape,
            fidelity,
        });
        (progress.borrow_mut())(*done.borrow(), *total.borrow(), name);
        opts.check_cancelled()
    };
    let file = &file;
    let finish = &finish;
    // Declared after everything its tensor closures borrow, so it is dropped first.
    let mut w = GgufWriter::new();
    for (k, v) in &h.metadata {
        if k != key::ALIGNMENT {
            w.set(k.clone(), v.clone());
        }
    }
    for t in &h.tensors {
        let (cols, rows) = (
            t.row_len() as usize,
            (t.n_elements() / t.row_len().max(1)) as usize,
        );
        let name = t.name.clone();
        let is_float_io = name == names::EMBED.gguf || name == names::LM_HEAD.gguf;
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        if names::is_gguf_linear(&name) && t.dims.len() == 2 {
            format.check_shape(rows, cols)?;
            *total.borrow_mut() += tensor_bytes(opts.ternary, &shape);
            let src_format = ternary_format(t.ty);
            if src_format.is_none() && !bitnet_formats::gguf::can_dequantize(t.ty) {
                return Err(ModelError::Unsupported(format!(
                    "{name}: cannot read {} weights",
                    t.ty
                )));
            }
            w.add_tensor(
                name.clone(),
                opts.ternary,
                &t.dims,
                TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                    let bytes = file.tensor_bytes(t);
                    let m = match src_format {
                        Some(f) => packed::unpack(&packed::PackedTensor {
                            format: f,
                            rows,
                            cols,
                            data: bytes.to_vec(),
                            scale: None,
                        })
                        .map_err(fmt_err)?,
                        None => {
                            let v = bitnet_formats::gguf::dequantize(
                                &t.name,
                                t.ty,
                                bytes,
                                rows * cols,
                            )?;
                            bitnet_core::quant::ternarize(
                                &v,
                                rows,
                                cols,
                                bitnet_core::quant::Granularity::PerTensor,
                            )
                            .map_err(fmt_err)?
                        }
                    };
                    let (p, fidelity) = packed::pack(&m, format).map_err(fmt_err)?;
                    out.write_all(&p.data).map_err(|e| FormatError::Io {
                        path: "output".into(),
                        source: e,
                    })?;
                    file.release(t);
                    finish(&t.name, opts.ternary, vec![rows, cols], Some(fidelity))?;
                    Ok(())
                })),
            )?;
        } else if is_float_io && !keep_float && t.ty != opts.float_type {
            let ty = opts.float_type;
            *total.borrow_mut() += tensor_bytes(ty, &shape);
            w.add_tensor(
                name.clone(),
                ty,
                &t.dims,
                TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                    let bytes = file.tensor_bytes(t);
                    let row_bytes = bytes.len() / rows.max(1);
                    for r in 0..rows {
                        let v = bitnet_formats::gguf::dequantize(
                            &t.name,
                            t.ty,
                            &bytes[r * row_bytes..(r + 1) * row_bytes],
                            cols,
                        )?;
                        write_floats(out, ty, &v)?;
                    }
                    file.release(t);
                    finish(&t.name, ty, vec![rows, cols], None)?;
                    Ok(())
                })),
            )?;
        } else {
            let ty = t.ty;
            *total.borrow_mut() += tensor_bytes(ty, &shape);
            w.add_tensor(
                name.clone(),
                ty,
                &t.dims,
                TensorData::Stream(Box::new(move |out: &mut dyn Write| {
                    out.write_all(file.tensor_bytes(t))
                        .map_err(|e| FormatError::Io {
                            path: "output".into(),
                            source: e,
                        })?;
                    file.release(t);
                    finish(&t.name, ty, shape, None)?;
                    Ok(())
                })),
            )?;
        }
    }
    w.write_to_path(dst)?;
    let mut r = report.into_inner();
    r.bytes_written = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
    Ok(r)
}

/// What `--verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub tensors: usize,
    /// Ternary tensors whose codes were compared.
    pub ternary: usize,
    /// Largest relative change of a ternary scale between the source and the output.
    pub max_rel_scale_change: f64,
}

/// Compare a written ternary tensor with the source's codes and scales: codes must be equal,
/// and every weight's scale within `tol` (relative) of the source's.
fn check_ternary(name: &str, want: &TernaryMatrix, got: &TernaryMatrix, tol: f64) -> Result<f64> {
    if want.codes != got.codes {
        let i = want
            .codes
            .iter()
            .zip(&got.codes)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(ModelError::Invalid(format!(
            "verify: {name}: code {i} is {} in the output but {} in the source",
            got.codes.get(i).copied().unwrap_or(0),
            want.codes.get(i).copied().unwrap_or(0)
        )));
    }
    let (gw, gg) = (want.group_len(), got.group_len());
    let mut worst = 0.0f64;
    for i in (0..want.codes.len()).step_by(gw.min(gg).max(1)) {
        let (a, b) = (
            f64::from(want.scales[i / gw]),
            f64::from(got.scales[i / gg]),
        );
        let rel = if a == b { 0.0 } else { (a - b).abs() / a.abs() };
        worst = worst.max(rel);
    }
    if worst > tol {
        return Err(ModelError::Invalid(format!(
            "verify: {name}: a scale changed by {worst:.3e} (relative), more than the format's {tol:.1e}"
        )));
    }
    Ok(worst)
}

/// Relative rounding a ternary type applies to scales: TQ types store them in f16.
fn scale_tolerance(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::TQ1_0 | GgmlType::TQ2_0 => 2f64.powi(-11),
        _ => 0.0,
    }
}

/// Re-read a converted file and check it against its source (a Hugging Face directory or a
/// GGUF file): every tensor present, ternary codes identical and scales within the output
/// format's rounding, float tensors byte-identical to a fresh encoding of the source values,
/// copied tensors and metadata unchanged.
pub fn verify(src: &Path, dst: &Path) -> Result<VerifyReport> {
    use bitnet_formats::gguf::{GgufFile, dequantize};
    let out = GgufFile::open(dst)?;
    let mut rep = VerifyReport::default();
    let unpack_out = |t: &bitnet_formats::gguf::TensorInfo| -> Result<TernaryMatrix> {
        let (cols, rows) = (
            t.row_len() as usize,
            (t.n_elements() / t.row_len()) as usize,
        );
        let f = ternary_format(t.ty).expect("ternary type");
        Ok(packed::unpack(&packed::PackedTensor {
            format: f,
            rows,
            cols,
            data: out.tensor_bytes(t).to_vec(),
            scale: None,
        })?)
    };
    let mismatch = |name: &str, what: &str| {
        ModelError::Invalid(format!("verify: {name}: {what} differs from the source"))
    };
    if src.is_dir() {
        let dir = HfModelDir::open(src)?;
        let (loader, _) = HfLoader::new(&dir)?;
        for t in &out.header.tensors {
            let (cols, rows) = (
                t.row_len() as usize,
                (t.n_elements() / t.row_len()) as usize,
            );
            let hf = names::hf_for_gguf(&t.name).ok_or_else(|| {
                ModelError::Invalid(format!("verify: {} has no source tensor", t.name))
            })?;
            if ternary_format(t.ty).is_some() {
                // A linear's module: `.weight` and `.weight_scale` hang below it.
                let hf = hf.strip_suffix(".weight").unwrap_or(&hf);
                let Some((mut want, conv)) = loader.ternary(hf, rows, cols)? else {
                    return Err(mismatch(&t.name, "type (the source is not ternary)"));
                };
                if conv == ScaleConvention::Divide {
                    want.scales.iter_mut().for_each(|s| *s = 1.0 / *s);
                }
                let got = unpack_out(t)?;
                let w = check_ternary(&t.name, &want, &got, scale_tolerance(t.ty))?;
                rep.max_rel_scale_change = rep.max_rel_scale_change.max(w);
                rep.ternary += 1;
                for part in ["weight", "weight_scale"] {
                    dir.weights.release(&format!("{hf}.{part}"));
                }
            } else {
                let mut want = Vec::with_capacity(out.tensor_bytes(t).len());
                if t.dims.len() == 1 {
                    write_floats(&mut want, t.ty, &loader.vector(&hf, cols)?)?;
                } else {
                    let m = loader.dense(&hf, rows, cols)?;
                    let mut row = vec![0.0f32; cols];
                    for r in 0..rows {
                        m.row_into(r, &mut row);
                        write_floats(&mut want, t.ty, &row)?;
                    }
                }
                if want != out.tensor_bytes(t) {
                    return Err(mismatch(&t.name, "data"));
                }
                dir.weights.release(&hf);
            }
            out.release(t);
            rep.tensors += 1;
        }
        return Ok(rep);
    }
    let inp = GgufFile::open(src)?;
    for (k, v) in &inp.header.metadata {
        if k != key::ALIGNMENT && out.header.get(k) != Some(v) {
            return Err(mismatch(k, "metadata value"));
        }
    }
    if inp.header.tensors.len() != out.header.tensors.len() {
        return Err(ModelError::Invalid(format!(
            "verify: the output has {} tensors, the source {}",
            out.header.tensors.len(),
            inp.header.tensors.len()
        )));
    }
    for s in &inp.header.tensors {
        let t = out.tensor(&s.name)?;
        if t.dims != s.dims {
            return Err(mismatch(&t.name, "shape"));
        }
        let (cols, rows) = (
            t.row_len() as usize,
            (t.n_elements() / t.row_len()) as usize,
        );
        let src_bytes = inp.tensor_bytes(s);
        if t.ty == s.ty {
            if src_bytes != out.tensor_bytes(t) {
                return Err(mismatch(&t.name, "data"));
            }
        } else if ternary_format(t.ty).is_some() {
            let want = match ternary_format(s.ty) {
                Some(f) => packed::unpack(&packed::PackedTensor {
                    format: f,
                    rows,
                    cols,
                    data: src_bytes.to_vec(),
                    scale: None,
                })?,
                None => bitnet_core::quant::ternarize(
                    &dequantize(&s.name, s.ty, src_bytes, rows * cols)?,
                    rows,
                    cols,
                    bitnet_core::quant::Granularity::PerTensor,
                )?,
            };
            let got = unpack_out(t)?;
            // Scales may be rounded once by the source format and once by the output's.
            let tol = scale_tolerance(t.ty) + scale_tolerance(s.ty);
            let w = check_ternary(&t.name, &want, &got, tol)?;
            rep.max_rel_scale_change = rep.max_rel_scale_change.max(w);
            rep.ternary += 1;
        } else {
            let row_bytes = src_bytes.len() / rows.max(1);
            let mut want = Vec::with_capacity(out.tensor_bytes(t).len());
            for r in 0..rows {
                let v = dequantize(
                    &s.name,
                    s.ty,
                    &src_bytes[r * row_bytes..(r + 1) * row_bytes],
                    cols,
                )?;
                write_floats(&mut want, t.ty, &v)?;
            }
            if want != out.tensor_bytes(t) {
                return Err(mismatch(&t.name, "data"));
            }
        }
        inp.release(s);
        out.release(t);
        rep.tensors += 1;
    }
    Ok(rep)
}
