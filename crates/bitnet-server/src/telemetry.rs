//! OpenTelemetry trace export: the request spans (and the spans inside them) go to an OTLP
//! collector over HTTP/protobuf when one is configured, and join the caller's trace when the
//! request carries a W3C `traceparent` header.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Where spans go: `--otlp-endpoint`, else `server.otlp_endpoint` in the config, else the
/// standard environment variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_ENDPOINT`); none of them means no export.
pub fn endpoint_from(flag: Option<&str>, config: Option<&str>) -> Option<Endpoint> {
    if let Some(url) = flag.or(config).filter(|u| !u.is_empty()) {
        return Some(Endpoint::Url(url.to_string()));
    }
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .then_some(Endpoint::FromEnv)
}

/// An OTLP/HTTP collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A base URL such as `http://127.0.0.1:4318` (`/v1/traces` is appended unless there).
    Url(String),
    /// As the `OTEL_EXPORTER_OTLP_*` variables say.
    FromEnv,
}

/// Exports spans until [`shutdown`](Self::shutdown) (or drop) flushes what is still buffered.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Start exporting to `endpoint`. The service is named `bitnet` unless `OTEL_SERVICE_NAME`
    /// says otherwise.
    pub fn start(endpoint: &Endpoint) -> Result<Self, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if let Endpoint::Url(base) = endpoint {
            let url = if base.trim_end_matches('/').ends_with("/v1/traces") {
                base.clone()
            } else {
                format!("{}/v1/traces", base.trim_end_matches('/'))
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "OTLP endpoint {base:?}: give an http:// URL such as http://127.0.0.1:4318"
                ));
            }
            exporter = exporter.with_endpoint(url);
        }
        let exporter = exporter
            .build()
            .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("bitnet");
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Self { provider })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("bitnet-server"))
    }

    /// Export what is buffered and stop.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("bitnet: exporting the last traces failed: {e}");
        }
    }
}

/// Make `span` a child of the trace named by the request's W3C `traceparent` header, if any.
pub fn join_caller_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}
