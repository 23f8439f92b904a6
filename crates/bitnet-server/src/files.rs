//! OpenAI's Files API for project keys: `POST /v1/files` (multipart: `purpose`, `file`),
//! `GET /v1/files` (`purpose`, `limit`, `after`, `order`), `GET /v1/files/{file_id}`,
//! `GET /v1/files/{file_id}/content` (HTTP `Range`), `DELETE /v1/files/{file_id}`.
//!
//! Uploads stream: each piece of the multipart body is sealed and written to storage as it
//! arrives (`bitnet_platform::storage`), so a file never sits in memory; a pause longer than
//! the body timeout between two pieces ends the upload (408) and leaves nothing behind.

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::org::Params;
use axum::Json;
use axum::body::Body;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bitnet_platform::files::{FileObject, Segment};
use bitnet_platform::storage::Storage;
use bitnet_platform::uploads::{Upload, UploadPart};
use bitnet_platform::{Deleted, List};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use std::time::Duration;

type Answer<T> = Result<Json<T>, ApiError>;

impl Caller {
    /// The project of a project key.
    pub fn project(&self) -> Result<&str, ApiError> {
        self.cred.project_id.as_deref().ok_or_else(|| {
            ApiError::Forbidden("files belong to a project: use a project key".into())
        })
    }
}

impl AppState {
    pub fn storage(&self) -> Result<&Storage, ApiError> {
        self.storage.as_deref().ok_or_else(|| ApiError::Http {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "this server has no file storage (start it with --storage)".into(),
            code: "no_storage",
        })
    }
}

/// A stream that fails when no piece arrives within `idle`.
pub fn with_idle_timeout<S, E>(
    s: S,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, String>> + Unpin
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    Box::pin(futures_util::stream::unfold(
        (s, false),
        move |(mut s, done)| async move {
            if done {
                return None;
            }
            match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(Ok(b))) => Some((Ok(b), (s, false))),
                Ok(Some(Err(e))) => Some((Err(e.to_string()), (s, true))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(format!("no data for {} s", idle.as_secs_f64())),
                    (s, true),
                )),
            }
        },
    ))
}

/// `axum`'s `Multipart` whose rejections (no boundary, not a form) are 400s in OpenAI's
/// shape.
pub struct Form(pub Multipart);

impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Form")
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        Multipart::from_request(req, state)
            .await
            .map(Form)
            .map_err(|e| {
                ApiError::bad(
                    "file",
                    format!(
                        "send the file as multipart/form-data with `purpose` and `file`: {}",
                        e.body_text()
                    ),
                )
            })
    }
}

fn multipart_err(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::bad(
        "file",
        format!("the multipart body could not be read: {}", e.body_text()),
    )
}

/// A small text field, at most `max` bytes.
async fn small_field(
    mut f: axum::extract::multipart::Field<'_>,
    name: &str,
    max: usize,
) -> Result<String, ApiError> {
    let mut out = Vec::new();
    while let Some(c) = f.chunk().await.map_err(multipart_err)? {
        out.extend_from_slice(&c);
        if out.len() > max {
            return Err(ApiError::bad(name, format!("{name} is over {max} bytes")));
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad(name, format!("{name} is not UTF-8 text")))
}

/// `POST /v1/files`.
pub async fn create_file(
    State(s): State<AppState>,
    who: Caller,
    Form(mut form): Form,
) -> Answer<FileObject> {
    let (org, project) = (who.org()?, who.project()?);
    let storage = s.storage()?;
    let mut purpose = None;
    let mut file: Option<(Segment, String)> = None;
    let r = async {
        while let Some(field) = form.next_field().await.map_err(multipart_err)? {
            match field.name().unwrap_or("") {
                "purpose" => purpose = Some(small_field(field, "purpose", 64).await?),
                "file" if file.is_none() => {
                    let name = field.file_name().unwrap_or("").to_string();
                    let body = with_idle_timeout(field, s.config.body_timeout);
                    let seg = s
                        .store
                        .write_segment(storage, org, body, s.config.max_file_bytes)
                        .await?;
                    file = Some((seg, name));
                }
                "file" => return Err(ApiError::bad("file", "one file per request")),
                other => {
                    return Err(ApiError::bad(
                        "file",
                        format!("unknown form field {other:?}: send `purpose` and `file`"),
                    ));
                }
            }
        }
        let purpose = purpose.ok_or_else(|| ApiError::bad("purpose", "purpose is required"))?;
        bitnet_platform::files::check_purpose(&purpose)?;
        Ok::<_, ApiError>(purpose)
    }
    .await;
    let purpose = match r {
        Ok(p) => p,
        Err(e) => {
            if let Some((seg, _)) = &file {
                let _ = storage.delete(&seg.object).await;
            }
            return Err(e);
        }
    };
    let (seg, name) = file.ok_or_else(|| ApiError::bad("file", "file is required"))?;
    Ok(Json(
        s.store
            .create_file(storage, org, project, &purpose, &name, &[seg], &who.actor)
            .await?,
    ))
}

/// `GET /v1/files`.
pub async fn list_files(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<FileObject>> {
    let p = Params::parse(q.as_deref())?;
    let page = p.page()?;
    let newest_first = match p.one("order") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => {
            return Err(ApiError::bad(
                "order",
                format!("order is asc or desc, not {o:?}"),
            ));
        }
    };
    let purpose = p.one("purpose");
    Ok(Json(
        s.store
            .files(who.org()?, who.project()?, &page, purpose, newest_first)
            .await?,
    ))
}

/// `GET /v1/files/{file_id}`.
pub async fn get_file(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<FileObject> {
    Ok(Json(s.store.file(who.org()?, who.project()?, &id).await?))
}

/// `DELETE /v1/files/{file_id}`.
pub async fn delete_file(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Deleted> {
    s.store
        .delete_file(s.storage()?, who.org()?, who.project()?, &id, &who.actor)
        .await?;
    Ok(Json(Deleted::new("file", &id)))
}

/// A `Range: bytes=…` header against a file of `len` bytes: `Ok(None)` for none, the range
/// for one satisfiable range, `Err` for one that is not (416). Several ranges are answered
/// whole, as servers may.
#[allow(clippy::result_unit_err)]
pub fn parse_range(h: Option<&HeaderValue>, len: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(v) = h.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        // The last `b` bytes.
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            len.saturating_sub(n)..len
        }
        (false, _) => {
            let start: u64 = a.parse().map_err(|_| ())?;
            let end = if b.is_empty() {
                len
            } else {
                let e: u64 = b.parse().map_err(|_| ())?;
                if e < start {
                    return Err(());
                }
                e.saturating_add(1).min(len)
            };
            start..end
        }
        (true, true) => return Err(()),
    };
    if range.start >= len {
        return Err(());
    }
    Ok(Some(range))
}

/// `GET /v1/files/{file_id}/content`.
pub async fn file_content(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (org, project) = (who.org()?, who.project()?);
    let f = s.store.file(org, project, &id).await?;
    let len = f.bytes as u64;
    let range = match parse_range(headers.get(header::RANGE), len) {
        Ok(r) => r,
        Err(()) => {
            let mut r = ApiError::Http {
                status: StatusCode::RANGE_NOT_SATISFIABLE,
                message: format!("the range is outside the file's {len} bytes"),
                code: "range_not_satisfiable",
            }
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let (_, stream) = s
        .store
        .file_content(s.storage()?, org, project, &id, range.clone())
        .await?;
    let body = Body::from_stream(stream.map_err(|e| std::io::Error::other(e.to_string())));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let (status, n) = match &range {
        Some(rg) => {
            if let Ok(v) =
                HeaderValue::from_str(&format!("bytes {}-{}/{len}", rg.start, rg.end - 1))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, rg.end - rg.start)
        }
        None => (StatusCode::OK, len),
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        f.filename.replace(['"', '\\'], "_")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    *r.status_mut() = status;
    Ok(r)
}

/// `POST /v1/uploads` body.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct CreateUpload {
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
    pub mime_type: String,
}

/// `POST /v1/uploads/{upload_id}/complete` body.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
pub struct CompleteUpload {
    pub part_ids: Vec<String>,
    #[serde(default)]
    pub md5: Option<String>,
}

/// `POST /v1/uploads`: an upload of `bytes` bytes in parts, pending for an hour.
pub async fn create_upload(
    State(s): State<AppState>,
    who: Caller,
    crate::api::ApiJson(b): crate::api::ApiJson<CreateUpload>,
) -> Answer<Upload> {
    s.storage()?;
    Ok(Json(
        s.store
            .create_upload(
                who.org()?,
                who.project()?,
                &b.filename,
                &b.purpose,
                b.bytes,
                &b.mime_type,
                s.config.max_file_bytes,
                &who.actor,
            )
            .await?,
    ))
}

/// `POST /v1/uploads/{upload_id}/parts`: one part, the multipart form's `data` field, streamed
/// to storage.
pub async fn add_upload_part(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Form(mut form): Form,
) -> Answer<UploadPart> {
    let (org, project) = (who.org()?, who.project()?);
    let storage = s.storage()?;
    let mut part = None;
    while let Some(field) = form.next_field().await.map_err(multipart_err)? {
        match field.name().unwrap_or("") {
            "data" if part.is_none() => {
                let body = with_idle_timeout(field, s.config.body_timeout);
                part = Some(
                    s.store
                        .add_upload_part(storage, org, project, &id, body)
                        .await?,
                );
            }
            "data" => return Err(ApiError::bad("data", "one part per request")),
            other => {
                return Err(ApiError::bad(
                    "data",
                    format!("unknown form field {other:?}: send the part as `data`"),
                ));
            }
        }
    }
    Ok(Json(part.ok_or_else(|| {
        ApiError::bad("data", "data is required")
    })?))
}

/// `POST /v1/uploads/{upload_id}/complete`.
pub async fn complete_upload(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    crate::api::ApiJson(b): crate::api::ApiJson<CompleteUpload>,
) -> Answer<Upload> {
    Ok(Json(
        s.store
            .complete_upload(
                s.storage()?,
                who.org()?,
                who.project()?,
                &id,
                &b.part_ids,
                b.md5.as_deref(),
                &who.actor,
            )
            .await?,
    ))
}

/// `POST /v1/uploads/{upload_id}/cancel`.
pub async fn cancel_upload(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Upload> {
    Ok(Json(
        s.store
            .cancel_upload(s.storage()?, who.org()?, who.project()?, &id, &who.actor)
            .await?,
    ))
}

macro_rules! doc {
    ($method:ident, $path:literal, $name:ident $(, $param:literal)*) => {
        #[utoipa::path($method, path = $path, tag = "files",
            params($(($param = String, Path, description = "An id of the caller's project")),*),
            responses((status = 200, description = "OpenAI's Files / Uploads API object"),
                      (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
                      (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
            security(("api_key" = [])))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

doc!(get, "/v1/files", doc_list_files);
doc!(get, "/v1/files/{file_id}", doc_get_file, "file_id");
doc!(delete, "/v1/files/{file_id}", doc_delete_file, "file_id");
doc!(
    get,
    "/v1/files/{file_id}/content",
    doc_file_content,
    "file_id"
);
doc!(
    post,
    "/v1/uploads/{upload_id}/cancel",
    doc_cancel_upload,
    "upload_id"
);

/// `POST /v1/uploads` with its JSON body described.
#[utoipa::path(post, path = "/v1/uploads", tag = "files", request_body = CreateUpload,
    responses((status = 200, description = "OpenAI's upload object"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_create_upload() {}

/// `POST /v1/uploads/{upload_id}/complete` with its JSON body described.
#[utoipa::path(post, path = "/v1/uploads/{upload_id}/complete", tag = "files", request_body = CompleteUpload,
    params(("upload_id" = String, Path, description = "An id of the caller's project")),
    responses((status = 200, description = "OpenAI's upload object"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 409, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_complete_upload() {}
