//! Files (OpenAI's Files API): what a project uploads, model files first among them. A file's
//! bytes sit in the artifact storage ([`crate::storage`]) as sealed segments, in order; its row
//! keeps the size and digests. Every query names the organization and the project.

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::new_id;
use crate::storage::{Storage, Written};
use crate::store::Change;
use crate::{HasId, List, Page, Store};
use bitnet_formats::archive::{PackageKind, SNIFF_BYTES, sniff};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::json;
use std::ops::Range;

/// The purposes a file may have: OpenAI's, and `model` (a GGUF, an ONNX file, or a tar of a
/// Hugging Face directory).
pub const PURPOSES: &[&str] = &[
    "model",
    "fine-tune",
    "batch",
    "user_data",
    "assistants",
    "vision",
    "evals",
];

/// OpenAI's file object.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct FileObject {
    pub id: String,
    #[sqlx(skip)]
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    #[sqlx(skip)]
    pub status: &'static str,
    /// Beyond OpenAI: the content's SHA-256 (hex).
    pub sha256: String,
}

impl HasId for FileObject {
    fn id(&self) -> &str {
        &self.id
    }
}

impl FileObject {
    fn tagged(mut self) -> Self {
        self.object = "file";
        self.status = "processed";
        self
    }
}

/// Bytes written to storage that no file holds yet.
#[derive(Debug, Clone)]
pub struct Segment {
    pub object: String,
    pub data_key_id: String,
    pub written: Written,
}

const COLS: &str = "id, bytes, created_at, expires_at, filename, purpose, sha256";

/// A model file is a GGUF, an ONNX file, or a tar (optionally gzip) of a Hugging Face
/// directory; anything else is refused when it is uploaded, by its first bytes.
pub fn check_model_head(head: &[u8]) -> Result<PackageKind> {
    match sniff(head) {
        PackageKind::Unknown => Err(PlatformError::invalid(
            "file",
            "a model file is a GGUF, an ONNX file, or a tar (optionally gzip) of a Hugging Face \
             directory; this file is none of them",
        )),
        kind => Ok(kind),
    }
}

pub fn check_purpose(purpose: &str) -> Result<()> {
    if PURPOSES.contains(&purpose) {
        Ok(())
    } else {
        Err(PlatformError::invalid(
            "purpose",
            format!(
                "purpose must be one of {}; got {purpose:?}",
                PURPOSES.join(", ")
            ),
        ))
    }
}

fn check_filename(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.len() > 512 || n.chars().any(char::is_control) {
        return Err(PlatformError::invalid(
            "file",
            "the file needs a filename of 1 to 512 bytes without control characters",
        ));
    }
    Ok(n.to_string())
}

impl Store {
    /// Seal and store what `body` yields (at most `limit` bytes) for organization `org`; the
    /// bytes belong to nothing until [`Self::create_file`] takes them.
    pub async fn write_segment<S, E>(
        &self,
        storage: &Storage,
        org: &str,
        body: S,
        limit: u64,
    ) -> Result<Segment>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let object = format!("orgs/{org}/segments/{}", new_id("seg_"));
        self.write_segment_at(storage, org, &object, body, limit)
            .await
    }

    /// As [`Self::write_segment`], under the storage path `object` (a job's result is written
    /// under a name of its own, so a dead attempt's leftovers can be found and removed).
    pub async fn write_segment_at<S, E>(
        &self,
        storage: &Storage,
        org: &str,
        object: &str,
        body: S,
        limit: u64,
    ) -> Result<Segment>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let key = self.data_key(Some(org)).await?;
        let object = object.to_string();
        let written = storage.write_sealed(&object, &key, body, limit).await?;
        Ok(Segment {
            object,
            data_key_id: key.id,
            written,
        })
    }

    /// A file of `project` made of stored segments, in order. On failure the segments are
    /// removed from storage.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_file(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        purpose: &str,
        filename: &str,
        segments: &[Segment],
        by: &Actor,
    ) -> Result<FileObject> {
        let r = async {
            if purpose == "model"
                && let Some(first) = segments.first()
            {
                let head = self.segment_head(storage, org, first).await?;
                check_model_head(&head)?;
            }
            self.insert_file(org, project, purpose, filename, segments, by)
                .await
        }
        .await;
        if r.is_err() {
            for s in segments {
                let _ = storage.delete(&s.object).await;
            }
        }
        r
    }

    /// The first bytes of a stored segment (up to [`SNIFF_BYTES`]).
    async fn segment_head(&self, storage: &Storage, org: &str, seg: &Segment) -> Result<Vec<u8>> {
        let key = self.data_key_by_id(Some(org), &seg.data_key_id).await?;
        let n = seg.written.bytes.min(SNIFF_BYTES as u64);
        let mut stream = storage
            .read_sealed(&seg.object, &key, seg.written.bytes, 0..n)
            .await?;
        let mut head = Vec::new();
        while let Some(piece) = stream.next().await {
            head.extend_from_slice(&piece?);
        }
        Ok(head)
    }

    async fn insert_file(
        &self,
        org: &str,
        project: &str,
        purpose: &str,
        filename: &str,
        segments: &[Segment],
        by: &Actor,
    ) -> Result<FileObject> {
        let one = match segments {
            [one] => one,
            _ => {
                return Err(PlatformError::invalid(
                    "file",
                    "a file from several parts is made by completing an upload",
                ));
            }
        };
        // A file sent whole has no MD5 to check (OpenAI's files carry none); an upload's is
        // computed when it completes.
        let digests = (one.written.sha256.clone(), String::new());
        let mut c = self.change(org).await?;
        let f = self
            .insert_file_in(
                &mut c, org, project, purpose, filename, segments, digests, by,
            )
            .await?;
        c.commit().await?;
        Ok(f)
    }

    /// A file's rows (and its `file.created` event) within change `c`; `digests` are the whole
    /// content's SHA-256 and MD5.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn insert_file_in(
        &self,
        c: &mut Change,
        org: &str,
        project: &str,
        purpose: &str,
        filename: &str,
        segments: &[Segment],
        digests: (String, String),
        by: &Actor,
    ) -> Result<FileObject> {
        check_purpose(purpose)?;
        let filename = check_filename(filename)?;
        self.active_project(org, project).await?;
        let bytes: u64 = segments.iter().map(|s| s.written.bytes).sum();
        let f = FileObject {
            id: new_id("file-"),
            object: "file",
            bytes: bytes as i64,
            created_at: c.at,
            expires_at: None,
            filename,
            purpose: purpose.to_string(),
            status: "processed",
            sha256: digests.0,
        };
        sqlx::query(
            "INSERT INTO files (id, organization_id, project_id, purpose, filename, bytes, sha256, md5, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&f.id)
        .bind(org)
        .bind(project)
        .bind(&f.purpose)
        .bind(&f.filename)
        .bind(f.bytes)
        .bind(&f.sha256)
        .bind(&digests.1)
        .bind(f.created_at)
        .execute(&mut *c.tx)
        .await?;
        let mut at = 0i64;
        for (i, s) in segments.iter().enumerate() {
            sqlx::query(
                "INSERT INTO file_segments (file_id, seq, object, start_at, bytes, data_key_id) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&f.id)
            .bind(i as i32)
            .bind(&s.object)
            .bind(at)
            .bind(s.written.bytes as i64)
            .bind(&s.data_key_id)
            .execute(&mut *c.tx)
            .await?;
            at += s.written.bytes as i64;
        }
        c.audit(
            AuditEvent::new(
                "file.created",
                by,
                &f.id,
                json!({"id": f.id, "data": {"filename": f.filename, "purpose": f.purpose, "bytes": f.bytes}}),
            )
            .in_project(project),
        )
        .await?;
        Ok(f)
    }

    /// A project's files, newest first or oldest first, optionally of one purpose.
    pub async fn files(
        &self,
        org: &str,
        project: &str,
        page: &Page,
        purpose: Option<&str>,
        newest_first: bool,
    ) -> Result<List<FileObject>> {
        let mut sql = format!(
            "SELECT {COLS} FROM files WHERE organization_id = $1 AND project_id = $2 AND deleted_at IS NULL"
        );
        let mut binds = vec![org, project];
        if let Some(p) = purpose {
            binds.push(p);
            sql.push_str(&format!(" AND purpose = ${}", binds.len()));
        }
        if let Some(a) = &page.after {
            binds.push(a);
            let op = if newest_first { "<" } else { ">" };
            sql.push_str(&format!(" AND id {op} ${}", binds.len()));
        }
        sql.push_str(&format!(
            " ORDER BY id {} LIMIT {}",
            if newest_first { "DESC" } else { "ASC" },
            page.limit.min(10_000) + 1
        ));
        let mut q = sqlx::query_as::<_, FileObject>(&sql);
        for b in binds {
            q = q.bind(b);
        }
        let mut rows = q.fetch_all(&self.pool).await?;
        let has_more = rows.len() > page.limit;
        rows.truncate(page.limit);
        Ok(List::new(
            rows.into_iter().map(FileObject::tagged).collect(),
            has_more,
        ))
    }

    /// A file of the project; another project's or organization's is not found.
    pub async fn file(&self, org: &str, project: &str, id: &str) -> Result<FileObject> {
        let row: Option<FileObject> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM files WHERE organization_id = $1 AND project_id = $2 AND id = $3 AND deleted_at IS NULL"
        ))
        .bind(org)
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(FileObject::tagged)
            .ok_or_else(|| PlatformError::not_found("file", id))
    }

    /// The bytes `range` of a file (all of it when `None`), streamed from storage.
    pub async fn file_content(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        id: &str,
        range: Option<Range<u64>>,
    ) -> Result<(
        FileObject,
        impl Stream<Item = Result<Bytes>> + Send + 'static,
    )> {
        let f = self.file(org, project, id).await?;
        let len = f.bytes as u64;
        let range = range.unwrap_or(0..len);
        let segs: Vec<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT object, start_at, bytes, data_key_id FROM file_segments WHERE file_id = $1 ORDER BY seq",
        )
        .bind(&f.id)
        .fetch_all(&self.pool)
        .await?;
        let mut parts = Vec::new();
        for (object, start, bytes, dk) in segs {
            let (s, e) = (start as u64, (start + bytes) as u64);
            if e <= range.start || s >= range.end {
                continue;
            }
            let key = self.data_key_by_id(Some(org), &dk).await?;
            let local = range.start.max(s) - s..range.end.min(e) - s;
            parts.push(
                storage
                    .read_sealed(&object, &key, bytes as u64, local)
                    .await?
                    .boxed(),
            );
        }
        Ok((f, futures_util::stream::iter(parts).flatten()))
    }

    /// Delete a file: its row at once, then its stored segments.
    pub async fn delete_file(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        id: &str,
        by: &Actor,
    ) -> Result<()> {
        self.file(org, project, id).await?;
        if let Some(version) = self.file_in_registry(id).await? {
            return Err(PlatformError::Conflict(format!(
                "file {id} holds model version {version}; delete that version first"
            )));
        }
        let objects: Vec<(String,)> =
            sqlx::query_as("SELECT object FROM file_segments WHERE file_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        let mut c = self.change(org).await?;
        let n = sqlx::query(
            "UPDATE files SET deleted_at = $1 WHERE organization_id = $2 AND project_id = $3 AND id = $4 AND deleted_at IS NULL",
        )
        .bind(c.at)
        .bind(org)
        .bind(project)
        .bind(id)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(PlatformError::not_found("file", id));
        }
        c.audit(AuditEvent::new("file.deleted", by, id, json!({"id": id})).in_project(project))
            .await?;
        c.commit().await?;
        for (o,) in objects {
            if let Err(e) = storage.delete(&o).await {
                tracing::warn!(object = %o, error = %e, "a deleted file's bytes stay in storage");
            }
        }
        Ok(())
    }
}
