//! bitnet-server: the platform's HTTP server. This first part serves models through an
//! OpenAI-compatible API with continuous batching, API keys, usage metering, Prometheus metrics
//! and a generated OpenAPI document.
//!
//! Layout: [`engine`] schedules one model's sequences (no HTTP), [`api`] holds the OpenAI
//! handlers, [`admin`] the key endpoints, [`store`] the database, [`usage`] the metering writer,
//! and this file the shared state, the router and `serve`.

pub mod admin;
pub mod api;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod store;
pub mod telemetry;
pub mod usage;

use crate::engine::{Engine, EngineConfig};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Principal, Store};
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use utoipa::OpenApi;

/// Server limits and timeouts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// A request body must arrive within this time (slow senders are cut off with 408).
    pub body_timeout: Duration,
    /// A request head must arrive within this time (else the connection is closed).
    pub header_timeout: Duration,
    /// Most tokens one request may generate (`usize::MAX`: up to the model's context).
    pub max_tokens: usize,
    /// A generation that runs longer ends with a timeout error.
    pub request_timeout: Duration,
    /// On shutdown, in-flight generations get this long to finish before they are cancelled.
    pub shutdown_grace: Duration,
    pub engine: EngineConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            max_tokens: usize::MAX,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            engine: EngineConfig::default(),
        }
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
            shutting_down: Arc::new(AtomicBool::new(false)),
        }
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
    }
}

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "bitnet-rust server", description = "OpenAI-compatible inference for ternary models, with API keys and usage metering."),
    paths(
        api::chat_completions, api::completions, api::list_models,
        admin::create_key, admin::list_keys, admin::revoke_key,
        healthz, readyz, metrics_text
    ),
    modifiers(&Security),
    tags((name = "inference"), (name = "admin"), (name = "operations"))
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
    if s.models.is_empty() {
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

/// The OpenAPI document, with the ids of the models served here as the `model` field's enum
/// (so generated clients and fuzzers know the valid values).
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
            if let Some(model) = doc.pointer_mut(&at) {
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

/// `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every `/v1` route.
async fn require_key(
    State(s): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let h = req.headers();
    let key = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::Unauthorized("no API key: send `Authorization: Bearer KEY` (create one with `bitnet keys create`)".into())
        })?;
    let who: Principal =
        s.store.authenticate(key).await?.ok_or_else(|| {
            ApiError::Unauthorized("the API key is not valid or was revoked".into())
        })?;
    req.extensions_mut().insert(who);
    Ok(next.run(req).await)
}

/// Latency per route, method and status (time to the response head; streams count their setup).
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .http(&route, &method, resp.status().as_u16())
        .observe(t.elapsed().as_secs_f64());
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
        .route("/v1/models", get(api::list_models))
        .route(
            "/v1/admin/keys",
            post(admin::create_key).get(admin::list_keys),
        )
        .route("/v1/admin/keys/{id}", delete(admin::revoke_key))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(state.config.body_timeout))
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
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
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
        .header_read_timeout(state.config.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let svc = TowerToHyperService::new(app.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
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
