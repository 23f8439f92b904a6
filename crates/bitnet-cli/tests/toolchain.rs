//! The conversion toolchain end to end: `convert` (atomic under kill -9 and a full disk,
//! `--verify`, GGUF sources), `quantize --report`, `init` (scripted and through a pseudo-terminal,
//! re-asking bad answers) and `doctor` (against the real PostgreSQL and Redis of this machine).

mod cli;
#[path = "../../bitnet-formats/tests/common/mod.rs"]
mod common;

use cli::{bitnet, succeeds};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A float-master BitNet directory big enough that converting it takes a while (19 MB of f32).
fn float_master(dir: &Path) {
    use safetensors::tensor::{Dtype, TensorView};
    let (h, inter, layers, heads, kv, vocab) = (256usize, 1024usize, 4usize, 4usize, 2usize, 2048);
    let hd = h / heads;
    let mut seed = 99u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let b: Vec<u8> = (0..n)
            .flat_map(|_| (offset + scale * rnd()).to_le_bytes())
            .collect();
        tensors.push((name, shape, b));
    };
    use bitnet_formats::names;
    add(names::EMBED.hf.into(), vec![vocab, h], 2.0, 0.0);
    add(names::OUTPUT_NORM.hf.into(), vec![h], 0.2, 1.0);
    let d = names::Dims {
        hidden: h,
        q: h,
        kv: kv * hd,
        inter,
    };
    for l in 0..layers {
        for t in names::LAYER {
            let (scale, offset) = if t.is_linear() {
                (0.1, 0.0)
            } else {
                (0.2, 1.0)
            };
            add(t.hf_weight(l), t.shape(&d), scale, offset);
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({"model_type": "bitnet", "architectures": ["BitNetForCausalLM"],
        "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "relu2", "tie_word_embeddings": true,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
            "quantization_mode": "online"}});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn src_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("src");
    std::fs::create_dir_all(&d).unwrap();
    float_master(&d);
    d
}

/// `convert --verify --json` converts, re-reads and reports; a GGUF source converts between
/// dialects and verifies too.
#[test]
fn convert_verifies_and_reads_gguf_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let src = src_dir(tmp.path());
    let out = tmp.path().join("m.tq2.gguf");
    let o = succeeds(
        bitnet()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .args(["--to", "tq2_0", "--verify", "--json"]),
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verify"]["ternary"], 28);
    assert_eq!(
        v["verify"]["tensors"],
        v["tensors"].as_array().unwrap().len()
    );
    let i2s = tmp.path().join("m.i2s.gguf");
    let o = succeeds(
        bitnet()
            .arg("convert")
            .arg(&out)
            .arg("-o")
            .arg(&i2s)
            .args(["--to", "i2_s", "--verify"]),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("verified: 46 tensors"), "{text}");
    // A llama GGUF has nothing to ternarize: a clear error, no output.
    if let Some(smol) = common::smollm2() {
        let bad = tmp.path().join("smol.gguf");
        let o = bitnet()
            .arg("convert")
            .arg(&smol)
            .arg("-o")
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("nothing to ternarize"),
            "{err}"
        );
        assert!(!bad.exists());
    }
}

/// SIGKILL at any moment of a conversion leaves an existing destination exactly as it was (or,
/// if the kill came after the rename, the complete new file): never a partial one.
#[test]
fn kill_9_never_leaves_a_partial_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let src = src_dir(tmp.path());
    let out = tmp.path().join("out.gguf");
    let old = b"the previous file, which must survive".to_vec();
    // How long an uninterrupted conversion takes here, to spread the kills over it. The first
    // run pays for a cold page cache and a loaded CI machine makes any one figure noisy, so the
    // estimate is the fastest run seen so far and keeps shrinking as finished runs come in;
    // the loop goes on until enough kills landed inside a conversion.
    let t0 = std::time::Instant::now();
    succeeds(bitnet().arg("convert").arg(&src).arg("-o").arg(&out));
    let mut full = t0.elapsed();
    let complete = std::fs::read(&out).unwrap();
    let (mut killed, mut finished) = (0, 0);
    for i in 0..64u32 {
        if killed >= 10 {
            break;
        }
        std::fs::write(&out, &old).unwrap();
        let delay = full * (i % 12) / 12;
        let started = std::time::Instant::now();
        let mut child = bitnet()
            .arg("convert")
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL (a no-op on a process that already exited)
        let status = child.wait().unwrap();
        let now = std::fs::read(&out).unwrap();
        if status.success() {
            finished += 1;
            full = full.min(started.elapsed());
            assert!(
                now == complete,
                "kill {i}: a finished run left another file"
            );
        } else {
            killed += 1;
            assert!(
                now == old || now == complete,
                "kill {i} after {delay:?}: destination is {} bytes, neither the old file nor the new",
                now.len()
            );
        }
    }
    assert!(
        killed >= 8,
        "only {killed} runs were killed ({finished} finished)"
    );
}

/// A write that runs out of room fails with a clear error and leaves no output file: a file
/// size limit (`ulimit -f`, EFBIG) everywhere, and a really full filesystem (a 1 MiB tmpfs in a
/// private mount namespace, ENOSPC) where this user may mount.
#[test]
fn full_disk_gives_a_clear_error_and_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = src_dir(tmp.path());
    let out = tmp.path().join("limited.gguf");
    let bin = env!("CARGO_BIN_EXE_bitnet");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 1024; exec '{bin}' convert '{}' -o '{}'",
            src.display(),
            out.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "conversion fit in 1 MiB?");
    assert!(
        err.contains("File too large") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists(), "a partial file was left");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let o = std::process::Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs '{m}' || exit 77; '{bin}' convert '{s}' -o '{m}/x.gguf'; rc=$?; ls -A '{m}' >&2; exit $rc",
            m = mnt.display(),
            s = src.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(77) || err.contains("unshare failed") {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the tmpfs case (as root): {err}"
        );
        eprintln!("skipping the tmpfs case: cannot mount here ({err})");
        return;
    }
    assert!(!o.status.success(), "conversion fit in a 1 MiB tmpfs?");
    assert!(
        err.contains("No space left on device") && !err.contains("panicked"),
        "{err}"
    );
    // `ls -A` of the full filesystem after the failure printed nothing: no file, no temp.
    let listing: Vec<&str> = err
        .lines()
        .filter(|l| l.ends_with(".gguf") || l.ends_with(".tmp"))
        .collect();
    assert!(listing.is_empty(), "left on the full disk: {listing:?}");
}

/// `quantize --report --json` measures every linear layer under each granularity: finer scales
/// never fit worse, and the perplexity of source and output is reported.
#[test]
fn quantize_reports_errors_per_granularity() {
    let tmp = tempfile::tempdir().unwrap();
    let src = src_dir(tmp.path());
    let o = succeeds(bitnet().arg("quantize").arg(&src).args([
        "--report",
        "--json",
        "--granularity",
        "tensor,channel,group:64",
    ]));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = v["tensors"].as_array().unwrap();
    assert_eq!(t.len(), 28);
    for x in t {
        let g = &x["granularities"];
        let cos = |k: &str| g[k]["cosine"].as_f64().unwrap();
        assert!(cos("tensor") > 0.5 && cos("tensor") < 1.0, "{x}");
        assert!(cos("group:64") >= cos("tensor") - 1e-3, "{x}");
        let z = g["tensor"]["zero_fraction"].as_f64().unwrap();
        assert!(z > 0.1 && z < 0.6, "{x}");
    }
    assert!(v["summary"]["channel"]["mse"].as_f64().unwrap() > 0.0);
    let bad = bitnet()
        .arg("quantize")
        .arg(&src)
        .args(["--granularity", "rows"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use tensor, channel or group:N"));
}

/// `init --yes` then `doctor` succeed on a fresh home; doctor reaches the real PostgreSQL and
/// Redis when they are configured, and fails (with a fix) when they cannot be reached.
#[test]
fn init_yes_then_doctor() {
    let home = tempfile::tempdir().unwrap();
    let env = |c: &mut std::process::Command| {
        c.env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_DATA_HOME")
            .env_remove("BITNET_CONFIG");
    };
    let mut c = bitnet();
    env(&mut c);
    succeeds(c.args(["init", "--yes"]));
    let cfg = home.path().join(".config/bitnet/config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("127.0.0.1:8080") && text.contains("sqlite://"),
        "{text}"
    );
    assert!(home.path().join(".local/share/bitnet/models").is_dir());
    let mut c = bitnet();
    env(&mut c);
    let o = succeeds(c.args(["doctor", "--json"]));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "cpu",
        "cores",
        "memory",
        "config",
        "models dir",
        "disk",
        "cuda",
        "database",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // The real services of this machine (CI starts them).
    let mut c = bitnet();
    env(&mut c);
    succeeds(c.args([
        "init",
        "--yes",
        "--database",
        "postgres://postgres@127.0.0.1:5432/test",
        "--redis",
        "redis://127.0.0.1:6379",
    ]));
    let mut c = bitnet();
    env(&mut c);
    let o = c.args(["doctor", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let status = |n: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .map(|c| c["status"].as_str().unwrap().to_string())
    };
    if std::env::var("CI").is_ok() || o.status.success() {
        assert_eq!(status("database").as_deref(), Some("ok"), "{v}");
        assert_eq!(status("redis").as_deref(), Some("ok"), "{v}");
    }
    // A config that does not parse is not silently replaced by `init`.
    std::fs::write(&cfg, "[server\n").unwrap();
    let mut c = bitnet();
    env(&mut c);
    let o = c.args(["init", "--yes"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "[server\n");
    // Nothing listens on port 1: a failure with a fix, and a non-zero exit.
    let mut c = bitnet();
    env(&mut c);
    succeeds(c.args(["init", "--yes", "--force", "--redis", "redis://127.0.0.1:1"]));
    let mut c = bitnet();
    env(&mut c);
    let o = c.args(["doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("FAIL") && text.contains("start Redis"),
        "{text}"
    );
}

/// The wizard on a real pseudo-terminal: bad answers are re-asked, and the file it writes is the
/// one `init --yes` writes from the same values as flags.
#[test]
fn init_wizard_on_a_pty_reasks_and_matches_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let by_wizard = tmp.path().join("wizard.toml");
    let by_flags = tmp.path().join("flags.toml");
    let models = tmp.path().join("models");
    let db = format!("sqlite://{}/bitnet.db", tmp.path().display());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bitnet"));
    cmd.arg("init").arg("--config").arg(&by_wizard);
    cmd.env("HOME", tmp.path()).env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(20_000)).unwrap();
    let step = Duration::from_millis(50);
    p.exp_string("Models directory").unwrap();
    std::thread::sleep(step);
    p.send_line(&models.display().to_string()).unwrap();
    p.exp_string("Kernel threads").unwrap();
    std::thread::sleep(step);
    p.send_line("100000").unwrap();
    p.exp_string("at most").unwrap();
    p.exp_string("Kernel threads").unwrap();
    std::thread::sleep(step);
    p.send_line("2").unwrap();
    p.exp_string("Server address").unwrap();
    std::thread::sleep(step);
    p.send_line("not-an-address").unwrap();
    p.exp_string("is not an address").unwrap();
    std::thread::sleep(step);
    p.send_line("127.0.0.1:9090").unwrap();
    p.exp_string("Database").unwrap();
    std::thread::sleep(step);
    p.send_line("mysql://nope").unwrap();
    p.exp_string("is not a database URL").unwrap();
    std::thread::sleep(step);
    p.send_line(&db).unwrap();
    p.exp_string("Redis URL").unwrap();
    std::thread::sleep(step);
    p.send_line("").unwrap();
    p.exp_string("wrote").unwrap();
    p.exp_eof().unwrap();
    succeeds(
        bitnet()
            .env("HOME", tmp.path())
            .arg("init")
            .arg("--yes")
            .arg("--config")
            .arg(&by_flags)
            .arg("--models-dir")
            .arg(&models)
            .args([
                "--threads",
                "2",
                "--addr",
                "127.0.0.1:9090",
                "--database",
                &db,
            ]),
    );
    let (a, b) = (
        std::fs::read_to_string(&by_wizard).unwrap(),
        std::fs::read_to_string(&by_flags).unwrap(),
    );
    assert_eq!(a, b);
    assert!(
        a.contains("threads = 2") && a.contains("127.0.0.1:9090"),
        "{a}"
    );
}
