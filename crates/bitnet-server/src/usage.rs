//! Usage metering and rate limits: every request that reaches a model is admitted under its
//! project's limits, reserved in the database, and settled into exactly one usage row.
//!
//! [`UsageLog::open`] admits a request (or refuses it with a 429 and OpenAI's headers) and
//! reserves it; the [`Ticket`] it returns is filled in as tokens come back. A streaming
//! response records its tokens with [`Ticket::checkpoint`] before it sends them, and every
//! response settles with [`Ticket::settle`] before its last byte leaves; a ticket dropped on any
//! other path (the client went away, an error) is settled by a writer task that retries until
//! the database takes it. A replica that dies leaves reservations that stop being kept alive:
//! any replica settles them, with the tokens they hold (see `bitnet_platform::usage`).
//!
//! The ticket also carries the request's `generation` span (a child of the request span), so
//! a trace shows the whole generation, streamed or not, with its token counts and outcome.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::limits::{Kind, Limit, Limiter, Seen, Verdict, reset_text};
use crate::metrics::Metrics;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bitnet_platform::Store;
use bitnet_platform::ratelimits::limit_model;
use bitnet_platform::usage::UsageRow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// How reservations are kept.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// This replica's name in its reservations.
    pub replica: String,
    /// Seconds a reservation outlives its replica's last sign of life.
    pub ttl: Duration,
}

impl Default for MeterConfig {
    fn default() -> Self {
        Self {
            replica: default_replica(),
            ttl: Duration::from_secs(15),
        }
    }
}

/// `HOST-PID-RANDOM`: unique among replicas, and readable in the database.
pub fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        u32::from_le_bytes(r)
    )
}

/// A finished request to settle: its row, and its token entry in the rate-limit window.
#[derive(Debug)]
struct Settle {
    row: UsageRow,
    tokens_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UsageLog {
    tx: UnboundedSender<Settle>,
    store: Store,
    limiter: Arc<Limiter>,
    cfg: Arc<MeterConfig>,
    metrics: Arc<Metrics>,
}

impl UsageLog {
    /// Start the writer and the keeper of this replica's reservations (which also settles
    /// dead replicas' expired ones); the returned task ends once every `UsageLog` and ticket
    /// is dropped and the queue is written.
    pub fn start(
        store: Store,
        limiter: Limiter,
        cfg: MeterConfig,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = unbounded_channel();
        let limiter = Arc::new(limiter);
        let cfg = Arc::new(cfg);
        let writer = tokio::spawn(writer(store.clone(), limiter.clone(), rx));
        tokio::spawn(keeper(store.clone(), cfg.clone(), tx.downgrade()));
        (
            Self {
                tx,
                store,
                limiter,
                cfg,
                metrics,
            },
            writer,
        )
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Admit a request under its project's limits on `model` and reserve it. `max_tokens` is
    /// the most completion tokens it may produce (over all its choices).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        &self,
        request_id: &str,
        client_request_id: Option<&str>,
        who: &Caller,
        model: &str,
        endpoint: &'static str,
        prompt_tokens: u64,
        max_tokens: u64,
    ) -> Result<Ticket, ApiError> {
        let project = who.cred.project_id.clone();
        let mut limits = Vec::new();
        if let Some(p) = &project
            && let Some(rl) = self.store.rate_limit_for(p, model).await?
        {
            let base = format!("bitnet:rl:{p}:{}", limit_model(model));
            if let Some(max) = rl.max_requests_per_1_minute {
                limits.push(Limit {
                    key: format!("{base}:requests"),
                    kind: Kind::Requests,
                    max: max as u64,
                    cost: 1,
                });
            }
            if let Some(max) = rl.max_tokens_per_1_minute {
                limits.push(Limit {
                    key: format!("{base}:tokens"),
                    kind: Kind::Tokens,
                    max: max as u64,
                    cost: prompt_tokens + max_tokens,
                });
            }
        }
        let mut seen = Vec::new();
        let mut tokens_key = None;
        if !limits.is_empty() {
            match self.limiter.admit(request_id, &limits).await {
                Ok(v) if v.admitted => {
                    tokens_key = limits
                        .iter()
                        .find(|l| l.kind == Kind::Tokens)
                        .map(|l| l.key.clone());
                    seen = v.seen;
                }
                Ok(v) => {
                    let reason = match v.refused_by().map(|s| s.kind) {
                        Some(Kind::Tokens) => "rate_limit_tokens",
                        _ => "rate_limit_requests",
                    };
                    self.metrics.refused(&org_of(who), model, reason);
                    return Err(refusal(model, who, &v));
                }
                // Counting is down: serve rather than refuse everyone (logged).
                Err(e) => tracing::error!(error = %e, "rate limits cannot be checked; admitting"),
            }
        }
        let span = tracing::info_span!(
            "generation",
            otel.name = %format_args!("generate {model}"),
            model,
            endpoint,
            prompt_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            status = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let row = UsageRow {
            request_id: request_id.to_string(),
            client_request_id: client_request_id.map(str::to_string),
            organization_id: who.cred.organization_id.clone().unwrap_or_default(),
            project_id: project,
            key_id: Some(who.cred.key_id.clone()),
            user_id: who.cred.user_id.clone(),
            service_account_id: who.cred.service_account_id.clone(),
            model: model.to_string(),
            endpoint: endpoint.to_string(),
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            max_tokens,
            latency_ms: 0,
            // Until told otherwise: the client went away (nginx's 499).
            status: 499,
            created_at: bitnet_platform::ids::now(),
        };
        if let Err(e) = self
            .store
            .reserve(&row, &self.cfg.replica, self.cfg.ttl.as_secs() as i64)
            .await
        {
            // Not reserved, not run: the windows get their room back.
            if !seen.is_empty() {
                for l in &limits {
                    let _ = self.limiter.settle(&l.key, request_id, 0).await;
                }
            }
            if matches!(e, bitnet_platform::PlatformError::Quota(_)) {
                self.metrics
                    .refused(&row.organization_id, model, "insufficient_quota");
            }
            return Err(e.into());
        }
        self.metrics
            .reserved(&row.organization_id, model, prompt_tokens + max_tokens);
        Ok(Ticket {
            metrics: self.metrics.clone(),
            log: self.tx.clone(),
            store: self.store.clone(),
            limiter: self.limiter.clone(),
            started: Instant::now(),
            span,
            row: Some(row),
            tokens_key,
            seen,
            recorded: (0, 0),
        })
    }
}

fn org_of(who: &Caller) -> String {
    who.cred.organization_id.clone().unwrap_or_default()
}

/// The 429 for a refused request: OpenAI's message, type (`requests` / `tokens`) and headers.
fn refusal(model: &str, who: &Caller, v: &Verdict) -> ApiError {
    let by = v.refused_by().or(v.seen.first());
    let (kind, message) = match by {
        Some(s) => (
            s.kind.as_str(),
            format!(
                "Rate limit reached for {model} in project {} on {} per min: Limit {}, Remaining {}. Please try again in {}.",
                who.cred.project_id.as_deref().unwrap_or("-"),
                s.kind.as_str(),
                s.limit,
                s.remaining,
                reset_text(s.reset),
            ),
        ),
        None => ("requests", format!("Rate limit reached for {model}")),
    };
    ApiError::RateLimited {
        message,
        kind,
        code: "rate_limit_exceeded",
        retry_after: by.map_or(1, |s| s.reset.as_secs_f64().ceil().max(1.0) as u64),
        headers: Box::new(headers(&v.seen)),
    }
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
pub fn headers(seen: &[Seen]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for s in seen {
        let k = s.kind.as_str();
        for (name, value) in [
            (format!("x-ratelimit-limit-{k}"), s.limit.to_string()),
            (
                format!("x-ratelimit-remaining-{k}"),
                s.remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{k}"), reset_text(s.reset)),
        ] {
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                h.insert(n, v);
            }
        }
    }
    h
}

async fn settle_one(store: &Store, limiter: &Limiter, s: &Settle) -> bitnet_platform::Result<()> {
    store.settle(std::slice::from_ref(&s.row)).await?;
    if let Some(k) = &s.tokens_key
        && let Err(e) = limiter
            .settle(
                k,
                &s.row.request_id,
                s.row.prompt_tokens + s.row.completion_tokens,
            )
            .await
    {
        tracing::warn!(error = %e, "a request's tokens could not be settled in the rate limit window");
    }
    Ok(())
}

async fn writer(store: Store, limiter: Arc<Limiter>, mut rx: UnboundedReceiver<Settle>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        // Retried until the database takes it: a row is never dropped while this process
        // lives (and if it dies, the reservation is settled by another replica).
        let rows: Vec<UsageRow> = batch.iter().map(|s| s.row.clone()).collect();
        let mut tries = 0u32;
        while let Err(e) = store.settle(&rows).await {
            tries += 1;
            tracing::error!(error = %e, rows = rows.len(), tries, "usage rows could not be written; retrying");
            tokio::time::sleep(Duration::from_millis(100 * u64::from(tries.min(50)))).await;
        }
        for s in &batch {
            if let Some(k) = &s.tokens_key {
                let used = s.row.prompt_tokens + s.row.completion_tokens;
                if let Err(e) = limiter.settle(k, &s.row.request_id, used).await {
                    tracing::warn!(error = %e, "a request's tokens could not be settled in the rate limit window");
                }
            }
        }
        batch.clear();
    }
}

/// Keep this replica's reservations alive and settle those of dead replicas, until the
/// writer's queue closes.
async fn keeper(
    store: Store,
    cfg: Arc<MeterConfig>,
    alive: tokio::sync::mpsc::WeakUnboundedSender<Settle>,
) {
    let ttl = cfg.ttl.as_secs().max(1) as i64;
    let mut every = tokio::time::interval((cfg.ttl / 4).max(Duration::from_millis(250)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if alive.upgrade().is_none() {
            return;
        }
        if let Err(e) = store.keep_reservations(&cfg.replica, ttl).await {
            tracing::warn!(error = %e, "cannot keep this replica's reservations alive");
        }
        loop {
            match store.settle_expired(100).await {
                Ok(0) => break,
                Ok(n) => tracing::warn!(
                    requests = n,
                    "settled the reservations of a replica that stopped"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot settle expired reservations");
                    break;
                }
            }
        }
    }
}

/// One request's reservation, settled into its usage row by [`Ticket::settle`] or when
/// dropped.
#[derive(Debug)]
pub struct Ticket {
    metrics: Arc<Metrics>,
    log: UnboundedSender<Settle>,
    store: Store,
    limiter: Arc<Limiter>,
    started: Instant,
    span: tracing::Span,
    row: Option<UsageRow>,
    tokens_key: Option<String>,
    seen: Vec<Seen>,
    /// (completion, cached) tokens last recorded in the reservation.
    recorded: (u64, u64),
}

impl Ticket {
    /// The rate-limit headers of the response.
    pub fn headers(&self) -> HeaderMap {
        headers(&self.seen)
    }

    pub fn completion_tokens(&mut self, n: u64) {
        if let Some(r) = &mut self.row {
            r.completion_tokens = n;
        }
    }

    pub fn cached_tokens(&mut self, n: u64) {
        if let Some(r) = &mut self.row {
            r.cached_tokens = n;
        }
    }

    pub fn status(&mut self, status: u16) {
        if let Some(r) = &mut self.row {
            r.status = status;
        }
    }

    /// Record the tokens produced so far in the reservation, before they are sent: if this
    /// replica dies, that is what the request is billed. A failed write is logged and the
    /// stream goes on (the settle still has the count).
    pub async fn checkpoint(&mut self) {
        let Some(r) = &self.row else { return };
        let now = (r.completion_tokens, r.cached_tokens);
        if now == self.recorded {
            return;
        }
        match self.store.checkpoint(&r.request_id, now.0, now.1).await {
            Ok(()) => self.recorded = now,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a stream's tokens in its reservation")
            }
        }
    }

    /// Settle now (the response's last byte waits for it); on failure the writer retries.
    pub async fn settle(mut self) {
        let Some(s) = self.finish() else { return };
        if let Err(e) = settle_one(&self.store, &self.limiter, &s).await {
            tracing::warn!(error = %e, "a usage row could not be written; queued");
            let _ = self.log.send(s);
        }
    }

    /// Take the row out, with its latency, and log the request line.
    fn finish(&mut self) -> Option<Settle> {
        let mut r = self.row.take()?;
        r.latency_ms = self.started.elapsed().as_millis() as u64;
        self.span.record("prompt_tokens", r.prompt_tokens as i64);
        self.span
            .record("completion_tokens", r.completion_tokens as i64);
        self.span.record("status", i64::from(r.status));
        if r.status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics.settled(
            &r.organization_id,
            &r.model,
            r.prompt_tokens,
            r.cached_tokens,
            r.completion_tokens,
        );
        // One line per request that reached a model.
        tracing::info!(
            request_id = %r.request_id,
            endpoint = %r.endpoint,
            model = %r.model,
            status = r.status,
            prompt_tokens = r.prompt_tokens,
            completion_tokens = r.completion_tokens,
            latency_ms = r.latency_ms,
            "request"
        );
        Some(Settle {
            row: r,
            tokens_key: self.tokens_key.take(),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(s) = self.finish() {
            let _ = self.log.send(s);
        }
    }
}
