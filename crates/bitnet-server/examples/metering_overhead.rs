//! What metering and limits add to a request: admit it under a rate limit (in this process or
//! in Redis), reserve it under a capped budget, then settle it, at a fixed rate (open loop),
//! reporting the latency of admit + reserve and of settle as percentiles.
//!
//! ```sh
//! cargo run --profile test -p bitnet-server --example metering_overhead -- \
//!     --database postgres://postgres@127.0.0.1/bench_meter [--redis redis://127.0.0.1:6379] \
//!     [--rate 500] [--seconds 10]
//! ```
//!
//! The database is made fresh (an SQLite path is removed first; a PostgreSQL database is
//! dropped and made again).

use bitnet_platform::Store;
use bitnet_platform::audit::Actor;
use bitnet_platform::keys::{Credential, KeyKind};
use bitnet_server::auth::Caller;
use bitnet_server::limits::Limiter;
use bitnet_server::metrics::Metrics;
use bitnet_server::usage::{MeterConfig, UsageLog};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((p / 100.0) * (xs.len() - 1) as f64).round() as usize]
}

async fn fresh(url: &str) {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
        return;
    }
    let (server, db) = url.rsplit_once('/').expect("postgres://HOST/DB");
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut c = sqlx::AnyConnection::connect(&format!("{server}/postgres"))
        .await
        .expect("PostgreSQL");
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute(&mut c)
        .await;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut c)
        .await
        .expect("create the database");
}

fn main() {
    let database = arg("--database").unwrap_or("sqlite:///tmp/bitnet-meter-bench.db".into());
    let redis = arg("--redis");
    let rate: f64 = arg("--rate").map_or(500.0, |r| r.parse().expect("--rate"));
    let secs: f64 = arg("--seconds").map_or(10.0, |s| s.parse().expect("--seconds"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        fresh(&database).await;
        let store = Store::open(&database).await.expect("open the store");
        let cli = Actor::cli();
        let org = store.create_organization("bench", &cli).await.unwrap().id;
        let project = store.create_project(&org, "p", &cli).await.unwrap().id;
        // Every path on: a rate limit (never reached), a price, a capped budget (never reached).
        store
            .set_rate_limit(&org, &project, "m", Some(1_000_000), Some(1_000_000_000), &cli)
            .await
            .unwrap();
        store
            .set_price("m", 1_000_000, 500_000, 2_000_000, None)
            .await
            .unwrap();
        store
            .set_budget(&org, Some(&project), Some(1_000_000_000_000_000), vec![0.5], &cli)
            .await
            .unwrap();
        let limiter = match &redis {
            Some(u) => Limiter::redis(u).await.expect("Redis"),
            None => Limiter::local(),
        };
        let (log, writer) = UsageLog::start(
            store.clone(),
            limiter,
            MeterConfig::default(),
            Arc::new(Metrics::new()),
        );
        let who = Caller {
            cred: Credential {
                key_id: "key_bench".into(),
                kind: KeyKind::Project,
                organization_id: Some(org.clone()),
                project_id: Some(project.clone()),
                read_only: false,
                user_id: None,
                user_email: None,
                service_account_id: Some("sa_bench".into()),
                role: None,
            },
            actor: Actor::cli(),
        };
        let n = (rate * secs) as usize;
        let every = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        let mut lag = Duration::ZERO;
        for i in 0..n {
            let due = start + every * i as u32;
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            } else {
                lag = lag.max(now - due);
            }
            let (log, who) = (log.clone(), who.clone());
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let mut ticket = log
                    .open(&format!("req_{i}"), None, &who, "m", "chat.completions", 40, 16)
                    .await
                    .expect("admitted");
                let admitted = t.elapsed();
                ticket.completion_tokens(8);
                ticket.status(200);
                let s = Instant::now();
                ticket.settle().await;
                (admitted, s.elapsed(), t.elapsed())
            }));
        }
        let mut open = Vec::new();
        let mut settle = Vec::new();
        let mut total = Vec::new();
        for t in tasks {
            let (a, s, w) = t.await.unwrap();
            open.push(a.as_secs_f64() * 1e3);
            settle.push(s.as_secs_f64() * 1e3);
            total.push(w.as_secs_f64() * 1e3);
        }
        let wall = start.elapsed().as_secs_f64();
        drop(log);
        let _ = writer.await;
        let (rows, _, _) = store.usage_totals(&org).await.unwrap();
        println!(
            "{} at {rate}/s for {secs} s, limits in {}: {n} requests in {wall:.1} s, {rows} usage rows, worst lag {:.1} ms",
            database.split("://").next().unwrap_or(""),
            if redis.is_some() { "Redis" } else { "process" },
            lag.as_secs_f64() * 1e3
        );
        for (name, xs) in [
            ("admit + reserve", &mut open),
            ("settle", &mut settle),
            ("both", &mut total),
        ] {
            println!(
                "  {name:16} P50 {:.2} ms  P95 {:.2} ms  P99 {:.2} ms",
                pct(xs, 50.0),
                pct(xs, 95.0),
                pct(xs, 99.0)
            );
        }
        assert_eq!(rows as usize, n, "every request has its row");
    });
}
