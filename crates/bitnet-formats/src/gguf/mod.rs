//! GGUF: the native model container. Read (v2/v3, mmapped, zero-copy tensor views), write (v3,
//! atomic), dequantize.

mod dequant;
mod read;
mod types;
mod value;
mod write;

pub use dequant::{can_dequantize, dequantize, dequantize_into, quantize_q8_0};
pub use read::{BITNET_CPP_ARCHS, DEFAULT_ALIGNMENT, GgufHeader, TensorInfo};
pub use types::{Dialect, GgmlType};
pub use value::{MetaValue, ValueType};
pub use write::{GgufWriter, StreamFn, TensorData, array};

use crate::error::{FormatError, Result, io_err};
use bitnet_kernels::mmap::MappedFile;
use std::path::Path;
use std::sync::Arc;

/// An open GGUF file: the parsed header over a read-only mapping of the whole file.
#[derive(Debug)]
pub struct GgufFile {
    pub header: GgufHeader,
    map: Arc<MappedFile>,
}

impl GgufFile {
    /// Map and parse `path`. Tensor data is not touched until asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let map = MappedFile::open(path).map_err(io_err(path))?;
        let header = GgufHeader::parse(&map).map_err(|e| match e {
            FormatError::Io { .. } => e,
            other => FormatError::Config {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })?;
        Ok(Self {
            header,
            map: Arc::new(map),
        })
    }

    /// The mapping itself, for views that outlive this handle (weights read in place).
    pub fn mapping(&self) -> Arc<MappedFile> {
        Arc::clone(&self.map)
    }

    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// The raw bytes of a tensor, borrowed from the mapping (no copy).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[self.header.tensor_range(t)]
    }

    /// Drop this process's mapped pages of a tensor (see [`MappedFile::release`]).
    pub fn release(&self, t: &TensorInfo) {
        self.map.release(self.header.tensor_range(t));
    }

    /// Look a tensor up by name.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.header
            .tensor(name)
            .ok_or_else(|| FormatError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Dequantize a tensor to f32 in file order (ne0 fastest).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        dequantize(&t.name, t.ty, self.tensor_bytes(t), t.n_elements() as usize)
    }
}
