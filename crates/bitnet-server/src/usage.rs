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
use bitnet_platform::usage::{MeterOp, UsageRow};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

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

/// A metering step for the writer: the operation, who waits for its result, and (for a
/// settle) the request's token entry in the rate-limit window.
#[derive(Debug)]
struct Job {
    op: MeterOp,
    done: Option<oneshot::Sender<bitnet_platform::Result<()>>>,
    /// The token windows the request was logged under.
    tokens_key: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UsageLog {
    tx: UnboundedSender<Job>,
    store: Store,
    limiter: Arc<Limiter>,
    cfg: Arc<MeterConfig>,
    metrics: Arc<Metrics>,
}

/// Queue `op` for the writer and wait until it is committed (with every other operation of
/// its batch).
async fn committed(tx: &UnboundedSender<Job>, op: MeterOp) -> bitnet_platform::Result<()> {
    let (done, rx) = oneshot::channel();
    tx.send(Job {
        op,
        done: Some(done),
        tokens_key: Vec::new(),
    })
    .map_err(|_| bitnet_platform::PlatformError::Storage("metering has stopped".into()))?;
    rx.await
        .map_err(|_| bitnet_platform::PlatformError::Storage("metering has stopped".into()))?
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
        if let Some(p) = &project {
            let (on_model, on_key) = self.store.limits_for(p, &who.cred.key_id, model).await?;
            let scopes = [
                on_model.map(|l| {
                    (
                        format!("bitnet:rl:{p}:{}", limit_model(model)),
                        l.max_requests_per_1_minute,
                        l.max_tokens_per_1_minute,
                    )
                }),
                on_key.map(|l| {
                    (
                        format!("bitnet:rl:key:{}", who.cred.key_id),
                        l.max_requests_per_1_minute,
                        l.max_tokens_per_1_minute,
                    )
                }),
            ];
            for (base, rpm, tpm) in scopes.into_iter().flatten() {
                if let Some(max) = rpm {
                    limits.push(Limit {
                        key: format!("{base}:requests"),
                        kind: Kind::Requests,
                        max: max as u64,
                        cost: 1,
                    });
                }
                if let Some(max) = tpm {
                    limits.push(Limit {
                        key: format!("{base}:tokens"),
                        kind: Kind::Tokens,
                        max: max as u64,
                        cost: prompt_tokens + max_tokens,
                    });
                }
            }
        }
        let mut seen = Vec::new();
        let mut tokens_key: Vec<String> = Vec::new();
        if !limits.is_empty() {
            match self.limiter.admit(request_id, &limits).await {
                Ok(v) if v.admitted => {
                    tokens_key = limits
                        .iter()
                        .filter(|l| l.kind == Kind::Tokens)
                        .map(|l| l.key.clone())
                        .collect();
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
        let reserve = MeterOp::Reserve {
            row: row.clone(),
            replica: self.cfg.replica.clone(),
            ttl: self.cfg.ttl.as_secs() as i64,
        };
        if let Err(e) = committed(&self.tx, reserve).await {
            // Not reserved, not run: the windows get their room back.
            if !seen.is_empty() {
                for l in &limits {
                    if let Err(e) = self.limiter.settle(&l.key, request_id, 0).await {
                        tracing::warn!(error = %e, "a refused request's room could not be given back to its rate limit window");
                    }
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

/// Apply the queued metering operations a batch at a time, one transaction each. A batch that
/// fails as a whole fails its reservations and checkpoints (their requests answer 503 or go on
/// unrecorded) and retries its settles until the database takes them: a row is never dropped
/// while this process lives (and if it dies, the reservation is settled by another replica).
async fn writer(store: Store, limiter: Arc<Limiter>, mut rx: UnboundedReceiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    let mut retry: Vec<Job> = Vec::new();
    let mut tries = 0u32;
    loop {
        if retry.is_empty() {
            if rx.recv_many(&mut batch, 512).await == 0 {
                return;
            }
        } else {
            batch.append(&mut retry);
            while let Ok(j) = rx.try_recv() {
                batch.push(j);
            }
        }
        let ops: Vec<MeterOp> = batch.iter().map(|j| j.op.clone()).collect();
        match store.meter(&ops).await {
            Ok(results) => {
                tries = 0;
                // The rate-limit windows learn what the settled requests used, beside the
                // next batch.
                let mut used = Vec::new();
                for (job, r) in batch.drain(..).zip(results) {
                    if let MeterOp::Settle(row) = &job.op {
                        for k in job.tokens_key {
                            let n = row.prompt_tokens + row.completion_tokens;
                            used.push((k, row.request_id.clone(), n));
                        }
                    }
                    if let Some(d) = job.done {
                        let _ = d.send(r);
                    }
                }
                if !used.is_empty() {
                    let limiter = limiter.clone();
                    tokio::spawn(async move {
                        for (k, id, n) in used {
                            if let Err(e) = limiter.settle(&k, &id, n).await {
                                tracing::warn!(error = %e, "a request's tokens could not be settled in the rate limit window");
                            }
                        }
                    });
                }
            }
            Err(e) => {
                tries += 1;
                tracing::error!(error = %e, operations = batch.len(), tries, "metering could not be written; settles are retried");
                for job in batch.drain(..) {
                    if matches!(job.op, MeterOp::Settle(_)) {
                        retry.push(job);
                    } else if let Some(d) = job.done {
                        let _ = d.send(Err(bitnet_platform::PlatformError::Storage(format!(
                            "metering: {e}"
                        ))));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(tries.min(50)))).await;
            }
        }
    }
}

/// Keep this replica's reservations alive and settle those of dead replicas, until the
/// writer's queue closes.
async fn keeper(
    store: Store,
    cfg: Arc<MeterConfig>,
    alive: tokio::sync::mpsc::WeakUnboundedSender<Job>,
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
    log: UnboundedSender<Job>,
    started: Instant,
    span: tracing::Span,
    row: Option<UsageRow>,
    tokens_key: Vec<String>,
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
        let op = MeterOp::Checkpoint {
            request_id: r.request_id.clone(),
            completion: now.0,
            cached: now.1,
        };
        match committed(&self.log, op).await {
            Ok(()) => self.recorded = now,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record a stream's tokens in its reservation")
            }
        }
    }

    /// Settle now: the response's last byte waits until the row is committed (or a minute,
    /// while the database is down: the writer keeps the row and retries).
    pub async fn settle(mut self) {
        let Some(mut job) = self.finish() else { return };
        let (done, rx) = oneshot::channel();
        job.done = Some(done);
        if self.log.send(job).is_ok()
            && tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .is_err()
        {
            tracing::warn!(
                "a usage row is not written yet; the response goes on, the row will follow"
            );
        }
    }

    /// Take the row out, with its latency, and log the request line.
    fn finish(&mut self) -> Option<Job> {
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
        Some(Job {
            op: MeterOp::Settle(r),
            done: None,
            tokens_key: std::mem::take(&mut self.tokens_key),
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
