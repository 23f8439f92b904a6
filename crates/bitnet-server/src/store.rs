//! The embedded database (SQLite through sqlx): API keys and usage rows, every row owned by a
//! tenant. Migrations are compiled in and run at open.

use crate::error::ApiError;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

pub const DEFAULT_TENANT: &str = "default";
/// Every key starts with this, so it is recognisable in logs and secret scanners.
pub const KEY_PREFIX: &str = "bnk_";
/// Characters of a key kept in clear to identify it (`bnk_` and 8 more).
const SHOWN: usize = 12;

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    /// The role stored in the database (the column's CHECK allows only these two).
    fn from_db(s: &str) -> Self {
        if s == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// A key as listings show it: never the key itself.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub role: Role,
    pub tenant_id: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// The caller a valid key identifies.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key_id: String,
    pub tenant_id: String,
    pub role: Role,
}

/// One request's metering record.
#[derive(Debug, Clone)]
pub struct UsageRow {
    /// The server's id of the request (unique).
    pub request_id: String,
    /// The `x-request-id` the client sent, if any.
    pub client_request_id: Option<String>,
    pub tenant_id: String,
    pub key_id: Option<String>,
    pub model: String,
    pub endpoint: &'static str,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    pub status: u16,
}

/// `api_keys` columns of a listing: id, name, prefix, role, tenant, created, revoked.
type KeyRow = (String, String, String, String, String, i64, Option<i64>);
/// `api_keys` columns for authentication: id, tenant, role, hash, revoked.
type AuthRow = (String, String, String, Vec<u8>, Option<i64>);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A new random key: `bnk_` and 43 base62 characters (256 bits from the OS).
fn random_key() -> Result<String, ApiError> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut key = String::from(KEY_PREFIX);
    while key.len() < KEY_PREFIX.len() + 43 {
        let mut b = [0u8; 64];
        getrandom::fill(&mut b).map_err(|e| ApiError::Internal(format!("no randomness: {e}")))?;
        // Rejection sampling keeps every character equally likely.
        for &x in &b {
            if x < 248 && key.len() < KEY_PREFIX.len() + 43 {
                key.push(ALPHABET[(x % 62) as usize] as char);
            }
        }
    }
    Ok(key)
}

impl Store {
    /// Open (creating if missing) the database at `url` (`sqlite://PATH` or `sqlite::memory:`)
    /// and run the migrations.
    pub async fn open(url: &str) -> Result<Self, ApiError> {
        let Some(rest) = url.strip_prefix("sqlite:") else {
            return Err(ApiError::Internal(format!(
                "database {url:?}: this server build stores in SQLite (sqlite://PATH); PostgreSQL comes with multi-tenancy"
            )));
        };
        if let Some(path) = rest.strip_prefix("//")
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let memory = rest.contains(":memory:");
        let pool = SqlitePoolOptions::new()
            // One connection for an in-memory database (each would be its own database).
            .max_connections(if memory { 1 } else { 4 })
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| ApiError::Internal(format!("migrations: {e}")))?;
        Ok(Self { pool })
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Create a key; returns its record and the key itself, which is not stored and cannot be
    /// shown again.
    pub async fn create_key(&self, name: &str, role: Role) -> Result<(KeyInfo, String), ApiError> {
        let key = random_key()?;
        let info = KeyInfo {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            prefix: key[..SHOWN].to_string(),
            role,
            tenant_id: DEFAULT_TENANT.into(),
            created_at: now(),
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, prefix, hash, role, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&info.id)
        .bind(&info.tenant_id)
        .bind(&info.name)
        .bind(&info.prefix)
        .bind(hash(&key).as_slice())
        .bind(role.as_str())
        .bind(info.created_at)
        .execute(&self.pool)
        .await?;
        Ok((info, key))
    }

    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, ApiError> {
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, name, prefix, role, tenant_id, created_at, revoked_at FROM api_keys WHERE tenant_id = ? ORDER BY created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, name, prefix, role, tenant_id, created_at, revoked_at)| KeyInfo {
                    id,
                    name,
                    prefix,
                    role: Role::from_db(&role),
                    tenant_id,
                    created_at,
                    revoked_at,
                },
            )
            .collect())
    }

    /// Revoke by id or by prefix; false when no live key matched.
    pub async fn revoke_key(&self, tenant: &str, id_or_prefix: &str) -> Result<bool, ApiError> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE tenant_id = ? AND (id = ? OR prefix = ?) AND revoked_at IS NULL",
        )
        .bind(now())
        .bind(tenant)
        .bind(id_or_prefix)
        .bind(id_or_prefix)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The principal of a presented key, or `None`. The stored hash is compared in constant
    /// time, and a key whose prefix matches no row is compared against a dummy hash, so the
    /// answer takes the same work either way.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>, ApiError> {
        let h = hash(presented);
        let prefix = presented.get(..SHOWN).unwrap_or("");
        let row: Option<AuthRow> = sqlx::query_as(
            "SELECT id, tenant_id, role, hash, revoked_at FROM api_keys WHERE prefix = ?",
        )
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        let dummy = [0u8; 32];
        let stored = row.as_ref().map_or(&dummy[..], |r| &r.3[..]);
        let equal: bool = h.ct_eq(stored).into();
        Ok(match row {
            Some((key_id, tenant_id, role, _, None)) if equal => Some(Principal {
                key_id,
                tenant_id,
                role: Role::from_db(&role),
            }),
            _ => None,
        })
    }

    /// Write usage rows in one transaction. A row whose request id is already stored is skipped
    /// (never counted twice).
    pub async fn record_usage(&self, rows: &[UsageRow]) -> Result<(), ApiError> {
        let mut tx = self.pool.begin().await?;
        for r in rows {
            sqlx::query(
                "INSERT OR IGNORE INTO usage (request_id, client_request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, latency_ms, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.request_id)
            .bind(&r.client_request_id)
            .bind(&r.tenant_id)
            .bind(&r.key_id)
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

    /// Usage totals of a tenant: (requests, prompt tokens, completion tokens).
    pub async fn usage_totals(&self, tenant: &str) -> Result<(i64, i64, i64), ApiError> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM usage WHERE tenant_id = ?",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?)
    }
}
