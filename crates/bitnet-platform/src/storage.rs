//! Artifact storage through `object_store`: a local directory (`file:///…`, the default) or
//! an S3-compatible bucket (`s3://bucket/prefix`, endpoint and credentials from the standard
//! `AWS_*` variables). Everything is written sealed: each object is a 16-byte header and then
//! chunks of [`CHUNK`] plaintext bytes, each encrypted with the organization's data key
//! ([`crate::crypto`]) and followed by its tag. Writes stream (multipart uploads, never the
//! whole object in memory); reads fetch only the chunks a byte range needs.
//!
//! Header: `BNE1`, the chunk size (u32, little-endian), the object's 7-byte nonce prefix, one
//! zero byte.

use crate::crypto::{DataKey, TAG_LEN};
use crate::error::{PlatformError, Result};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;

/// Plaintext bytes per sealed chunk.
pub const CHUNK: usize = 256 << 10;
const HEADER: usize = 16;
const MAGIC: &[u8; 4] = b"BNE1";
/// Bytes per part of a multipart upload (S3's parts are 5 MiB at least).
const PART: usize = 8 << 20;
/// Parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 2;

/// Where artifacts live.
#[derive(Debug, Clone)]
pub struct Storage {
    inner: Arc<dyn ObjectStore>,
    url: String,
}

/// What a sealed write took in: plaintext size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

fn storage_err(e: object_store::Error) -> PlatformError {
    match e {
        object_store::Error::NotFound { path, .. } => {
            PlatformError::not_found("stored object", &path)
        }
        e => PlatformError::Storage(e.to_string()),
    }
}

impl Storage {
    /// `file:///abs/dir` (created if missing) or `s3://bucket[/prefix]`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, &[])
    }

    /// As [`Self::open`], with S3 settings given here rather than in `AWS_*` variables
    /// (`("aws_endpoint", "http://…")`, `("aws_access_key_id", …)`: `object_store`'s names).
    pub fn open_with(url: &str, s3_options: &[(&str, &str)]) -> Result<Self> {
        let inner: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(PlatformError::Config(format!(
                    "--storage {url}: a file URL takes an absolute path (file:///var/lib/bitnet)"
                )));
            }
            std::fs::create_dir_all(dir)
                .map_err(|e| PlatformError::Storage(format!("cannot create {dir}: {e}")))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(storage_err)?
                    .with_automatic_cleanup(true)
                    // The object's bytes and its name are on disk before the write returns.
                    .with_fsync(true),
            )
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(PlatformError::Config(format!("--storage {url}: no bucket")));
            }
            // object_store's HTTP client is reqwest on rustls without a built-in provider.
            crate::sso::install_tls_provider();
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            let mut http = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .is_ok_and(|e| e.starts_with("http://"));
            for (k, v) in s3_options {
                let key: object_store::aws::AmazonS3ConfigKey = k
                    .parse()
                    .map_err(|e| PlatformError::Config(format!("S3 option {k}: {e}")))?;
                http |= matches!(key, object_store::aws::AmazonS3ConfigKey::Endpoint)
                    && v.starts_with("http://");
                b = b.with_config(key, *v);
            }
            // An http endpoint (a local S3-compatible server) needs http allowed.
            if http {
                b = b.with_allow_http(true);
            }
            let s3 = b.build().map_err(|e| {
                PlatformError::Config(format!("--storage {url}: {e} (set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL)"))
            })?;
            let s3: Arc<dyn ObjectStore> = Arc::new(s3);
            if prefix.trim_matches('/').is_empty() {
                s3
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            }
        } else {
            return Err(PlatformError::Config(format!(
                "--storage {url}: expected file:///DIR or s3://BUCKET[/PREFIX]"
            )));
        };
        Ok(Self {
            inner,
            url: url.to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Seal and write what `body` yields to `path`, at most `limit` plaintext bytes (more is
    /// [`PlatformError::TooLarge`], and nothing is left behind). The object appears only when
    /// complete (a multipart upload's completion, a rename on local disk).
    pub async fn write_sealed<S, E>(
        &self,
        path: &str,
        key: &DataKey,
        mut body: S,
        limit: u64,
    ) -> Result<Written>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let path = Path::from(path);
        let upload = self.inner.put_multipart(&path).await.map_err(storage_err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let r = async {
            let mut prefix = [0u8; 7];
            getrandom::fill(&mut prefix).map_err(|e| PlatformError::Random(e.to_string()))?;
            let mut header = Vec::with_capacity(HEADER);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&(CHUNK as u32).to_le_bytes());
            header.extend_from_slice(&prefix);
            header.push(0);
            w.write(&header);
            // SHA-256 runs on a thread of its own, beside the encryption.
            let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            let hasher = tokio::task::spawn_blocking(move || {
                let mut sha = Sha256::new();
                while let Some(b) = hash_rx.blocking_recv() {
                    sha.update(&b);
                }
                sha.finalize()
            });
            let mut total = 0u64;
            let mut index = 0u32;
            let mut chunk: Vec<u8> = Vec::with_capacity(CHUNK + TAG_LEN);
            loop {
                let next = body.next().await;
                let data = match next {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => {
                        return Err(PlatformError::invalid(
                            "file",
                            format!("the upload broke off: {e}"),
                        ));
                    }
                    None => break,
                };
                total += data.len() as u64;
                if total > limit {
                    return Err(PlatformError::TooLarge(format!(
                        "the file is over the {limit}-byte limit"
                    )));
                }
                to_hash
                    .send(data.clone())
                    .await
                    .map_err(|_| PlatformError::Storage("the hashing thread stopped".into()))?;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    // A full chunk is sealed only when more data follows: the last chunk is
                    // marked as such.
                    if chunk.len() == CHUNK {
                        key.seal_chunk(&prefix, index, false, &mut chunk)?;
                        w.wait_for_capacity(PARTS_IN_FLIGHT)
                            .await
                            .map_err(storage_err)?;
                        w.write(&chunk);
                        chunk.clear();
                        index = index.checked_add(1).ok_or_else(|| {
                            PlatformError::TooLarge("the file has too many chunks".into())
                        })?;
                    }
                    let n = (CHUNK - chunk.len()).min(rest.len());
                    chunk.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
            key.seal_chunk(&prefix, index, true, &mut chunk)?;
            w.write(&chunk);
            drop(to_hash);
            let sha = hasher
                .await
                .map_err(|e| PlatformError::Storage(format!("the hashing thread failed: {e}")))?;
            Ok(Written {
                bytes: total,
                sha256: crate::ids::hex(&sha),
            })
        }
        .await;
        match r {
            Ok(written) => {
                w.finish().await.map_err(storage_err)?;
                Ok(written)
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// The plaintext bytes `range` of the sealed object at `path` of `len` plaintext bytes,
    /// as a stream of pieces (each chunk is checked before any of it is given out).
    pub async fn read_sealed(
        &self,
        path: &str,
        key: &DataKey,
        len: u64,
        range: Range<u64>,
    ) -> Result<impl Stream<Item = Result<Bytes>> + Send + 'static> {
        let path = Path::from(path);
        let header = self
            .inner
            .get_range(&path, 0..HEADER as u64)
            .await
            .map_err(storage_err)?;
        if header.len() != HEADER || &header[..4] != MAGIC {
            return Err(PlatformError::Storage(format!(
                "{path} is not a sealed object"
            )));
        }
        let chunk = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as u64;
        let prefix: [u8; 7] = header[8..15].try_into().expect("7 bytes");
        if chunk == 0 {
            return Err(PlatformError::Storage(format!("{path}: chunk size 0")));
        }
        let chunks = len.div_ceil(chunk).max(1);
        let (start, end) = (range.start.min(len), range.end.min(len));
        let first = start / chunk;
        let last = if end > start {
            (end - 1) / chunk
        } else {
            first
        };
        let sealed = chunk + TAG_LEN as u64;
        let from = HEADER as u64 + first * sealed;
        let to = (HEADER as u64 + (last + 1) * sealed)
            .min(HEADER as u64 + len + chunks * TAG_LEN as u64);
        let got = self
            .inner
            .get_opts(
                &path,
                GetOptions {
                    range: Some(GetRange::Bounded(from..to)),
                    ..Default::default()
                },
            )
            .await
            .map_err(storage_err)?;
        let inner = match got.payload {
            object_store::GetResultPayload::File(file, p) => local_stream(file, p, got.range),
            object_store::GetResultPayload::Stream(s) => s,
        };
        let key = key.clone();
        let state = Reader {
            inner,
            buf: Vec::with_capacity(sealed as usize),
            index: first,
            last_index: chunks - 1,
            stop_index: last,
            chunk,
            start,
            end,
            prefix,
            key,
            path: path.to_string(),
            done: end <= start,
        };
        Ok(futures_util::stream::unfold(state, Reader::next).boxed())
    }

    /// Remove an object (a missing one is fine).
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.inner.delete(&Path::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(storage_err(e)),
        }
    }

    /// The stored (sealed) bytes of an object, as the disk or bucket holds them (tests).
    pub async fn raw(&self, path: &str) -> Result<Bytes> {
        self.inner
            .get(&Path::from(path))
            .await
            .map_err(storage_err)?
            .bytes()
            .await
            .map_err(storage_err)
    }

    /// Write bytes as they are, unsealed (tests that tamper with stored objects).
    pub async fn put_raw(&self, path: &str, bytes: Bytes) -> Result<()> {
        self.inner
            .put(&Path::from(path), bytes.into())
            .await
            .map_err(storage_err)?;
        Ok(())
    }

    /// Every object's path under `prefix` (tests, garbage collection).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = Path::from(prefix);
        let mut s = self.inner.list(Some(&p));
        let mut out = Vec::new();
        while let Some(m) = s.next().await {
            out.push(m.map_err(storage_err)?.location.to_string());
        }
        Ok(out)
    }
}

/// A local file's `range` in pieces of 4 MiB, each read on the blocking pool
/// (`GetResult::into_stream` reads 8 KiB a hop, which held a local read to about 130 MB/s).
fn local_stream(
    file: std::fs::File,
    path: std::path::PathBuf,
    range: Range<u64>,
) -> futures_util::stream::BoxStream<'static, object_store::Result<Bytes>> {
    const PIECE: u64 = 4 << 20;
    let read_err = move |path: &std::path::Path, e: std::io::Error| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("cannot read {}: {e}", path.display()).into(),
    };
    futures_util::stream::try_unfold(
        (Some(file), path, range.start, range.end),
        move |(file, path, at, end)| async move {
            let Some(mut file) = file else {
                return Ok(None);
            };
            if at >= end {
                return Ok(None);
            }
            let (file, path, piece) = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                let n = (end - at).min(PIECE) as usize;
                let mut buf = vec![0u8; n];
                let r = file
                    .seek(SeekFrom::Start(at))
                    .and_then(|_| file.read_exact(&mut buf));
                (file, path, r.map(|()| buf))
            })
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })?;
            let piece = piece.map_err(|e| read_err(&path, e))?;
            let next = at + piece.len() as u64;
            Ok(Some((Bytes::from(piece), (Some(file), path, next, end))))
        },
    )
    .boxed()
}

struct Reader {
    inner: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
    buf: Vec<u8>,
    index: u64,
    last_index: u64,
    stop_index: u64,
    chunk: u64,
    start: u64,
    end: u64,
    prefix: [u8; 7],
    key: DataKey,
    path: String,
    done: bool,
}

impl Reader {
    async fn next(mut self) -> Option<(Result<Bytes>, Self)> {
        if self.done {
            return None;
        }
        let sealed = (self.chunk as usize) + TAG_LEN;
        // Fill one sealed chunk (the last may be shorter).
        while self.buf.len() < sealed {
            match self.inner.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    self.done = true;
                    return Some((Err(storage_err(e)), self));
                }
                None => break,
            }
        }
        let take = self.buf.len().min(sealed);
        let mut piece: Vec<u8> = self.buf.drain(..take).collect();
        let is_last = self.index == self.last_index;
        if !self
            .key
            .open_chunk(&self.prefix, self.index as u32, is_last, &mut piece)
        {
            self.done = true;
            let e = PlatformError::Storage(format!(
                "{}: chunk {} does not authenticate (the stored object was altered or cut short)",
                self.path, self.index
            ));
            return Some((Err(e), self));
        }
        let base = self.index * self.chunk;
        let lo = self.start.saturating_sub(base) as usize;
        let hi = ((self.end - base) as usize).min(piece.len());
        if self.index >= self.stop_index {
            self.done = true;
        }
        self.index += 1;
        let out = Bytes::from(piece).slice(lo.min(hi)..hi);
        Some((Ok(out), self))
    }
}
