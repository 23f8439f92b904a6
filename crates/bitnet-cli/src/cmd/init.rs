//! `bitnet init`: a setup wizard that writes the configuration file. Each answer is checked as
//! it is typed and asked again until it is valid; `--yes` takes the defaults (and any flags)
//! without asking, for scripts.

use crate::config::{self, Config};
use anyhow::{Context, Result, bail};
use dialoguer::{Confirm, Input, theme::ColorfulTheme};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Accept the defaults (and the values given as flags) without asking.
    #[arg(short, long)]
    pub yes: bool,
    /// Configuration file to write (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory for models.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Kernel threads (0: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Address `bitnet serve` listens on.
    #[arg(long)]
    pub addr: Option<String>,
    /// Database URL (sqlite://PATH or postgres://...).
    #[arg(long)]
    pub database: Option<String>,
    /// Redis URL (optional; "" for none).
    #[arg(long)]
    pub redis: Option<String>,
    /// Overwrite an existing file without asking (and start from the defaults if it is invalid).
    #[arg(long)]
    pub force: bool,
}

fn validate_dir(s: &String) -> Result<(), String> {
    let p = PathBuf::from(s);
    if s.trim().is_empty() {
        return Err("give a directory".into());
    }
    if p.exists() && !p.is_dir() {
        return Err(format!("{s} exists and is not a directory"));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let path = config::path(args.config.as_deref());
    // Start from the existing file, so re-running init edits rather than resets; a file that
    // does not parse is not silently replaced.
    let mut c = match Config::load_or_default(&path) {
        Ok(c) => c,
        Err(_) if args.force => Config::default(),
        Err(e) => {
            return Err(e.context("pass --force to start again from the defaults"));
        }
    };
    if let Some(d) = &args.models_dir {
        c.models.dir = d.clone();
    }
    if let Some(t) = args.threads {
        c.runtime.threads = t;
    }
    if let Some(a) = &args.addr {
        c.server.addr = a.clone();
    }
    if let Some(d) = &args.database {
        c.server.database = d.clone();
    }
    if let Some(r) = &args.redis {
        c.server.redis = Some(r.clone()).filter(|r| !r.is_empty());
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("bitnet init asks questions on a terminal; use --yes (and flags) in scripts");
        }
        let theme = ColorfulTheme::default();
        if path.exists()
            && !args.force
            && !Confirm::with_theme(&theme)
                .with_prompt(format!("{} exists; edit it?", path.display()))
                .default(true)
                .interact()?
        {
            bail!("left {} unchanged", path.display());
        }
        let dir: String = Input::with_theme(&theme)
            .with_prompt("Models directory")
            .default(c.models.dir.display().to_string())
            .validate_with(validate_dir)
            .interact_text()?;
        c.models.dir = PathBuf::from(dir);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        c.runtime.threads = Input::with_theme(&theme)
            .with_prompt(format!("Kernel threads (0 = all {cores} cores)"))
            .default(c.runtime.threads)
            .validate_with(|n: &usize| {
                if *n <= 4 * cores {
                    Ok(())
                } else {
                    Err(format!("at most {} on this machine", 4 * cores))
                }
            })
            .interact_text()?;
        c.server.addr = Input::with_theme(&theme)
            .with_prompt("Server address")
            .default(c.server.addr.clone())
            .validate_with(|s: &String| config::validate_addr(s))
            .interact_text()?;
        c.server.database = Input::with_theme(&theme)
            .with_prompt("Database (sqlite://PATH or postgres://USER@HOST:PORT/DB)")
            .default(c.server.database.clone())
            .validate_with(|s: &String| config::validate_database(s))
            .interact_text()?;
        let redis: String = Input::with_theme(&theme)
            .with_prompt("Redis URL (empty for none)")
            .default(c.server.redis.clone().unwrap_or_default())
            .allow_empty(true)
            .validate_with(|s: &String| {
                if s.is_empty() {
                    Ok(())
                } else {
                    config::validate_redis(s)
                }
            })
            .interact_text()?;
        c.server.redis = Some(redis).filter(|r| !r.is_empty());
    }
    c.validate().context("the configuration is not valid")?;
    std::fs::create_dir_all(&c.models.dir)
        .with_context(|| format!("cannot create {}", c.models.dir.display()))?;
    if let Some(db) = c.server.database.strip_prefix("sqlite://")
        && let Some(parent) = std::path::Path::new(db).parent()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    c.save(&path)?;
    println!("wrote {}", path.display());
    println!("next: bitnet doctor");
    Ok(())
}
