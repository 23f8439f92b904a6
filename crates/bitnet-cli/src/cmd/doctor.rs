//! `bitnet doctor`: check what this setup needs and say what to fix.
//!
//! Each check is ok, a warning (works, but slower or limited) or a failure (something will not
//! work); the exit status is non-zero when any check fails.

use crate::config::{self, Config};
use anyhow::Result;
use bitnet_kernels::cpu;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, serde::Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &'static str, status: Status, detail: String, fix: Option<String>) -> Check {
    Check {
        name,
        status,
        detail,
        fix,
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// Connect to `host:port` within a second.
fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the host name resolves to nothing"))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    Ok(s)
}

/// Redis answers PING with +PONG (or -NOAUTH when it wants a password: it is there).
fn redis_ping(host: &str, port: u16) -> std::io::Result<String> {
    let mut s = connect(host, port)?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// PostgreSQL answers an SSLRequest with one byte, `S` or `N`.
fn postgres_probe(host: &str, port: u16) -> std::io::Result<u8> {
    let mut s = connect(host, port)?;
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn cuda_driver() -> Option<String> {
    if let Ok(v) = std::fs::read_to_string("/proc/driver/nvidia/version") {
        return Some(v.lines().next().unwrap_or("").trim().to_string());
    }
    [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/lib/wsl/lib/libcuda.so.1",
        "/usr/local/cuda/lib64/stubs/libcuda.so",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .map(|p| format!("libcuda at {p}"))
}

fn checks(path: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let f = cpu::features();
    let tier = cpu::tier();
    let feats: Vec<&str> = [
        ("avx2", f.avx2),
        ("fma", f.fma),
        ("f16c", f.f16c),
        ("avx-vnni", f.avx_vnni),
        ("avx512bw", f.avx512bw),
        ("avx512vnni", f.avx512vnni),
        ("avx512fp16", f.avx512fp16),
        ("amx-int8", f.amx_int8),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| *n)
    .collect();
    let (st, fix) = match tier {
        cpu::Tier::Scalar => (
            Status::Warn,
            Some("this CPU has no AVX2: the portable kernels are several times slower".into()),
        ),
        _ => (Status::Ok, None),
    };
    out.push(check(
        "cpu",
        st,
        format!(
            "kernel tier {tier}{}; features: {}",
            if f.amx_int8 && !f.amx_usable {
                " (AMX present but not granted by the kernel)"
            } else {
                ""
            },
            if feats.is_empty() {
                "none".to_string()
            } else {
                feats.join(" ")
            }
        ),
        fix,
    ));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    out.push(check("cores", Status::Ok, format!("{cores} usable"), None));
    match (meminfo("MemTotal:"), meminfo("MemAvailable:")) {
        (Some(total), Some(avail)) => {
            // A 2B ternary model with an f16 head needs about 1.3 GB resident.
            let (st, fix) = if avail < 2 << 30 {
                (
                    Status::Warn,
                    Some("less than 2 GiB free: a 2B model may not fit; close programs or use a smaller model".into()),
                )
            } else {
                (Status::Ok, None)
            };
            out.push(check(
                "memory",
                st,
                format!("{} total, {} available", gib(total), gib(avail)),
                fix,
            ));
        }
        _ => out.push(check(
            "memory",
            Status::Warn,
            "cannot read /proc/meminfo".into(),
            None,
        )),
    }
    let cfg = match Config::load_or_default(path) {
        Ok(c) => {
            out.push(check(
                "config",
                Status::Ok,
                if path.exists() {
                    format!("{} is valid", path.display())
                } else {
                    format!("{} does not exist; using the defaults", path.display())
                },
                (!path.exists()).then(|| "run `bitnet init` to write one".to_string()),
            ));
            c
        }
        Err(e) => {
            out.push(check(
                "config",
                Status::Fail,
                format!("{e:#}"),
                Some(format!(
                    "fix the file or run `bitnet init` to rewrite {}",
                    path.display()
                )),
            ));
            Config::default()
        }
    };
    let dir = &cfg.models.dir;
    if dir.is_dir() {
        let probe = dir.join(format!(".bitnet-doctor-{}", std::process::id()));
        let writable = std::fs::write(&probe, b"").is_ok();
        let _ = std::fs::remove_file(&probe);
        let models = super::models::list(dir).len();
        out.push(check(
            "models dir",
            if writable { Status::Ok } else { Status::Fail },
            format!(
                "{} ({models} model{}){}",
                dir.display(),
                if models == 1 { "" } else { "s" },
                if writable { "" } else { ", not writable" }
            ),
            (!writable).then(|| format!("make {} writable by this user", dir.display())),
        ));
        match bitnet_kernels::system::disk_free(dir) {
            Ok(free) => out.push(check(
                "disk",
                if free < 4 << 30 {
                    Status::Warn
                } else {
                    Status::Ok
                },
                format!("{} free under {}", gib(free), dir.display()),
                (free < 4 << 30).then(|| {
                    "converting a 2B model needs about 2 GB free, a 4.8 GB source more".into()
                }),
            )),
            Err(e) => out.push(check("disk", Status::Warn, e.to_string(), None)),
        }
    } else {
        out.push(check(
            "models dir",
            Status::Fail,
            format!("{} does not exist", dir.display()),
            Some(format!("run `bitnet init` or mkdir -p {}", dir.display())),
        ));
    }
    if let Some(m) = &cfg.models.default {
        let p = if Path::new(m).is_absolute() {
            PathBuf::from(m)
        } else {
            dir.join(m)
        };
        let res = if p.is_dir() {
            bitnet_formats::safetensors_dir::HfModelDir::open(&p).map(|_| ())
        } else {
            bitnet_formats::gguf::GgufFile::open(&p).map(|_| ())
        };
        out.push(match res {
            Ok(()) => check("default model", Status::Ok, p.display().to_string(), None),
            Err(e) => check(
                "default model",
                Status::Fail,
                format!("{}: {e}", p.display()),
                Some("point models.default at a GGUF file or a Hugging Face directory".into()),
            ),
        });
    }
    out.push(match cuda_driver() {
        Some(d) => check("cuda", Status::Ok, d, None),
        None => check(
            "cuda",
            Status::Ok,
            "no NVIDIA driver found: the CPU kernels will be used".into(),
            None,
        ),
    });
    let db = &cfg.server.database;
    if let Some(file) = db.strip_prefix("sqlite://") {
        let parent = Path::new(file)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        out.push(if parent.is_dir() {
            check("database", Status::Ok, format!("SQLite at {file}"), None)
        } else {
            check(
                "database",
                Status::Fail,
                format!("{} (for {db}) does not exist", parent.display()),
                Some(format!("mkdir -p {}", parent.display())),
            )
        });
    } else if let Some((h, p)) = db
        .split_once("://")
        .and_then(|(_, rest)| config::host_port(rest, 5432))
    {
        out.push(match postgres_probe(&h, p) {
            Ok(b'S' | b'N') => check(
                "database",
                Status::Ok,
                format!("PostgreSQL answers at {h}:{p}"),
                None,
            ),
            Ok(b) => check(
                "database",
                Status::Fail,
                format!("{h}:{p} answered {b:#x}, not as PostgreSQL does"),
                Some("check server.database".into()),
            ),
            Err(e) => check(
                "database",
                Status::Fail,
                format!("cannot reach PostgreSQL at {h}:{p}: {e}"),
                Some("start PostgreSQL or fix server.database".into()),
            ),
        });
    }
    if let Some(r) = &cfg.server.redis
        && let Some((h, p)) = r
            .strip_prefix("redis://")
            .and_then(|rest| config::host_port(rest, 6379))
    {
        out.push(match redis_ping(&h, p) {
            Ok(a) if a == "+PONG" || a.starts_with("-NOAUTH") => check(
                "redis",
                Status::Ok,
                format!("Redis answers at {h}:{p}"),
                None,
            ),
            Ok(a) => check(
                "redis",
                Status::Fail,
                format!("{h}:{p} answered {a:?}"),
                Some("check server.redis".into()),
            ),
            Err(e) => check(
                "redis",
                Status::Fail,
                format!("cannot reach Redis at {h}:{p}: {e}"),
                Some("start Redis or fix server.redis".into()),
            ),
        });
    }
    out
}

pub fn run(args: Args) -> Result<()> {
    let path = config::path(args.config.as_deref());
    let all = checks(&path);
    let failed = all.iter().filter(|c| c.status == Status::Fail).count();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"config": path, "ok": failed == 0, "checks": all})
        );
    } else {
        for c in &all {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("[{mark}] {:<14} {}", c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("       {:<14} fix: {f}", "");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
