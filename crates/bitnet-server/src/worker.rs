//! Quantization workers: claim a job from the database queue, fetch its source file from
//! storage, unpack and convert it (as `bitnet convert` does), verify the output against the
//! source, measure the fidelity report, store the result sealed, and make it a registry
//! version, all while heartbeats keep the lease.
//!
//! Nothing of a failed, cancelled or abandoned attempt stays: the work happens in a scratch
//! directory of the job (removed at the end, and by the next attempt if this worker is killed),
//! the result is written to storage under a name of the attempt's own
//! (`orgs/ORG/jobs/JOB/attempt-N.gguf`), and it becomes a file and a version in the same
//! transaction that marks the job succeeded, only if the job is still this worker's. Stale
//! results of earlier attempts are removed when an attempt starts and when one succeeds.
//!
//! A heartbeat every quarter of the lease (at most every 500 ms) extends the lease and learns
//! of a cancel, which stops the conversion after the tensor being written.

use bitnet_formats::archive::{Limits, PackageKind, SNIFF_BYTES, sniff, unpack_model_tar};
use bitnet_formats::gguf::{GgmlType, GgufFile};
use bitnet_model::convert::{
    ConvertOptions, ConvertReport, convert_gguf_to_gguf, convert_hf_to_gguf, verify,
};
use bitnet_platform::jobs::{Beat, QuantJob, result_model_name};
use bitnet_platform::registry::NewVersion;
use bitnet_platform::storage::Storage;
use bitnet_platform::{PlatformError, Store};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Names the worker in leases and events (host and process id by default).
    pub id: String,
    /// How long a claim lasts without a heartbeat: a killed worker's job is taken over after it.
    pub lease: Duration,
    /// Most jobs of one organization running at once, over every worker.
    pub per_org: i64,
    /// Where jobs unpack and convert (a directory per job).
    pub scratch: PathBuf,
    /// The wait between looks at an empty queue.
    pub poll: Duration,
}

impl WorkerConfig {
    pub fn new(id: String, scratch: PathBuf) -> Self {
        Self {
            id,
            lease: Duration::from_secs(30),
            per_org: 2,
            scratch,
            poll: Duration::from_secs(1),
        }
    }
}

/// A worker name: the host name and the process id, plus `suffix` (several workers in one
/// process).
pub fn default_worker_id(suffix: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{suffix}", std::process::id())
}

/// Why an attempt ended without a result.
#[derive(Debug)]
enum Failure {
    /// The input cannot be converted: the job fails for good with this message.
    Input(String),
    /// Something that may pass (storage, database, disk): retried while attempts remain.
    Internal(String),
    /// Cancelled, lost or stopped: the flags say which.
    Stopped,
}

impl From<PlatformError> for Failure {
    fn from(e: PlatformError) -> Self {
        Failure::Internal(e.to_string())
    }
}

/// What the job is doing, shared with the progress reporter.
#[derive(Debug, Default)]
struct Progress {
    /// 0: download, 1: unpack, 2: convert, 3: verify, 4: measure, 5: store.
    phase: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    tensors_done: AtomicU64,
}

const PHASES: [&str; 6] = [
    "download", "unpack", "convert", "verify", "measure", "store",
];

impl Progress {
    /// The phase's name and the counters as they stand, as an event's data.
    fn snapshot(&self) -> (&'static str, Value) {
        let phase = PHASES
            .get(self.phase.load(Ordering::Relaxed) as usize)
            .copied()
            .unwrap_or("work");
        let data = json!({
            "phase": phase,
            "bytes_done": self.bytes_done.load(Ordering::Relaxed),
            "bytes_total": self.bytes_total.load(Ordering::Relaxed),
            "tensors_done": self.tensors_done.load(Ordering::Relaxed),
        });
        (phase, data)
    }
}

/// Record a progress event of a job; a failure to is logged (the job goes on).
async fn progress_event(store: &Store, job: &str, message: &str, data: Value) {
    if let Err(e) = store.job_event(job, "info", message, data).await {
        tracing::warn!(job = %job, error = %e, "cannot record a job event");
    }
}

/// Flags of one attempt.
#[derive(Debug, Default)]
struct Flags {
    /// The job was cancelled.
    cancel: AtomicBool,
    /// The lease is no longer ours.
    lost: AtomicBool,
    /// The worker is shutting down.
    stop: AtomicBool,
    /// Any of them: the conversion checks it after every tensor.
    halt: Arc<AtomicBool>,
}

impl Flags {
    fn halted(&self) -> bool {
        self.halt.load(Ordering::Relaxed)
    }
}

/// Run jobs until `stop` turns true; a job running then is handed back to the queue.
pub async fn run(
    store: Store,
    storage: Arc<Storage>,
    cfg: WorkerConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!(worker = %cfg.id, "quantization worker started");
    if let Err(e) = std::fs::create_dir_all(&cfg.scratch) {
        tracing::error!(error = %e, dir = %cfg.scratch.display(), "cannot make the worker's scratch directory");
    }
    loop {
        if *stop.borrow() {
            break;
        }
        match store.claim_job(&cfg.id, cfg.lease, cfg.per_org).await {
            Ok(Some(job)) => {
                run_job(&store, &storage, &cfg, job, stop.clone()).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot claim a quantization job"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.poll) => {}
            _ = stop.changed() => {}
        }
    }
    tracing::info!(worker = %cfg.id, "quantization worker stopped");
}

fn result_object(job: &QuantJob) -> String {
    format!(
        "orgs/{}/jobs/{}/attempt-{}.gguf",
        job.organization_id, job.id, job.attempts
    )
}

fn job_prefix(job: &QuantJob) -> String {
    format!("orgs/{}/jobs/{}/", job.organization_id, job.id)
}

/// Remove what earlier attempts of `job` left in storage, except `keep`.
async fn remove_stale(storage: &Storage, job: &QuantJob, keep: Option<&str>) {
    match storage.list(&job_prefix(job)).await {
        Ok(objects) => {
            for o in objects {
                if Some(o.as_str()) != keep
                    && let Err(e) = storage.delete(&o).await
                {
                    tracing::warn!(object = %o, error = %e, "cannot remove a stale job result");
                }
            }
        }
        Err(e) => tracing::warn!(job = %job.id, error = %e, "cannot list a job's stored results"),
    }
}

async fn run_job(
    store: &Store,
    storage: &Arc<Storage>,
    cfg: &WorkerConfig,
    job: QuantJob,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let id = job.id.clone();
    tracing::info!(job = %id, attempt = job.attempts, "quantization job started");
    let flags = Arc::new(Flags::default());
    let progress = Arc::new(Progress::default());
    // Heartbeats: extend the lease, learn of a cancel.
    let beat = (cfg.lease / 4).min(Duration::from_millis(500));
    let heart = {
        let (store, flags, id, worker, lease) = (
            store.clone(),
            flags.clone(),
            id.clone(),
            cfg.id.clone(),
            cfg.lease,
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(beat) => {}
                    _ = stop.changed() => {
                        if *stop.borrow() {
                            flags.stop.store(true, Ordering::Relaxed);
                            flags.halt.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                match store.heartbeat(&id, &worker, lease).await {
                    Ok(Beat::Continue) => {}
                    Ok(Beat::Cancel) => {
                        flags.cancel.store(true, Ordering::Relaxed);
                        flags.halt.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(Beat::Lost) => {
                        flags.lost.store(true, Ordering::Relaxed);
                        flags.halt.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "heartbeat failed"),
                }
            }
        })
    };
    // Progress events, at most one a second, when something moved.
    let reporter = {
        let (store, progress, id) = (store.clone(), progress.clone(), id.clone());
        tokio::spawn(async move {
            let mut last = Value::Null;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (phase, data) = progress.snapshot();
                if data == last {
                    continue;
                }
                let message = format!(
                    "{phase}: {:.1} of {:.1} MiB, {} tensors",
                    data["bytes_done"].as_u64().unwrap_or(0) as f64 / 1048576.0,
                    data["bytes_total"].as_u64().unwrap_or(0) as f64 / 1048576.0,
                    data["tensors_done"]
                );
                progress_event(&store, &id, &message, data.clone()).await;
                last = data;
            }
        })
    };
    let scratch = cfg.scratch.join(&id);
    let object = result_object(&job);
    let result = attempt(
        store, storage, &job, &scratch, &object, &cfg.id, &flags, &progress,
    )
    .await;
    heart.abort();
    reporter.abort();
    let _ = tokio::fs::remove_dir_all(&scratch).await;
    let worker = cfg.id.as_str();
    let report = |r: Result<bool, PlatformError>| {
        if let Err(e) = r {
            tracing::warn!(job = %id, error = %e, "cannot record the job's end");
        }
    };
    if flags.lost.load(Ordering::Relaxed) {
        tracing::warn!(job = %id, "the job's lease was lost; another worker has it");
        let _ = storage.delete(&object).await;
        return;
    }
    if flags.cancel.load(Ordering::Relaxed) {
        let _ = storage.delete(&object).await;
        report(store.job_cancelled(&id, worker).await);
        tracing::info!(job = %id, "quantization job cancelled");
        return;
    }
    let (code, message, retry) = match result {
        Ok(()) => {
            remove_stale(storage, &job, Some(&object)).await;
            tracing::info!(job = %id, "quantization job succeeded");
            return;
        }
        Err(Failure::Stopped) => (
            "worker_stopped",
            "the worker running the job shut down".to_string(),
            true,
        ),
        // Bad input fails for good; anything else may pass and is retried.
        Err(Failure::Input(m)) => ("invalid_file", m, false),
        Err(Failure::Internal(m)) => ("internal_error", m, true),
    };
    let _ = storage.delete(&object).await;
    tracing::info!(job = %id, code, error = %message, "quantization job attempt failed");
    report(store.job_failed(&id, worker, code, &message, retry).await);
}

/// Milliseconds to pause after each tensor (tests stretch a tiny job with it, to kill or
/// cancel it midway). Not for production use.
fn test_pause() -> Option<Duration> {
    std::env::var("BITNET_TEST_JOB_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// An event for the end of a phase, with the counters as they stand.
async fn phase_done(store: &Store, job: &QuantJob, progress: &Progress, message: String) {
    let (_, mut data) = progress.snapshot();
    data["done"] = true.into();
    progress_event(store, &job.id, &message, data).await;
}

/// A blocking reader over the pieces a channel brings (a stream from storage, read by the
/// tar unpacker on the blocking pool).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Run a blocking step on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Failure::Internal(format!("a worker task failed: {e}"))))
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    store: &Store,
    storage: &Arc<Storage>,
    job: &QuantJob,
    scratch: &Path,
    object: &str,
    worker: &str,
    flags: &Arc<Flags>,
    progress: &Arc<Progress>,
) -> Result<(), Failure> {
    let halted = || {
        if flags.halted() {
            Err(Failure::Stopped)
        } else {
            Ok(())
        }
    };
    // What a killed attempt left.
    let _ = tokio::fs::remove_dir_all(scratch).await;
    remove_stale(storage, job, None).await;
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| Failure::Internal(format!("cannot make {}: {e}", scratch.display())))?;
    let (org, project) = (&job.organization_id, &job.project_id);
    // 1. The source file, streamed to the scratch directory.
    let (file, mut body) = store
        .file_content(storage, org, project, &job.file, None)
        .await
        .map_err(|e| match e {
            PlatformError::NotFound { .. } => {
                Failure::Input(format!("the source file {} no longer exists", job.file))
            }
            e => e.into(),
        })?;
    let name = result_model_name(&job.params, &file.filename)
        .map_err(|e| Failure::Input(e.to_string()))?;
    progress
        .bytes_total
        .store(file.bytes as u64, Ordering::Relaxed);
    // The first bytes say what the file is.
    let mut head: Vec<u8> = Vec::with_capacity(SNIFF_BYTES);
    let mut early: Vec<Bytes> = Vec::new();
    while head.len() < SNIFF_BYTES {
        let Some(piece) = body.next().await else {
            break;
        };
        let piece = piece?;
        let take = piece.len().min(SNIFF_BYTES - head.len());
        head.extend_from_slice(&piece[..take]);
        progress
            .bytes_done
            .fetch_add(piece.len() as u64, Ordering::Relaxed);
        early.push(piece);
    }
    let kind = sniff(&head);
    // 2. A tar streams from storage into the unpacker (nothing of it is written but the
    // files); a GGUF is written to the scratch directory as it is.
    let src: PathBuf = match kind {
        PackageKind::Gguf => {
            let source = scratch.join("source.gguf");
            let mut out = tokio::fs::File::create(&source).await.map_err(|e| {
                Failure::Internal(format!("cannot write {}: {e}", source.display()))
            })?;
            let write_err =
                |e: std::io::Error| Failure::Internal(format!("cannot write the source: {e}"));
            for piece in early {
                out.write_all(&piece).await.map_err(write_err)?;
            }
            while let Some(piece) = body.next().await {
                halted()?;
                let piece = piece?;
                out.write_all(&piece).await.map_err(write_err)?;
                progress
                    .bytes_done
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            out.flush().await.map_err(write_err)?;
            source
        }
        PackageKind::Tar | PackageKind::GzipTar => {
            let gzip = kind == PackageKind::GzipTar;
            let dest = scratch.join("model");
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(8);
            let unpack = blocking(move || {
                let reader = ChannelReader {
                    rx,
                    current: Bytes::new(),
                };
                unpack_model_tar(
                    std::io::BufReader::with_capacity(1 << 20, reader),
                    gzip,
                    &dest,
                    Limits::default(),
                )
                .map_err(|e| Failure::Input(format!("cannot unpack the archive: {e}")))
            });
            progress.phase.store(1, Ordering::Relaxed);
            let feed = async move {
                for piece in early {
                    if tx.send(Ok(piece)).await.is_err() {
                        return Ok(());
                    }
                }
                while let Some(piece) = body.next().await {
                    let piece = match (halted(), piece) {
                        (Err(e), _) => {
                            let _ = tx.send(Err("stopped".into())).await;
                            return Err(e);
                        }
                        (_, Err(e)) => {
                            // The unpacker must not take a cut-off stream for a short tar.
                            let _ = tx.send(Err(e.to_string())).await;
                            return Err(Failure::from(e));
                        }
                        (_, Ok(p)) => p,
                    };
                    let n = piece.len() as u64;
                    // The unpacker stopped (a refused archive): its error says why.
                    if tx.send(Ok(piece)).await.is_err() {
                        return Ok(());
                    }
                    progress.bytes_done.fetch_add(n, Ordering::Relaxed);
                }
                Ok::<(), Failure>(())
            };
            // The feed's end drops the sender: the unpacker sees the end of the stream.
            let (unpacked, fed) = tokio::join!(unpack, feed);
            fed?;
            unpacked?.model_dir
        }
        PackageKind::Onnx => {
            return Err(Failure::Input(
                "an ONNX file alone has no config.json; upload a tar of the export's directory \
                 (config.json beside model.onnx)"
                    .into(),
            ));
        }
        PackageKind::Unknown => {
            return Err(Failure::Input(
                "the file is not a GGUF, an ONNX file or a tar of a Hugging Face directory".into(),
            ));
        }
    };
    phase_done(
        store,
        job,
        progress,
        format!(
            "downloaded {} ({:.1} MiB){}",
            file.filename,
            file.bytes as f64 / 1048576.0,
            if src.is_dir() { " and unpacked it" } else { "" }
        ),
    )
    .await;
    halted()?;
    let from_dir = src.is_dir();
    if from_dir && !src.join("config.json").is_file() {
        return Err(Failure::Input(
            "the archive holds no config.json: a Hugging Face model directory needs one".into(),
        ));
    }
    // The file is good: the job runs.
    if !store.job_running(&job.id, worker).await? {
        flags.lost.store(true, Ordering::Relaxed);
        return Err(Failure::Stopped);
    }
    // 3. Convert.
    progress.phase.store(2, Ordering::Relaxed);
    progress.bytes_done.store(0, Ordering::Relaxed);
    let ternary = GgmlType::from_name(&job.params.to)
        .ok_or_else(|| Failure::Input(format!("unknown type {:?}", job.params.to)))?;
    let float_type = match &job.params.embeddings {
        Some(e) => GgmlType::from_name(e)
            .ok_or_else(|| Failure::Input(format!("unknown embeddings type {e:?}")))?,
        None => GgmlType::F16,
    };
    let opts = ConvertOptions {
        ternary,
        float_type,
        cancel: Some(flags.halt.clone()),
    };
    let dst = scratch.join("out.gguf");
    let conv: ConvertReport = {
        let (src, dst, opts, p, f) = (
            src.clone(),
            dst.clone(),
            opts.clone(),
            progress.clone(),
            flags.clone(),
        );
        let keep_float = job.params.embeddings.is_none();
        let pause = test_pause();
        let f2 = flags.clone();
        blocking(move || {
            let mut each = |done: u64, total: u64, _name: &str| {
                p.bytes_done.store(done, Ordering::Relaxed);
                p.bytes_total.store(total, Ordering::Relaxed);
                p.tensors_done.fetch_add(1, Ordering::Relaxed);
                if let Some(d) = pause {
                    // In small steps, so a cancel is seen at once.
                    let t = std::time::Instant::now();
                    while t.elapsed() < d && !f2.halted() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            };
            let r = if from_dir {
                convert_hf_to_gguf(&src, &dst, &opts, &mut each)
            } else {
                convert_gguf_to_gguf(&src, &dst, &opts, keep_float, &mut each)
            };
            r.map_err(|e| {
                if f.halted() {
                    Failure::Stopped
                } else {
                    Failure::Input(format!("cannot convert the model: {e}"))
                }
            })
        })
        .await?
    };
    halted()?;
    phase_done(
        store,
        job,
        progress,
        format!(
            "converted {} tensors to {} ({:.1} MiB)",
            conv.tensors.len(),
            job.params.to,
            conv.bytes_written as f64 / 1048576.0
        ),
    )
    .await;
    // 4. Verify the output against the source, tensor by tensor, and measure what
    // ternarization cost, side by side (they read the same files on two threads).
    progress.phase.store(3, Ordering::Relaxed);
    let verifying = {
        let (src, dst) = (src.clone(), dst.clone());
        blocking(move || {
            verify(&src, &dst)
                .map_err(|e| Failure::Internal(format!("the output failed verification: {e}")))
        })
    };
    let measuring = {
        let src = src.clone();
        blocking(move || Ok(measure(&src)))
    };
    let (verified, measured) = tokio::join!(verifying, measuring);
    let (verified, measured) = (verified?, measured?);
    halted()?;
    phase_done(
        store,
        job,
        progress,
        format!(
            "verified {} tensors against the source ({} ternary: codes identical)",
            verified.tensors, verified.ternary
        ),
    )
    .await;
    // 5. The fidelity report.
    progress.phase.store(4, Ordering::Relaxed);
    let (report, architecture, parameters) = {
        let (dst, to) = (dst.clone(), job.params.to.clone());
        blocking(move || Ok(fidelity(&dst, &to, &conv, &verified, measured))).await?
    };
    halted()?;
    // 6. Store the result sealed, then make it a file and a registry version with the job's
    // success, in one transaction.
    progress.phase.store(5, Ordering::Relaxed);
    let bytes = tokio::fs::metadata(&dst)
        .await
        .map_err(|e| Failure::Internal(e.to_string()))?
        .len();
    progress.bytes_total.store(bytes, Ordering::Relaxed);
    progress.bytes_done.store(0, Ordering::Relaxed);
    let f = tokio::fs::File::open(&dst)
        .await
        .map_err(|e| Failure::Internal(e.to_string()))?;
    let p = progress.clone();
    let fl = flags.clone();
    let stream = futures_util::stream::unfold(f, move |mut f| {
        let (p, fl) = (p.clone(), fl.clone());
        async move {
            if fl.halted() {
                return Some((Err("the job was stopped".to_string()), f));
            }
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    p.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
                    Some((Ok(Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e.to_string()), f)),
            }
        }
    });
    let segment = store
        .write_segment_at(storage, org, object, Box::pin(stream), u64::MAX)
        .await
        .map_err(|e| {
            if flags.halted() {
                Failure::Stopped
            } else {
                Failure::from(e)
            }
        })?;
    halted()?;
    phase_done(
        store,
        job,
        progress,
        format!(
            "stored the result sealed ({:.1} MiB)",
            bytes as f64 / 1048576.0
        ),
    )
    .await;
    let nv = NewVersion {
        name: name.clone(),
        format: job.params.to.clone(),
        architecture,
        parameters,
        source_file_id: Some(job.file.clone()),
        job_id: Some(job.id.clone()),
        report,
    };
    let filename = format!("{name}.{}.gguf", job.params.to);
    match store
        .job_completed(&job.id, worker, &segment, &filename, &nv)
        .await?
    {
        Some(_) => Ok(()),
        None => {
            flags.lost.store(true, Ordering::Relaxed);
            Err(Failure::Stopped)
        }
    }
}

/// What ternarizing the source's float linear weights costs them, as `bitnet quantize
/// --report` measures it (per tensor and weighted over the model); a source that is already
/// ternary has nothing to measure.
fn measure(src: &Path) -> Value {
    use bitnet_core::quant::Granularity;
    let measured =
        bitnet_model::quantize::report(src, &[Granularity::PerTensor], &mut |_, _, _| {});
    match measured {
        Ok(reps) => {
            let n: f64 = reps.iter().map(|r| (r.rows * r.cols) as f64).sum();
            let (mut mse, mut cos, mut zeros) = (0.0, 0.0, 0.0);
            let tensors: Vec<Value> = reps
                .iter()
                .map(|r| {
                    let m = &r.results[0].1;
                    let w = (r.rows * r.cols) as f64 / n.max(1.0);
                    mse += w * m.mse;
                    cos += w * m.cosine;
                    zeros += w * m.zero_fraction;
                    json!({"name": r.name, "mse": m.mse, "cosine": m.cosine, "zero_fraction": m.zero_fraction})
                })
                .collect();
            json!({"source": "float", "granularity": "tensor", "mse": mse, "cosine": cos,
                   "zero_fraction": zeros, "tensors": tensors})
        }
        Err(e) => {
            json!({"source": "ternary", "note": format!("no float weights to measure ({e}); the ternary codes were copied exactly")})
        }
    }
}

/// The fidelity report: what `bitnet quantize --report` measures (MSE, cosine similarity and
/// the zero fraction of the ternary weights against the float ones, per tensor and weighted
/// over the model) when the source has float weights; what packing changed about the scales;
/// what verification found. Returns the report, the architecture and the parameter count.
fn fidelity(
    dst: &Path,
    to: &str,
    conv: &ConvertReport,
    verified: &bitnet_model::convert::VerifyReport,
    ternarization: Value,
) -> (Value, String, i64) {
    let (architecture, parameters) = match GgufFile::open(dst) {
        Ok(f) => (
            f.header.architecture().to_string(),
            f.header
                .tensors
                .iter()
                .map(|t| t.n_elements() as i64)
                .sum::<i64>(),
        ),
        Err(_) => (String::new(), 0),
    };
    let inexact: Vec<Value> = conv
        .tensors
        .iter()
        .filter_map(|t| {
            t.fidelity
                .as_ref()
                .filter(|f| !f.exact)
                .map(|f| json!({"name": t.name, "note": f.note}))
        })
        .collect();
    let report = json!({
        "format": to,
        "tensors": conv.tensors.len(),
        "bytes": conv.bytes_written,
        "ternarization": ternarization,
        "packing": {"exact": inexact.is_empty(), "rounded_scales": inexact},
        "verified": {"tensors": verified.tensors, "ternary": verified.ternary,
                     "max_rel_scale_change": verified.max_rel_scale_change},
    });
    (report, architecture, parameters)
}
