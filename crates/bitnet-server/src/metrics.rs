//! Prometheus metrics (`GET /metrics`, OpenMetrics text): HTTP latency per route and status,
//! time to first token, inter-token latency, prompt and generated tokens, queue depth, running
//! sequences and KV cache bytes per model; and metering per organization and model: requests
//! by outcome, tokens by kind, tokens reserved against rate limits and settled, events
//! published.
//!
//! Organizations are labels of their own only while they are among the `top` most active
//! (by tokens over the last day, refreshed from the database); the rest are counted under
//! `organization="other"`, so the number of series stays bounded however many tenants come.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The organizations that are labels of their own (the rest are `other`).
#[derive(Debug)]
pub struct OrgLabels {
    top: std::sync::RwLock<std::collections::HashSet<String>>,
    n: usize,
}

impl OrgLabels {
    pub fn new(n: usize) -> Self {
        Self {
            top: std::sync::RwLock::new(std::collections::HashSet::new()),
            n,
        }
    }

    /// The label of `org`: itself while it has a place (places fill as organizations come,
    /// until the next refresh), else `other`.
    pub fn label(&self, org: &str) -> String {
        if self
            .top
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(org)
        {
            return org.to_string();
        }
        let mut top = self.top.write().unwrap_or_else(|p| p.into_inner());
        if top.len() < self.n {
            top.insert(org.to_string());
            return org.to_string();
        }
        "other".into()
    }
}

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
    metered: Family<Labels, Counter>,
    metered_tokens: Family<Labels, Counter>,
    reserved_tokens: Family<Labels, Counter>,
    settled_tokens: Family<Labels, Counter>,
    events: Counter,
    pub orgs: OrgLabels,
    /// The models each labelled organization has series for (to remove them when it leaves).
    seen: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
}

const OUTCOMES: [&str; 4] = [
    "settled",
    "rate_limit_requests",
    "rate_limit_tokens",
    "insufficient_quota",
];
const KINDS: [&str; 3] = ["input", "cached_input", "output"];

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
        let (metered, metered_tokens) = (Family::default(), Family::default());
        let (reserved_tokens, settled_tokens) = (Family::default(), Family::default());
        let events = Counter::default();
        registry.register(
            "metered_requests",
            "Requests to a model by organization, model and outcome (settled, or refused: rate_limit_requests, rate_limit_tokens, insufficient_quota)",
            metered.clone(),
        );
        registry.register(
            "metered_tokens",
            "Tokens settled into usage rows by organization, model and kind (input, cached_input, output)",
            metered_tokens.clone(),
        );
        registry.register(
            "reserved_tokens",
            "Tokens reserved before requests ran (prompt plus max_tokens), by organization and model",
            reserved_tokens.clone(),
        );
        registry.register(
            "settled_tokens",
            "Tokens the same requests used when they settled, by organization and model",
            settled_tokens.clone(),
        );
        registry.register(
            "events_published",
            "Outbox events handed to the event sink",
            events.clone(),
        );
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
            metered,
            metered_tokens,
            reserved_tokens,
            settled_tokens,
            events,
            orgs: OrgLabels::new(50),
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Label at most `n` organizations (default 50).
    pub fn with_top_organizations(mut self, n: usize) -> Self {
        self.orgs = OrgLabels::new(n);
        self
    }

    fn org_model(&self, org: &str, model: &str) -> Labels {
        let label = self.orgs.label(org);
        if label != "other" {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(label.clone())
                .or_default()
                .insert(model.to_string());
        }
        vec![("organization", label), ("model", model.to_string())]
    }

    /// A request refused before it ran (`reason`: `rate_limit_requests`, `rate_limit_tokens`,
    /// `insufficient_quota`).
    pub fn refused(&self, org: &str, model: &str, reason: &str) {
        let mut l = self.org_model(org, model);
        l.push(("outcome", reason.to_string()));
        self.metered.get_or_create(&l).inc();
    }

    /// A request admitted with `tokens` reserved.
    pub fn reserved(&self, org: &str, model: &str, tokens: u64) {
        self.reserved_tokens
            .get_or_create(&self.org_model(org, model))
            .inc_by(tokens);
    }

    /// A request settled: its tokens.
    pub fn settled(&self, org: &str, model: &str, input: u64, cached: u64, output: u64) {
        let l = self.org_model(org, model);
        let mut o = l.clone();
        o.push(("outcome", "settled".to_string()));
        self.metered.get_or_create(&o).inc();
        self.settled_tokens.get_or_create(&l).inc_by(input + output);
        for (kind, n) in KINDS.into_iter().zip([input, cached, output]) {
            let mut k = l.clone();
            k.push(("kind", kind.to_string()));
            self.metered_tokens.get_or_create(&k).inc_by(n);
        }
    }

    pub fn events_published(&self, n: usize) {
        self.events.inc_by(n as u64);
    }

    /// Make `top` the labelled organizations; the series of those that drop out go (their
    /// later traffic counts under `other`).
    pub fn refresh_top_organizations(&self, top: Vec<String>) {
        let keep: std::collections::HashSet<String> = top.into_iter().take(self.orgs.n).collect();
        let gone: Vec<String> = {
            let mut t = self.orgs.top.write().unwrap_or_else(|p| p.into_inner());
            let gone = t.difference(&keep).cloned().collect();
            *t = keep;
            gone
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for org in gone {
            for model in seen.remove(&org).unwrap_or_default() {
                let l: Labels = vec![("organization", org.clone()), ("model", model)];
                self.reserved_tokens.remove(&l);
                self.settled_tokens.remove(&l);
                for o in OUTCOMES {
                    let mut x = l.clone();
                    x.push(("outcome", o.to_string()));
                    self.metered.remove(&x);
                }
                for k in KINDS {
                    let mut x = l.clone();
                    x.push(("kind", k.to_string()));
                    self.metered_tokens.remove(&x);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository's Grafana dashboard reads series these metrics expose.
    #[test]
    fn the_dashboard_reads_series_that_exist() {
        let m = Metrics::new();
        m.http("/v1/chat/completions", "POST", 200).observe(0.01);
        m.reserved("org-a", "m", 100);
        m.settled("org-a", "m", 60, 10, 30);
        m.refused("org-a", "m", "rate_limit_requests");
        m.events_published(3);
        let text = m.render();
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/bitnet-metering.json"))
                .unwrap();
        let mut checked = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("bitnet_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        text.lines().any(|l| l.starts_with(&format!("{name}{{"))
                            || l.starts_with(&format!("{name} "))),
                        "the dashboard reads {name}, which /metrics does not expose:\n{text}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 10);
    }

    /// Past the top N, organizations share `other`; one that leaves the top loses its series.
    #[test]
    fn organization_labels_stay_bounded() {
        let m = Metrics::new().with_top_organizations(2);
        for org in ["a", "b", "c", "d"] {
            m.settled(org, "m", 1, 0, 1);
        }
        let text = m.render();
        let orgs = |text: &str| -> std::collections::BTreeSet<String> {
            text.lines()
                .filter(|l| l.starts_with("bitnet_metered_requests_total{"))
                .filter_map(|l| l.split("organization=\"").nth(1)?.split('"').next())
                .map(str::to_string)
                .collect()
        };
        assert_eq!(orgs(&text), ["a", "b", "other"].map(String::from).into());
        assert!(text.contains(
            "bitnet_metered_requests_total{organization=\"other\",model=\"m\",outcome=\"settled\"} 2"
        ));
        // The day's ranking puts d first: a's series go, d gets its own.
        m.refresh_top_organizations(vec!["d".into(), "b".into()]);
        m.settled("d", "m", 1, 0, 1);
        m.settled("a", "m", 1, 0, 1);
        let text = m.render();
        assert_eq!(orgs(&text), ["b", "d", "other"].map(String::from).into());
    }
}
