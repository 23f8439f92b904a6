//! Quantization jobs: a durable queue in the database, shaped like OpenAI's fine-tuning jobs
//! (`queued` → `validating_files` (a worker has it and checks its file) → `running` (it
//! converts) → `succeeded` / `failed` / `cancelled`, an `error` object,
//! `result_files`, `created_at` / `finished_at`).
//!
//! Workers (inside `bitnet serve`, or `bitnet worker` processes) claim jobs with a lease and
//! extend it with heartbeats. A job whose worker died is claimed again once its lease runs out,
//! up to `max_attempts`, and a failure that may pass is retried after a backoff. At most
//! `per_org` jobs of one organization run at once: a claim locks the organization (its row on
//! PostgreSQL, whose candidate jobs are taken `FOR UPDATE SKIP LOCKED`; SQLite has one writer),
//! so the limit holds across every worker. Every step is a job event.

use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now};
use crate::{Backend, Store};
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What a job is asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct JobParams {
    /// `tq2_0`, `tq1_0` or `i2_s`.
    pub to: String,
    /// How to store the embeddings (`f16`, `q8_0`, ...), `None` for the converter's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<String>,
    /// The registry model's name (default: from the file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
}

/// `quantization.job`.
#[derive(Debug, Clone, Serialize)]
pub struct QuantJob {
    pub object: &'static str,
    pub id: String,
    pub organization_id: String,
    pub project_id: String,
    pub file: String,
    #[serde(flatten)]
    pub params: JobParams,
    pub status: String,
    pub error: Option<Value>,
    pub result_files: Vec<String>,
    /// The registry version the job made, `NAME:VERSION` (OpenAI's `fine_tuned_model`).
    pub quantized_model: Option<String>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// `quantization.job.event`.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub object: &'static str,
    pub id: String,
    pub created_at: i64,
    pub level: String,
    pub message: String,
    pub data: Value,
}

impl crate::HasId for QuantJob {
    fn id(&self) -> &str {
        &self.id
    }
}

impl crate::HasId for JobEvent {
    fn id(&self) -> &str {
        &self.id
    }
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Keep going: the lease is extended.
    Continue,
    /// The job was cancelled: stop, and report it with [`Store::job_cancelled`].
    Cancel,
    /// The lease is no longer this worker's (it ran out and another worker took the job):
    /// stop and report nothing.
    Lost,
}

const STATUSES: &[&str] = &[
    "queued",
    "validating_files",
    "running",
    "succeeded",
    "failed",
    "cancelled",
];
/// The statuses of a job a worker holds: checking its file, then converting.
const HELD: &str = "('validating_files', 'running')";
const COLS: &str = "id, organization_id, project_id, file_id, params, status, error, result_files, \
                    attempts, max_attempts, created_at, finished_at, result_model";

type Row = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

fn job_of(r: Row) -> QuantJob {
    QuantJob {
        object: "quantization.job",
        id: r.0,
        organization_id: r.1,
        project_id: r.2,
        file: r.3,
        params: serde_json::from_str(&r.4).unwrap_or(JobParams {
            to: String::new(),
            embeddings: None,
            name: None,
            suffix: None,
        }),
        status: r.5,
        error: r.6.and_then(|e| serde_json::from_str(&e).ok()),
        result_files: serde_json::from_str(&r.7).unwrap_or_default(),
        quantized_model: r.12,
        attempts: r.8,
        max_attempts: r.9,
        created_at: r.10,
        finished_at: r.11,
    }
}

/// The registry model a job's result joins: `name`, else the source file's name without its
/// extensions (`tiny.tar.gz` → `tiny`), with `-SUFFIX` when a suffix is given.
pub fn result_model_name(params: &JobParams, filename: &str) -> Result<String> {
    let base = match &params.name {
        Some(n) => n.clone(),
        None => {
            let stem = filename.rsplit('/').next().unwrap_or(filename);
            let mut stem = stem.to_string();
            for ext in [".tar.gz", ".tgz", ".tar", ".gguf", ".onnx"] {
                if stem.to_ascii_lowercase().ends_with(ext) && stem.len() > ext.len() {
                    stem.truncate(stem.len() - ext.len());
                    break;
                }
            }
            // Characters a name cannot hold become '-'.
            let s: String = stem
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            let s = s.trim_start_matches(['.', '_', '-']).to_string();
            if s.is_empty() { "model".into() } else { s }
        }
    };
    let name = match &params.suffix {
        Some(x) => format!("{base}-{x}"),
        None => base,
    };
    crate::registry::check_name("name", &name)?;
    Ok(name)
}

/// The wait before attempt `n + 1` after `n` attempts: 2, 4, 8, ... seconds, at most 5 minutes.
pub fn backoff(attempts: i64) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(1, 8)).min(Duration::from_secs(300))
}

impl Store {
    /// Queue a job converting `file` (a `model` file of the project). With an idempotency key,
    /// the same key gives back the job it made (and a different request under it is a
    /// conflict).
    pub async fn create_job(
        &self,
        org: &str,
        project: &str,
        file: &str,
        params: &JobParams,
        idempotency_key: Option<&str>,
        by: &crate::audit::Actor,
    ) -> Result<QuantJob> {
        if !["tq2_0", "tq1_0", "i2_s"].contains(&params.to.as_str()) {
            return Err(PlatformError::invalid(
                "to",
                format!("to must be tq2_0, tq1_0 or i2_s, not {:?}", params.to),
            ));
        }
        if let Some(k) = idempotency_key
            && (k.is_empty() || k.len() > 255)
        {
            return Err(PlatformError::invalid(
                "Idempotency-Key",
                "an idempotency key is 1 to 255 bytes",
            ));
        }
        let f = self.file(org, project, file).await?;
        result_model_name(params, &f.filename)?;
        if let Some(e) = &params.embeddings
            && !["f16", "bf16", "f32", "q8_0"].contains(&e.as_str())
        {
            return Err(PlatformError::invalid(
                "embeddings",
                format!("embeddings must be f16, bf16, f32 or q8_0, not {e:?}"),
            ));
        }
        if f.purpose != "model" {
            return Err(PlatformError::invalid(
                "file",
                format!(
                    "file {file} has purpose {:?}; a job takes a `model` file",
                    f.purpose
                ),
            ));
        }
        if let Some(k) = idempotency_key
            && let Some(j) = self.job_by_key(org, project, k).await?
        {
            return if j.file == file && j.params == *params {
                Ok(j)
            } else {
                Err(PlatformError::Conflict(format!(
                    "idempotency key {k:?} was used for job {} with other parameters",
                    j.id
                )))
            };
        }
        let id = new_id("qjob_");
        let mut c = self.change(org).await?;
        let inserted = sqlx::query(
            "INSERT INTO quantization_jobs (id, organization_id, project_id, file_id, params, idempotency_key, status, run_after_ms, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8) ON CONFLICT (organization_id, project_id, idempotency_key) DO NOTHING",
        )
        .bind(&id)
        .bind(org)
        .bind(project)
        .bind(file)
        .bind(serde_json::to_string(params).unwrap_or_default())
        .bind(idempotency_key)
        .bind(now_ms())
        .bind(c.at)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            drop(c);
            // Another request with the same key won the race.
            let k = idempotency_key.unwrap_or_default();
            return Box::pin(self.create_job(org, project, file, params, Some(k), by)).await;
        }
        crate::events::emit_job_state(&mut c.tx, &id).await?;
        c.audit(
            crate::audit::AuditEvent::new(
                "quantization_job.created",
                by,
                &id,
                json!({"id": id, "data": {"file": file, "to": params.to}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        self.job_event(&id, "info", "job queued", json!({})).await?;
        self.job(org, project, &id).await
    }

    async fn job_by_key(&self, org: &str, project: &str, key: &str) -> Result<Option<QuantJob>> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM quantization_jobs WHERE organization_id = $1 AND project_id = $2 AND idempotency_key = $3"
        ))
        .bind(org)
        .bind(project)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(job_of))
    }

    /// A job of the project.
    pub async fn job(&self, org: &str, project: &str, id: &str) -> Result<QuantJob> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM quantization_jobs WHERE organization_id = $1 AND project_id = $2 AND id = $3"
        ))
        .bind(org)
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(job_of)
            .ok_or_else(|| PlatformError::not_found("quantization job", id))
    }

    /// A job by id alone (workers).
    pub async fn job_for_worker(&self, id: &str) -> Result<QuantJob> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM quantization_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(job_of)
            .ok_or_else(|| PlatformError::not_found("quantization job", id))
    }

    /// The project's jobs, newest first.
    pub async fn jobs(
        &self,
        org: &str,
        project: &str,
        page: &crate::Page,
    ) -> Result<crate::List<QuantJob>> {
        let mut sql = format!(
            "SELECT {COLS} FROM quantization_jobs WHERE organization_id = $1 AND project_id = $2"
        );
        if page.after.is_some() {
            sql.push_str(" AND id < $3");
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", page.limit + 1));
        let mut q = sqlx::query_as::<_, Row>(&sql).bind(org).bind(project);
        if let Some(a) = &page.after {
            q = q.bind(a.as_str());
        }
        let mut rows = q.fetch_all(&self.pool).await?;
        let more = rows.len() > page.limit;
        rows.truncate(page.limit);
        Ok(crate::List::new(
            rows.into_iter().map(job_of).collect(),
            more,
        ))
    }

    /// Record an event of a job.
    pub async fn job_event(
        &self,
        job: &str,
        level: &str,
        message: &str,
        data: Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO quantization_job_events (id, job_id, created_at, level, message, data) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(new_id("qjevent_"))
        .bind(job)
        .bind(now())
        .bind(level)
        .bind(message)
        .bind(data.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A job's events, oldest first, after event `after`.
    pub async fn job_events(
        &self,
        org: &str,
        project: &str,
        id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobEvent>> {
        self.job(org, project, id).await?;
        let rows: Vec<(String, i64, String, String, String)> = sqlx::query_as(&format!(
            "SELECT id, created_at, level, message, data FROM quantization_job_events \
             WHERE job_id = $1 AND id > $2 ORDER BY id LIMIT {}",
            limit.min(10_000)
        ))
        .bind(id)
        .bind(after.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, created_at, level, message, data)| JobEvent {
                object: "quantization.job.event",
                id,
                created_at,
                level,
                message,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
            })
            .collect())
    }

    /// Claim the oldest job that may run: queued and due, or running with a lapsed lease (its
    /// worker died), never more than `per_org` running in one organization.
    pub async fn claim_job(
        &self,
        worker: &str,
        lease: Duration,
        per_org: i64,
    ) -> Result<Option<QuantJob>> {
        let t = now_ms();
        let pg = self.backend() == Backend::Postgres;
        let mut tx = self.begin_write().await?;
        if !pg {
            // Take SQLite's write lock first: claims are serialized.
            sqlx::query("UPDATE quantization_jobs SET id = id WHERE 1 = 0")
                .execute(&mut *tx)
                .await?;
        }
        // One candidate at a time, so that concurrent claimers (each skipping the rows the
        // others hold) each find one; a candidate whose organization is at its limit is set
        // aside and the next is taken.
        let mut skipped: Vec<String> = Vec::new();
        while skipped.len() < 16 {
            let not_in = (0..skipped.len())
                .map(|i| format!("${}", i + 2))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT id, organization_id, status, lease_owner FROM quantization_jobs \
                 WHERE cancel_requested = 0 AND ((status = 'queued' AND run_after_ms <= $1) \
                    OR (status IN {HELD} AND lease_expires_ms < $1)){} \
                 ORDER BY created_at, id LIMIT 1{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" AND id NOT IN ({not_in})")
                },
                if pg { " FOR UPDATE SKIP LOCKED" } else { "" }
            );
            let mut q = sqlx::query_as::<_, (String, String, String, Option<String>)>(&sql).bind(t);
            for id in &skipped {
                q = q.bind(id.as_str());
            }
            let Some((id, org, status, previous)) = q.fetch_optional(&mut *tx).await? else {
                break;
            };
            if pg {
                sqlx::query("SELECT id FROM organizations WHERE id = $1 FOR UPDATE")
                    .bind(&org)
                    .fetch_optional(&mut *tx)
                    .await?;
            }
            let (running,): (i64,) = sqlx::query_as(
                &format!("SELECT COUNT(*) FROM quantization_jobs WHERE organization_id = $1 AND status IN {HELD} AND lease_expires_ms >= $2"),
            )
            .bind(&org)
            .bind(t)
            .fetch_one(&mut *tx)
            .await?;
            if running >= per_org {
                skipped.push(id);
                continue;
            }
            // A job out of attempts fails instead of running again.
            let (attempts, max): (i64, i64) = sqlx::query_as(
                "SELECT attempts, max_attempts FROM quantization_jobs WHERE id = $1",
            )
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            if attempts >= max {
                let error = json!({"code": "worker_lost", "message": format!("the job's worker stopped {attempts} times without finishing it"), "param": null});
                sqlx::query(
                    "UPDATE quantization_jobs SET status = 'failed', error = $1, finished_at = $2, lease_owner = NULL WHERE id = $3",
                )
                .bind(error.to_string())
                .bind(now())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                crate::events::emit_job_state(&mut tx, &id).await?;
                skipped.push(id);
                continue;
            }
            sqlx::query(
                "UPDATE quantization_jobs SET status = 'validating_files', attempts = attempts + 1, lease_owner = $1, lease_expires_ms = $2 WHERE id = $3",
            )
            .bind(worker)
            .bind(t + lease.as_millis() as i64)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            crate::events::emit_job_state(&mut tx, &id).await?;
            tx.commit().await?;
            let (level, message) = if status != "queued" {
                (
                    "warn",
                    format!(
                        "the lease of worker {} ran out; worker {worker} takes the job over (attempt {})",
                        previous.unwrap_or_default(),
                        attempts + 1
                    ),
                )
            } else {
                (
                    "info",
                    format!("worker {worker} runs the job (attempt {})", attempts + 1),
                )
            };
            self.job_event(
                &id,
                level,
                &message,
                json!({"attempt": attempts + 1, "worker": worker}),
            )
            .await?;
            return Ok(Some(self.job_for_worker(&id).await?));
        }
        tx.commit().await?;
        Ok(None)
    }

    /// The worker found the job's file good (`validating_files` → `running`); `Ok(false)` if
    /// the job is no longer its own.
    pub async fn job_running(&self, id: &str, worker: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE quantization_jobs SET status = 'running' WHERE id = $1 AND lease_owner = $2 AND status = 'validating_files'",
        )
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            crate::events::emit_job_state(&mut tx, id).await?;
        }
        tx.commit().await?;
        if n == 1 {
            self.job_event(id, "info", "the file is a model: converting", json!({}))
                .await?;
        }
        Ok(n == 1)
    }

    /// Extend `worker`'s lease on a job, and learn whether to go on.
    pub async fn heartbeat(&self, id: &str, worker: &str, lease: Duration) -> Result<Beat> {
        let row: Option<(i64,)> = sqlx::query_as(
            &format!("UPDATE quantization_jobs SET lease_expires_ms = $1 WHERE id = $2 AND lease_owner = $3 AND status IN {HELD} \
             RETURNING cancel_requested"),
        )
        .bind(now_ms() + lease.as_millis() as i64)
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Beat::Lost,
            Some((0,)) => Beat::Continue,
            Some(_) => Beat::Cancel,
        })
    }

    /// Finish `worker`'s job: `Ok(false)` if the job is no longer its own.
    async fn finish_job(
        &self,
        id: &str,
        worker: &str,
        status: &str,
        error: Option<Value>,
        result_files: &[String],
    ) -> Result<bool> {
        debug_assert!(STATUSES.contains(&status));
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            &format!("UPDATE quantization_jobs SET status = $1, error = $2, result_files = $3, finished_at = $4, lease_owner = NULL \
             WHERE id = $5 AND lease_owner = $6 AND status IN {HELD}"),
        )
        .bind(status)
        .bind(error.map(|e| e.to_string()))
        .bind(serde_json::to_string(result_files).unwrap_or_default())
        .bind(now())
        .bind(id)
        .bind(worker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            crate::events::emit_job_state(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The job succeeded with these result files.
    pub async fn job_succeeded(
        &self,
        id: &str,
        worker: &str,
        result_files: &[String],
    ) -> Result<bool> {
        let ok = self
            .finish_job(id, worker, "succeeded", None, result_files)
            .await?;
        if ok {
            self.job_event(
                id,
                "info",
                "job succeeded",
                json!({"result_files": result_files}),
            )
            .await?;
        }
        Ok(ok)
    }

    /// The job succeeded: in one transaction, while the job is still `worker`'s, the stored
    /// `segment` becomes a model file of the job's project named `filename` and a new registry
    /// version of `nv.name`, and the job ends `succeeded` with them. `Ok(None)` (and nothing
    /// changed) when the job is no longer the worker's: the caller removes the segment.
    pub async fn job_completed(
        &self,
        id: &str,
        worker: &str,
        segment: &crate::files::Segment,
        filename: &str,
        nv: &crate::registry::NewVersion,
    ) -> Result<Option<(crate::files::FileObject, String)>> {
        let j = self.job_for_worker(id).await?;
        let by = crate::audit::Actor::system(&format!("worker {worker}"));
        let mut c = self.change(&j.organization_id).await?;
        let file = self
            .insert_file_in(
                &mut c,
                &j.organization_id,
                &j.project_id,
                "model",
                filename,
                std::slice::from_ref(segment),
                (segment.written.sha256.clone(), String::new()),
                &by,
            )
            .await?;
        let model = self
            .insert_version_in(&mut c, &j.organization_id, &j.project_id, &file, nv, &by)
            .await?;
        let n = sqlx::query(
            &format!("UPDATE quantization_jobs SET status = 'succeeded', error = NULL, result_files = $1, result_model = $2, \
             finished_at = $3, lease_owner = NULL WHERE id = $4 AND lease_owner = $5 AND status IN {HELD}"),
        )
        .bind(serde_json::to_string(&[&file.id]).unwrap_or_default())
        .bind(&model)
        .bind(c.at)
        .bind(id)
        .bind(worker)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if n != 1 {
            // Dropped uncommitted: nothing of this attempt stays.
            return Ok(None);
        }
        crate::events::emit_job_state(&mut c.tx, id).await?;
        c.commit().await?;
        self.job_event(
            id,
            "info",
            &format!("job succeeded: {model}"),
            json!({"result_files": [&file.id], "quantized_model": model}),
        )
        .await?;
        Ok(Some((file, model)))
    }

    /// The job stopped because it was cancelled.
    pub async fn job_cancelled(&self, id: &str, worker: &str) -> Result<bool> {
        let ok = self.finish_job(id, worker, "cancelled", None, &[]).await?;
        if ok {
            self.job_event(id, "info", "job cancelled", json!({}))
                .await?;
        }
        Ok(ok)
    }

    /// The job failed: for good (`retry` false: bad input), or, while attempts remain, queued
    /// again after a backoff.
    pub async fn job_failed(
        &self,
        id: &str,
        worker: &str,
        code: &str,
        message: &str,
        retry: bool,
    ) -> Result<bool> {
        let j = self.job_for_worker(id).await?;
        let error = json!({"code": code, "message": message, "param": null});
        if retry && j.attempts < j.max_attempts {
            let wait = backoff(j.attempts);
            let mut tx = self.begin_write().await?;
            let n = sqlx::query(
                &format!("UPDATE quantization_jobs SET status = 'queued', run_after_ms = $1, lease_owner = NULL, error = $2 \
                 WHERE id = $3 AND lease_owner = $4 AND status IN {HELD}"),
            )
            .bind(now_ms() + wait.as_millis() as i64)
            .bind(error.to_string())
            .bind(id)
            .bind(worker)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                crate::events::emit_job_state(&mut tx, id).await?;
            }
            tx.commit().await?;
            if n == 1 {
                self.job_event(
                    id,
                    "warn",
                    &format!(
                        "attempt {} failed: {message}; retrying in {} s",
                        j.attempts,
                        wait.as_secs()
                    ),
                    json!({"attempt": j.attempts, "code": code}),
                )
                .await?;
            }
            return Ok(n == 1);
        }
        let ok = self
            .finish_job(id, worker, "failed", Some(error), &[])
            .await?;
        if ok {
            self.job_event(
                id,
                "error",
                &format!("job failed: {message}"),
                json!({"code": code}),
            )
            .await?;
        }
        Ok(ok)
    }

    /// Cancel a job: a queued one at once; a running one is flagged, and its worker stops at
    /// its next heartbeat. Finished jobs are a conflict.
    pub async fn cancel_job(
        &self,
        org: &str,
        project: &str,
        id: &str,
        by: &crate::audit::Actor,
    ) -> Result<QuantJob> {
        let j = self.job(org, project, id).await?;
        let mut c = self.change(org).await?;
        let n = sqlx::query(
            "UPDATE quantization_jobs SET status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
             finished_at = CASE WHEN status = 'queued' THEN $1 ELSE finished_at END, cancel_requested = 1 \
             WHERE id = $2 AND organization_id = $3 AND status IN ('queued', 'validating_files', 'running')",
        )
        .bind(c.at)
        .bind(id)
        .bind(org)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(PlatformError::Conflict(format!(
                "job {id} is {}; only queued or running jobs can be cancelled",
                j.status
            )));
        }
        crate::events::emit_job_state(&mut c.tx, id).await?;
        c.audit(
            crate::audit::AuditEvent::new("quantization_job.cancelled", by, id, json!({"id": id}))
                .in_project(project),
        )
        .await?;
        c.commit().await?;
        self.job_event(id, "info", "cancel requested", json!({}))
            .await?;
        self.job(org, project, id).await
    }
}
