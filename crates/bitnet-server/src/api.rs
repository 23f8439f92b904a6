//! The OpenAI-compatible endpoints: chat completions, completions and models. Handlers turn a
//! request into engine requests (one per choice), then answer at once or stream the events as
//! Server-Sent Events.

use crate::auth::Caller;
use crate::engine::{Event, GenRequest, SubmitError};
use crate::error::ApiError;
use crate::openai::*;
use crate::usage::Ticket;
use crate::{AppState, ServedModel};
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bitnet_model::chat::Message;
use bitnet_model::generate::{FinishReason, GenerateOptions};
use bitnet_model::sampling::SamplingParams;
use futures_util::stream::{self, BoxStream};
use futures_util::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

/// `axum::Json` whose rejections (malformed JSON, wrong types, wrong content type) come back in
/// OpenAI's error shape as 400s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::TooLarge(format!(
                    "the request body is over the server's limit: {}",
                    e.body_text()
                )))
            }
            Err(e) => Err(ApiError::BadRequest {
                message: match &e {
                    JsonRejection::JsonDataError(d) => {
                        format!("invalid request body: {}", d.body_text())
                    }
                    JsonRejection::JsonSyntaxError(d) => {
                        format!("the body is not valid JSON: {}", d.body_text())
                    }
                    JsonRejection::MissingJsonContentType(_) => {
                        "send the body as JSON with Content-Type: application/json".into()
                    }
                    other => other.body_text(),
                },
                param: None,
                code: match e {
                    JsonRejection::JsonSyntaxError(_) => "invalid_json",
                    JsonRejection::BytesRejection(_) => "unreadable_body",
                    _ => "invalid_request",
                },
            }),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fingerprint() -> String {
    concat!("bitnet-rust-", env!("CARGO_PKG_VERSION")).to_string()
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// What both endpoints ask of the engine, checked.
struct Plan {
    model: Arc<ServedModel>,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop_strings: Vec<String>,
    n: u32,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

/// The model a request names: one served from the command line, else a registry model of the
/// caller's organization (`NAME`, `NAME:ALIAS`, `NAME:VERSION`), loaded on first use.
pub async fn model_for(
    state: &AppState,
    who: &Caller,
    name: &str,
) -> Result<Arc<ServedModel>, ApiError> {
    if let Some(m) = state.model(name) {
        return Ok(m);
    }
    if let (Some(cache), Some(org)) = (&state.registry, who.cred.organization_id.as_deref())
        && let Some(r) = state.store.resolve_model(org, name).await?
    {
        return cache.get(&r).await;
    }
    Err(ApiError::NotFound {
        message: format!(
            "the model `{name}` does not exist; GET /v1/models lists those you may call"
        ),
        code: "model_not_found",
    })
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32, default: f32) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::bad(
            param,
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ))
    }
}

/// Sampling, stop strings, n and streaming, shared by both endpoints. Fields a request leaves
/// out take the model's own settings (its generation config, as vLLM does), else OpenAI's.
fn common(
    s: &Sampling,
    model: &bitnet_model::sampling::SamplingDefaults,
) -> Result<(SamplingParams, Vec<String>, u32), ApiError> {
    let temperature = range(
        "temperature",
        s.temperature,
        0.0,
        2.0,
        model.temperature.unwrap_or(1.0),
    )?;
    let top_p = range("top_p", s.top_p, 0.0, 1.0, model.top_p.unwrap_or(1.0))?;
    if top_p == 0.0 {
        return Err(ApiError::bad("top_p", "top_p must be greater than 0"));
    }
    let frequency_penalty = range("frequency_penalty", s.frequency_penalty, -2.0, 2.0, 0.0)?;
    let presence_penalty = range("presence_penalty", s.presence_penalty, -2.0, 2.0, 0.0)?;
    let n = s.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad(
            "n",
            format!("n must be between 1 and 16, got {n}"),
        ));
    }
    let stop = s.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop",
            "stop takes up to 4 non-empty strings",
        ));
    }
    if s.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "logit_bias is not supported by this server",
        ));
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::bad(
            "stream_options",
            "stream_options needs stream: true",
        ));
    }
    let seed = match s.seed {
        Some(v) => v as u64,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b)
                .map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
            u64::from_le_bytes(b)
        }
    };
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k: model.top_k.unwrap_or(0),
        min_p: model.min_p.unwrap_or(0.0),
        repetition_penalty: model.repetition_penalty.unwrap_or(1.0),
        penalty_last_n: model.penalty_last_n,
        frequency_penalty,
        presence_penalty,
        seed,
    };
    Ok((sampling, stop, n))
}

/// Check the prompt and the token budget against the model's context.
fn budget(
    model: &ServedModel,
    prompt: &[u32],
    max: Option<u64>,
    param: &str,
    cap: usize,
) -> Result<usize, ApiError> {
    let ctx = model.context;
    if prompt.is_empty() {
        return Err(ApiError::bad(param, "the prompt is empty"));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::BadRequest {
            message: format!(
                "this model's context is {ctx} tokens and the prompt alone is {} tokens",
                prompt.len()
            ),
            param: Some(param.into()),
            code: "context_length_exceeded",
        });
    }
    let room = ctx - prompt.len();
    match max {
        None => Ok(room.min(cap)),
        Some(m) if m > cap as u64 => Err(ApiError::bad(
            "max_tokens",
            format!(
                "this server generates at most {cap} tokens per request; ask for at most {cap}"
            ),
        )),
        Some(0) => Err(ApiError::bad("max_tokens", "max_tokens must be at least 1")),
        Some(m) if m as usize > room || m > ctx as u64 => Err(ApiError::BadRequest {
            message: format!(
                "this model's context is {ctx} tokens: {} in the prompt plus max_tokens {m} do not fit; ask for at most {room}",
                prompt.len()
            ),
            param: Some("max_tokens".into()),
            code: "context_length_exceeded",
        }),
        Some(m) => Ok(m as usize),
    }
}

fn message_text(m: &ChatMessage, i: usize) -> Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::bad(
                            &format!("messages[{i}].content[{j}].text"),
                            "a content part of type `text` needs a `text` field",
                        ));
                    }
                    (kind, _) => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content"),
                            format!("content parts of type `{kind}` are not supported (text only)"),
                        ));
                    }
                }
            }
            Ok(out)
        }
    }
}

fn chat_plan(
    state: &AppState,
    model: Arc<ServedModel>,
    r: ChatCompletionRequest,
) -> Result<Plan, ApiError> {
    let (sampling, stop_strings, n) = common(&r.sampling, &model.sampling)?;
    if let Some(f) = &r.response_format
        && f.kind != "text"
    {
        return Err(ApiError::unsupported(
            "response_format",
            format!(
                "response_format `{}` needs constrained decoding, which this server does not do yet; only `text` is accepted",
                f.kind
            ),
        ));
    }
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported(
            "tools",
            "tool calling is not supported by this server",
        ));
    }
    let top = r.top_logprobs.unwrap_or(0);
    if top > 20 {
        return Err(ApiError::bad(
            "top_logprobs",
            "top_logprobs must be between 0 and 20",
        ));
    }
    if r.top_logprobs.is_some() && !r.logprobs {
        return Err(ApiError::bad(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    if r.messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "messages must hold at least one message",
        ));
    }
    let template = model.template.as_ref().ok_or_else(|| {
        ApiError::unsupported(
            "model",
            format!("{} ships no chat template: use /v1/completions", model.id),
        )
    })?;
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.iter().enumerate() {
        let role = m.role.template_name();
        messages.push(Message::new(role, &message_text(m, i)?));
    }
    let text = template.render(&messages, true).map_err(|e| {
        ApiError::bad(
            "messages",
            format!("the chat template refused these messages: {e}"),
        )
    })?;
    let prompt = model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?;
    let max = r.max_completion_tokens.or(r.max_tokens);
    let max_tokens = budget(&model, &prompt, max, "messages", state.config.max_tokens)?;
    let include_usage = r
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    Ok(Plan {
        model,
        prompt,
        max_tokens,
        sampling,
        stop_strings,
        n,
        logprobs: r.logprobs.then_some(top as usize),
        stream: r.sampling.stream,
        include_usage,
    })
}

fn completion_plan(
    state: &AppState,
    model: Arc<ServedModel>,
    r: &CompletionRequest,
) -> Result<Plan, ApiError> {
    let (sampling, stop_strings, n) = common(&r.sampling, &model.sampling)?;
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "suffix (insertion) is not supported",
        ));
    }
    if let Some(b) = r.best_of
        && b != n
    {
        return Err(ApiError::unsupported(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let top = r.logprobs.unwrap_or(0);
    if top > 5 {
        return Err(ApiError::bad(
            "logprobs",
            "logprobs must be between 0 and 5",
        ));
    }
    let prompt = match &r.prompt {
        Prompt::Text(t) => model.tokenizer.encode(t, true),
        Prompt::Texts(v) if v.len() == 1 => model.tokenizer.encode(&v[0], true),
        Prompt::Texts(_) => {
            return Err(ApiError::unsupported(
                "prompt",
                "give one prompt per request",
            ));
        }
        Prompt::Tokens(ids) => {
            let vocab = model.vocab;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                ));
            }
            Ok(ids.clone())
        }
    }
    .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?;
    let max_tokens = budget(
        &model,
        &prompt,
        // OpenAI's default of 16, within the server's cap.
        Some(
            r.max_tokens
                .unwrap_or(16.min(state.config.max_tokens as u64)),
        ),
        "prompt",
        state.config.max_tokens,
    )?;
    let include_usage = r
        .sampling
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    Ok(Plan {
        model,
        prompt,
        max_tokens,
        sampling,
        stop_strings,
        n,
        logprobs: r.logprobs.map(|k| k as usize),
        stream: r.sampling.stream,
        include_usage,
    })
}

/// Queue one engine request per choice.
fn launch(
    state: &AppState,
    p: &Plan,
    received: Instant,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::ShuttingDown);
    }
    let mut rxs = Vec::with_capacity(p.n as usize);
    for i in 0..p.n {
        let (tx, rx) = unbounded_channel();
        let mut sampling = p.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(u64::from(i));
        let req = GenRequest {
            prompt: p.prompt.clone(),
            options: GenerateOptions {
                max_new_tokens: p.max_tokens,
                sampling,
                stop_tokens: p.model.stop_tokens.clone(),
                stop_strings: p.stop_strings.clone(),
            },
            logprobs: p.logprobs,
            deadline: received + state.config.request_timeout,
            received,
            events: tx,
        };
        match p.model.engine.submit(req) {
            Ok(()) => rxs.push(rx),
            // Dropping the receivers already queued cancels those choices.
            Err(SubmitError::QueueFull) => {
                return Err(ApiError::Overloaded("the request queue is full", 1));
            }
            Err(SubmitError::Stopped) => return Err(ApiError::ShuttingDown),
        }
    }
    Ok(rxs)
}

/// One choice, gathered.
struct Gathered {
    text: String,
    tokens: Vec<crate::engine::TokenInfo>,
    finish: FinishReason,
    completion_tokens: usize,
    cached_tokens: usize,
}

/// Every choice's events, read as they come (the choices run side by side). The ticket's
/// completion count follows every delta, so a client that gives up on a non-streaming request
/// is billed what was generated until then (its row written as 499 when the handler is dropped,
/// which also drops the receivers and ends the generation).
async fn gather(
    rxs: Vec<UnboundedReceiver<Event>>,
    ticket: &mut Ticket,
) -> Result<Vec<Gathered>, ApiError> {
    let n = rxs.len();
    let mut merged = stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    );
    let mut text = vec![String::new(); n];
    let mut tokens: Vec<Vec<crate::engine::TokenInfo>> = (0..n).map(|_| Vec::new()).collect();
    let mut count = vec![0usize; n];
    let mut cached = vec![0usize; n];
    let mut finish: Vec<Option<FinishReason>> = vec![None; n];
    while finish.iter().any(Option::is_none) {
        let Some((i, e)) = merged.next().await else {
            return Err(ApiError::Internal("the engine stopped".into()));
        };
        match e {
            Event::Delta {
                text: t,
                tokens: k,
                sampled,
            } => {
                text[i].push_str(&t);
                tokens[i].extend(k);
                count[i] = sampled;
            }
            Event::Done {
                finish: f,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                finish[i] = Some(f);
                count[i] = completion_tokens;
                cached[i] = cached_tokens;
            }
            Event::Failed(f) => return Err(f.into()),
        }
        ticket.completion_tokens(count.iter().sum::<usize>() as u64);
    }
    if finish.contains(&Some(FinishReason::Timeout)) {
        return Err(ApiError::Timeout(
            "the request took longer than the server's request timeout".into(),
        ));
    }
    Ok((0..n)
        .map(|i| Gathered {
            text: std::mem::take(&mut text[i]),
            tokens: std::mem::take(&mut tokens[i]),
            finish: finish[i].unwrap_or(FinishReason::Stop),
            completion_tokens: count[i],
            cached_tokens: cached[i],
        })
        .collect())
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Usage {
    Usage {
        prompt_tokens: prompt as u64,
        completion_tokens: completion as u64,
        total_tokens: (prompt + completion) as u64,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached as u64,
        },
    }
}

fn chat_logprobs(tokens: &[crate::engine::TokenInfo]) -> ChoiceLogprobs {
    ChoiceLogprobs {
        content: tokens
            .iter()
            .map(|t| TokenLogprob {
                token: t.text.clone(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|a| TopLogprob {
                        token: a.text.clone(),
                        logprob: a.logprob,
                        bytes: a.bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn completion_logprobs(tokens: &[crate::engine::TokenInfo], offset: usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut at = offset;
    for t in tokens {
        lp.tokens.push(t.text.clone());
        lp.token_logprobs.push(t.logprob);
        // A map from token text, as OpenAI's legacy shape has it: pieces of characters are
        // spelled by their bytes (`token_text`), so distinct tokens keep distinct keys.
        lp.top_logprobs
            .push(t.top.iter().map(|a| (a.text.clone(), a.logprob)).collect());
        lp.text_offset.push(at);
        at += t.bytes.len();
    }
    lp
}

#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A completion, or with `stream: true` Server-Sent Events of `ChatCompletionChunk` ending in `data: [DONE]`", body = ChatCompletion),
        (status = 400, description = "Invalid parameters", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = crate::error::ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn chat_completions(
    State(state): State<AppState>,
    who: Caller,
    ids: crate::RequestIds,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let st = state.clone();
    // Templates and tokenization take CPU time in proportion to the prompt: off the async
    // threads, so a few huge prompts cannot stall every other connection.
    let model = model_for(&state, &who, &req.model).await?;
    let plan = blocking(move || chat_plan(&st, model, req)).await?;
    let (plan, done) =
        match run_plan(&state, &who, &ids, plan, StreamKind::Chat, None, received).await? {
            Ran::Streaming(r) => return Ok(r),
            Ran::Gathered(plan, done) => (plan, done),
        };
    Ok((
        done.limits,
        Json(ChatCompletion {
            id: done.id,
            object: "chat.completion",
            created: done.created,
            model: plan.model.id.clone(),
            system_fingerprint: fingerprint(),
            usage: done.usage,
            choices: done
                .choices
                .into_iter()
                .enumerate()
                .map(|(i, g)| ChatChoice {
                    index: i as u32,
                    logprobs: plan.logprobs.map(|_| chat_logprobs(&g.tokens)),
                    message: AssistantMessage {
                        role: "assistant",
                        content: g.text,
                    },
                    finish_reason: g.finish.as_str().to_string(),
                })
                .collect(),
        }),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/completions", tag = "inference",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or with `stream: true` Server-Sent Events of `Completion` chunks ending in `data: [DONE]`", body = Completion),
        (status = 400, description = "Invalid parameters", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = crate::error::ErrorBody),
        (status = 404, description = "Unknown model", body = crate::error::ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = crate::error::ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn completions(
    State(state): State<AppState>,
    who: Caller,
    ids: crate::RequestIds,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let st = state.clone();
    let model = model_for(&state, &who, &req.model).await?;
    let (plan, echo) = blocking(move || {
        let plan = completion_plan(&st, model, &req)?;
        // The prompt as it was sent: special tokens echo as their text.
        let echo = if req.echo {
            Some(
                plan.model
                    .tokenizer
                    .decode(&plan.prompt, false)
                    .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?,
            )
        } else {
            None
        };
        Ok((plan, echo))
    })
    .await?;
    let kind = StreamKind::Completion;
    let (plan, done) =
        match run_plan(&state, &who, &ids, plan, kind, echo.clone(), received).await? {
            Ran::Streaming(r) => return Ok(r),
            Ran::Gathered(plan, done) => (plan, done),
        };
    let prefix = echo.unwrap_or_default();
    Ok((
        done.limits,
        Json(Completion {
            id: done.id,
            object: "text_completion",
            created: done.created,
            model: plan.model.id.clone(),
            system_fingerprint: fingerprint(),
            usage: Some(done.usage),
            choices: done
                .choices
                .into_iter()
                .enumerate()
                .map(|(i, g)| CompletionChoice {
                    index: i as u32,
                    logprobs: plan
                        .logprobs
                        .map(|_| completion_logprobs(&g.tokens, prefix.len())),
                    text: format!("{prefix}{}", g.text),
                    finish_reason: Some(g.finish.as_str().to_string()),
                })
                .collect(),
        }),
    )
        .into_response())
}

/// What [`run_plan`] ends with: the streaming response, or every choice gathered.
enum Ran {
    Streaming(Response),
    Gathered(Plan, Done),
}

/// A finished non-streaming request.
struct Done {
    id: String,
    created: u64,
    choices: Vec<Gathered>,
    usage: Usage,
    /// The rate-limit headers.
    limits: axum::http::HeaderMap,
}

/// The part both endpoints share: open the usage ticket, queue one engine request per choice,
/// then stream the events or gather them. The ticket records the outcome on every path.
/// Run CPU-bound request work (templates, tokenization) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("request preparation failed: {e}")))?
}

async fn run_plan(
    state: &AppState,
    who: &Caller,
    ids: &crate::RequestIds,
    plan: Plan,
    kind: StreamKind,
    echo: Option<String>,
    received: Instant,
) -> Result<Ran, ApiError> {
    let (endpoint, id_prefix) = match kind {
        StreamKind::Chat => ("chat.completions", "chatcmpl"),
        StreamKind::Completion => ("completions", "cmpl"),
    };
    // Admitted under the project's rate limits and reserved before the model runs.
    let mut ticket = state
        .usage
        .open(
            &ids.server,
            ids.client.as_deref(),
            who,
            &plan.model.id,
            endpoint,
            plan.prompt.len() as u64,
            (plan.max_tokens as u64).saturating_mul(u64::from(plan.n)),
        )
        .await?;
    let limits = ticket.headers();
    let rxs = launch(state, &plan, received).inspect_err(|e| ticket.status(e.status().as_u16()))?;
    let (id, created) = (new_id(id_prefix), unix_now());
    if plan.stream {
        let mut r = stream_response(rxs, ticket, plan, kind, id, created, echo);
        r.headers_mut().extend(limits);
        return Ok(Ran::Streaming(r));
    }
    let choices = gather(rxs, &mut ticket)
        .await
        .inspect_err(|e| ticket.status(e.status().as_u16()))?;
    ticket.status(200);
    let completion = choices.iter().map(|g| g.completion_tokens).sum();
    let cached = choices.iter().map(|g| g.cached_tokens).min().unwrap_or(0);
    ticket.cached_tokens(cached as u64);
    // The row is written before the answer leaves.
    ticket.settle().await;
    let usage = usage(plan.prompt.len(), completion, cached);
    Ok(Ran::Gathered(
        plan,
        Done {
            id,
            created,
            choices,
            usage,
            limits,
        },
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    Chat,
    Completion,
}

/// The state a streaming response carries: the usage ticket is dropped (and its row written)
/// when the stream ends or the client goes away.
struct Streaming {
    /// Taken when the stream settles.
    ticket: Option<Ticket>,
    kind: StreamKind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
    sampled: Vec<usize>,
    /// Prompt tokens each choice took from the prefix cache.
    cached: Vec<usize>,
    open: usize,
    failed: bool,
    /// The status metered for a failed stream.
    fail_status: u16,
}

impl Streaming {
    fn chunk(
        &self,
        index: usize,
        text: Option<String>,
        role: bool,
        tokens: &[crate::engine::TokenInfo],
        finish: Option<&str>,
    ) -> SseEvent {
        let finish = finish.map(str::to_string);
        let json = match self.kind {
            StreamKind::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: fingerprint(),
                choices: vec![ChunkChoice {
                    index: index as u32,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: (self.logprobs && !tokens.is_empty()).then(|| chat_logprobs(tokens)),
                    finish_reason: finish,
                }],
                usage: self.include_usage.then_some(None),
            }),
            StreamKind::Completion => serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: fingerprint(),
                choices: vec![CompletionChoice {
                    index: index as u32,
                    text: text.unwrap_or_default(),
                    logprobs: (self.logprobs && !tokens.is_empty())
                        .then(|| completion_logprobs(tokens, 0)),
                    finish_reason: finish,
                }],
                usage: None,
            }),
        };
        SseEvent::default().data(json.unwrap_or_default())
    }

    fn ticket_mut(&mut self) -> &mut Ticket {
        self.ticket
            .as_mut()
            .expect("a stream's ticket is taken only when it ends")
    }

    /// Take one engine event into the stream's state, and its SSE events into `out`.
    fn event(&mut self, (i, e): (usize, Event), out: &mut Vec<SseEvent>) {
        match e {
            Event::Delta {
                text,
                tokens,
                sampled,
            } => {
                self.sampled[i] = sampled;
                let total = self.sampled.iter().sum::<usize>() as u64;
                self.ticket_mut().completion_tokens(total);
                out.push(self.chunk(i, Some(text), false, &tokens, None));
            }
            Event::Done {
                finish,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                self.sampled[i] = completion_tokens;
                self.cached[i] = cached_tokens;
                let total = self.sampled.iter().sum::<usize>() as u64;
                let cached = self.cached.iter().copied().min().unwrap_or(0) as u64;
                self.ticket_mut().completion_tokens(total);
                self.ticket_mut().cached_tokens(cached);
                self.open -= 1;
                if finish == FinishReason::Timeout {
                    self.failed = true;
                    self.fail_status = 504;
                }
                out.push(match self.kind {
                    StreamKind::Chat => self.chunk(i, None, false, &[], Some(finish.as_str())),
                    StreamKind::Completion => {
                        self.chunk(i, Some(String::new()), false, &[], Some(finish.as_str()))
                    }
                });
            }
            Event::Failed(f) => {
                self.failed = true;
                self.open -= 1;
                let e = ApiError::from(f);
                self.fail_status = e.status().as_u16();
                let body = e.body();
                out.push(
                    SseEvent::default().data(serde_json::to_string(&body).unwrap_or_default()),
                );
            }
        }
    }

    fn usage_chunk(&self) -> SseEvent {
        let cached = self.cached.iter().copied().min().unwrap_or(0);
        let u = usage(self.prompt_tokens, self.sampled.iter().sum(), cached);
        let json = match self.kind {
            StreamKind::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: fingerprint(),
                choices: Vec::new(),
                usage: Some(Some(u)),
            }),
            StreamKind::Completion => serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: fingerprint(),
                choices: Vec::new(),
                usage: Some(u),
            }),
        };
        SseEvent::default().data(json.unwrap_or_default())
    }
}

fn stream_response(
    rxs: Vec<UnboundedReceiver<Event>>,
    ticket: Ticket,
    plan: Plan,
    kind: StreamKind,
    id: String,
    created: u64,
    echo: Option<String>,
) -> Response {
    let n = rxs.len();
    let merged: BoxStream<'static, (usize, Event)> = stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    )
    .boxed();
    let st = Streaming {
        ticket: Some(ticket),
        kind,
        id,
        created,
        model: plan.model.id.clone(),
        logprobs: plan.logprobs.is_some(),
        include_usage: plan.include_usage,
        prompt_tokens: plan.prompt.len(),
        sampled: vec![0; n],
        cached: vec![0; n],
        open: n,
        failed: false,
        fail_status: 500,
    };
    // Opening chunks: the assistant role (chat) or the echoed prompt (completions).
    let mut first = Vec::new();
    for i in 0..n {
        match kind {
            StreamKind::Chat => first.push(st.chunk(i, Some(String::new()), true, &[], None)),
            StreamKind::Completion => {
                if let Some(e) = &echo {
                    first.push(st.chunk(i, Some(e.clone()), false, &[], None));
                }
            }
        }
    }
    let body = stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>)).chain(
        stream::unfold((merged, Some(st)), |(mut merged, st)| async move {
            let mut st = st?;
            // The events ready now go out together, after one record of their tokens.
            let mut out = Vec::new();
            match merged.next().await {
                Some(first) => {
                    st.event(first, &mut out);
                    while st.open > 0
                        && out.len() < 64
                        && let Some(Some(e)) = merged.next().now_or_never()
                    {
                        st.event(e, &mut out);
                    }
                }
                None => {
                    st.failed = true;
                    st.open = 0;
                }
            }
            // Billed before sent: if this replica dies now, the reservation holds these.
            st.ticket_mut().checkpoint().await;
            if st.open > 0 {
                return Some((out, (merged, Some(st))));
            }
            // Every choice finished: usage (when asked), then [DONE], once the usage row is
            // written.
            if st.include_usage && !st.failed {
                out.push(st.usage_chunk());
            }
            out.push(SseEvent::default().data("[DONE]"));
            let status = if st.failed { st.fail_status } else { 200 };
            if let Some(mut t) = st.ticket.take() {
                t.status(status);
                t.settle().await;
            }
            Some((out, (merged, None)))
        })
        .flat_map(|evs| stream::iter(evs.into_iter().map(Ok))),
    );
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_model::sampling::SamplingDefaults;

    /// Issue 13: a request's omitted sampling fields take the model's settings, else OpenAI's;
    /// fields it sends win.
    #[test]
    fn omitted_sampling_fields_take_the_models_settings() {
        let model = SamplingDefaults {
            temperature: Some(0.3),
            top_k: Some(20),
            top_p: Some(0.9),
            repetition_penalty: Some(1.05),
            ..SamplingDefaults::default()
        };
        let (p, _, _) = common(&Sampling::default(), &model).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.3, 20, 0.9));
        assert_eq!(p.repetition_penalty, 1.05);
        let (p, _, _) = common(&Sampling::default(), &SamplingDefaults::default()).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (1.0, 0, 1.0));
        let sent = Sampling {
            temperature: Some(0.0),
            ..Sampling::default()
        };
        let (p, _, _) = common(&sent, &model).unwrap();
        assert_eq!(p.temperature, 0.0);
    }
}
