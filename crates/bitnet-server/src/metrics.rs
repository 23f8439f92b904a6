//! Prometheus metrics (`GET /metrics`, OpenMetrics text): HTTP latency per route and status,
//! time to first token, inter-token latency, prompt and generated tokens, queue depth, running
//! sequences and KV cache bytes per model.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Handles to one model's series (clones share the registered values).
#[derive(Debug, Clone)]
pub struct ModelMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub prompt_tokens: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache instead of a prefill.
    pub prompt_tokens_cached: Counter,
    pub generation_tokens: Counter,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub kv_bytes: Gauge,
    pub prefix_cache_bytes: Gauge,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http: Family<Labels, Histogram>,
    ttft: Family<Labels, Histogram>,
    itl: Family<Labels, Histogram>,
    prompt: Family<Labels, Counter>,
    prompt_cached: Family<Labels, Counter>,
    generated: Family<Labels, Counter>,
    queue: Family<Labels, Gauge>,
    running: Family<Labels, Gauge>,
    kv: Family<Labels, Gauge>,
    prefix: Family<Labels, Gauge>,
}

fn model(m: &str) -> Labels {
    vec![("model", m.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bitnet");
        // 100 µs .. about 13 s.
        let http = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        // 1 ms .. about 65 s.
        let token = || Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let ttft = Family::<Labels, Histogram>::new_with_constructor(token);
        let itl = Family::<Labels, Histogram>::new_with_constructor(token);
        let (prompt, prompt_cached, generated) =
            (Family::default(), Family::default(), Family::default());
        let (queue, running, kv) = (Family::default(), Family::default(), Family::default());
        let prefix = Family::default();
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency to the end of the response headers, by route, method and status",
            http.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            ttft.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive generated tokens of one sequence",
            itl.clone(),
        );
        registry.register("prompt_tokens", "Prompt tokens processed", prompt.clone());
        registry.register(
            "prompt_cached_tokens",
            "Prompt tokens taken from the prefix cache (not prefilled again)",
            prompt_cached.clone(),
        );
        registry.register("generation_tokens", "Tokens generated", generated.clone());
        registry.register(
            "queue_depth",
            "Requests waiting for a place in the batch",
            queue.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            running.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "Bytes held by the running sequences' KV caches",
            kv.clone(),
        );
        registry.register(
            "prefix_cache_bytes",
            "Bytes held by finished sequences' KV caches kept for reuse",
            prefix.clone(),
        );
        Self {
            registry,
            http,
            ttft,
            itl,
            prompt,
            prompt_cached,
            generated,
            queue,
            running,
            kv,
            prefix,
        }
    }

    pub fn http(&self, route: &str, method: &str, status: u16) -> Histogram {
        self.http
            .get_or_create(&vec![
                ("route", route.to_string()),
                ("method", method.to_string()),
                ("status", status.to_string()),
            ])
            .clone()
    }

    /// One model's series, looked up once: the engine updates them every token.
    pub fn model(&self, m: &str) -> ModelMetrics {
        let l = model(m);
        ModelMetrics {
            ttft: self.ttft.get_or_create(&l).clone(),
            itl: self.itl.get_or_create(&l).clone(),
            prompt_tokens: self.prompt.get_or_create(&l).clone(),
            prompt_tokens_cached: self.prompt_cached.get_or_create(&l).clone(),
            generation_tokens: self.generated.get_or_create(&l).clone(),
            queue_depth: self.queue.get_or_create(&l).clone(),
            running: self.running.get_or_create(&l).clone(),
            kv_bytes: self.kv.get_or_create(&l).clone(),
            prefix_cache_bytes: self.prefix.get_or_create(&l).clone(),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
