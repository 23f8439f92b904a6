//! GGUF parsing (versions 2 and 3, little-endian).
//!
//! The layout (`ggml/docs/gguf.md`): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/values, the tensor infos (name, u32 n_dims, u64 dims ne0-first, u32
//! type, u64 offset), padding to `general.alignment` (default 32), then the tensor data.
//!
//! Every count is checked against the bytes left before anything is allocated, every offset
//! and size is computed with checked arithmetic, and every string is validated as UTF-8.

use super::types::{Dialect, GgmlType};
use super::value::{MetaValue, ValueType};
use crate::error::{FormatError, Result};
use crate::names::key;
use std::collections::HashMap;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Nesting limit for arrays of arrays (none of the known writers nest at all).
pub const MAX_ARRAY_DEPTH: usize = 4;

/// Architectures whose files come from bitnet.cpp's ggml fork.
pub const BITNET_CPP_ARCHS: &[&str] = &["bitnet", "bitnet-b1.58", "bitnet-25"];

/// One tensor's description; `offset` is relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: `ne0` (the contiguous row length) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions outermost first, as numpy and PyTorch print them.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// Row length (`ne0`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// Everything before the tensor data, parsed and validated against the file length.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    pub dialect: Dialect,
    pub file_len: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(FormatError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, || what.to_string())?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let at = self.pos as u64;
        let bytes = self.take(len, || format!("{what} ({len} bytes)"))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::BadUtf8 {
            what: what.to_string(),
            offset: at,
        })
    }

    /// A count of items each at least `min_size` bytes, checked against what is left.
    fn count(&mut self, what: &'static str, min_size: u64) -> Result<u64> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let max = self.remaining() / min_size.max(1);
        if count > max {
            return Err(FormatError::ImpossibleCount {
                what,
                count,
                offset,
                available: self.remaining(),
                max,
            });
        }
        Ok(count)
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<MetaValue> {
        let what = || format!("value of {key:?}");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.take(1, what)?[0]),
            ValueType::I8 => MetaValue::I8(self.take(1, what)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what())?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what())?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what())?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what())?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what())?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what())?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what())?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what())?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.take(1, what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(FormatError::BadTensor {
                            name: key.to_string(),
                            reason: format!("bool metadata byte {b} at {at} is neither 0 nor 1"),
                        });
                    }
                }
            }
            ValueType::String => MetaValue::String(self.string(&what())?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(FormatError::TooDeep {
                        key: key.to_string(),
                        max: MAX_ARRAY_DEPTH,
                    });
                }
                let at = self.pos as u64;
                let type_id = self.u32(&what())?;
                let elem =
                    ValueType::from_id(type_id).ok_or_else(|| FormatError::BadValueType {
                        key: key.to_string(),
                        type_id,
                        offset: at,
                    })?;
                let n = self.count("array element", elem.min_size())?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                MetaValue::Array(elem, items)
            }
        })
    }
}

impl GgufHeader {
    /// Parse and validate the header of a GGUF file held in `bytes` (the whole file).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic: [u8; 4] = c.array("magic")?;
        if &magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(FormatError::BigEndian { version });
        }
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion { version });
        }
        // A tensor info is at least 8 (name) + 4 + 4 + 8 bytes; a key/value at least 8 + 4 + 1.
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.count("metadata", 13)?;
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let at = c.pos as u64;
            let type_id = c.u32("metadata value type")?;
            let ty = ValueType::from_id(type_id).ok_or_else(|| FormatError::BadValueType {
                key: key.clone(),
                type_id,
                offset: at,
            })?;
            let value = c.value(&key, ty, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(FormatError::Duplicate {
                    what: "metadata key",
                    name: key,
                });
            }
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == key::ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => {
                let a = v.as_u64().ok_or(FormatError::WrongType {
                    key: key::ALIGNMENT.into(),
                    expected: "an unsigned integer",
                    found: v.value_type().name(),
                })?;
                if a == 0 || !a.is_power_of_two() || a > 1 << 30 {
                    return Err(FormatError::BadAlignment(a));
                }
                a
            }
        };
        let max_tensors = c.remaining() / 24;
        if n_tensors > max_tensors {
            return Err(FormatError::ImpossibleCount {
                what: "tensor",
                count: n_tensors,
                offset: 8,
                available: c.remaining(),
                max: max_tensors,
            });
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            let n_dims = c.u32(&format!("dimension count of {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(FormatError::BadTensor {
                    name,
                    reason: format!("{n_dims} dimensions (ggml allows 1 to {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(c.u64(&format!("dimension {d} of {name:?}"))?);
            }
            let type_id = c.u32(&format!("type of {name:?}"))?;
            let offset = c.u64(&format!("offset of {name:?}"))?;
            raw.push((name, dims, type_id, offset));
        }
        let file_len = bytes.len() as u64;
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let arch = metadata
            .iter()
            .find(|(k, _)| k == key::ARCHITECTURE)
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("");
        let dialect = detect_dialect(&raw, arch);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            let ty =
                GgmlType::from_id(type_id, dialect).ok_or_else(|| FormatError::UnknownType {
                    name: name.clone(),
                    type_id,
                })?;
            let bad = |reason: String| FormatError::BadTensor {
                name: name.clone(),
                reason,
            };
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow the element count")))?;
            let nbytes = ty.nbytes(n, dims[0]).ok_or_else(|| {
                bad(format!(
                    "{n} elements in rows of {} do not fit {ty} blocks of {}",
                    dims[0],
                    ty.block_size()
                ))
            })?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let end = data_offset
                .checked_add(offset)
                .and_then(|s| s.checked_add(nbytes))
                .filter(|&e| e <= file_len)
                .ok_or_else(|| {
                    bad(format!(
                        "data [{offset}, +{nbytes}) after the data start {data_offset} runs past the end of the {file_len}-byte file"
                    ))
                })?;
            let _ = end;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(FormatError::Duplicate {
                    what: "tensor",
                    name,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                nbytes,
            });
        }
        Ok(Self {
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
            dialect,
            file_len,
            meta_index,
            tensor_index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }

    /// `general.architecture`, or "" when absent.
    pub fn architecture(&self) -> &str {
        self.get_str(key::ARCHITECTURE).unwrap_or("")
    }

    /// A key under the architecture's namespace, e.g. `arch_key("context_length")`.
    pub fn arch_get(&self, suffix: &str) -> Option<&MetaValue> {
        self.get(&format!("{}.{suffix}", self.architecture()))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The byte range of a tensor's data within the file (validated at parse time).
    pub fn tensor_range(&self, t: &TensorInfo) -> std::ops::Range<usize> {
        let start = (self.data_offset + t.offset) as usize;
        start..start + t.nbytes as usize
    }
}

/// bitnet.cpp reuses ids 36-39 that upstream ggml gives (or once gave) to other types.
/// A file is read in bitnet.cpp's dialect when its architecture is one bitnet.cpp writes, or
/// when every tensor of id 36 has exactly the I2_S size (n/4 + 32 bytes) in the space before the
/// next tensor.
fn detect_dialect(raw: &[(String, Vec<u64>, u32, u64)], arch: &str) -> Dialect {
    let suspects: Vec<_> = raw.iter().filter(|t| (36..=38).contains(&t.2)).collect();
    // 39 is upstream MXFP4 and bitnet.cpp TL2: only the architecture can tell those apart.
    if suspects.is_empty() {
        return Dialect::Upstream;
    }
    if BITNET_CPP_ARCHS.contains(&arch) {
        return Dialect::BitnetCpp;
    }
    let mut offsets: Vec<u64> = raw.iter().map(|t| t.3).collect();
    offsets.sort_unstable();
    let fits_i2s = suspects.iter().filter(|t| t.2 == 36).all(|t| {
        let n: Option<u64> = t.1.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let next = offsets.iter().find(|&&o| o > t.3).copied();
        match (n, next) {
            (Some(n), Some(next)) => next - t.3 >= n / 4 + 32 && next - t.3 < n / 4 + 32 + 4096,
            (Some(_), None) => true,
            _ => false,
        }
    });
    if fits_i2s {
        Dialect::BitnetCpp
    } else {
        Dialect::Upstream
    }
}
