//! Publishing the outbox (`bitnet_platform::events`) to a sink, behind [`EventSink`]:
//!
//! - NATS JetStream (`nats://HOST:PORT`): each event goes to the subject `bitnet.events.TYPE` of
//!   the stream `BITNET_EVENTS` with its id as `Nats-Msg-Id`, so JetStream drops a duplicate
//!   within its window and consumers dedupe on the id past it.
//! - Kafka (`kafka://HOST:PORT[,HOST:PORT...][/TOPIC]`, topic `bitnet.events` by default, made
//!   with one partition if missing): each event is a record keyed by its organization (one
//!   organization's events stay in order on one partition) with the JSON event as value and
//!   headers `event-id` and `event-type`; consumers dedupe on `event-id`. Through `rskafka`, a
//!   pure-Rust client (no librdkafka to build).
//!
//! A batch is marked published only once the sink acknowledges every event in it (JetStream's
//! acks; Kafka's produce response, every record written to its partition leader); a publisher
//! that dies before that leaves the batch to the next one, which sends it again under the same
//! ids.

use bitnet_platform::Store;
use bitnet_platform::events::Event;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The JetStream stream events are kept in, and their subjects' prefix.
pub const STREAM: &str = "BITNET_EVENTS";
pub const SUBJECT_PREFIX: &str = "bitnet.events";
/// The Kafka topic events go to unless the URL names one.
pub const KAFKA_TOPIC: &str = "bitnet.events";

type Publish<'a> = Pin<Box<dyn Future<Output = Result<usize, String>> + Send + 'a>>;

/// Where events go.
pub trait EventSink: Send + Sync {
    /// Where, for logs: `NATS JetStream stream BITNET_EVENTS`, `Kafka topic bitnet.events`.
    fn describe(&self) -> String;
    /// Hand a batch over; `Ok` once the sink holds every event. Returns how many it already
    /// had (duplicates of a batch sent before), where the sink can tell.
    fn publish<'a>(&'a self, batch: &'a [Event]) -> Publish<'a>;
}

/// The sink a URL names: `nats://...` or `kafka://...`.
pub async fn connect(url: &str) -> Result<Arc<dyn EventSink>, String> {
    if url.starts_with("nats://") {
        Ok(Arc::new(Nats::connect(url).await?))
    } else if url.starts_with("kafka://") {
        Ok(Arc::new(Kafka::connect(url).await?))
    } else {
        Err(format!(
            "{url:?} is not an event sink: expected nats://HOST:PORT or kafka://HOST:PORT[/TOPIC]"
        ))
    }
}

/// NATS JetStream.
#[derive(Debug, Clone)]
pub struct Nats(async_nats::jetstream::Context);

impl Nats {
    /// Connect to NATS at `url` (`nats://HOST:PORT`) and make sure the stream exists.
    pub async fn connect(url: &str) -> Result<Self, String> {
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
        Ok(Self(js))
    }
}

impl EventSink for Nats {
    fn describe(&self) -> String {
        format!("NATS JetStream stream {STREAM}")
    }

    fn publish<'a>(&'a self, batch: &'a [Event]) -> Publish<'a> {
        Box::pin(async move {
            // Send them all, then wait for the acknowledgements.
            let mut acks = Vec::with_capacity(batch.len());
            for e in batch {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", e.id.as_str());
                let body = serde_json::to_vec(e).map_err(|e| e.to_string())?;
                let subject = format!("{SUBJECT_PREFIX}.{}", e.kind);
                acks.push(
                    self.0
                        .publish_with_headers(subject, h, body.into())
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
        })
    }
}

/// Kafka, one client per partition of the topic.
pub struct Kafka {
    topic: String,
    partitions: Vec<rskafka::client::partition::PartitionClient>,
}

/// (brokers, topic) of `kafka://HOST:PORT[,HOST:PORT...][/TOPIC]`.
pub fn parse_kafka_url(url: &str) -> Result<(Vec<String>, String), String> {
    let rest = url
        .strip_prefix("kafka://")
        .ok_or_else(|| format!("{url:?} is not a kafka:// URL"))?;
    let (hosts, topic) = rest.split_once('/').unwrap_or((rest, ""));
    let brokers: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                h.to_string()
            } else {
                format!("{h}:9092")
            }
        })
        .collect();
    if brokers.is_empty() {
        return Err(format!(
            "{url:?} names no Kafka broker (kafka://HOST:PORT[/TOPIC])"
        ));
    }
    let topic = if topic.is_empty() { KAFKA_TOPIC } else { topic };
    if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        || topic.len() > 249
    {
        return Err(format!("{topic:?} is not a Kafka topic name"));
    }
    Ok((brokers, topic.to_string()))
}

impl Kafka {
    /// Connect to the brokers of `url`, make the topic if it is missing (one partition,
    /// replication factor 1: make it yourself for more), and open each of its partitions.
    pub async fn connect(url: &str) -> Result<Self, String> {
        use rskafka::client::partition::UnknownTopicHandling;
        let (brokers, topic) = parse_kafka_url(url)?;
        let client = rskafka::client::ClientBuilder::new(brokers)
            .client_id("bitnet")
            .backoff_config(rskafka::BackoffConfig {
                deadline: Some(Duration::from_secs(30)),
                ..Default::default()
            })
            .build()
            .await
            .map_err(|e| format!("cannot reach Kafka at {url}: {e}"))?;
        let find = |topics: Vec<rskafka::topic::Topic>| {
            topics
                .into_iter()
                .find(|t| t.name == topic)
                .map(|t| t.partitions)
        };
        let listed = client
            .list_topics()
            .await
            .map_err(|e| format!("Kafka at {url}: {e}"))?;
        let partitions = match find(listed) {
            Some(p) => p,
            None => {
                let controller = client
                    .controller_client()
                    .map_err(|e| format!("Kafka at {url}: {e}"))?;
                if let Err(e) = controller.create_topic(topic.as_str(), 1, 1, 10_000).await {
                    // Another replica may have made it first.
                    tracing::debug!(error = %e, "creating the Kafka topic");
                }
                let listed = client
                    .list_topics()
                    .await
                    .map_err(|e| format!("Kafka at {url}: {e}"))?;
                find(listed)
                    .ok_or_else(|| format!("Kafka at {url}: cannot make the topic {topic}"))?
            }
        };
        let mut clients = Vec::with_capacity(partitions.len());
        for p in partitions {
            clients.push(
                client
                    .partition_client(topic.as_str(), p, UnknownTopicHandling::Retry)
                    .await
                    .map_err(|e| format!("Kafka topic {topic} partition {p}: {e}"))?,
            );
        }
        if clients.is_empty() {
            return Err(format!("Kafka topic {topic} has no partitions"));
        }
        Ok(Self {
            topic,
            partitions: clients,
        })
    }
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

/// FNV-1a: a stable hash of an organization id to its partition.
fn partition_of(key: &str, n: usize) -> usize {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % n as u64) as usize
}

impl EventSink for Kafka {
    fn describe(&self) -> String {
        format!(
            "Kafka topic {} ({} partition(s))",
            self.topic,
            self.partitions.len()
        )
    }

    fn publish<'a>(&'a self, batch: &'a [Event]) -> Publish<'a> {
        Box::pin(async move {
            let n = self.partitions.len();
            let mut by_partition: Vec<Vec<rskafka::record::Record>> = vec![Vec::new(); n];
            for e in batch {
                let key = e.organization_id.clone().unwrap_or_default();
                let value = serde_json::to_vec(e).map_err(|e| e.to_string())?;
                let headers = [
                    ("event-id".to_string(), e.id.clone().into_bytes()),
                    ("event-type".to_string(), e.kind.clone().into_bytes()),
                ]
                .into_iter()
                .collect();
                by_partition[partition_of(&key, n)].push(rskafka::record::Record {
                    key: Some(key.into_bytes()),
                    value: Some(value),
                    headers,
                    timestamp: rskafka::chrono::DateTime::from_timestamp(e.created_at, 0)
                        .unwrap_or_default(),
                });
            }
            for (client, records) in self.partitions.iter().zip(by_partition) {
                client
                    .produce(
                        records,
                        rskafka::client::partition::Compression::NoCompression,
                    )
                    .await
                    .map_err(|e| format!("Kafka produce to {}: {e}", self.topic))?;
            }
            Ok(0)
        })
    }
}

/// Publish the outbox until `stop`: a batch at a time, looking again at once while there is
/// more, else every `idle`. Published events are forgotten after a week.
pub async fn publisher(
    store: Store,
    sink: Arc<dyn EventSink>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_urls() {
        assert_eq!(
            parse_kafka_url("kafka://a:9093,b/ev.t-1"),
            Ok((vec!["a:9093".into(), "b:9092".into()], "ev.t-1".into()))
        );
        assert_eq!(
            parse_kafka_url("kafka://127.0.0.1:9092"),
            Ok((vec!["127.0.0.1:9092".into()], KAFKA_TOPIC.into()))
        );
        assert!(parse_kafka_url("kafka:///t").is_err());
        assert!(parse_kafka_url("kafka://h/bad topic").is_err());
        assert!(parse_kafka_url("nats://h").is_err());
        // An organization's events always land on one partition.
        assert_eq!(partition_of("org_1", 7), partition_of("org_1", 7));
        assert!((0..100).all(|i| partition_of(&format!("org_{i}"), 3) < 3));
    }
}
