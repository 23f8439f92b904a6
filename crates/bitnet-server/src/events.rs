//! Publishing the outbox (`bitnet_platform::events`) to a sink: NATS JetStream, where each
//! event goes to the subject `bitnet.events.TYPE` of the stream `BITNET_EVENTS` with its id as
//! `Nats-Msg-Id`, so JetStream drops a duplicate within its window and consumers dedupe on
//! the id past it. A batch is marked published only once every message in it is acknowledged
//! by the stream; a publisher that dies before that leaves the batch to the next one.

use bitnet_platform::Store;
use bitnet_platform::events::Event;
use std::time::Duration;

/// The JetStream stream events are kept in, and their subjects' prefix.
pub const STREAM: &str = "BITNET_EVENTS";
pub const SUBJECT_PREFIX: &str = "bitnet.events";

/// Where events go.
#[derive(Debug, Clone)]
pub enum Sink {
    Nats(async_nats::jetstream::Context),
}

impl Sink {
    /// Connect to NATS at `url` (`nats://HOST:PORT`) and make sure the stream exists.
    pub async fn nats(url: &str) -> Result<Self, String> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| format!("cannot reach NATS at {url}: {e}"))?;
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            duplicate_window: Duration::from_secs(600),
            // Consumers have a week to catch up; the stream does not grow without bound.
            max_age: Duration::from_secs(7 * 86_400),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("NATS JetStream stream {STREAM}: {e}"))?;
        Ok(Self::Nats(js))
    }

    /// Hand a batch over; `Ok` once the sink has every event. Returns how many it already
    /// had (duplicates of a batch sent before).
    pub async fn publish(&self, batch: &[Event]) -> Result<usize, String> {
        match self {
            Self::Nats(js) => {
                // Send them all, then wait for the acknowledgements.
                let mut acks = Vec::with_capacity(batch.len());
                for e in batch {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", e.id.as_str());
                    let body = serde_json::to_vec(e).map_err(|e| e.to_string())?;
                    let subject = format!("{SUBJECT_PREFIX}.{}", e.kind);
                    acks.push(
                        js.publish_with_headers(subject, h, body.into())
                            .await
                            .map_err(|e| format!("NATS publish: {e}"))?,
                    );
                }
                let mut dup = 0;
                for a in acks {
                    let ack = a.await.map_err(|e| format!("NATS acknowledgement: {e}"))?;
                    dup += usize::from(ack.duplicate);
                }
                Ok(dup)
            }
        }
    }
}

/// Publish the outbox until `stop`: a batch at a time, looking again at once while there is
/// more, else every `idle`. Published events are forgotten after a week.
pub async fn publisher(
    store: Store,
    sink: Sink,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Tests hold a published batch here before it is marked, to kill the publisher in between.
    let pause = std::env::var("BITNET_TEST_EVENTS_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let mut pruned = tokio::time::Instant::now();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let sent = store
            .publish_events(100, |batch| {
                let sink = sink.clone();
                async move {
                    let dup = sink.publish(&batch).await?;
                    if dup > 0 {
                        tracing::info!(
                            duplicates = dup,
                            events = batch.len(),
                            "the sink had some of these events already"
                        );
                    }
                    if let Some(p) = pause {
                        tracing::info!(
                            events = batch.len(),
                            "published; pausing before marking (test hook)"
                        );
                        tokio::time::sleep(p).await;
                    }
                    Ok(())
                }
            })
            .await;
        let wait = match sent {
            Ok(0) => {
                failures = 0;
                idle
            }
            Ok(n) => {
                failures = 0;
                metrics.events_published(n);
                tracing::debug!(events = n, "events published");
                Duration::ZERO
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "events could not be published; retrying");
                Duration::from_millis(200 * u64::from(failures.min(25)))
            }
        };
        if pruned.elapsed() > Duration::from_secs(3600) {
            pruned = tokio::time::Instant::now();
            if let Err(e) = store.prune_events(7 * 86_400).await {
                tracing::warn!(error = %e, "cannot prune published events");
            }
        }
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }
}
