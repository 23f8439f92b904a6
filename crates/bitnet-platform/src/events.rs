//! The transactional outbox. Every change other systems may follow (a usage row, an audit
//! event, a job's state, a budget threshold) writes an event in its own transaction, so an
//! event exists exactly when its change does. A publisher takes unpublished events in order,
//! hands them to a sink and marks them published only once the sink has them: at least once,
//! each with a stable id (`evt_...`) that consumers dedupe on. A publisher killed mid-batch
//! leaves its batch unpublished; the next one sends it again, under the same ids.

use crate::Store;
use crate::error::Result;
use crate::ids::now;
use crate::store::Backend;
use serde::Serialize;
use serde_json::Value;

/// An event as sinks receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Stable across retries: the sinks' deduplication id.
    pub id: String,
    /// `usage.recorded`, `audit.project.created`, `quantization_job.succeeded`,
    /// `budget.threshold_reached`, ...
    #[serde(rename = "type")]
    pub kind: String,
    pub organization_id: Option<String>,
    pub created_at: i64,
    pub data: Value,
}

/// Write an event in the caller's transaction; an id written already is left as it is.
pub(crate) async fn emit(
    conn: &mut sqlx::AnyConnection,
    id: &str,
    org: Option<&str>,
    kind: &str,
    data: &Value,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO events (id, organization_id, type, data, created_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(org)
    .bind(kind)
    .bind(data.to_string())
    .bind(now())
    .execute(conn)
    .await?;
    Ok(())
}

/// Write the event of a quantization job's current state (`quantization_job.STATUS`), read
/// from its row in the caller's transaction, right after the change.
pub(crate) async fn emit_job_state(conn: &mut sqlx::AnyConnection, job: &str) -> Result<()> {
    let row: Option<(String, String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT organization_id, project_id, status, CAST(attempts AS BIGINT), result_model FROM quantization_jobs WHERE id = $1",
    )
    .bind(job)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((org, project, status, attempts, model)) = row else {
        return Ok(());
    };
    emit(
        conn,
        &format!("evt_{job}_{status}_{attempts}"),
        Some(&org),
        &format!("quantization_job.{status}"),
        &serde_json::json!({"id": job, "project_id": project, "status": status,
                            "attempts": attempts, "quantized_model": model}),
    )
    .await
}

impl Store {
    /// Publish up to `limit` unpublished events, oldest first, through `sink`; they are marked
    /// published only if it succeeds. Replicas publishing at once take different events
    /// (PostgreSQL's `SKIP LOCKED`; SQLite has one writer). Returns how many went out.
    pub async fn publish_events<F, Fut>(&self, limit: i64, sink: F) -> Result<usize>
    where
        F: FnOnce(Vec<Event>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), String>>,
    {
        let lock = if self.backend() == Backend::Postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, String, Option<String>, String, String, i64)> =
            sqlx::query_as(&format!(
                "SELECT seq, id, organization_id, type, data, created_at FROM events \
             WHERE published_at IS NULL ORDER BY seq LIMIT $1{lock}"
            ))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let batch: Vec<Event> = rows
            .into_iter()
            .map(|(_, id, org, kind, data, at)| Event {
                id,
                kind,
                organization_id: org,
                created_at: at,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
            })
            .collect();
        // PostgreSQL keeps the rows locked while the sink has them; SQLite (one server) ends
        // its read here, or the marking below would fail whenever anything was written while
        // the sink worked (WAL's snapshot rule) and the batch would be sent again and again.
        let mut tx = if self.backend() == Backend::Postgres {
            Some(tx)
        } else {
            tx.commit().await?;
            None
        };
        sink(batch).await.map_err(crate::PlatformError::Upstream)?;
        let list = seqs
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let mark = format!("UPDATE events SET published_at = $1 WHERE seq IN ({list})");
        match tx.as_mut() {
            Some(t) => sqlx::query(&mark).bind(now()).execute(&mut **t).await?,
            None => sqlx::query(&mark).bind(now()).execute(&self.pool).await?,
        };
        if let Some(t) = tx {
            t.commit().await?;
        }
        Ok(seqs.len())
    }

    /// Events not yet published.
    pub async fn events_pending(&self) -> Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events WHERE published_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// Every event of an organization, oldest first (for tests and exports).
    pub async fn events_of(&self, org: &str) -> Result<Vec<Event>> {
        let rows: Vec<(String, Option<String>, String, String, i64)> = sqlx::query_as(
            "SELECT id, organization_id, type, data, created_at FROM events \
             WHERE organization_id = $1 ORDER BY seq",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, org, kind, data, at)| Event {
                id,
                kind,
                organization_id: org,
                created_at: at,
                data: serde_json::from_str(&data).unwrap_or(Value::Null),
            })
            .collect())
    }

    /// Forget events published more than `age` seconds ago; returns how many.
    pub async fn prune_events(&self, age: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM events WHERE published_at IS NOT NULL AND published_at < $1")
                .bind(now() - age)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
