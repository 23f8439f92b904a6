//! bitnet-server: the platform's HTTP server. This first part serves models through an
//! OpenAI-compatible API with continuous batching, API keys, usage metering, Prometheus metrics
//! and a generated OpenAPI document.
//!
//! Layout: [`engine`] schedules one model's sequences (no HTTP), [`api`] holds the OpenAI
//! inference handlers, [`org`] the organization API (OpenAI's Administration API shapes),
//! [`operator`] the API above organizations, [`auth`] turns keys into callers,
//! [`permissions`] decides every route, [`usage`] writes metering rows, and this file holds the
//! shared state, the router and `serve`. The domain and its database live in `bitnet-platform`.

pub mod api;
pub mod auth;
pub mod billing;
pub mod engine;
pub mod error;
pub mod events;
pub mod files;
pub mod jobs;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod operator;
pub mod org;
pub mod permissions;
pub mod registry;
pub mod signin;
pub mod telemetry;
pub mod usage;
pub mod worker;

use crate::engine::{Engine, EngineConfig};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::usage::UsageLog;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bitnet_formats::tokenizer::TextTokenizer;
use bitnet_model::LoadedModel;
use bitnet_model::chat::ChatTemplate;
use bitnet_platform::Store;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tower_http::request_id::PropagateRequestIdLayer;
use utoipa::OpenApi;

/// Server limits and timeouts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Largest file `POST /v1/files` takes (streamed to storage, never held in memory).
    pub max_file_bytes: u64,
    /// A request body must arrive within this time (slow senders are cut off with 408).
    pub body_timeout: Duration,
    /// A request head must arrive within this time of the connection opening or of the last
    /// response (else the connection is closed): idle connections do not stay open.
    pub header_timeout: Duration,
    /// Most connections open at once; past it, new ones wait in the listen backlog until one
    /// closes (a log line says so, at most every 10 s).
    pub max_connections: usize,
    /// Most tokens one request may generate (`usize::MAX`: up to the model's context).
    pub max_tokens: usize,
    /// A generation that runs longer ends with a timeout error.
    pub request_timeout: Duration,
    /// On shutdown, in-flight generations get this long to finish before they are cancelled.
    pub shutdown_grace: Duration,
    /// The server's address as browsers reach it (single sign-on's callback); default: the
    /// request's `Host` over http.
    pub public_url: Option<String>,
    /// The Stripe webhook endpoint's signing secret (`whsec_...`); `None`: the webhook route
    /// answers 404.
    pub stripe_webhook_secret: Option<String>,
    pub engine: EngineConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_file_bytes: 8 << 30,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            max_tokens: usize::MAX,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            public_url: None,
            stripe_webhook_secret: None,
            engine: EngineConfig::default(),
        }
    }
}

/// Connections a server may hold by default: 4096, or fewer when the process's descriptor limit
/// is low (64 descriptors are kept for the database, model files and logs), so accepting never
/// runs the process out of descriptors.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        });
    match soft {
        Some(n) => n.saturating_sub(64).clamp(16, 4096),
        None => 4096,
    }
}

/// A model being served.
#[derive(Debug)]
pub struct ServedModel {
    pub id: String,
    pub created: u64,
    pub context: usize,
    pub vocab: usize,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Option<ChatTemplate>,
    /// End-of-sequence and end-of-turn tokens.
    pub stop_tokens: Vec<u32>,
    pub engine: Engine,
    /// The model's own sampling settings: a request's omitted fields take them.
    pub sampling: bitnet_model::sampling::SamplingDefaults,
}

impl ServedModel {
    /// Start an engine for a loaded model, served under `id`.
    pub fn start(
        id: String,
        loaded: LoadedModel,
        config: &EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let tokenizer =
            Arc::new(loaded.tokenizer.ok_or_else(|| {
                format!("{id}: the model ships no tokenizer, which serving needs")
            })?);
        let name = |t: Option<u32>| -> String {
            t.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default()
        };
        let template = match tokenizer.chat_template.as_deref() {
            Some(src) => Some(
                ChatTemplate::new(src, &name(tokenizer.bos_id), &name(tokenizer.eos_id))
                    .map_err(|e| format!("{id}: chat template: {e}"))?,
            ),
            None => None,
        };
        let stop_tokens = bitnet_model::chat::turn_end_tokens(&tokenizer);
        let sampling = loaded.sampling;
        let model = Arc::new(loaded.model);
        let (context, vocab) = (model.spec.context, model.spec.vocab);
        let engine = Engine::start(
            id.clone(),
            model,
            tokenizer.clone(),
            config.clone(),
            metrics,
        )
        .map_err(|e| format!("{id}: cannot start the engine thread: {e}"))?;
        Ok(Self {
            id,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            context,
            vocab,
            tokenizer,
            template,
            stop_tokens,
            engine,
            sampling,
        })
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub models: Arc<Vec<Arc<ServedModel>>>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub usage: UsageLog,
    pub config: Arc<ServerConfig>,
    /// Where files live (`None`: the Files API answers 503).
    pub storage: Option<Arc<bitnet_platform::storage::Storage>>,
    /// The registry's loaded models (`None`: only the models of the command line are served).
    pub registry: Option<Arc<registry::ModelCache>>,
    shutting_down: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        models: Vec<ServedModel>,
        store: Store,
        metrics: Arc<Metrics>,
        usage: UsageLog,
        config: ServerConfig,
    ) -> Self {
        Self {
            models: Arc::new(models.into_iter().map(Arc::new).collect()),
            store,
            metrics,
            usage,
            config: Arc::new(config),
            storage: None,
            registry: None,
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Keep files in `storage`.
    pub fn with_storage(mut self, storage: bitnet_platform::storage::Storage) -> Self {
        self.storage = Some(Arc::new(storage));
        self
    }

    /// Serve the registry's models through `cache`.
    pub fn with_registry(mut self, cache: registry::ModelCache) -> Self {
        self.registry = Some(Arc::new(cache));
        self
    }

    pub fn model(&self, id: &str) -> Option<Arc<ServedModel>> {
        self.models.iter().find(|m| m.id == id).cloned()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Refuse new work (readyz turns 503, generation requests 503).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Cancel every running and waiting generation.
    pub fn cancel_all(&self) {
        for m in self.models.iter() {
            m.engine.cancel_all();
        }
        if let Some(r) = &self.registry {
            r.cancel_all();
        }
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "bitnet-rust server", description = "OpenAI-compatible inference for ternary models, with API keys and usage metering."),
    paths(
        api::chat_completions, api::completions, registry::list_models,
        registry::doc_get_model, registry::doc_list_versions, registry::doc_set_alias, registry::doc_delete_alias,
        registry::doc_delete_version, registry::doc_share_model,
        jobs::doc_create_job, jobs::doc_list_jobs, jobs::doc_get_job, jobs::doc_job_events, jobs::doc_cancel_job,
        org::doc_list_projects, org::doc_create_project, org::doc_get_project, org::doc_modify_project,
        org::doc_archive_project, org::doc_list_project_users, org::doc_add_project_user,
        org::doc_list_service_accounts, org::doc_create_service_account, org::doc_list_project_keys, org::doc_create_own_project_key,
        org::doc_list_users, org::doc_list_invites, org::doc_create_invite, org::doc_list_admin_keys,
        org::doc_create_admin_key, org::doc_list_audit_logs,
        metering::doc_list_rate_limits, metering::doc_modify_rate_limit, metering::doc_usage_completions,
        metering::doc_costs, metering::doc_list_prices, metering::doc_create_price,
        metering::doc_get_key_rate_limit, metering::doc_set_key_rate_limit, metering::doc_get_org_budget, metering::doc_set_org_budget, metering::doc_get_project_budget, metering::doc_set_project_budget,
        billing::doc_list_invoices, billing::doc_get_invoice, billing::doc_stripe_webhook,
        files::doc_list_files, files::doc_get_file, files::doc_delete_file, files::doc_file_content,
        files::doc_create_upload, files::doc_complete_upload, files::doc_cancel_upload,
        signin::login, signin::refresh, signin::logout, signin::accept_invite, signin::jwks,
        signin::sso_start, signin::sso_callback,
        healthz, readyz, metrics_text
    ),
    modifiers(&Security),
    components(schemas(signin::LoginBody, signin::RefreshBody, signin::AcceptInviteBody, org::NameBody, org::RoleBody, org::ProjectUserBody, org::InviteBody, org::InviteProjectBody, files::CreateUpload, files::CompleteUpload, jobs::CreateJob, registry::AliasBody, registry::ShareBody, registry::ModelsList, registry::ModelObject, metering::RateLimitBody, metering::PriceBody, metering::PriceObject, metering::BudgetBody)),
    tags((name = "inference"), (name = "organization"), (name = "sign-in"), (name = "operations"))
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Models loaded and the database answers"), (status = 503, description = "Cannot serve")))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    if s.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if s.models.is_empty() && s.registry.is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no model loaded").into_response();
    }
    if !s.store.ping().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the database does not answer",
        )
            .into_response();
    }
    (StatusCode::OK, "ready").into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics_text(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI document, with the ids of the models served from the command line as the
/// `model` field's enum (so generated clients and fuzzers know the valid values).
async fn openapi_json(State(s): State<AppState>) -> Response {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let ids: Vec<serde_json::Value> = s.models.iter().map(|m| m.id.clone().into()).collect();
    for schema in ["ChatCompletionRequest", "CompletionRequest"] {
        // The request bodies flatten `Sampling`, so their own fields sit in an `allOf` part.
        let base = format!("/components/schemas/{schema}");
        for at in [
            format!("{base}/properties/model"),
            format!("{base}/allOf/1/properties/model"),
        ] {
            // (Registry models come and go: with none served from the command line, any
            // name may be valid.)
            if !ids.is_empty()
                && let Some(model) = doc.pointer_mut(&at)
            {
                model["enum"] = ids.clone().into();
            }
        }
        // The server's cap on generated tokens, when it has one.
        if s.config.max_tokens < usize::MAX {
            for field in ["max_tokens", "max_completion_tokens"] {
                for at in [
                    format!("{base}/properties/{field}"),
                    format!("{base}/allOf/1/properties/{field}"),
                ] {
                    if let Some(f) = doc.pointer_mut(&at) {
                        f["maximum"] = s.config.max_tokens.into();
                    }
                }
            }
        }
    }
    Json(doc).into_response()
}

/// The method as a metrics label: the methods HTTP defines, anything else `other` (a client can
/// send any token as a method; each distinct label would be a new series).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Latency per route template, method and status (time to the response head; streams count
/// their setup). Every label is bounded: routes are the router's templates (`unmatched` for
/// anything else), methods as [`method_label`], statuses three digits.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let t = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .http(&route, method, resp.status().as_u16())
        .observe(t.elapsed().as_secs_f64());
    resp
}

/// The client's own `x-request-id`, if it sent one (kept beside the server's id, not unique).
#[derive(Debug, Clone)]
pub struct ClientRequestId(pub String);

/// A handler's view of the request's ids: the server's (`x-request-id`, set by
/// [`assign_request_id`]) and the client's.
#[derive(Debug, Clone)]
pub struct RequestIds {
    pub server: String,
    pub client: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RequestIds {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let server = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map_or_else(
                || format!("req_{}", uuid::Uuid::new_v4().simple()),
                str::to_string,
            );
        let client = parts
            .extensions
            .get::<ClientRequestId>()
            .map(|c| c.0.clone());
        Ok(Self { server, client })
    }
}

/// Every request gets the server's own id (`req_` + a UUID) in `x-request-id`, returned in the
/// response as OpenAI does; the client's header, if any, moves to [`ClientRequestId`] (at most
/// 128 characters kept). Usage rows are keyed by the server's id, so clients that repeat an id
/// cannot merge or drop rows.
async fn assign_request_id(mut req: Request, next: Next) -> Response {
    let client = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect::<String>());
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        req.headers_mut().insert("x-request-id", v);
    }
    if let Some(c) = client {
        req.extensions_mut().insert(ClientRequestId(c));
    }
    next.run(req).await
}

/// Longest request target answered normally; longer ones get 414 in the OpenAI error shape.
const MAX_URI_BYTES: usize = 8 << 10;
/// Most bytes of request headers answered normally; more get 431 in the OpenAI error shape.
const MAX_HEADER_BYTES: usize = 32 << 10;

/// Routes whose bodies stream to storage.
fn is_upload(req: &Request) -> bool {
    req.method() == axum::http::Method::POST
        && req.extensions().get::<MatchedPath>().is_some_and(|p| {
            p.as_str() == "/v1/files" || p.as_str() == "/v1/uploads/{upload_id}/parts"
        })
}

/// HTTP-level refusals in OpenAI's error shape: request targets and headers over the limits
/// (414, 431; hyper refuses far larger ones itself, without a body), a body that has not fully
/// arrived by `body_timeout` from the head (408: one deadline for the whole body, not per
/// read), and 405s (axum answers them with an empty body).
async fn http_limits(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let refuse = |status, message: String, code| ApiError::Http {
        status,
        message,
        code,
    };
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        return refuse(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {uri} bytes; at most {MAX_URI_BYTES} are accepted"),
            "uri_too_long",
        )
        .into_response();
    }
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        return refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"
            ),
            "headers_too_large",
        )
        .into_response();
    }
    // Uploads stream to storage under their own limits (the handler's idle timeout, the
    // route's size limit): their bodies are not gathered here.
    if is_upload(&req) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limit = s.config.max_body_bytes;
    let read = axum::body::to_bytes(body, limit.saturating_add(1));
    let bytes = match tokio::time::timeout(s.config.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // Over the limit (to_bytes stops past it), or the client broke off mid-body.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|c| c.is::<http_body_util::LengthLimitError>());
            return if too_large {
                ApiError::TooLarge(format!("the request body is over the {limit}-byte limit"))
                    .into_response()
            } else {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("the request body could not be read: {e}"),
                    "unreadable_body",
                )
                .into_response()
            };
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    s.config.body_timeout.as_secs_f64()
                ),
                "request_timeout",
            )
            .into_response();
        }
    };
    let resp = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        let (mut parts, body) = resp.into_parts();
        if axum::body::HttpBody::is_end_stream(&body) {
            let allow = parts.headers.remove(header::ALLOW);
            let mut r = refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method; GET /openapi.json lists the routes".into(),
                "method_not_allowed",
            )
            .into_response();
            if let Some(a) = allow {
                r.headers_mut().insert(header::ALLOW, a);
            }
            return r;
        }
        return Response::from_parts(parts, body);
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::NotFound {
        message: "no such route; GET /openapi.json lists them".into(),
        code: "not_found",
    }
}

pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let v1 = Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(registry::list_models))
        .route("/v1/models/{model}", get(registry::get_model))
        .route("/v1/models/{model}/versions", get(registry::list_versions))
        .route(
            "/v1/models/{model}/aliases/{alias}",
            post(registry::set_alias).delete(registry::delete_alias),
        )
        .route(
            "/v1/models/{model}/versions/{version}",
            delete(registry::delete_version),
        )
        .route(
            "/v1/quantization/jobs",
            get(jobs::list_jobs).post(jobs::create_job),
        )
        .route("/v1/quantization/jobs/{job_id}", get(jobs::get_job))
        .route(
            "/v1/quantization/jobs/{job_id}/events",
            get(jobs::job_events),
        )
        .route(
            "/v1/quantization/jobs/{job_id}/cancel",
            post(jobs::cancel_job),
        )
        .route(
            "/v1/organization/projects",
            get(org::list_projects).post(org::create_project),
        )
        .route(
            "/v1/organization/projects/{project_id}",
            get(org::get_project).post(org::modify_project),
        )
        .route(
            "/v1/organization/projects/{project_id}/archive",
            post(org::archive_project),
        )
        .route(
            "/v1/organization/projects/{project_id}/users",
            get(org::list_project_users).post(org::add_project_user),
        )
        .route(
            "/v1/organization/projects/{project_id}/users/{user_id}",
            get(org::get_project_user)
                .post(org::modify_project_user)
                .delete(org::delete_project_user),
        )
        .route(
            "/v1/organization/projects/{project_id}/service_accounts",
            get(org::list_service_accounts).post(org::create_service_account),
        )
        .route(
            "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}",
            get(org::get_service_account).delete(org::delete_service_account),
        )
        .route(
            "/v1/organization/projects/{project_id}/api_keys",
            get(org::list_project_keys).post(org::create_own_project_key),
        )
        .route(
            "/v1/organization/projects/{project_id}/api_keys/{key_id}",
            get(org::get_project_key).delete(org::delete_project_key),
        )
        .route("/v1/organization/users", get(org::list_users))
        .route(
            "/v1/organization/users/{user_id}",
            get(org::get_user)
                .post(org::modify_user)
                .delete(org::delete_user),
        )
        .route(
            "/v1/organization/invites",
            get(org::list_invites).post(org::create_invite),
        )
        .route(
            "/v1/organization/invites/{invite_id}",
            get(org::get_invite).delete(org::delete_invite),
        )
        .route(
            "/v1/organization/admin_api_keys",
            get(org::list_admin_keys).post(org::create_admin_key),
        )
        .route(
            "/v1/organization/admin_api_keys/{key_id}",
            get(org::get_admin_key).delete(org::delete_admin_key),
        )
        .route("/v1/organization/audit_logs", get(org::list_audit_logs))
        .route(
            "/v1/organization/projects/{project_id}/rate_limits",
            get(metering::list_rate_limits),
        )
        .route(
            "/v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}",
            post(metering::modify_rate_limit),
        )
        .route(
            "/v1/organization/usage/completions",
            get(metering::usage_completions),
        )
        .route("/v1/organization/costs", get(metering::costs))
        .route("/v1/organization/invoices", get(billing::list_invoices))
        .route(
            "/v1/organization/invoices/{invoice_id}",
            get(billing::get_invoice),
        )
        .route(
            "/v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit",
            get(metering::get_key_rate_limit).post(metering::set_key_rate_limit),
        )
        .route(
            "/v1/organization/budget",
            get(metering::get_org_budget).post(metering::set_org_budget),
        )
        .route(
            "/v1/organization/projects/{project_id}/budget",
            get(metering::get_project_budget).post(metering::set_project_budget),
        )
        .route(
            "/v1/operator/prices",
            get(metering::list_prices).post(metering::create_price),
        )
        .route(
            "/v1/files",
            get(files::list_files)
                .post(files::create_file)
                .layer(DefaultBodyLimit::max(
                    usize::try_from(state.config.max_file_bytes)
                        .unwrap_or(usize::MAX)
                        .saturating_add(64 << 10),
                )),
        )
        .route(
            "/v1/files/{file_id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files/{file_id}/content", get(files::file_content))
        .route("/v1/uploads", post(files::create_upload))
        .route(
            "/v1/uploads/{upload_id}/parts",
            post(files::add_upload_part).layer(DefaultBodyLimit::max(
                bitnet_platform::uploads::MAX_PART_BYTES as usize + (64 << 10),
            )),
        )
        .route(
            "/v1/uploads/{upload_id}/complete",
            post(files::complete_upload),
        )
        .route("/v1/uploads/{upload_id}/cancel", post(files::cancel_upload))
        .route(
            "/v1/organization/sso",
            get(org::get_sso).post(org::set_sso).delete(org::delete_sso),
        )
        .route(
            "/v1/operator/organizations",
            get(operator::list_organizations).post(operator::create_organization),
        )
        .route(
            "/v1/operator/organizations/{organization_id}",
            get(operator::get_organization),
        )
        .route(
            "/v1/operator/organizations/{organization_id}/admin_api_keys",
            post(operator::create_admin_key),
        )
        .route(
            "/v1/operator/organizations/{organization_id}/models/{model}/share",
            post(registry::share_model),
        )
        // Authenticate first (outermost), then the permission table.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            permissions::authorize,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    // Signing in takes no credential (the table lists these routes as `Public`).
    let public = Router::new()
        .route("/v1/auth/login", post(signin::login))
        .route("/v1/auth/refresh", post(signin::refresh))
        .route("/v1/auth/logout", post(signin::logout))
        .route("/v1/auth/invites/accept", post(signin::accept_invite))
        .route("/.well-known/jwks.json", get(signin::jwks))
        .route("/v1/auth/sso/{organization}/start", get(signin::sso_start))
        .route("/v1/auth/sso/callback", get(signin::sso_callback))
        .route("/v1/billing/webhooks/stripe", post(billing::stripe_webhook));
    Router::new()
        .merge(v1)
        .merge(public)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        // Inside the routing, so the refusals are counted under their route.
        .route_layer(middleware::from_fn_with_state(state.clone(), http_limits))
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    // OpenTelemetry reads `otel.*` fields as the span's name, kind and status.
                    let span = tracing::info_span!(
                        "request",
                        otel.name = %format_args!("{} {}", req.method(), req.uri().path()),
                        otel.kind = "server",
                        http.request.method = %req.method(),
                        url.path = %req.uri().path(),
                        method = %req.method(),
                        uri = %req.uri(),
                        request_id = %id,
                        http.response.status_code = tracing::field::Empty,
                        otel.status_code = tracing::field::Empty,
                    );
                    telemetry::join_caller_trace(&span, req.headers());
                    span
                })
                .on_response(
                    |res: &axum::response::Response, _: Duration, span: &tracing::Span| {
                        let status = res.status();
                        span.record("http.response.status_code", i64::from(status.as_u16()));
                        if status.is_server_error() {
                            span.record("otel.status_code", "ERROR");
                        }
                    },
                ),
        )
        .layer(PropagateRequestIdLayer::new(request_id))
        .layer(middleware::from_fn(assign_request_id))
        .with_state(state)
}

/// A warning that is logged at most once per `every`, with how many times it happened since.
struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl RateLimitedLog {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            count: 0,
        }
    }

    fn log(&mut self, emit: impl FnOnce(u64)) {
        self.count += 1;
        if self.last.is_none_or(|t| t.elapsed() >= self.every) {
            emit(self.count);
            self.count = 0;
            self.last = Some(Instant::now());
        }
    }
}

/// Serve `state` on `listener` until `shutdown` resolves; then refuse new work, give in-flight
/// generations `shutdown_grace` to finish, cancel the rest, and return once every connection
/// has closed.
///
/// Connections are served by hyper directly (as axum's `serve-with-hyper` example does) so a
/// client must send its request head within `header_timeout`: a slowloris sender is cut off.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let app = router(state.clone());
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Hyper's own limits sit above `http_limits`', which answer in the OpenAI shape.
        .max_buf_size(4 * MAX_HEADER_BYTES + MAX_URI_BYTES)
        .header_read_timeout(state.config.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = state.config.header_timeout;
    let slots = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let mut at_limit = RateLimitedLog::new(Duration::from_secs(10));
    let mut accept_errors = RateLimitedLog::new(Duration::from_secs(10));
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        // A slot first: at the limit, new connections wait in the kernel's backlog.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                at_limit.log(|n| {
                    tracing::warn!(
                        limit = state.config.max_connections,
                        times = n,
                        "connection limit reached: new connections wait until one closes \
                         (--max-connections)"
                    )
                });
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => {
                        backoff = Duration::from_millis(10);
                        a
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off (up to a second) rather
                        // than spin, and say so at most every 10 s.
                        accept_errors.log(|n| {
                            tracing::warn!(error = %e, times = n, "accept failed; backing off")
                        });
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                // The client's address reaches handlers (the audit log records it).
                let peer = stream.peer_addr().ok();
                let svc = TowerToHyperService::new(tower::ServiceExt::map_request(
                    app.clone(),
                    move |mut req: Request<hyper::body::Incoming>| {
                        if let Some(p) = peer {
                            req.extensions_mut().insert(axum::extract::ConnectInfo(p));
                        }
                        req
                    },
                ));
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _slot = slot;
                    // A client that opens a connection and sends nothing is closed after the
                    // header timeout (hyper's timer only starts once the first bytes arrive
                    // and the protocol is known).
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new requests; waiting for in-flight generations");
    state.begin_shutdown();
    let grace = state.config.shutdown_grace;
    let closing = graceful.shutdown();
    tokio::pin!(closing);
    if tokio::time::timeout(grace, &mut closing).await.is_err() {
        tracing::warn!("shutdown grace period over: cancelling what is still running");
        state.cancel_all();
        // Cancelled streams end at once; a connection that still will not close is left.
        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    }
    Ok(())
}
