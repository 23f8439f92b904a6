//! Hugging Face model directories: `config.json` plus one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, each mapped read-only.

use crate::config::{ModelConfig, config_path};
use crate::error::{FormatError, Result, io_err};
use bitnet_kernels::mmap::MappedFile;
pub use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of a safetensors file: where its bytes are and what they are.
#[derive(Debug, Clone, PartialEq)]
pub struct StTensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index of the shard file holding it.
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub range: std::ops::Range<usize>,
}

impl StTensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A set of mapped safetensors files with a name index over all of them.
#[derive(Debug)]
pub struct SafetensorsSet {
    shards: Vec<Arc<MappedFile>>,
    tensors: Vec<StTensorInfo>,
    index: HashMap<String, usize>,
    /// `__metadata__` of each shard.
    pub metadata: Vec<Option<HashMap<String, String>>>,
}

/// A parsed safetensors header: its tensors (in data order) and its `__metadata__`.
#[derive(Debug, Clone)]
pub struct StHeader {
    pub tensors: Vec<StTensorInfo>,
    pub metadata: Option<HashMap<String, String>>,
}

/// Parse a safetensors header from a whole file's bytes, validating it against the buffer.
pub fn parse_header(bytes: &[u8], path: &Path, shard: usize) -> Result<StHeader> {
    let err = |message: String| FormatError::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    // `read_metadata` checks the header length against the buffer, parses the JSON and checks
    // that the data offsets tile the data section exactly with sizes matching dtype x shape.
    let (header_len, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| err(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        let range = data_start
            .checked_add(s)
            .zip(data_start.checked_add(e))
            .filter(|(s, e)| s <= e && *e <= bytes.len());
        let Some((s, e)) = range else {
            return Err(err(format!(
                "tensor {name:?}: data offsets {:?} lie outside the file",
                info.data_offsets
            )));
        };
        out.push(StTensorInfo {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            shard,
            range: s..e,
        });
    }
    out.sort_by_key(|a| a.range.start);
    Ok(StHeader {
        tensors: out,
        metadata: meta.metadata().clone(),
    })
}

impl SafetensorsSet {
    /// A set over files already mapped (other containers' weights, e.g. ONNX initializers):
    /// names must be unique and every range inside its file.
    pub fn from_parts(shards: Vec<Arc<MappedFile>>, tensors: Vec<StTensorInfo>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            let len = shards.get(t.shard).map(|s| s.len());
            if len.is_none_or(|l| t.range.end > l) {
                return Err(FormatError::BadTensor {
                    name: t.name.clone(),
                    reason: format!("bytes {:?} lie outside its file", t.range),
                });
            }
            if index.insert(t.name.clone(), i).is_some() {
                return Err(FormatError::Duplicate {
                    what: "tensor",
                    name: t.name.clone(),
                });
            }
        }
        Ok(Self {
            metadata: vec![None; shards.len()],
            shards,
            tensors,
            index,
        })
    }

    /// Map the given files and index their tensors; a name in two files is an error.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut set = SafetensorsSet {
            shards: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
            metadata: Vec::new(),
        };
        for (i, f) in files.iter().enumerate() {
            let map = MappedFile::open(f).map_err(io_err(f))?;
            let StHeader {
                tensors,
                metadata: meta,
            } = parse_header(&map, f, i)?;
            for t in tensors {
                if set
                    .index
                    .insert(t.name.clone(), set.tensors.len())
                    .is_some()
                {
                    return Err(FormatError::Duplicate {
                        what: "tensor",
                        name: t.name,
                    });
                }
                set.tensors.push(t);
            }
            set.shards.push(Arc::new(map));
            set.metadata.push(meta);
        }
        Ok(set)
    }

    pub fn tensors(&self) -> &[StTensorInfo] {
        &self.tensors
    }

    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|m| m.path()).collect()
    }

    /// The mapping of a shard, for views that outlive this set (weights read in place).
    pub fn shard_mapping(&self, shard: usize) -> Arc<MappedFile> {
        Arc::clone(&self.shards[shard])
    }

    pub fn get(&self, name: &str) -> Option<&StTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Drop this process's mapped pages of a tensor (see [`MappedFile::release`]): streaming
    /// conversions call it after each tensor so that the resident set stays one tensor deep.
    pub fn release(&self, name: &str) {
        if let Some(t) = self.get(name) {
            self.shards[t.shard].release(t.range.clone());
        }
    }

    /// [`Self::release`] of the bytes of rows `rows` of a tensor of `of` rows (a streaming
    /// reader of one large tensor releases it behind itself as it goes).
    pub fn release_rows(&self, name: &str, rows: std::ops::Range<usize>, of: usize) {
        if let Some(t) = self.get(name) {
            let row_bytes = t.range.len() / of.max(1);
            let start = t.range.start + rows.start * row_bytes;
            let end = (t.range.start + rows.end * row_bytes).min(t.range.end);
            self.shards[t.shard].release(start..end);
        }
    }

    /// The raw little-endian bytes of a tensor, borrowed from the mapping.
    pub fn bytes(&self, t: &StTensorInfo) -> &[u8] {
        &self.shards[t.shard][t.range.clone()]
    }

    /// A floating-point tensor as f32 (F32, F16, BF16, F64 widen or narrow exactly as a cast).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.get(name).ok_or_else(|| FormatError::MissingTensor {
            name: name.to_string(),
        })?;
        let b = self.bytes(t);
        Ok(match t.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(FormatError::CannotDequantize {
                    name: name.to_string(),
                    ty: format!("{other:?}"),
                });
            }
        })
    }
}

/// A Hugging Face model directory: its config and its weights.
#[derive(Debug)]
pub struct HfModelDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: SafetensorsSet,
}

impl HfModelDir {
    /// Open `dir`: `config.json`, then `model.safetensors.index.json` (sharded) or every
    /// `*.safetensors` file.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config = ModelConfig::from_file(config_path(&dir)?)?;
        // An ONNX export (optimum's layout: config.json beside model.onnx) when the directory
        // has no safetensors.
        let onnx = dir.join("model.onnx");
        let weights = match weight_files(&dir) {
            Err(_) if onnx.is_file() => {
                crate::onnx::OnnxModel::open(&onnx)?.to_safetensors_set()?
            }
            files => SafetensorsSet::open(&files?)?,
        };
        Ok(Self {
            dir,
            config,
            weights,
        })
    }

    /// Tokenizer files present beside the weights.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.json");
        p.is_file().then_some(p)
    }
}

/// The safetensors files of a directory, in index order when an index exists.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let idx: Index = serde_json::from_str(&text).map_err(|source| FormatError::Json {
            path: index.clone(),
            source,
        })?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let p = Path::new(&f);
            if p.components().count() != 1 || p.is_absolute() || f.contains("..") {
                return Err(FormatError::Config {
                    path: index.clone(),
                    message: format!("shard name {f:?} is not a plain file name in this directory"),
                });
            }
            let full = dir.join(p);
            if !full.is_file() {
                return Err(FormatError::Config {
                    path: index.clone(),
                    message: format!("lists shard {f:?}, which is missing"),
                });
            }
            out.push(full);
        }
        return Ok(out);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FormatError::Config {
            path: dir.to_path_buf(),
            message: "no *.safetensors weights in this directory".into(),
        });
    }
    Ok(files)
}
