//! The audit log: every change to an organization, written in the change's own transaction,
//! hash-chained per organization, and served in the shape of OpenAI's
//! `GET /v1/organization/audit_logs`.
//!
//! Row `n` of an organization stores `hash = SHA-256(prev_hash "\n" content)`, where `content`
//! is the canonical JSON array of its columns and `prev_hash` is row `n - 1`'s hash (empty for
//! the first). The organization row keeps the count and the last hash, so [`Store::verify_audit`]
//! finds an edited, deleted, inserted or reordered row, including the last one.

use crate::error::{PlatformError, Result};
use crate::ids::{hex, new_id};
use crate::store::Store;
use crate::{List, Page};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::Any;

/// Who did something, as OpenAI's audit log spells it (`{"type": "api_key", "api_key": {...}}`,
/// `{"type": "session", "session": {...}}`), plus our operator.
#[derive(Debug, Clone)]
pub struct Actor {
    pub json: Value,
    /// The id filters match (`actor_ids[]`): a user's or a key's.
    pub id: Option<String>,
    /// The email filters match (`actor_emails[]`).
    pub email: Option<String>,
    pub ip: Option<String>,
    pub request_id: Option<String>,
}

impl Actor {
    /// The platform operator acting through the `bitnet` CLI on the database itself.
    pub fn cli() -> Self {
        Self {
            json: json!({"type": "operator", "operator": {"via": "cli"}}),
            id: None,
            email: None,
            ip: None,
            request_id: None,
        }
    }

    /// A part of the platform acting on its own (a quantization worker, say).
    pub fn system(name: &str) -> Self {
        Self {
            json: json!({"type": "system", "system": {"name": name}}),
            id: None,
            email: None,
            ip: None,
            request_id: None,
        }
    }

    /// Someone who is not signed in (a failed login names the email it tried).
    pub fn anonymous(email: Option<&str>) -> Self {
        Self {
            json: json!({"type": "anonymous", "anonymous": {"email": email}}),
            id: None,
            email: email.map(str::to_string),
            ip: None,
            request_id: None,
        }
    }

    /// With the request's address and id.
    pub fn at(mut self, ip: Option<String>, request_id: Option<String>) -> Self {
        // `{"type": "api_key", "api_key": {...}}`: the address goes in the object the type names.
        let kind = self.json["type"].as_str().unwrap_or("").to_string();
        if ip.is_some()
            && let Some(Value::Object(inner)) = self.json.get_mut(&kind)
        {
            inner.insert("ip_address".into(), json!(ip));
        }
        self.ip = ip;
        self.request_id = request_id;
        self
    }
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// OpenAI's event type: `project.created`, `api_key.deleted`, `login.failed`, ...
    pub kind: &'static str,
    pub actor: Actor,
    pub project_id: Option<String>,
    /// The object acted on (`resource_ids[]` matches it).
    pub target_id: Option<String>,
    /// The event's own object, served under the event type's key.
    pub details: Value,
    /// `success` or `failure`.
    pub outcome: &'static str,
}

impl AuditEvent {
    pub fn new(kind: &'static str, actor: &Actor, target: &str, details: Value) -> Self {
        Self {
            kind,
            actor: actor.clone(),
            project_id: None,
            target_id: Some(target.to_string()),
            details,
            outcome: "success",
        }
    }

    pub fn in_project(mut self, project: &str) -> Self {
        self.project_id = Some(project.to_string());
        self
    }
}

/// A stored row, with the columns the hash covers.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Row {
    pub id: String,
    pub organization_id: String,
    pub seq: i64,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub effective_at: i64,
    pub actor: String,
    pub actor_id: Option<String>,
    pub actor_email: Option<String>,
    pub project_id: Option<String>,
    pub target_id: Option<String>,
    pub details: String,
    pub outcome: String,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

const COLUMNS: &str = "id, organization_id, seq, type, effective_at, actor, actor_id, actor_email, \
    project_id, target_id, details, outcome, ip, request_id, prev_hash, hash";

impl Row {
    pub fn chain(org: &str, seq: i64, at: i64, e: AuditEvent, prev: &str) -> Self {
        let mut row = Row {
            id: new_id("audit_log-"),
            organization_id: org.to_string(),
            seq,
            kind: e.kind.to_string(),
            effective_at: at,
            actor: e.actor.json.to_string(),
            actor_id: e.actor.id,
            actor_email: e.actor.email,
            project_id: e.project_id,
            target_id: e.target_id,
            details: e.details.to_string(),
            outcome: e.outcome.to_string(),
            ip: e.actor.ip,
            request_id: e.actor.request_id,
            prev_hash: prev.to_string(),
            hash: String::new(),
        };
        row.hash = row.content_hash();
        row
    }

    /// SHA-256 of the previous hash and this row's columns (all but `hash`).
    pub fn content_hash(&self) -> String {
        let content = json!([
            self.id,
            self.organization_id,
            self.seq,
            self.kind,
            self.effective_at,
            self.actor,
            self.actor_id,
            self.actor_email,
            self.project_id,
            self.target_id,
            self.details,
            self.outcome,
            self.ip,
            self.request_id,
        ]);
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(content.to_string().as_bytes());
        hex(&h.finalize())
    }

    pub async fn insert(&self, tx: &mut sqlx::Transaction<'static, Any>) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO audit_logs ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        ))
        .bind(&self.id)
        .bind(&self.organization_id)
        .bind(self.seq)
        .bind(&self.kind)
        .bind(self.effective_at)
        .bind(&self.actor)
        .bind(&self.actor_id)
        .bind(&self.actor_email)
        .bind(&self.project_id)
        .bind(&self.target_id)
        .bind(&self.details)
        .bind(&self.outcome)
        .bind(&self.ip)
        .bind(&self.request_id)
        .bind(&self.prev_hash)
        .bind(&self.hash)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// OpenAI's audit log object, with our extra fields beside its own.
    pub fn object(&self) -> AuditLog {
        let parse = |s: &str| serde_json::from_str(s).unwrap_or(Value::Null);
        AuditLog {
            id: self.id.clone(),
            object: "organization.audit_log",
            kind: self.kind.clone(),
            effective_at: self.effective_at,
            actor: parse(&self.actor),
            project: self.project_id.as_ref().map(|id| json!({"id": id})),
            outcome: self.outcome.clone(),
            request_id: self.request_id.clone(),
            details: (self.kind.clone(), parse(&self.details)),
        }
    }
}

/// An audit log entry as `GET /v1/organization/audit_logs` serves it: the event's own object
/// sits under a key named after its type (`"project.created": {"id": ...}`).
#[derive(Debug, Clone)]
pub struct AuditLog {
    pub id: String,
    pub object: &'static str,
    pub kind: String,
    pub effective_at: i64,
    pub actor: Value,
    pub project: Option<Value>,
    pub outcome: String,
    pub request_id: Option<String>,
    pub details: (String, Value),
}

impl Serialize for AuditLog {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("object", self.object)?;
        m.serialize_entry("type", &self.kind)?;
        m.serialize_entry("effective_at", &self.effective_at)?;
        m.serialize_entry("actor", &self.actor)?;
        if let Some(p) = &self.project {
            m.serialize_entry("project", p)?;
        }
        m.serialize_entry("outcome", &self.outcome)?;
        m.serialize_entry("request_id", &self.request_id)?;
        m.serialize_entry(&self.details.0, &self.details.1)?;
        m.end()
    }
}

impl crate::HasId for AuditLog {
    fn id(&self) -> &str {
        &self.id
    }
}

/// `GET /v1/organization/audit_logs` filters.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub effective_gt: Option<i64>,
    pub effective_gte: Option<i64>,
    pub effective_lt: Option<i64>,
    pub effective_lte: Option<i64>,
    pub project_ids: Vec<String>,
    pub event_types: Vec<String>,
    pub actor_ids: Vec<String>,
    pub actor_emails: Vec<String>,
    pub resource_ids: Vec<String>,
}

/// What `verify` found in one organization's chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub organization_id: String,
    pub rows: u64,
    /// The first row that does not hold, and why; `None` when the chain is intact.
    pub first_bad: Option<BadRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BadRow {
    /// The row's id (or `(end)` when rows are missing at the end of the chain).
    pub id: String,
    pub seq: i64,
    pub reason: String,
}

impl Store {
    /// Audit events of `org`, newest first, filtered as OpenAI's endpoint filters. `after` and
    /// `before` are event ids (cursors).
    pub async fn audit_logs(
        &self,
        org: &str,
        q: &AuditQuery,
        page: &Page,
        before: Option<&str>,
    ) -> Result<List<AuditLog>> {
        let mut sql = format!("SELECT {COLUMNS} FROM audit_logs WHERE organization_id = $1");
        let mut args: Vec<Arg> = vec![Arg::S(org.to_string())];
        let mut push = |sql: &mut String, cond: &str, a: Vec<Arg>| {
            let mut cond = cond.to_string();
            for x in a {
                args.push(x);
                cond = cond.replacen('?', &format!("${}", args.len()), 1);
            }
            sql.push_str(" AND ");
            sql.push_str(&cond);
        };
        for (op, v) in [
            (">", q.effective_gt),
            (">=", q.effective_gte),
            ("<", q.effective_lt),
            ("<=", q.effective_lte),
        ] {
            if let Some(v) = v {
                push(&mut sql, &format!("effective_at {op} ?"), vec![Arg::I(v)]);
            }
        }
        for (col, vals) in [
            ("project_id", &q.project_ids),
            ("type", &q.event_types),
            ("actor_id", &q.actor_ids),
            ("actor_email", &q.actor_emails),
            ("target_id", &q.resource_ids),
        ] {
            if !vals.is_empty() {
                let marks = vec!["?"; vals.len()].join(", ");
                push(
                    &mut sql,
                    &format!("{col} IN ({marks})"),
                    vals.iter().cloned().map(Arg::S).collect(),
                );
            }
        }
        // Cursors are ids of this organization's events; newest first, so `after` goes back.
        for (cursor, op) in [(page.after.as_deref(), "<"), (before, ">")] {
            if let Some(c) = cursor {
                let seq: Option<(i64,)> = sqlx::query_as(
                    "SELECT seq FROM audit_logs WHERE organization_id = $1 AND id = $2",
                )
                .bind(org)
                .bind(c)
                .fetch_optional(&self.pool)
                .await?;
                let Some((seq,)) = seq else {
                    return Err(PlatformError::invalid(
                        if op == "<" { "after" } else { "before" },
                        format!("no audit log entry with id `{c}`"),
                    ));
                };
                push(&mut sql, &format!("seq {op} ?"), vec![Arg::I(seq)]);
            }
        }
        let order = if before.is_some() && page.after.is_none() {
            "ASC"
        } else {
            "DESC"
        };
        sql.push_str(&format!(" ORDER BY seq {order} LIMIT {}", page.limit + 1));
        let mut query = sqlx::query_as::<_, Row>(&sql);
        for a in args {
            query = match a {
                Arg::S(s) => query.bind(s),
                Arg::I(i) => query.bind(i),
            };
        }
        let mut rows = query.fetch_all(&self.pool).await?;
        let has_more = rows.len() > page.limit;
        rows.truncate(page.limit);
        if order == "ASC" {
            rows.reverse();
        }
        Ok(List::new(rows.iter().map(Row::object).collect(), has_more))
    }

    /// Every audit event of `org`, oldest first (for export as JSON lines).
    pub async fn audit_export(&self, org: &str) -> Result<Vec<AuditLog>> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM audit_logs WHERE organization_id = $1 ORDER BY seq"
        ))
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(Row::object).collect())
    }

    /// Check every organization's chain (or one's): each row's hash, its link to the row
    /// before, the sequence without gaps, and the organization's recorded head.
    pub async fn verify_audit(&self, only: Option<&str>) -> Result<Vec<ChainReport>> {
        let orgs: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT id, audit_seq, audit_head FROM organizations ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for (org, seq_head, head) in orgs {
            if only.is_some_and(|o| o != org) {
                continue;
            }
            let rows: Vec<Row> = sqlx::query_as(&format!(
                "SELECT {COLUMNS} FROM audit_logs WHERE organization_id = $1 ORDER BY seq"
            ))
            .bind(&org)
            .fetch_all(&self.pool)
            .await?;
            out.push(check_chain(&org, &rows, seq_head, &head));
        }
        // Rows whose organization is gone (or was renamed under them) are bad too.
        let strays: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, seq FROM audit_logs WHERE organization_id NOT IN (SELECT id FROM organizations) ORDER BY id LIMIT 1",
        )
        .fetch_all(&self.pool)
        .await?;
        if let Some((id, seq)) = strays.into_iter().next() {
            out.push(ChainReport {
                organization_id: "(none)".into(),
                rows: 1,
                first_bad: Some(BadRow {
                    id,
                    seq,
                    reason: "the row's organization does not exist".into(),
                }),
            });
        }
        Ok(out)
    }
}

fn check_chain(org: &str, rows: &[Row], seq_head: i64, head: &str) -> ChainReport {
    let bad = |r: &Row, reason: String| {
        Some(BadRow {
            id: r.id.clone(),
            seq: r.seq,
            reason,
        })
    };
    let mut prev = String::new();
    let mut first_bad = None;
    for (i, r) in rows.iter().enumerate() {
        let expect = i as i64 + 1;
        first_bad = if r.seq != expect {
            bad(
                r,
                format!(
                    "sequence {} where {expect} was expected (a row is missing or reordered)",
                    r.seq
                ),
            )
        } else if r.prev_hash != prev {
            bad(r, "its link to the previous row does not match (a row before it was removed, inserted or reordered)".into())
        } else if r.content_hash() != r.hash {
            bad(
                r,
                "its content does not match its hash (the row was edited)".into(),
            )
        } else {
            None
        };
        if first_bad.is_some() {
            break;
        }
        prev = r.hash.clone();
    }
    if first_bad.is_none() && (rows.len() as i64 != seq_head || prev != head) {
        first_bad = Some(BadRow {
            id: "(end)".into(),
            seq: rows.len() as i64,
            reason: format!(
                "the chain ends at row {} but the organization recorded {seq_head} events (rows at the end were removed or added)",
                rows.len()
            ),
        });
    }
    ChainReport {
        organization_id: org.to_string(),
        rows: rows.len() as u64,
        first_bad,
    }
}

enum Arg {
    S(String),
    I(i64),
}
