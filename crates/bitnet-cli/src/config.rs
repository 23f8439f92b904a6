//! The configuration file `bitnet init` writes and the CLI and server read (TOML).
//!
//! Found at `--config PATH`, else `$BITNET_CONFIG`, else `$XDG_CONFIG_HOME/bitnet/config.toml`
//! (`~/.config/bitnet/config.toml`). Every field has a default, so a missing file means
//! "defaults", and a file only needs the fields that differ.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub models: Models,
    pub runtime: Runtime,
    pub server: Server,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Models {
    /// Where models are kept (converted files, the registry's files).
    pub dir: PathBuf,
    /// The model `run`, `chat` and `serve` use when none is named (a path, or a file name in
    /// `dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Runtime {
    /// Kernel threads (0: every core this process may use).
    pub threads: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Address `bitnet serve` listens on.
    pub addr: String,
    /// Database URL: `sqlite://PATH` (embedded, the default) or `postgres://...`.
    pub database: String,
    /// Where uploaded files and models are kept: `file:///DIR` (the default, under the data
    /// directory) or `s3://BUCKET[/PREFIX]` (endpoint and credentials from `AWS_*`).
    pub storage: String,
    /// The master key that wraps each organization's data key (made on first start if
    /// missing; `BITNET_MASTER_KEY` holding the key itself wins over the file).
    pub master_key_file: PathBuf,
    /// Redis URL for shared rate limits and queues when running several servers (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// OpenTelemetry collector (OTLP over HTTP, e.g. `http://127.0.0.1:4318`) that `bitnet
    /// serve` exports request traces to (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Where `bitnet serve` publishes the event outbox: NATS JetStream (`nats://HOST:PORT`,
    /// stream `BITNET_EVENTS`) or Kafka (`kafka://HOST:PORT[/TOPIC]`) (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
}

/// `~/.local/share/bitnet` (or `$XDG_DATA_HOME/bitnet`).
pub fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("bitnet")
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

impl Default for Models {
    fn default() -> Self {
        Self {
            dir: data_dir().join("models"),
            default: None,
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            database: format!("sqlite://{}", data_dir().join("bitnet.db").display()),
            storage: format!("file://{}", data_dir().join("storage").display()),
            master_key_file: data_dir().join("master.key"),
            redis: None,
            otlp_endpoint: None,
            events: None,
        }
    }
}

/// Where the configuration lives: `explicit`, else `$BITNET_CONFIG`, else the XDG path.
pub fn path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("BITNET_CONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("bitnet/config.toml")
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        c.validate()
            .with_context(|| format!("{} is not valid", path.display()))?;
        Ok(c)
    }

    /// The file at `path` if there is one, else the defaults.
    pub fn load_or_default(path: &Path) -> Result<Self> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::default())
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_addr(&self.server.addr).map_err(anyhow::Error::msg)?;
        validate_database(&self.server.database).map_err(anyhow::Error::msg)?;
        if let Some(r) = &self.server.redis {
            validate_redis(r).map_err(anyhow::Error::msg)?;
        }
        if self.models.dir.as_os_str().is_empty() {
            bail!("models.dir is empty");
        }
        Ok(())
    }

    /// Write atomically (temp file, fsync, rename), creating the parent directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = format!(
            "# bitnet configuration, written by `bitnet init`; read by the CLI and `bitnet serve`.\n{}",
            toml::to_string_pretty(self)?
        );
        bitnet_formats::atomic::write_atomic(path, |w| {
            w.write_all(text.as_bytes())
                .map_err(|e| bitnet_formats::FormatError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
        })
        .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A `host:port` the server can bind.
pub fn validate_addr(s: &str) -> Result<(), String> {
    s.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:8080"))
}

/// `sqlite://PATH` or `postgres://` / `postgresql://` URL.
pub fn validate_database(s: &str) -> Result<(), String> {
    if let Some(p) = s.strip_prefix("sqlite://") {
        if p.is_empty() {
            return Err(
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/bitnet/bitnet.db".into(),
            );
        }
        return Ok(());
    }
    if let Some(rest) = s
        .strip_prefix("postgres://")
        .or_else(|| s.strip_prefix("postgresql://"))
        && host_port(rest, 5432).is_some()
    {
        return Ok(());
    }
    Err(format!(
        "{s:?} is not a database URL: use sqlite://PATH or postgres://USER@HOST:PORT/DB"
    ))
}

/// `redis://HOST[:PORT][/DB]`.
pub fn validate_redis(s: &str) -> Result<(), String> {
    match s.strip_prefix("redis://").and_then(|r| host_port(r, 6379)) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{s:?} is not a Redis URL like redis://127.0.0.1:6379"
        )),
    }
}

/// The `host:port` of a URL's authority (after the scheme), with a default port.
pub fn host_port(rest: &str, default_port: u16) -> Option<(String, u16)> {
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit('@').next()?;
    if hostport.is_empty() {
        return None;
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((hostport.to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/config.toml");
        let mut c = Config::default();
        c.models.default = Some("m.gguf".into());
        c.server.redis = Some("redis://127.0.0.1:6379".into());
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
        // Partial files take defaults; unknown keys and bad values are refused with the path.
        std::fs::write(&p, "[runtime]\nthreads = 3\n").unwrap();
        assert_eq!(Config::load(&p).unwrap().runtime.threads, 3);
        std::fs::write(&p, "[runtime]\nthread = 3\n").unwrap();
        assert!(format!("{:#}", Config::load(&p).unwrap_err()).contains("unknown field"));
        std::fs::write(&p, "[server]\naddr = \"nowhere\"\n").unwrap();
        assert!(format!("{:#}", Config::load(&p).unwrap_err()).contains("not an address"));
        assert!(validate_database("postgres://postgres@127.0.0.1:5432/test").is_ok());
        assert!(validate_database("mysql://x").is_err());
        assert!(validate_database("sqlite://").is_err());
        assert_eq!(
            host_port("u:p@db.example:6000/x", 5432),
            Some(("db.example".into(), 6000))
        );
        assert_eq!(host_port("h/x", 5432), Some(("h".into(), 5432)));
        assert!(validate_redis("redis://:bad").is_err());
    }
}
