//! Uploads (OpenAI's Uploads API): a large file sent in parts. Each part is sealed into storage
//! as it streams in; completing the upload checks the parts (their total against the declared
//! size, the content's MD5 when given) by reading them back once, and makes a file whose
//! segments are the parts, in the order given: nothing is copied. An upload is pending for an
//! hour; parts of uploads that expire or are cancelled are removed from storage.

use crate::Store;
use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::files::{FileObject, Segment, check_purpose};
use crate::ids::{new_id, now};
use crate::storage::{Storage, Written};
use crate::store::Change;
use bitnet_formats::archive::SNIFF_BYTES;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use md5::Md5;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

/// How long an upload may stay pending.
pub const UPLOAD_SECONDS: i64 = 3600;
/// The most bytes one part may carry (OpenAI's limit).
pub const MAX_PART_BYTES: u64 = 64 << 20;

/// OpenAI's upload object.
#[derive(Debug, Clone, Serialize)]
pub struct Upload {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    /// `pending`, `completed`, `cancelled` or `expired`.
    pub status: String,
    pub expires_at: i64,
    pub file: Option<FileObject>,
}

/// OpenAI's upload part object.
#[derive(Debug, Clone, Serialize)]
pub struct UploadPart {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub upload_id: String,
}

type Row = (
    String,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    Option<String>,
);

impl Store {
    /// Start an upload of `bytes` bytes (at most `max_bytes`).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_upload(
        &self,
        org: &str,
        project: &str,
        filename: &str,
        purpose: &str,
        bytes: i64,
        mime_type: &str,
        max_bytes: u64,
        by: &Actor,
    ) -> Result<Upload> {
        check_purpose(purpose)?;
        let filename = filename.trim();
        if filename.is_empty() || filename.len() > 512 || filename.chars().any(char::is_control) {
            return Err(PlatformError::invalid(
                "filename",
                "filename must be 1 to 512 bytes without control characters",
            ));
        }
        if bytes < 0 || bytes as u64 > max_bytes {
            return Err(PlatformError::invalid(
                "bytes",
                format!("bytes must be between 0 and {max_bytes}"),
            ));
        }
        let mime = mime_type.trim();
        if mime.is_empty() || mime.len() > 255 || mime.chars().any(char::is_control) {
            return Err(PlatformError::invalid(
                "mime_type",
                "mime_type must be 1 to 255 bytes (application/octet-stream will do)",
            ));
        }
        self.active_project(org, project).await?;
        let mut c = self.change(org).await?;
        let u = Upload {
            id: new_id("upload_"),
            object: "upload",
            bytes,
            created_at: c.at,
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            status: "pending".into(),
            expires_at: c.at + UPLOAD_SECONDS,
            file: None,
        };
        sqlx::query(
            "INSERT INTO uploads (id, organization_id, project_id, filename, purpose, bytes, mime_type, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&u.id)
        .bind(org)
        .bind(project)
        .bind(&u.filename)
        .bind(&u.purpose)
        .bind(u.bytes)
        .bind(mime)
        .bind(u.created_at)
        .bind(u.expires_at)
        .execute(&mut *c.tx)
        .await?;
        c.audit(
            AuditEvent::new(
                "upload.created",
                by,
                &u.id,
                json!({"id": u.id, "data": {"filename": u.filename, "purpose": u.purpose, "bytes": u.bytes}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        Ok(u)
    }

    /// An upload of the project (status `expired` once past its time while pending).
    pub async fn upload(&self, org: &str, project: &str, id: &str) -> Result<Upload> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, filename, purpose, bytes, status, created_at, expires_at, file_id FROM uploads \
             WHERE organization_id = $1 AND project_id = $2 AND id = $3",
        )
        .bind(org)
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let (id, filename, purpose, bytes, status, created_at, expires_at, file_id) =
            row.ok_or_else(|| PlatformError::not_found("upload", id))?;
        let status = if status == "pending" && now() >= expires_at {
            "expired".to_string()
        } else {
            status
        };
        let file = match file_id {
            Some(f) => Some(self.file(org, project, &f).await?),
            None => None,
        };
        Ok(Upload {
            id,
            object: "upload",
            bytes,
            created_at,
            filename,
            purpose,
            status,
            expires_at,
            file,
        })
    }

    async fn pending_upload(&self, org: &str, project: &str, id: &str) -> Result<Upload> {
        let u = self.upload(org, project, id).await?;
        if u.status != "pending" {
            return Err(PlatformError::Conflict(format!(
                "upload {id} is {}; parts are added to pending uploads only",
                u.status
            )));
        }
        Ok(u)
    }

    /// Add a part: its bytes stream into storage, sealed (at most [`MAX_PART_BYTES`], and no
    /// more than the upload's declared size in all).
    pub async fn add_upload_part<S, E>(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        id: &str,
        body: S,
    ) -> Result<UploadPart>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let u = self.pending_upload(org, project, id).await?;
        let (have,): (i64,) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM upload_parts WHERE upload_id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        let room = (u.bytes - have).max(0) as u64;
        let seg = self
            .write_segment(storage, org, body, MAX_PART_BYTES.min(room))
            .await
            .map_err(|e| match e {
                PlatformError::TooLarge(_) => PlatformError::TooLarge(format!(
                    "a part is at most {MAX_PART_BYTES} bytes, and the parts at most the upload's {} bytes ({have} sent)",
                    u.bytes
                )),
                e => e,
            })?;
        let part = UploadPart {
            id: new_id("part_"),
            object: "upload.part",
            created_at: now(),
            upload_id: id.to_string(),
        };
        // Added only while the upload is still pending (a cancel or a completion may have come
        // in meanwhile): else the part's bytes go.
        let added = sqlx::query(
            "INSERT INTO upload_parts (id, upload_id, object, bytes, data_key_id, created_at) \
             SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM uploads WHERE id = $2 AND status = 'pending')",
        )
        .bind(&part.id)
        .bind(id)
        .bind(&seg.object)
        .bind(seg.written.bytes as i64)
        .bind(&seg.data_key_id)
        .bind(part.created_at)
        .execute(&self.pool)
        .await;
        match added {
            Ok(r) if r.rows_affected() == 1 => Ok(part),
            Ok(_) => {
                let _ = storage.delete(&seg.object).await;
                Err(PlatformError::Conflict(format!(
                    "upload {id} is no longer pending"
                )))
            }
            Err(e) => {
                let _ = storage.delete(&seg.object).await;
                Err(e.into())
            }
        }
    }

    /// Complete an upload with its parts in `part_ids`' order: their total must be the
    /// declared size and, when `md5` is given, the content's MD5 must match. The upload's file
    /// is made of the parts; parts left out are removed.
    #[allow(clippy::too_many_arguments)]
    pub async fn complete_upload(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        id: &str,
        part_ids: &[String],
        md5: Option<&str>,
        by: &Actor,
    ) -> Result<Upload> {
        let u = self.pending_upload(org, project, id).await?;
        let parts: Vec<(String, String, i64, String)> = sqlx::query_as(
            "SELECT id, object, bytes, data_key_id FROM upload_parts WHERE upload_id = $1",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut segments = Vec::with_capacity(part_ids.len());
        for (i, pid) in part_ids.iter().enumerate() {
            if part_ids[..i].contains(pid) {
                return Err(PlatformError::invalid(
                    "part_ids",
                    format!("part {pid} is listed twice"),
                ));
            }
            let (_, object, bytes, dk) = parts.iter().find(|p| &p.0 == pid).ok_or_else(|| {
                PlatformError::invalid("part_ids", format!("upload {id} has no part {pid}"))
            })?;
            segments.push(Segment {
                object: object.clone(),
                data_key_id: dk.clone(),
                written: Written {
                    bytes: *bytes as u64,
                    sha256: String::new(),
                },
            });
        }
        let total: i64 = segments.iter().map(|s| s.written.bytes as i64).sum();
        if total != u.bytes {
            return Err(PlatformError::invalid(
                "part_ids",
                format!(
                    "the parts hold {total} bytes; the upload was created for {}",
                    u.bytes
                ),
            ));
        }
        // Read the parts back once: their digests, and proof that every one authenticates.
        let (mut sha, mut m5) = (Sha256::new(), Md5::new());
        let mut head = Vec::new();
        for s in &segments {
            let key = self.data_key_by_id(Some(org), &s.data_key_id).await?;
            let mut stream = storage
                .read_sealed(&s.object, &key, s.written.bytes, 0..s.written.bytes)
                .await?;
            while let Some(piece) = stream.next().await {
                let piece = piece?;
                if head.len() < SNIFF_BYTES {
                    let n = (SNIFF_BYTES - head.len()).min(piece.len());
                    head.extend_from_slice(&piece[..n]);
                }
                sha.update(&piece);
                m5.update(&piece);
            }
        }
        let (sha, m5) = (
            crate::ids::hex(&sha.finalize()),
            crate::ids::hex(&m5.finalize()),
        );
        if let Some(want) = md5
            && !want.trim().eq_ignore_ascii_case(&m5)
        {
            return Err(PlatformError::invalid(
                "md5",
                format!("the parts' MD5 is {m5}, not {want}"),
            ));
        }
        if u.purpose == "model" {
            crate::files::check_model_head(&head)?;
        }
        let mut c = self.change(org).await?;
        end_pending(&mut c, org, id, "completed").await?;
        let f = self
            .insert_file_in(
                &mut c,
                org,
                project,
                &u.purpose,
                &u.filename,
                &segments,
                (sha, m5),
                by,
            )
            .await?;
        sqlx::query("UPDATE uploads SET file_id = $1 WHERE id = $2")
            .bind(&f.id)
            .bind(id)
            .execute(&mut *c.tx)
            .await?;
        c.audit(
            AuditEvent::new(
                "upload.completed",
                by,
                id,
                json!({"id": id, "data": {"file_id": f.id, "parts": part_ids.len()}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        for (pid, object, _, _) in &parts {
            if !part_ids.contains(pid) {
                let _ = storage.delete(object).await;
            }
        }
        self.upload(org, project, id).await
    }

    /// Cancel a pending upload; its parts are removed.
    pub async fn cancel_upload(
        &self,
        storage: &Storage,
        org: &str,
        project: &str,
        id: &str,
        by: &Actor,
    ) -> Result<Upload> {
        self.pending_upload(org, project, id).await?;
        let mut c = self.change(org).await?;
        end_pending(&mut c, org, id, "cancelled").await?;
        c.audit(AuditEvent::new("upload.cancelled", by, id, json!({"id": id})).in_project(project))
            .await?;
        c.commit().await?;
        self.remove_parts(storage, id).await;
        self.upload(org, project, id).await
    }

    async fn remove_parts(&self, storage: &Storage, upload: &str) {
        let parts: Vec<(String,)> = match sqlx::query_as(
            "SELECT object FROM upload_parts WHERE upload_id = $1",
        )
        .bind(upload)
        .fetch_all(&self.pool)
        .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%upload, error = %e, "cannot list an upload's parts; they stay in storage");
                return;
            }
        };
        for (o,) in parts {
            if let Err(e) = storage.delete(&o).await {
                tracing::warn!(object = %o, error = %e, "an upload part stays in storage");
            }
        }
    }

    /// Mark uploads that expired while pending, and remove their parts. Returns how many.
    pub async fn sweep_expired_uploads(&self, storage: &Storage) -> Result<usize> {
        let expired: Vec<(String,)> = sqlx::query_as(
            "UPDATE uploads SET status = 'expired' WHERE status = 'pending' AND expires_at <= $1 RETURNING id",
        )
        .bind(now())
        .fetch_all(&self.pool)
        .await?;
        for (id,) in &expired {
            self.remove_parts(storage, id).await;
        }
        Ok(expired.len())
    }
}

/// Move a pending upload to `status` within change `c`; a conflict if it is no longer pending
/// (a completion and a cancel raced, or it expired).
async fn end_pending(c: &mut Change, org: &str, id: &str, status: &str) -> Result<()> {
    let n = sqlx::query(
        "UPDATE uploads SET status = $1 WHERE id = $2 AND organization_id = $3 AND status = 'pending'",
    )
    .bind(status)
    .bind(id)
    .bind(org)
    .execute(&mut *c.tx)
    .await?
    .rows_affected();
    if n != 1 {
        return Err(PlatformError::Conflict(format!(
            "upload {id} is no longer pending"
        )));
    }
    Ok(())
}
