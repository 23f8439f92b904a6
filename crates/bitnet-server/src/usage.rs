//! Usage metering: every request that reached a model writes exactly one row.
//!
//! A handler opens a [`Ticket`] once it knows the caller and the model; the ticket is filled in
//! as tokens come back and sends its row when dropped — whether the request finished, failed,
//! timed out or its client vanished mid-stream — so no path can skip the row or write it twice.
//! A single writer task stores rows in batches and drains what is queued before shutdown.
//!
//! The ticket also carries the request's `generation` span (a child of the request span), so
//! a trace shows the whole generation, streamed or not, with its token counts and outcome.

use crate::auth::Caller;
use bitnet_platform::Store;
use bitnet_platform::usage::UsageRow;
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

#[derive(Debug, Clone)]
pub struct UsageLog {
    tx: UnboundedSender<UsageRow>,
}

impl UsageLog {
    /// Start the writer; the returned task ends once every `UsageLog` and ticket is dropped and
    /// the queue is written.
    pub fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = unbounded_channel();
        (Self { tx }, tokio::spawn(writer(store, rx)))
    }

    pub fn ticket(
        &self,
        request_id: &str,
        client_request_id: Option<&str>,
        who: &Caller,
        model: &str,
        endpoint: &'static str,
    ) -> Ticket {
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
        Ticket {
            log: self.tx.clone(),
            started: Instant::now(),
            span,
            row: Some(UsageRow {
                request_id: request_id.to_string(),
                client_request_id: client_request_id.map(str::to_string),
                organization_id: who.cred.organization_id.clone().unwrap_or_default(),
                project_id: who.cred.project_id.clone(),
                key_id: Some(who.cred.key_id.clone()),
                user_id: who.cred.user_id.clone(),
                service_account_id: who.cred.service_account_id.clone(),
                model: model.to_string(),
                endpoint,
                prompt_tokens: 0,
                completion_tokens: 0,
                latency_ms: 0,
                // Until told otherwise: the client went away (nginx's 499).
                status: 499,
            }),
        }
    }
}

async fn writer(store: Store, mut rx: UnboundedReceiver<UsageRow>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        // A failed write is retried a few times, then logged with the rows it lost.
        let mut tries = 0;
        while let Err(e) = store.record_usage(&batch).await {
            tries += 1;
            if tries == 5 {
                tracing::error!(error = %e, rows = batch.len(), "usage rows could not be written");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
        }
        batch.clear();
    }
}

/// One request's usage row, written when the ticket is dropped.
#[derive(Debug)]
pub struct Ticket {
    log: UnboundedSender<UsageRow>,
    started: Instant,
    span: tracing::Span,
    row: Option<UsageRow>,
}

impl Ticket {
    pub fn prompt_tokens(&mut self, n: u64) {
        if let Some(r) = &mut self.row {
            r.prompt_tokens = n;
        }
    }

    pub fn completion_tokens(&mut self, n: u64) {
        if let Some(r) = &mut self.row {
            r.completion_tokens = n;
        }
    }

    pub fn status(&mut self, status: u16) {
        if let Some(r) = &mut self.row {
            r.status = status;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(mut r) = self.row.take() {
            r.latency_ms = self.started.elapsed().as_millis() as u64;
            self.span.record("prompt_tokens", r.prompt_tokens as i64);
            self.span
                .record("completion_tokens", r.completion_tokens as i64);
            self.span.record("status", i64::from(r.status));
            if r.status >= 500 {
                self.span.record("otel.status_code", "ERROR");
            }
            // One line per request that reached a model.
            tracing::info!(
                request_id = %r.request_id,
                endpoint = r.endpoint,
                model = %r.model,
                status = r.status,
                prompt_tokens = r.prompt_tokens,
                completion_tokens = r.completion_tokens,
                latency_ms = r.latency_ms,
                "request"
            );
            let _ = self.log.send(r);
        }
    }
}
