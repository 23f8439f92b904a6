//! Usage metering: every request that reaches a model writes exactly one usage row, carrying
//! its organization, project, key and owner (user or service account), its tokens, and its
//! cost at the prices valid when it started.
//!
//! A request first **reserves**: a `usage_reservations` row that names the replica serving it.
//! While it runs, the replica records the tokens it has produced *before* it sends them, and
//! keeps the row's `expires_at` ahead of the clock. When the request ends, **settling** deletes
//! the reservation and writes the usage row in one transaction. If the replica dies, its rows
//! expire and any replica settles them with what they hold, which is what the client received:
//! never lost, never counted twice (the usage row's request id is unique, and a late settle from
//! a replica that was only slow replaces the expired one's row).

use crate::Store;
use crate::error::{PlatformError, Result};
use crate::ids::now;
use crate::prices::{Price, PriceBook};
use crate::store::Backend;
use sqlx::Acquire;

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
    pub endpoint: String,
    pub prompt_tokens: u64,
    /// Prompt tokens taken from the prefix cache (part of `prompt_tokens`).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Most completion tokens the request may produce (what its reservation holds).
    pub max_tokens: u64,
    pub latency_ms: u64,
    pub status: u16,
    /// Unix seconds when the request started (its usage bucket).
    pub created_at: i64,
}

/// A settled row's cost, in picodollars (1e-12 USD): tokens times microdollars per 1M tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub input: i64,
    pub cached: i64,
    pub output: i64,
}

impl Cost {
    pub fn of(row: &UsageRow, price: Option<&Price>) -> Self {
        let Some(p) = price else {
            return Self::default();
        };
        let cached = row.cached_tokens.min(row.prompt_tokens);
        let mul = |n: u64, per: i64| (n as i64).saturating_mul(per);
        Self {
            input: mul(row.prompt_tokens - cached, p.input),
            cached: mul(cached, p.cached_input),
            output: mul(row.completion_tokens, p.output),
        }
    }
}

/// A status that marks a usage row settled from an expired reservation: the server died with
/// the request in flight (the client saw its stream break).
pub const LOST_STATUS: u16 = 502;

impl Store {
    /// Reserve before a request runs: the row stays until the request settles, or expires
    /// `ttl` seconds after `replica` last kept it alive. Under a capped budget (the
    /// organization's or the project's) the request's worst-case cost is reserved against it
    /// in the same transaction, or the request is refused with [`PlatformError::Quota`].
    pub async fn reserve(&self, r: &UsageRow, replica: &str, ttl: i64) -> Result<()> {
        let op = MeterOp::Reserve {
            row: r.clone(),
            replica: replica.to_string(),
            ttl,
        };
        self.meter(std::slice::from_ref(&op)).await?.remove(0)
    }

    /// Record what a request has produced so far, before it is sent.
    pub async fn checkpoint(&self, request_id: &str, completion: u64, cached: u64) -> Result<()> {
        let op = MeterOp::Checkpoint {
            request_id: request_id.to_string(),
            completion,
            cached,
        };
        self.meter(std::slice::from_ref(&op)).await?.remove(0)
    }

    /// Settle finished requests: each one's reservation goes and its usage row is written, in
    /// one transaction, costed at the prices valid when it started. A row stored already is
    /// kept, unless it was settled from an expired reservation (then this, the replica's own
    /// account, replaces it).
    pub async fn settle(&self, rows: &[UsageRow]) -> Result<()> {
        let ops: Vec<MeterOp> = rows.iter().cloned().map(MeterOp::Settle).collect();
        self.meter(&ops).await?.into_iter().collect()
    }

    /// Apply metering operations in order, in one transaction (one commit for many requests:
    /// a server funnels its requests' operations through one writer). Each operation has its
    /// own result: a reservation refused by a budget changes nothing and the others go on. An
    /// `Err` of the whole means nothing was applied.
    pub async fn meter(&self, ops: &[MeterOp]) -> Result<Vec<Result<()>>> {
        let book = self.price_book().await?;
        let budgets = crate::budgets::all(&self.pool).await?;
        let mut tx = self.begin_write().await?;
        let mut out = Vec::with_capacity(ops.len());
        let mut spend = Spend::new();
        for op in ops {
            out.push(match op {
                MeterOp::Reserve { row, replica, ttl } => {
                    reserve_row(&mut tx, row, replica, *ttl, &book, &budgets).await?
                }
                MeterOp::Checkpoint {
                    request_id,
                    completion,
                    cached,
                } => {
                    sqlx::query(
                        "UPDATE usage_reservations SET completion_tokens = $1, cached_tokens = $2 WHERE request_id = $3",
                    )
                    .bind(*completion as i64)
                    .bind(*cached as i64)
                    .bind(request_id)
                    .execute(&mut *tx)
                    .await?;
                    Ok(())
                }
                MeterOp::Settle(row) => {
                    settle_row(&mut tx, row, &book, &mut spend, false).await?;
                    Ok(())
                }
            });
        }
        apply_spend(&mut tx, spend, &budgets).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Keep `replica`'s reservations alive for `ttl` more seconds; returns how many it holds.
    pub async fn keep_reservations(&self, replica: &str, ttl: i64) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE usage_reservations SET expires_at = $1 WHERE replica = $2")
                .bind(now() + ttl)
                .bind(replica)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Settle up to `limit` reservations that expired (their replica stopped keeping them
    /// alive) with the tokens they hold; returns how many.
    pub async fn settle_expired(&self, limit: i64) -> Result<usize> {
        let book = self.price_book().await?;
        let budgets = crate::budgets::all(&self.pool).await?;
        let mut tx = self.begin_write().await?;
        let lock = if self.backend() == Backend::Postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        type Reserved = (
            String,
            Option<String>,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let expired: Vec<Reserved> = sqlx::query_as(&format!(
            "SELECT request_id, client_request_id, organization_id, project_id, key_id, user_id, \
             service_account_id, model, endpoint, prompt_tokens, max_tokens, completion_tokens, \
             cached_tokens, created_at FROM usage_reservations WHERE expires_at < $1 \
             ORDER BY expires_at LIMIT $2{lock}"
        ))
        .bind(now())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let at = now();
        let mut spend = Spend::new();
        for e in &expired {
            let r = UsageRow {
                request_id: e.0.clone(),
                client_request_id: e.1.clone(),
                organization_id: e.2.clone(),
                project_id: e.3.clone(),
                key_id: e.4.clone(),
                user_id: e.5.clone(),
                service_account_id: e.6.clone(),
                model: e.7.clone(),
                endpoint: e.8.clone(),
                prompt_tokens: e.9 as u64,
                max_tokens: e.10 as u64,
                completion_tokens: e.11 as u64,
                cached_tokens: e.12 as u64,
                latency_ms: ((at - e.13).max(0) as u64) * 1000,
                status: LOST_STATUS,
                created_at: e.13,
            };
            settle_row(&mut tx, &r, &book, &mut spend, true).await?;
        }
        apply_spend(&mut tx, spend, &budgets).await?;
        tx.commit().await?;
        Ok(expired.len())
    }

    /// Requests in flight (reserved, not settled) of an organization.
    pub async fn reservations(&self, org: &str) -> Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM usage_reservations WHERE organization_id = $1")
                .bind(org)
                .fetch_one(&self.pool)
                .await?;
        Ok(n)
    }

    /// The `n` organizations that used the most tokens over the last `secs` seconds, most
    /// first.
    pub async fn top_organizations(&self, secs: i64, n: i64) -> Result<Vec<String>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT organization_id, CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) AS t \
             FROM usage WHERE created_at >= $1 GROUP BY organization_id ORDER BY t DESC LIMIT $2",
        )
        .bind(now() - secs)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
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

/// What usage and cost reports group by (OpenAI's `group_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Project,
    User,
    ApiKey,
    Model,
}

impl Group {
    fn column(self) -> &'static str {
        match self {
            Self::Project => "project_id",
            Self::User => "user_id",
            Self::ApiKey => "key_id",
            Self::Model => "model",
        }
    }
}

/// Usage rows of one organization from `start` (inclusive) to `end` (exclusive), in buckets
/// `width` seconds wide, filtered and grouped.
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    pub start: i64,
    pub end: i64,
    pub width: i64,
    pub project_ids: Vec<String>,
    pub user_ids: Vec<String>,
    pub api_key_ids: Vec<String>,
    pub models: Vec<String>,
    pub group_by: Vec<Group>,
}

/// One bucket's totals for one group (the grouped-by fields are set, the others `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageGroup {
    pub bucket: i64,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub api_key_id: Option<String>,
    pub model: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub output_tokens: i64,
    pub cost_input: i64,
    pub cost_cached: i64,
    pub cost_output: i64,
}

impl Store {
    /// Totals per bucket and group, oldest bucket first; empty buckets are left out.
    pub async fn usage_groups(&self, org: &str, q: &UsageQuery) -> Result<Vec<UsageGroup>> {
        let w = q.width.max(1);
        // Buckets start at `start` (both are integers, not user text).
        let mut sql = format!(
            "SELECT created_at - ((created_at - {s}) % {w}) AS bucket",
            s = q.start
        );
        for g in [Group::Project, Group::User, Group::ApiKey, Group::Model] {
            if q.group_by.contains(&g) {
                sql.push_str(&format!(", COALESCE({}, '')", g.column()));
            } else {
                sql.push_str(", ''");
            }
        }
        sql.push_str(
            ", COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_input), 0) AS BIGINT), CAST(COALESCE(SUM(cost_cached), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_output), 0) AS BIGINT) \
             FROM usage WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3",
        );
        let mut binds: Vec<&str> = Vec::new();
        for (col, vals) in [
            ("project_id", &q.project_ids),
            ("user_id", &q.user_ids),
            ("key_id", &q.api_key_ids),
            ("model", &q.models),
        ] {
            if vals.is_empty() {
                continue;
            }
            let marks: Vec<String> = (0..vals.len())
                .map(|i| format!("${}", 4 + binds.len() + i))
                .collect();
            sql.push_str(&format!(" AND {col} IN ({})", marks.join(", ")));
            binds.extend(vals.iter().map(String::as_str));
        }
        sql.push_str(" GROUP BY bucket");
        for g in &q.group_by {
            sql.push_str(&format!(", COALESCE({}, '')", g.column()));
        }
        sql.push_str(" ORDER BY bucket");
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let mut query = sqlx::query_as::<_, Row>(&sql)
            .bind(org)
            .bind(q.start)
            .bind(q.end);
        for b in binds {
            query = query.bind(b);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let some = |s: String| (!s.is_empty()).then_some(s);
        Ok(rows
            .into_iter()
            .map(|r| UsageGroup {
                bucket: r.0,
                project_id: some(r.1),
                user_id: some(r.2),
                api_key_id: some(r.3),
                model: some(r.4),
                requests: r.5,
                input_tokens: r.6,
                cached_tokens: r.7,
                output_tokens: r.8,
                cost_input: r.9,
                cost_cached: r.10,
                cost_output: r.11,
            })
            .collect())
    }
}

/// One metering step of a request (see [`Store::meter`]).
#[derive(Debug, Clone)]
pub enum MeterOp {
    /// Reserve before it runs, kept alive by `replica` for `ttl` seconds at a time.
    Reserve {
        row: UsageRow,
        replica: String,
        ttl: i64,
    },
    /// Record the tokens produced so far, before they are sent.
    Checkpoint {
        request_id: String,
        completion: u64,
        cached: u64,
    },
    /// Settle into its usage row.
    Settle(UsageRow),
}

/// Reserve one request in the caller's transaction: its worst-case cost against every capped
/// budget it falls under (in a savepoint, so a refusal leaves nothing), then its row.
async fn reserve_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    r: &UsageRow,
    replica: &str,
    ttl: i64,
    book: &PriceBook,
    budgets: &[crate::budgets::BudgetRow],
) -> Result<Result<()>> {
    let project = r.project_id.as_deref().unwrap_or("");
    let period = crate::budgets::period_of(r.created_at);
    let mine: Vec<&crate::budgets::BudgetRow> = budgets
        .iter()
        .filter(|c| {
            c.limit.is_some()
                && c.organization_id == r.organization_id
                && (c.scope.is_empty() || c.scope == project)
        })
        .collect();
    let mut worst = 0;
    let mut sp = tx.begin().await?;
    if !mine.is_empty() {
        worst = book.at(&r.model, r.created_at).map_or(0, |p| {
            (r.prompt_tokens as i64).saturating_mul(p.input.max(p.cached_input))
                + (r.max_tokens as i64).saturating_mul(p.output)
        });
        // Both scopes hold the reservation, so settling takes it back from both.
        for scope in ["", project] {
            let cap = mine.iter().find(|c| c.scope == scope).and_then(|c| c.limit);
            if !crate::budgets::reserve_in(&mut sp, &r.organization_id, scope, &period, worst, cap)
                .await?
            {
                sp.rollback().await?;
                let whose = if scope.is_empty() {
                    "the organization's".to_string()
                } else {
                    format!("project {scope}'s")
                };
                return Ok(Err(PlatformError::Quota(format!(
                    "You exceeded your current quota: {whose} monthly budget for {period} is spent \
                     (this request could cost up to ${:.6}). Raise the budget or wait for next month.",
                    worst as f64 / 1e12
                ))));
            }
            if project.is_empty() {
                break;
            }
        }
    }
    sqlx::query(
        "INSERT INTO usage_reservations (request_id, client_request_id, organization_id, project_id, \
         key_id, user_id, service_account_id, model, endpoint, prompt_tokens, max_tokens, \
         completion_tokens, cached_tokens, replica, created_at, expires_at, reserved_cost, period) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, 0, $12, $13, $14, $15, $16)",
    )
    .bind(&r.request_id)
    .bind(&r.client_request_id)
    .bind(&r.organization_id)
    .bind(&r.project_id)
    .bind(&r.key_id)
    .bind(&r.user_id)
    .bind(&r.service_account_id)
    .bind(&r.model)
    .bind(&r.endpoint)
    .bind(r.prompt_tokens as i64)
    .bind(r.max_tokens as i64)
    .bind(replica)
    .bind(r.created_at)
    .bind(now() + ttl)
    .bind(worst)
    .bind(&period)
    .execute(&mut *sp)
    .await?;
    sp.commit().await?;
    Ok(Ok(()))
}

/// Spend to move per (organization, scope, period): (reserved to release, cost to add), summed
/// over a batch and written once per scope, in key order (the same lock order everywhere).
type Spend = std::collections::BTreeMap<(String, String, String), (i64, i64)>;

async fn apply_spend(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    spend: Spend,
    budgets: &[crate::budgets::BudgetRow],
) -> Result<()> {
    for ((org, scope, period), (reserved, cost)) in spend {
        let budget = budgets
            .iter()
            .find(|b| b.organization_id == org && b.scope == scope);
        crate::budgets::settle_in(tx, &org, &scope, &period, reserved, cost, budget).await?;
    }
    Ok(())
}

/// Settle one request in the caller's transaction: its reservation goes, its usage row is
/// written (or, when it replaces a row settled from an expired reservation, corrected), its
/// spend moves from reserved to spent, and its event joins the outbox.
async fn settle_row(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    r: &UsageRow,
    book: &PriceBook,
    spend: &mut Spend,
    expired: bool,
) -> Result<()> {
    let held: Option<(i64, String)> = sqlx::query_as(
        "DELETE FROM usage_reservations WHERE request_id = $1 RETURNING reserved_cost, period",
    )
    .bind(&r.request_id)
    .fetch_optional(&mut **tx)
    .await?;
    let price = book.at(&r.model, r.created_at);
    let cost = Cost::of(r, price);
    let mut replaces = None;
    if insert_usage(tx, r, cost, price, expired).await? == 0 {
        let before: Option<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT expired, cost_input, cost_cached, cost_output FROM usage WHERE request_id = $1",
        )
        .bind(&r.request_id)
        .fetch_optional(&mut **tx)
        .await?;
        match before {
            // The replica's own account replaces the one settled from its expired reservation.
            Some((1, a, b, c)) if !expired => {
                replaces = Some(a + b + c);
                sqlx::query("DELETE FROM usage WHERE request_id = $1")
                    .bind(&r.request_id)
                    .execute(&mut **tx)
                    .await?;
                insert_usage(tx, r, cost, price, expired).await?;
            }
            // Settled already: nothing changes.
            _ => return Ok(()),
        }
    }
    // Spend: this row's cost (less what an expired row it replaces had spent already).
    let total = cost.input + cost.cached + cost.output;
    let (reserved, period) = held.unwrap_or_else(|| (0, crate::budgets::period_of(r.created_at)));
    let project = r.project_id.as_deref().unwrap_or("");
    for scope in ["", project] {
        let e = spend
            .entry((r.organization_id.clone(), scope.to_string(), period.clone()))
            .or_default();
        e.0 += reserved;
        e.1 += total - replaces.unwrap_or(0);
        if project.is_empty() {
            break;
        }
    }
    let (id, kind) = match (replaces.is_some(), expired) {
        (true, _) => (
            format!("evt_usage_{}_final", r.request_id),
            "usage.corrected",
        ),
        (false, true) => (format!("evt_usage_{}_lost", r.request_id), "usage.recorded"),
        (false, false) => (format!("evt_usage_{}", r.request_id), "usage.recorded"),
    };
    crate::events::emit(
        tx,
        &id,
        Some(&r.organization_id),
        kind,
        &serde_json::json!({
            "request_id": r.request_id, "project_id": r.project_id, "api_key_id": r.key_id,
            "user_id": r.user_id, "service_account_id": r.service_account_id, "model": r.model,
            "endpoint": r.endpoint, "input_tokens": r.prompt_tokens,
            "input_cached_tokens": r.cached_tokens, "output_tokens": r.completion_tokens,
            "status": r.status, "latency_ms": r.latency_ms, "created_at": r.created_at,
            "cost": {"input": cost.input, "cached": cost.cached, "output": cost.output,
                     "unit": "picodollars", "price_id": price.map(|p| p.id.clone())},
        }),
    )
    .await
}

/// Write a usage row unless its request has one; returns how many rows it wrote (0 or 1).
async fn insert_usage(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    r: &UsageRow,
    cost: Cost,
    price: Option<&Price>,
    expired: bool,
) -> Result<u64> {
    Ok(sqlx::query(
        "INSERT INTO usage (request_id, client_request_id, organization_id, project_id, key_id, user_id, \
         service_account_id, model, endpoint, prompt_tokens, completion_tokens, latency_ms, status, created_at, \
         cached_tokens, cost_input, cost_cached, cost_output, price_id, expired) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
         ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(&r.request_id)
    .bind(&r.client_request_id)
    .bind(&r.organization_id)
    .bind(&r.project_id)
    .bind(&r.key_id)
    .bind(&r.user_id)
    .bind(&r.service_account_id)
    .bind(&r.model)
    .bind(&r.endpoint)
    .bind(r.prompt_tokens as i64)
    .bind(r.completion_tokens as i64)
    .bind(r.latency_ms as i64)
    .bind(i64::from(r.status))
    .bind(r.created_at)
    .bind(r.cached_tokens as i64)
    .bind(cost.input)
    .bind(cost.cached)
    .bind(cost.output)
    .bind(price.map(|p| p.id.clone()))
    .bind(i64::from(expired))
    .execute(&mut **tx)
    .await?
    .rows_affected())
}
