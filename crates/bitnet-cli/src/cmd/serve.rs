//! `bitnet serve`: the OpenAI-compatible server, and `bitnet keys`: its API keys.

use super::common::set_threads;
use super::platform::open_store;
use crate::config::{self, Config};
use anyhow::{Context, Result, bail};
use bitnet_platform::audit::Actor;
use bitnet_server::engine::EngineConfig;
use bitnet_server::metrics::Metrics;
use bitnet_server::telemetry::{self, Tracing};
use bitnet_server::usage::UsageLog;
use bitnet_server::{AppState, ServedModel, ServerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model to serve: PATH (a GGUF file or a Hugging Face directory), or NAME=PATH to choose
    /// the id clients ask for (default: the file name without extension). Repeat for several.
    /// Default: `models.default` from the config file.
    #[arg(short, long = "model", value_name = "[NAME=]PATH")]
    pub models: Vec<String>,
    /// Address to listen on (default: `server.addr` from the config, 127.0.0.1:8080).
    #[arg(long, conflicts_with_all = ["host", "port"])]
    pub addr: Option<String>,
    /// Host to listen on, with the port of `--port` or the configured address.
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on, with the host of `--host` or the configured address.
    #[arg(long)]
    pub port: Option<u16>,
    /// Longest sequence (prompt and reply) a request may use, in tokens (default: the
    /// model's context; vLLM's --max-model-len).
    #[arg(long, short = 'c', visible_alias = "ctx-size")]
    pub ctx: Option<usize>,
    /// Database URL (default: `server.database` from the config, an SQLite file).
    #[arg(long)]
    pub database: Option<String>,
    /// Configuration file (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel threads (default: `runtime.threads`, else every CPU).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Quantize each model's lm_head: int8 (half the bytes of f16, VNNI in batches; SmolLM2
    /// perplexity +0.37%) or q4. Default: keep the file's precision.
    #[arg(long, value_name = "int8|q4")]
    pub head_quant: Option<bitnet_model::HeadQuant>,
    /// Most sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most tokens one engine step feeds (chunked prefill): running sequences' next tokens
    /// first, then pieces of new prompts, so a long prompt does not stall the others.
    #[arg(long, default_value_t = 256)]
    pub max_step_tokens: usize,
    /// MiB of finished sequences' KV caches kept so that prompts starting the same way (a chat's
    /// next turn, a shared system prompt) skip that part of the prefill; 0 disables it.
    #[arg(long, default_value_t = 1024)]
    pub prefix_cache_mb: usize,
    /// Most requests waiting for a place in the batch; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most tokens one request may generate (default: up to the model's context); requests
    /// asking for more get 400.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Seconds a generation may run before it ends with a timeout.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Seconds in-flight generations get to finish on shutdown (Ctrl-C / SIGTERM).
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Seconds a client has to send its request head (from the connection opening, or from the
    /// last response on a kept-alive connection), and then its whole body.
    #[arg(long, default_value_t = 10)]
    pub client_timeout: u64,
    /// Most connections open at once; past it, new ones wait in the listen backlog until one
    /// closes. Default: 4096, or fewer when the descriptor limit (ulimit -n) is lower.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Largest file `POST /v1/files` takes, in bytes (it streams to storage).
    #[arg(long, default_value_t = 8 << 30)]
    pub max_file_bytes: u64,
    /// Log as JSON lines (default: human-readable). RUST_LOG filters (default: info).
    #[arg(long)]
    pub log_json: bool,
    /// Export request traces to this OpenTelemetry collector (OTLP over HTTP/protobuf, e.g.
    /// http://127.0.0.1:4318). Default: `server.otlp_endpoint` from the config, else the
    /// OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variables; none means
    /// no export.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// This server's URL as browsers reach it (behind a proxy, say), for single sign-on's
    /// callback (`URL/v1/auth/sso/callback`). Default: the request's Host over http.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Where uploaded files are kept: `file:///DIR` or `s3://BUCKET[/PREFIX]` with the
    /// standard `AWS_*` variables (default: `server.storage` from the config, a directory
    /// beside the database).
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// The master key file (64 hex digits) that wraps the organizations' data keys; made if
    /// missing (default: `server.master_key_file`). `BITNET_MASTER_KEY` holding the key
    /// itself wins over the file.
    #[arg(long, value_name = "PATH")]
    pub master_key_file: Option<std::path::PathBuf>,
    /// Read every request's key from the database instead of caching callers. With
    /// PostgreSQL the cache is on by default and every replica forgets a changed
    /// organization's callers within milliseconds (LISTEN/NOTIFY); SQLite never caches.
    #[arg(long)]
    pub no_credential_cache: bool,
    #[command(flatten)]
    pub jobs: JobArgs,
    /// Bytes of registry models kept loaded (e.g. 8GiB, 512MiB); the least recently used are
    /// unloaded past it. Default: half the machine's memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub model_memory_budget: Option<u64>,
    /// Seconds a registry model may sit unused before it is unloaded.
    #[arg(long, default_value_t = 900)]
    pub model_idle_unload: u64,
    /// Count rate limits in Redis (`redis://HOST[:PORT][/DB]`), so that every replica shares
    /// them (default: `server.redis` from the config; none: counted in this process).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Publish the event outbox (usage, audit, job, budget and invoice events) to NATS
    /// JetStream (`nats://HOST:PORT`) or Kafka (`kafka://HOST:PORT[,HOST:PORT][/TOPIC]`)
    /// (default: `server.events` from the config; none: events wait in the database for a
    /// server that has a sink).
    #[arg(long, value_name = "URL")]
    pub events: Option<String>,
    /// The signing secret (`whsec_...`) of the Stripe webhook endpoint this server is
    /// (`URL/v1/billing/webhooks/stripe`): Stripe reports invoices paid, voided or
    /// uncollectible there. Without it, the route answers 404.
    #[arg(long, env = "BITNET_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,
    /// Organizations with series of their own in the metrics (the most active over the last
    /// day); the others are counted together as `organization="other"`.
    #[arg(long, default_value_t = 50)]
    pub metrics_top_organizations: usize,
    /// Seconds a request's usage reservation outlives this server: if it dies mid-request,
    /// another replica (or this one, restarted) settles the request this long after.
    #[arg(long, default_value_t = 15)]
    pub reservation_ttl: u64,
    /// Quantization workers inside this server (0: leave the jobs to `bitnet worker`
    /// processes).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// How quantization workers run (`bitnet serve` and `bitnet worker`).
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// Seconds a worker's claim on a job lasts without a heartbeat: a job whose worker died is
    /// taken over by another after this.
    #[arg(long, default_value_t = 30)]
    pub job_lease: u64,
    /// Most jobs of one organization running at once, over every worker.
    #[arg(long, default_value_t = 2)]
    pub jobs_per_org: i64,
    /// Where workers unpack and convert, and where registry models are cached while loaded
    /// (default: `work` in the data directory, or beside an SQLite database given with
    /// --database).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
}

/// `8GiB`, `512MiB`, `1.5G`, `1000000`: bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1048576.0,
        "gi" | "gib" => 1073741824.0,
        "ti" | "tib" => 1099511627776.0,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
            ));
        }
    };
    Ok((n * mult) as u64)
}

/// Half the machine's memory (`MemTotal` of /proc/meminfo), else 4 GiB.
fn default_model_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024 / 2)
}

/// The work directory: given, beside an SQLite database given on the command line, else the
/// data directory's `work`.
pub fn work_dir(given: Option<&std::path::Path>, database: &str, db_given: bool) -> PathBuf {
    if let Some(d) = given {
        return d.to_path_buf();
    }
    if db_given
        && let Some(path) = database
            .strip_prefix("sqlite://")
            .and_then(|p| p.split('?').next())
        && !path.contains(":memory:")
    {
        let p = std::path::Path::new(path);
        if let (Some(dir), Some(stem)) = (p.parent(), p.file_stem().and_then(|s| s.to_str())) {
            return std::path::absolute(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .join(format!("{stem}-work"));
        }
    }
    config::data_dir().join("work")
}

/// Start `n` quantization workers; they stop when `stop` turns true.
pub fn start_workers(
    n: usize,
    store: &bitnet_platform::Store,
    storage: &Arc<bitnet_platform::storage::Storage>,
    jobs: &JobArgs,
    scratch: &std::path::Path,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let mut cfg = bitnet_server::worker::WorkerConfig::new(
                bitnet_server::worker::default_worker_id(i),
                scratch.to_path_buf(),
            );
            cfg.lease = Duration::from_secs(jobs.job_lease.max(1));
            cfg.per_org = jobs.jobs_per_org.max(1);
            tokio::spawn(bitnet_server::worker::run(
                store.clone(),
                storage.clone(),
                cfg,
                stop.clone(),
            ))
        })
        .collect()
}

/// `NAME=PATH` or `PATH` → (id, path). A bare name is looked up in `models.dir`.
fn model_spec(s: &str, cfg: &Config) -> (String, PathBuf) {
    let (name, path) = match s.split_once('=') {
        Some((n, p)) if !n.is_empty() && !n.contains('/') => (Some(n.to_string()), p),
        _ => (None, s),
    };
    let mut p = PathBuf::from(path);
    if !p.exists() && p.components().count() == 1 && cfg.models.dir.join(&p).exists() {
        p = cfg.models.dir.join(&p);
    }
    let id = name.unwrap_or_else(|| {
        let stem = if p.is_dir() {
            p.file_name()
        } else {
            p.file_stem()
        };
        stem.map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    (id, p)
}

/// `--addr`, or `--host` / `--port` over the configured address.
fn listen_addr(args: &Args, configured: &str) -> Result<String> {
    if let Some(a) = &args.addr {
        return Ok(a.clone());
    }
    let (host, port) = configured
        .rsplit_once(':')
        .map_or((configured, "8080"), |(h, p)| (h, p));
    let host = args.host.as_deref().unwrap_or(host);
    let port = args
        .port
        .map_or_else(|| port.to_string(), |p| p.to_string());
    if host.is_empty() {
        bail!("--host must not be empty");
    }
    // A bare IPv6 address needs brackets before the port.
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Logs to stderr (filtered by RUST_LOG, default info), plus the OpenTelemetry layer when
/// traces are exported (it sees every span, whatever the log filter).
fn init_logs(json: bool, traces: Option<&Tracing>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(traces.map(Tracing::layer))
        .try_init();
}

pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

pub fn run(args: Args) -> Result<()> {
    let cfg = Config::load_or_default(&config::path(args.config.as_deref()))?;
    let traces = match telemetry::endpoint_from(
        args.otlp_endpoint.as_deref(),
        cfg.server.otlp_endpoint.as_deref(),
    ) {
        Some(e) => {
            let t = Tracing::start(&e).map_err(anyhow::Error::msg)?;
            let to = match &e {
                telemetry::Endpoint::Url(u) => u.clone(),
                telemetry::Endpoint::FromEnv => "the OTEL_EXPORTER_OTLP_* endpoint".into(),
            };
            eprintln!("bitnet serve: exporting traces to {to} (OTLP over HTTP)");
            Some(t)
        }
        None => {
            eprintln!("bitnet serve: trace export off (--otlp-endpoint URL turns it on)");
            None
        }
    };
    init_logs(args.log_json, traces.as_ref());
    let result = serve(args, cfg);
    // Flush the spans still buffered, including the last requests'.
    if let Some(t) = traces {
        t.shutdown();
    }
    result
}

fn serve(args: Args, cfg: Config) -> Result<()> {
    let threads = args
        .threads
        .or((cfg.runtime.threads > 0).then_some(cfg.runtime.threads));
    set_threads(threads)?;
    let mut specs: Vec<String> = args.models.clone();
    if specs.is_empty()
        && let Some(d) = &cfg.models.default
    {
        specs.push(d.clone());
    }
    if args.max_batch == 0 || args.queue == 0 || args.max_step_tokens == 0 {
        bail!("--max-batch, --queue and --max-step-tokens must be at least 1");
    }
    let engine = EngineConfig {
        max_batch: args.max_batch,
        queue: args.queue,
        max_step_tokens: args.max_step_tokens,
        prefix_cache_bytes: args.prefix_cache_mb.saturating_mul(1 << 20),
        ..EngineConfig::default()
    };
    let metrics = Arc::new(Metrics::new().with_top_organizations(args.metrics_top_organizations));
    let mut models = Vec::new();
    for s in &specs {
        let (id, path) = model_spec(s, &cfg);
        if models.iter().any(|m: &ServedModel| m.id == id) {
            bail!("two models would be served as `{id}`: name them with NAME=PATH");
        }
        let mut loaded = bitnet_model::load(&path)
            .with_context(|| format!("cannot load model {}", path.display()))?;
        if let Some(q) = args.head_quant {
            loaded.model.quantize_head(q);
        }
        if let Some(c) = args.ctx {
            if c == 0 {
                bail!("--ctx must be at least 1");
            }
            loaded.model.spec.context = c;
        }
        tracing::info!(model = %id, "{}", loaded.description);
        models.push(
            ServedModel::start(id, loaded, &engine, metrics.clone()).map_err(anyhow::Error::msg)?,
        );
    }
    let database = args.database.clone().unwrap_or(cfg.server.database.clone());
    let addr = listen_addr(&args, &cfg.server.addr)?;
    let server = ServerConfig {
        max_body_bytes: args.max_body,
        max_file_bytes: args.max_file_bytes,
        body_timeout: Duration::from_secs(args.client_timeout),
        header_timeout: Duration::from_secs(args.client_timeout),
        max_connections: args
            .max_connections
            .unwrap_or_else(bitnet_server::default_max_connections),
        request_timeout: Duration::from_secs(args.request_timeout),
        max_tokens: args.max_tokens.unwrap_or(usize::MAX).max(1),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        public_url: args.public_url.clone(),
        stripe_webhook_secret: args.stripe_webhook_secret.clone().filter(|s| !s.is_empty()),
        engine: engine.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let beside = super::platform::beside_database(&database, args.database.is_some());
        let (storage_url, key_file) = match beside {
            Some((s, k)) => (s, k),
            None => (cfg.server.storage.clone(), cfg.server.master_key_file.clone()),
        };
        let master = super::platform::master_key(args.master_key_file.as_deref(), &key_file)?;
        let store = open_store(&database).await?.with_master_key(master);
        store.check_master_key().await.context("the master key does not fit this database")?;
        let storage = bitnet_platform::storage::Storage::open(
            args.storage.as_deref().unwrap_or(&storage_url),
        )
        .context("cannot open the storage")?;
        if !args.no_credential_cache {
            store.start_credential_cache().await?;
        }
        // A fresh database gets an organization `default` with an admin key, a project and a
        // project key, printed once, so the server is usable at once.
        let first_keys = if store.organizations(&bitnet_platform::Page::default()).await?.data.is_empty() {
            let cli = Actor::cli();
            let org = store.create_organization("default", &cli).await?;
            let (_, admin) = store.create_admin_key(&org.id, "first admin key", &cli).await?;
            let project = store.create_project(&org.id, "Default project", &cli).await?;
            let sa = store.create_service_account(&org.id, &project.id, "default", &cli).await?;
            Some((admin, sa.api_key.value))
        } else {
            None
        };
        let redis = args.redis.clone().or(cfg.server.redis.clone()).filter(|r| !r.is_empty());
        let limiter = match &redis {
            Some(url) => bitnet_server::limits::Limiter::redis(url).await.map_err(anyhow::Error::msg)?,
            None => bitnet_server::limits::Limiter::local(),
        };
        let meter = bitnet_server::usage::MeterConfig {
            ttl: Duration::from_secs(args.reservation_ttl.max(1)),
            ..Default::default()
        };
        let (usage, writer) = UsageLog::start(store.clone(), limiter, meter, metrics.clone());
        // The organizations labelled in the metrics: the most active of the last day.
        {
            let (store, metrics) = (store.clone(), metrics.clone());
            let n = args.metrics_top_organizations;
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                loop {
                    every.tick().await;
                    match store.top_organizations(86_400, n as i64).await {
                        Ok(top) if !top.is_empty() => metrics.refresh_top_organizations(top),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot rank organizations for the metrics"),
                    }
                }
            });
        }
        let ids: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
        // Uploads left pending past their hour lose their parts.
        {
            let (store, storage) = (store.clone(), storage.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(600));
                loop {
                    every.tick().await;
                    match store.sweep_expired_uploads(&storage).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(uploads = n, "expired uploads swept"),
                        Err(e) => tracing::warn!(error = %e, "cannot sweep expired uploads"),
                    }
                }
            });
        }
        let work = work_dir(args.jobs.work_dir.as_deref(), &database, args.database.is_some());
        let storage = Arc::new(storage);
        let cache = bitnet_server::registry::ModelCache::new(
            store.clone(),
            storage.clone(),
            bitnet_server::registry::RegistryConfig {
                cache_dir: work.join("models"),
                memory_budget: args.model_memory_budget.unwrap_or_else(default_model_budget),
                idle_unload: Duration::from_secs(args.model_idle_unload.max(1)),
                engine,
                head_quant: args.head_quant,
                ctx: args.ctx,
            },
            metrics.clone(),
        )
        .with_context(|| format!("cannot use the work directory {}", work.display()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let events = args.events.clone().or(cfg.server.events.clone()).filter(|e| !e.is_empty());
        let publisher = match &events {
            Some(url) => {
                let sink = bitnet_server::events::connect(url).await.map_err(anyhow::Error::msg)?;
                eprintln!("bitnet serve: publishing events to {url} ({})", sink.describe());
                Some(tokio::spawn(bitnet_server::events::publisher(
                    store.clone(),
                    sink,
                    metrics.clone(),
                    Duration::from_millis(200),
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
        let workers = start_workers(args.workers, &store, &storage, &args.jobs, &work.join("jobs"), &stop_rx);
        let mut state = AppState::new(models, store, metrics, usage, server).with_registry(cache);
        state.storage = Some(storage);
        if let Some(cache) = state.registry.clone() {
            // Look often enough that a model goes within half its idle time past it.
            let every = Duration::from_millis((args.model_idle_unload.max(1) * 500).min(30_000));
            tokio::spawn(async move {
                let mut every = tokio::time::interval(every);
                loop {
                    every.tick().await;
                    cache.unload_idle();
                }
            });
        }
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let served = if ids.is_empty() {
            "the model registry".to_string()
        } else {
            format!("{} and the model registry", ids.join(", "))
        };
        eprintln!("bitnet serve: {served} on http://{local}/v1 (OpenAPI: /openapi.json, metrics: /metrics)");
        let key = match &first_keys {
            Some((admin, project)) => {
                eprintln!(
                    "created organization `default` with a project; its keys are shown once \
                     (`bitnet keys create` makes more):\n  \
                     project key (calls the models):         {project}\n  \
                     admin key (manages the organization):   {admin}"
                );
                project.as_str()
            }
            None => "$BITNET_API_KEY",
        };
        eprintln!(
            "try:\n  curl http://{local}/v1/chat/completions -H \"Authorization: Bearer {key}\" -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
            ids.first().map_or("NAME", String::as_str)
        );
        bitnet_server::serve(listener, state.clone(), shutdown_signal()).await?;
        let _ = stop_tx.send(true);
        for w in workers.into_iter().chain(publisher) {
            let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
        }
        // Every ticket is gone with the state: the writer drains the queue and ends.
        drop(state);
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        eprintln!("bitnet serve: stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: Args,
    }

    fn addr(args: &[&str], configured: &str) -> Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))?;
        listen_addr(&cli.serve, configured)
    }

    /// Issue 13: --host and --port beside --addr, over the configured address.
    #[test]
    fn host_and_port_fill_in_the_configured_address() {
        let cfg = "127.0.0.1:8080";
        assert_eq!(addr(&[], cfg).unwrap(), "127.0.0.1:8080");
        assert_eq!(addr(&["--port", "9000"], cfg).unwrap(), "127.0.0.1:9000");
        assert_eq!(addr(&["--host", "0.0.0.0"], cfg).unwrap(), "0.0.0.0:8080");
        assert_eq!(
            addr(&["--host", "::1", "--port", "1"], cfg).unwrap(),
            "[::1]:1"
        );
        assert_eq!(addr(&["--addr", "10.0.0.1:5"], cfg).unwrap(), "10.0.0.1:5");
        assert!(addr(&["--addr", "a:1", "--port", "2"], cfg).is_err());
    }
}
