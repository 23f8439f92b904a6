//! `bitnet models`: the models in the models directory (`models.dir` of the configuration), and
//! finding one by name, so `-m NAME` works as `ollama run NAME` does.

use crate::config::{self, Config};
use anyhow::Result;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A model in the models directory: a GGUF file or a Hugging Face directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// What `-m` takes: the file name without `.gguf`, or the directory's name.
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub kind: &'static str,
}

/// The models in `dir`, by name (a missing directory has none).
pub fn list(dir: &Path) -> Vec<Entry> {
    let mut out: Vec<Entry> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_string_lossy().into_owned();
            if path.extension().is_some_and(|x| x == "gguf") && path.is_file() {
                let bytes = e.metadata().map_or(0, |m| m.len());
                let name = name.trim_end_matches(".gguf").to_string();
                Some(Entry {
                    name,
                    path,
                    bytes,
                    kind: "gguf",
                })
            } else if path.join("config.json").is_file() {
                let bytes = std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum();
                Some(Entry {
                    name,
                    path,
                    bytes,
                    kind: "hf",
                })
            } else {
                None
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `-m` as given: a path that exists, else a model of that name in the models directory.
pub fn resolve(m: &Path) -> PathBuf {
    if m.exists() || m.components().count() != 1 {
        return m.to_path_buf();
    }
    let Ok(cfg) = Config::load_or_default(&config::path(None)) else {
        return m.to_path_buf();
    };
    let name = m.to_string_lossy();
    list(&cfg.models.dir)
        .into_iter()
        .find(|e| e.name == name || e.path.file_name().is_some_and(|f| f == m.as_os_str()))
        .map_or_else(|| m.to_path_buf(), |e| e.path)
}

pub fn run(args: Args) -> Result<()> {
    let cfg = Config::load_or_default(&config::path(args.config.as_deref()))?;
    let dir = &cfg.models.dir;
    let models = list(dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
        return Ok(());
    }
    if !dir.is_dir() {
        eprintln!(
            "the models directory {} does not exist: `bitnet init` sets it up",
            dir.display()
        );
        return Ok(());
    }
    if models.is_empty() {
        eprintln!(
            "no models in {} (GGUF files or Hugging Face directories; `bitnet convert ... -o {}/NAME.gguf` adds one)",
            dir.display(),
            dir.display()
        );
        return Ok(());
    }
    println!("{:<40} {:>6} {:>10}  path", "name", "kind", "size");
    for m in &models {
        println!(
            "{:<40} {:>6} {:>8.1} MB  {}",
            m.name,
            m.kind,
            m.bytes as f64 / 1e6,
            m.path.display()
        );
    }
    Ok(())
}
