//! Quantization jobs, shaped like OpenAI's fine-tuning jobs, for project keys:
//! `POST /v1/quantization/jobs` (with an `Idempotency-Key` header: the same key gives back the
//! same job), `GET /v1/quantization/jobs` (`limit`, `after`), `GET /v1/quantization/jobs/{job_id}`,
//! `GET /v1/quantization/jobs/{job_id}/events` (`after`, `limit`; oldest first; with
//! `stream=true` or `Accept: text/event-stream`, Server-Sent Events until the job ends, then
//! `data: [DONE]`), `POST /v1/quantization/jobs/{job_id}/cancel`.

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::org::Params;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bitnet_platform::List;
use bitnet_platform::jobs::{JobEvent, JobParams, QuantJob};
use futures_util::stream;
use serde::Deserialize;
use std::time::Duration;

type Answer<T> = Result<Json<T>, ApiError>;

/// The body of `POST /v1/quantization/jobs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// A `model` file of the project: a GGUF, or a tar of a Hugging Face directory.
    pub file: String,
    /// The ternary type of the linear layers: `tq2_0`, `tq1_0` or `i2_s`.
    pub to: String,
    /// The type of the embeddings and lm_head: `f16` (default), `bf16`, `f32` or `q8_0`.
    #[serde(default)]
    pub embeddings: Option<String>,
    /// The registry model the result joins (default: the file's name without extensions).
    #[serde(default)]
    pub name: Option<String>,
    /// Appended to the name as `-SUFFIX`.
    #[serde(default)]
    pub suffix: Option<String>,
}

/// `POST /v1/quantization/jobs`.
pub async fn create_job(
    State(s): State<AppState>,
    who: Caller,
    headers: HeaderMap,
    crate::api::ApiJson(b): crate::api::ApiJson<CreateJob>,
) -> Answer<QuantJob> {
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key", "the key must be visible ASCII"))?
                .to_string(),
        ),
        None => None,
    };
    let params = JobParams {
        to: b.to,
        embeddings: b.embeddings,
        name: b.name,
        suffix: b.suffix,
    };
    Ok(Json(
        s.store
            .create_job(
                who.org()?,
                who.project()?,
                &b.file,
                &params,
                key.as_deref(),
                &who.actor,
            )
            .await?,
    ))
}

/// `GET /v1/quantization/jobs`.
pub async fn list_jobs(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<QuantJob>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.jobs(who.org()?, who.project()?, &page).await?))
}

/// `GET /v1/quantization/jobs/{job_id}`.
pub async fn get_job(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<QuantJob> {
    Ok(Json(s.store.job(who.org()?, who.project()?, &id).await?))
}

/// `POST /v1/quantization/jobs/{job_id}/cancel`.
pub async fn cancel_job(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<QuantJob> {
    Ok(Json(
        s.store
            .cancel_job(who.org()?, who.project()?, &id, &who.actor)
            .await?,
    ))
}

const TERMINAL: &[&str] = &["succeeded", "failed", "cancelled"];

/// `GET /v1/quantization/jobs/{job_id}/events`.
pub async fn job_events(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let p = Params::parse(q.as_deref())?;
    let limit = match p.one("limit") {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return Err(ApiError::bad("limit", "limit is 1 to 1000")),
        },
    };
    let after = p.one("after").map(str::to_string);
    let sse = match p.one("stream") {
        Some("true") => true,
        None | Some("false") => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream")),
        Some(x) => {
            return Err(ApiError::bad(
                "stream",
                format!("stream is true or false, not {x:?}"),
            ));
        }
    };
    let (org, project) = (who.org()?.to_string(), who.project()?.to_string());
    if !sse {
        let mut events = s
            .store
            .job_events(&org, &project, &id, after.as_deref(), limit + 1)
            .await?;
        let more = events.len() > limit;
        events.truncate(limit);
        return Ok(Json(List::<JobEvent>::new(events, more)).into_response());
    }
    // Fail before the stream starts if the job is not the caller's.
    s.store.job(&org, &project, &id).await?;
    struct Tail {
        after: Option<String>,
        done: bool,
    }
    let store = s.store.clone();
    let body = stream::unfold(Tail { after, done: false }, move |mut t| {
        let (store, org, project, id) = (store.clone(), org.clone(), project.clone(), id.clone());
        async move {
            if t.done {
                return None;
            }
            loop {
                // Read the status first: events written before a terminal status is seen
                // are all read below, so none is missed at the end. A database error ends
                // the stream with the error.
                let read = async {
                    let status = store.job(&org, &project, &id).await?.status;
                    let events = store
                        .job_events(&org, &project, &id, t.after.as_deref(), 1000)
                        .await?;
                    Ok::<_, bitnet_platform::PlatformError>((status, events))
                };
                let (status, events) = match read.await {
                    Ok(r) => r,
                    Err(e) => {
                        t.done = true;
                        let body = ApiError::from(e).body();
                        let ev = SseEvent::default()
                            .data(serde_json::to_string(&body).unwrap_or_default());
                        return Some((vec![ev], t));
                    }
                };
                if let Some(last) = events.last() {
                    t.after = Some(last.id.clone());
                }
                let mut out: Vec<SseEvent> = events
                    .iter()
                    .map(|e| SseEvent::default().data(serde_json::to_string(e).unwrap_or_default()))
                    .collect();
                if TERMINAL.contains(&status.as_str()) && events.len() < 1000 {
                    t.done = true;
                    out.push(SseEvent::default().data("[DONE]"));
                }
                if !out.is_empty() {
                    return Some((out, t));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });
    use futures_util::StreamExt;
    let body =
        body.flat_map(|evs| stream::iter(evs.into_iter().map(Ok::<_, std::convert::Infallible>)));
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}

macro_rules! doc {
    ($method:ident, $path:literal, $name:ident $(, $param:literal)*) => {
        #[utoipa::path($method, path = $path, tag = "quantization",
            params($(($param = String, Path, description = "An id of the caller's project")),*),
            responses((status = 200, description = "A quantization job, a list of them, or a job's events"),
                      (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
                      (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
            security(("api_key" = [])))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

doc!(get, "/v1/quantization/jobs", doc_list_jobs);
doc!(get, "/v1/quantization/jobs/{job_id}", doc_get_job, "job_id");
doc!(
    get,
    "/v1/quantization/jobs/{job_id}/events",
    doc_job_events,
    "job_id"
);
doc!(
    post,
    "/v1/quantization/jobs/{job_id}/cancel",
    doc_cancel_job,
    "job_id"
);

/// `POST /v1/quantization/jobs` with its JSON body described.
#[utoipa::path(post, path = "/v1/quantization/jobs", tag = "quantization", request_body = CreateJob,
    params(("Idempotency-Key" = Option<String>, Header, description = "Repeating a request with the same key gives back the same job")),
    responses((status = 200, description = "The quantization job"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
              (status = 409, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_create_job() {}
