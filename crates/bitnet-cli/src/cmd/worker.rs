//! `bitnet worker`: quantization workers as a process of their own, for scale-out beside (or
//! instead of) the workers inside `bitnet serve`. They share the servers' database, storage and
//! master key.

use super::platform::{master_key, open_store};
use super::serve::{JobArgs, start_workers, work_dir};
use crate::config::{self, Config};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Database URL (default: `server.database` from the config, an SQLite file).
    #[arg(long)]
    pub database: Option<String>,
    /// Where files are kept: `file:///DIR` or `s3://BUCKET[/PREFIX]` with the standard `AWS_*`
    /// variables (default: as `bitnet serve` chooses it).
    #[arg(long, value_name = "URL")]
    pub storage: Option<String>,
    /// The master key file (`BITNET_MASTER_KEY` holding the key itself wins over it).
    #[arg(long, value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,
    /// Configuration file (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Jobs this process runs at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Kernel threads (default: every CPU).
    #[arg(short, long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub jobs: JobArgs,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = Config::load_or_default(&config::path(args.config.as_deref()))?;
    super::common::set_threads(args.threads)?;
    {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let database = args.database.clone().unwrap_or(cfg.server.database.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (storage_url, key_file) =
            match super::platform::beside_database(&database, args.database.is_some()) {
                Some(b) => b,
                None => (
                    cfg.server.storage.clone(),
                    cfg.server.master_key_file.clone(),
                ),
            };
        let master = master_key(args.master_key_file.as_deref(), &key_file)?;
        let store = open_store(&database).await?.with_master_key(master);
        store
            .check_master_key()
            .await
            .context("the master key does not fit this database")?;
        let storage = Arc::new(
            bitnet_platform::storage::Storage::open(
                args.storage.as_deref().unwrap_or(&storage_url),
            )
            .context("cannot open the storage")?,
        );
        let work = work_dir(
            args.jobs.work_dir.as_deref(),
            &database,
            args.database.is_some(),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let workers = start_workers(
            args.concurrency.max(1),
            &store,
            &storage,
            &args.jobs,
            &work.join("jobs"),
            &stop_rx,
        );
        eprintln!(
            "bitnet worker: {} worker(s) on {} (storage {}); Ctrl-C stops them",
            workers.len(),
            database,
            storage.url()
        );
        super::serve::shutdown_signal().await;
        eprintln!("bitnet worker: stopping (a running job goes back to the queue)");
        let _ = stop_tx.send(true);
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
        }
        eprintln!("bitnet worker: stopped");
        Ok(())
    })
}
