//! Usage rows: one per request that reached a model, carrying its organization, project, key
//! and owner (user or service account).

use crate::Store;
use crate::error::Result;
use crate::ids::now;

/// One request's metering record.
#[derive(Debug, Clone)]
pub struct UsageRow {
    /// The server's id of the request (unique: a row is never written twice).
    pub request_id: String,
    /// The `x-request-id` the client sent, if any.
    pub client_request_id: Option<String>,
    pub organization_id: String,
    pub project_id: Option<String>,
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub service_account_id: Option<String>,
    pub model: String,
    pub endpoint: &'static str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    pub status: u16,
}

impl Store {
    /// Write usage rows in one transaction; a row whose request id is stored already is
    /// skipped.
    pub async fn record_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO usage (request_id, client_request_id, organization_id, project_id, key_id, user_id, \
                 service_account_id, model, endpoint, prompt_tokens, completion_tokens, latency_ms, status, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(&r.request_id)
            .bind(&r.client_request_id)
            .bind(&r.organization_id)
            .bind(&r.project_id)
            .bind(&r.key_id)
            .bind(&r.user_id)
            .bind(&r.service_account_id)
            .bind(&r.model)
            .bind(r.endpoint)
            .bind(r.prompt_tokens as i64)
            .bind(r.completion_tokens as i64)
            .bind(r.latency_ms as i64)
            .bind(i64::from(r.status))
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// An organization's totals: (requests, prompt tokens, completion tokens).
    pub async fn usage_totals(&self, org: &str) -> Result<(i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) FROM usage WHERE organization_id = $1",
        )
        .bind(org)
        .fetch_one(&self.pool)
        .await?)
    }
}
