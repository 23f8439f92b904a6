//! Project rate limits, in the shape of OpenAI's `project.rate_limit`: per project and model,
//! requests and tokens per minute. A limit left unset (`None`) does not apply. The counting
//! itself happens in the server (in-process, or in Redis across replicas); this is where the
//! limits are kept.

use crate::Store;
use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use serde::Serialize;
use serde_json::json;

/// `project.rate_limit`. Its id is `rl-` and the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub object: &'static str,
    pub id: String,
    pub model: String,
    pub max_requests_per_1_minute: Option<i64>,
    pub max_tokens_per_1_minute: Option<i64>,
}

impl RateLimit {
    pub fn new(model: &str, rpm: Option<i64>, tpm: Option<i64>) -> Self {
        Self {
            object: "project.rate_limit",
            id: rate_limit_id(model),
            model: model.to_string(),
            max_requests_per_1_minute: rpm,
            max_tokens_per_1_minute: tpm,
        }
    }
}

/// A project key's own limits, over every model (ours: OpenAI has no per-key limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRateLimit {
    pub object: &'static str,
    pub api_key_id: String,
    pub max_requests_per_1_minute: Option<i64>,
    pub max_tokens_per_1_minute: Option<i64>,
}

impl KeyRateLimit {
    pub fn new(key: &str, rpm: Option<i64>, tpm: Option<i64>) -> Self {
        Self {
            object: "organization.project.api_key.rate_limit",
            api_key_id: key.to_string(),
            max_requests_per_1_minute: rpm,
            max_tokens_per_1_minute: tpm,
        }
    }
}

fn check_limits(rpm: Option<i64>, tpm: Option<i64>) -> Result<()> {
    for (param, v) in [
        ("max_requests_per_1_minute", rpm),
        ("max_tokens_per_1_minute", tpm),
    ] {
        if let Some(v) = v
            && v < 1
        {
            return Err(PlatformError::invalid(
                param,
                format!("{param} must be at least 1 (null lifts the limit)"),
            ));
        }
    }
    Ok(())
}

pub fn rate_limit_id(model: &str) -> String {
    format!("rl-{model}")
}

/// The model a rate limit of `rl-MODEL` names.
pub fn model_of_rate_limit(id: &str) -> Option<&str> {
    id.strip_prefix("rl-").filter(|m| !m.is_empty())
}

/// The name rate limits and prices know a model by: a registry model's name for any of its
/// versions and aliases (`NAME` of `NAME:VERSION`), else the served id.
pub fn limit_model(model: &str) -> &str {
    model.split_once(':').map_or(model, |(n, _)| n)
}

impl Store {
    /// The limits set on `project` (of `org`), by model.
    pub async fn rate_limits(&self, org: &str, project: &str) -> Result<Vec<RateLimit>> {
        self.project(org, project).await?;
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT model, max_requests_per_1_minute, max_tokens_per_1_minute FROM rate_limits \
             WHERE organization_id = $1 AND project_id = $2 ORDER BY model",
        )
        .bind(org)
        .bind(project)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(m, r, t)| RateLimit::new(&m, r, t))
            .collect())
    }

    /// The limit on `model` in `project`, for the request path (no organization check: the
    /// caller's key named the project).
    pub async fn rate_limit_for(&self, project: &str, model: &str) -> Result<Option<RateLimit>> {
        let model = limit_model(model);
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT max_requests_per_1_minute, max_tokens_per_1_minute FROM rate_limits \
             WHERE project_id = $1 AND model = $2",
        )
        .bind(project)
        .bind(model)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(r, t)| RateLimit::new(model, r, t)))
    }

    /// The limits a request under `key` on `model` in `project` falls under: the project's on
    /// the model, and the key's own (one query, on every request).
    pub async fn limits_for(
        &self,
        project: &str,
        key: &str,
        model: &str,
    ) -> Result<(Option<RateLimit>, Option<KeyRateLimit>)> {
        let model = limit_model(model);
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT 'project', max_requests_per_1_minute, max_tokens_per_1_minute FROM rate_limits \
             WHERE project_id = $1 AND model = $2 \
             UNION ALL SELECT 'key', max_requests_per_1_minute, max_tokens_per_1_minute FROM key_rate_limits \
             WHERE key_id = $3",
        )
        .bind(project)
        .bind(model)
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        let mut out = (None, None);
        for (kind, r, t) in rows {
            if kind == "project" {
                out.0 = Some(RateLimit::new(model, r, t));
            } else {
                out.1 = Some(KeyRateLimit::new(key, r, t));
            }
        }
        Ok(out)
    }

    /// A project key's own limits (`None` fields: none).
    pub async fn key_rate_limit(
        &self,
        org: &str,
        project: &str,
        key: &str,
    ) -> Result<KeyRateLimit> {
        self.project_key(org, project, key).await?;
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT max_requests_per_1_minute, max_tokens_per_1_minute FROM key_rate_limits WHERE key_id = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        let (r, t) = row.unwrap_or((None, None));
        Ok(KeyRateLimit::new(key, r, t))
    }

    /// Set (or, with both `None`, lift) a project key's own limits.
    pub async fn set_key_rate_limit(
        &self,
        org: &str,
        project: &str,
        key: &str,
        rpm: Option<i64>,
        tpm: Option<i64>,
        by: &Actor,
    ) -> Result<KeyRateLimit> {
        check_limits(rpm, tpm)?;
        self.project_key(org, project, key).await?;
        let mut c = self.change(org).await?;
        sqlx::query("DELETE FROM key_rate_limits WHERE key_id = $1")
            .bind(key)
            .execute(&mut *c.tx)
            .await?;
        if rpm.is_some() || tpm.is_some() {
            sqlx::query(
                "INSERT INTO key_rate_limits (key_id, organization_id, max_requests_per_1_minute, \
                 max_tokens_per_1_minute, updated_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(key)
            .bind(org)
            .bind(rpm)
            .bind(tpm)
            .bind(c.at)
            .execute(&mut *c.tx)
            .await?;
        }
        c.audit(
            AuditEvent::new(
                "rate_limit.updated",
                by,
                key,
                json!({"id": key, "changes_requested": {
                    "max_requests_per_1_minute": rpm,
                    "max_tokens_per_1_minute": tpm,
                }}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        Ok(KeyRateLimit::new(key, rpm, tpm))
    }

    /// Set (or, with both `None`, lift) the limits on `model` in `project`.
    pub async fn set_rate_limit(
        &self,
        org: &str,
        project: &str,
        model: &str,
        rpm: Option<i64>,
        tpm: Option<i64>,
        by: &Actor,
    ) -> Result<RateLimit> {
        let model = model.trim();
        if model.is_empty() || model.len() > 256 || model.contains(':') {
            return Err(PlatformError::invalid(
                "rate_limit_id",
                "a rate limit names a model (`rl-MODEL`); a registry model's limit covers all its versions",
            ));
        }
        check_limits(rpm, tpm)?;
        self.active_project(org, project).await?;
        let mut c = self.change(org).await?;
        sqlx::query("DELETE FROM rate_limits WHERE project_id = $1 AND model = $2")
            .bind(project)
            .bind(model)
            .execute(&mut *c.tx)
            .await?;
        if rpm.is_some() || tpm.is_some() {
            sqlx::query(
                "INSERT INTO rate_limits (organization_id, project_id, model, max_requests_per_1_minute, \
                 max_tokens_per_1_minute, updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(org)
            .bind(project)
            .bind(model)
            .bind(rpm)
            .bind(tpm)
            .bind(c.at)
            .execute(&mut *c.tx)
            .await?;
        }
        let limit = RateLimit::new(model, rpm, tpm);
        c.audit(
            AuditEvent::new(
                "rate_limit.updated",
                by,
                &limit.id,
                json!({"id": limit.id, "changes_requested": {
                    "max_requests_per_1_minute": rpm,
                    "max_tokens_per_1_minute": tpm,
                }}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        Ok(limit)
    }
}
