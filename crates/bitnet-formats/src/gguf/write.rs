//! GGUF writing (version 3). Output goes through [`crate::atomic::write_atomic`].

use super::read::{DEFAULT_ALIGNMENT, MAGIC};
use super::types::GgmlType;
use super::value::{MetaValue, ValueType};
use crate::error::{FormatError, Result, io_err};
use crate::names::key;
use std::io::Write;
use std::path::Path;

/// A closure that writes one tensor's bytes into the file being written.
pub type StreamFn<'a> = Box<dyn FnOnce(&mut dyn Write) -> Result<()> + 'a>;

/// Where a tensor's bytes come from when the file is written.
pub enum TensorData<'a> {
    /// Bytes already in memory.
    Bytes(std::borrow::Cow<'a, [u8]>),
    /// Bytes produced while writing, so a converter streams one tensor at a time.
    Stream(StreamFn<'a>),
}

impl std::fmt::Debug for TensorData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorData::Bytes(b) => write!(f, "Bytes({})", b.len()),
            TensorData::Stream(_) => f.write_str("Stream"),
        }
    }
}

#[derive(Debug)]
struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    nbytes: u64,
    data: TensorData<'a>,
}

/// Builds a GGUF file: metadata in insertion order, then tensors in insertion order.
#[derive(Debug, Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor<'a>>,
    alignment: Option<u64>,
}

impl<'a> GgufWriter<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set (or replace) a metadata key.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        if key == key::ALIGNMENT {
            self.alignment = value.as_u64();
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    fn alignment(&self) -> u64 {
        self.alignment.unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Add a tensor. `dims` are ne0 (row length) first, as GGUF stores them.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: TensorData<'a>,
    ) -> Result<&mut Self> {
        let name = name.into();
        let bad = |reason: String| FormatError::BadTensor {
            name: name.clone(),
            reason,
        };
        if dims.is_empty() || dims.len() > 4 {
            return Err(bad(format!("{} dimensions (1 to 4 allowed)", dims.len())));
        }
        let n = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("element count overflows".into()))?;
        let nbytes = ty.nbytes(n, dims[0]).ok_or_else(|| {
            bad(format!(
                "row length {} is not a whole number of {ty} blocks",
                dims[0]
            ))
        })?;
        if let TensorData::Bytes(b) = &data
            && b.len() as u64 != nbytes
        {
            return Err(bad(format!(
                "{} bytes given, {ty} {dims:?} needs {nbytes}",
                b.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(FormatError::Duplicate {
                what: "tensor",
                name,
            });
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            nbytes,
            data,
        });
        Ok(self)
    }

    /// Convenience: an F32 tensor from values (shape ne0 first).
    pub fn add_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        values: &[f32],
    ) -> Result<&mut Self> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, GgmlType::F32, dims, TensorData::Bytes(bytes.into()))
    }

    /// Write the file atomically to `path`.
    pub fn write_to_path(self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::atomic::write_atomic(path, |w| self.write_to(w).map_err(|e| attach_path(e, path)))
    }

    /// Write the whole file to a stream.
    pub fn write_to(self, w: &mut dyn Write) -> Result<()> {
        let align = self.alignment();
        let mut out = Counting {
            inner: w,
            written: 0,
        };
        let io = |e: std::io::Error| FormatError::Io {
            path: "<gguf stream>".into(),
            source: e,
        };
        out.write_all(MAGIC).map_err(io)?;
        out.write_all(&3u32.to_le_bytes()).map_err(io)?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (k, v) in &self.metadata {
            write_string(&mut out, k).map_err(io)?;
            out.write_all(&(v.value_type() as u32).to_le_bytes())
                .map_err(io)?;
            write_value(&mut out, v).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_string(&mut out, &t.name).map_err(io)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())
                .map_err(io)?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes()).map_err(io)?;
            }
            out.write_all(&t.ty.id().to_le_bytes()).map_err(io)?;
            out.write_all(&offset.to_le_bytes()).map_err(io)?;
            offset = (offset + t.nbytes).div_ceil(align) * align;
        }
        pad(&mut out, align).map_err(io)?;
        for t in self.tensors {
            let start = out.written;
            match t.data {
                TensorData::Bytes(b) => out.write_all(&b).map_err(io)?,
                TensorData::Stream(f) => f(&mut out)?,
            }
            let got = out.written - start;
            if got != t.nbytes {
                return Err(FormatError::BadTensor {
                    name: t.name,
                    reason: format!(
                        "the data source wrote {got} bytes, the header promised {}",
                        t.nbytes
                    ),
                });
            }
            pad(&mut out, align).map_err(io)?;
        }
        out.flush().map_err(io)?;
        Ok(())
    }
}

fn attach_path(e: FormatError, path: &Path) -> FormatError {
    match e {
        FormatError::Io { source, .. } => io_err(path)(source),
        other => other,
    }
}

struct Counting<'w> {
    inner: &'w mut dyn Write,
    written: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn pad(out: &mut Counting<'_>, align: u64) -> std::io::Result<()> {
    let n = out.written.div_ceil(align) * align - out.written;
    out.write_all(&vec![0u8; n as usize])
}

fn write_string(w: &mut dyn Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut dyn Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        MetaValue::String(s) => write_string(w, s),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Array(ty, items) => {
            w.write_all(&(*ty as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for it in items {
                if it.value_type() != *ty {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("array of {} holds a {}", ty.name(), it.value_type().name()),
                    ));
                }
                write_value(w, it)?;
            }
            Ok(())
        }
    }
}

/// Build a typed array value.
pub fn array<T: Into<MetaValue>>(ty: ValueType, items: impl IntoIterator<Item = T>) -> MetaValue {
    MetaValue::Array(ty, items.into_iter().map(Into::into).collect())
}
