//! API keys and service accounts.
//!
//! - Operator keys (`sk-op-…`) sit above organizations: they create organizations and their
//!   first admin keys, nothing else.
//! - Admin keys (`sk-admin-…`) manage one organization and cannot call inference.
//! - Project keys (`sk-proj-…`), owned by a service account or a project user, call inference
//!   in their project and cannot manage anything; `read_only` ones can only list models.
//!
//! Keys are shown once; the database keeps their SHA-256, which also finds the row (a key has
//! 285 random bits, so a fast hash is the right one: there is nothing to brute-force).

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now, random_token, redact, secret_hash};
use crate::{HasId, List, Page, Store, check_name, page_of};
use serde::Serialize;
use serde_json::{Value, json};

/// What a key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Operator,
    Admin,
    Project,
    /// Not a key: a signed-in user's access token.
    Session,
}

impl KeyKind {
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Operator => "sk-op-",
            Self::Admin => "sk-admin-",
            Self::Project => "sk-proj-",
            Self::Session => "",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Project => "project",
            Self::Session => "session",
        }
    }

    fn from_db(s: &str) -> Self {
        match s {
            "operator" => Self::Operator,
            "admin" => Self::Admin,
            _ => Self::Project,
        }
    }
}

/// Random characters after a key's prefix (48 base62 characters: 285 bits).
const KEY_CHARS: usize = 48;

/// The caller a live key identifies.
#[derive(Debug, Clone)]
pub struct Credential {
    pub key_id: String,
    pub kind: KeyKind,
    /// `None` only for operator keys.
    pub organization_id: Option<String>,
    pub project_id: Option<String>,
    /// Read-only project keys may list models but not run them.
    pub read_only: bool,
    pub user_id: Option<String>,
    pub user_email: Option<String>,
    pub service_account_id: Option<String>,
    /// A signed-in user's organization role (`owner`, `reader`).
    pub role: Option<String>,
}

impl Credential {
    /// The audit log's actor for this key.
    pub fn actor(&self) -> Actor {
        if self.kind == KeyKind::Session {
            return crate::sessions::session_actor(
                self.user_id.as_deref().unwrap_or(""),
                self.user_email.as_deref().unwrap_or(""),
                &Actor::anonymous(None),
            );
        }
        let owner = match (&self.user_id, &self.service_account_id) {
            (Some(u), _) => json!({"type": "user", "user": {"id": u, "email": self.user_email}}),
            (None, Some(s)) => json!({"type": "service_account", "service_account": {"id": s}}),
            (None, None) => json!({"type": self.kind}),
        };
        let mut key = owner;
        key["id"] = json!(self.key_id);
        Actor {
            json: json!({"type": "api_key", "api_key": key}),
            id: Some(self.user_id.clone().unwrap_or_else(|| self.key_id.clone())),
            email: self.user_email.clone(),
            ip: None,
            request_id: None,
        }
    }
}

/// `organization.project.service_account`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ServiceAccount {
    #[sqlx(skip)]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: i64,
}

impl HasId for ServiceAccount {
    fn id(&self) -> &str {
        &self.id
    }
}

/// A service account as created: with its first key's value, shown this once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedServiceAccount {
    #[serde(flatten)]
    pub account: ServiceAccount,
    pub api_key: NewKeyValue,
}

/// `organization.project.service_account.api_key`: a key's value at creation.
#[derive(Debug, Clone, Serialize)]
pub struct NewKeyValue {
    pub object: &'static str,
    pub value: String,
    pub name: String,
    pub created_at: i64,
    pub id: String,
}

/// A stored key, as listings show it (`organization.admin_api_key`,
/// `organization.project.api_key`): never the key itself.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub redacted_value: String,
    /// The key itself: only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    /// Beyond OpenAI: `all`, or `read_only` for a key that may only list models.
    pub scope: String,
    pub owner: Value,
    /// Beyond OpenAI: the organization the key belongs to (operator keys: none).
    pub organization_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub revoked_at: Option<i64>,
}

impl HasId for ApiKey {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, sqlx::FromRow)]
struct KeyRow {
    id: String,
    organization_id: Option<String>,
    project_id: Option<String>,
    kind: String,
    scope: String,
    user_id: Option<String>,
    service_account_id: Option<String>,
    name: String,
    redacted_value: String,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
    owner_name: Option<String>,
    owner_email: Option<String>,
    owner_role: Option<String>,
    owner_created: Option<i64>,
}

impl HasId for KeyRow {
    fn id(&self) -> &str {
        &self.id
    }
}

const KEY_SELECT: &str = "SELECT * FROM (SELECT k.id AS id, k.organization_id AS organization_id, \
    k.project_id AS project_id, k.kind AS kind, k.scope AS scope, k.user_id AS user_id, \
    k.service_account_id AS service_account_id, k.name AS name, k.redacted_value AS redacted_value, \
    k.created_at AS created_at, k.last_used_at AS last_used_at, k.revoked_at AS revoked_at, \
    COALESCE(u.name, s.name) AS owner_name, u.email AS owner_email, \
    COALESCE(pu.role, s.role, u.role) AS owner_role, COALESCE(pu.added_at, s.created_at, u.created_at) AS owner_created \
    FROM api_keys k LEFT JOIN users u ON u.id = k.user_id \
    LEFT JOIN service_accounts s ON s.id = k.service_account_id \
    LEFT JOIN project_users pu ON pu.user_id = k.user_id AND pu.project_id = k.project_id) keys";

impl KeyRow {
    fn object(self) -> ApiKey {
        let kind = KeyKind::from_db(&self.kind);
        let (object, owner) = match kind {
            KeyKind::Project => {
                let owner = match (&self.user_id, &self.service_account_id) {
                    (Some(u), _) => json!({"type": "user", "user": {
                        "object": "organization.project.user", "id": u, "name": self.owner_name,
                        "email": self.owner_email, "role": self.owner_role, "added_at": self.owner_created}}),
                    (None, Some(s)) => json!({"type": "service_account", "service_account": {
                        "object": "organization.project.service_account", "id": s, "name": self.owner_name,
                        "role": self.owner_role, "created_at": self.owner_created}}),
                    (None, None) => Value::Null,
                };
                ("organization.project.api_key", owner)
            }
            KeyKind::Admin => {
                let owner = match &self.user_id {
                    Some(u) => json!({"type": "user", "object": "organization.user", "id": u,
                        "name": self.owner_name, "created_at": self.owner_created, "role": self.owner_role}),
                    None => json!({"type": "operator"}),
                };
                ("organization.admin_api_key", owner)
            }
            KeyKind::Operator | KeyKind::Session => {
                ("platform.operator_api_key", json!({"type": "operator"}))
            }
        };
        ApiKey {
            object,
            id: self.id,
            name: self.name,
            redacted_value: self.redacted_value,
            value: None,
            created_at: self.created_at,
            last_used_at: self.last_used_at,
            scope: self.scope,
            owner,
            organization_id: self.organization_id,
            project_id: self.project_id,
            revoked_at: self.revoked_at,
        }
    }
}

/// Where a new key belongs.
#[derive(Debug, Clone, Default)]
struct NewKey<'a> {
    org: Option<&'a str>,
    project: Option<&'a str>,
    user: Option<&'a str>,
    service_account: Option<&'a str>,
    read_only: bool,
}

impl Store {
    /// Insert a key row in `tx`; returns its id, value and creation time.
    async fn insert_key(
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        kind: KeyKind,
        name: &str,
        at: NewKey<'_>,
        created_at: i64,
    ) -> Result<(String, String)> {
        let value = format!("{}{}", kind.prefix(), random_token(KEY_CHARS)?);
        let id = new_id("key_");
        sqlx::query(
            "INSERT INTO api_keys (id, organization_id, project_id, kind, scope, user_id, service_account_id, name, redacted_value, hash, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&id)
        .bind(at.org)
        .bind(at.project)
        .bind(kind.as_str())
        .bind(if at.read_only { "read_only" } else { "all" })
        .bind(at.user)
        .bind(at.service_account)
        .bind(name)
        .bind(redact(&value, kind.prefix()))
        .bind(secret_hash(&value))
        .bind(created_at)
        .execute(&mut **tx)
        .await?;
        Ok((id, value))
    }

    /// A platform operator key (made with `bitnet keys create --operator`).
    pub async fn create_operator_key(&self, name: &str) -> Result<(ApiKey, String)> {
        let name = check_name("name", name)?;
        let mut tx = self.begin_write().await?;
        let (id, value) =
            Self::insert_key(&mut tx, KeyKind::Operator, &name, NewKey::default(), now()).await?;
        tx.commit().await?;
        let mut k = self.key_by_id(None, &id).await?;
        k.value = Some(value.clone());
        Ok((k, value))
    }

    pub async fn create_admin_key(
        &self,
        org: &str,
        name: &str,
        by: &Actor,
    ) -> Result<(ApiKey, String)> {
        self.create_admin_key_for(org, name, None, by).await
    }

    /// An admin key of `org`, owned by `user` when a signed-in user makes it.
    pub async fn create_admin_key_for(
        &self,
        org: &str,
        name: &str,
        user: Option<&str>,
        by: &Actor,
    ) -> Result<(ApiKey, String)> {
        let name = check_name("name", name)?;
        let mut c = self.change(org).await?;
        let at = NewKey {
            org: Some(org),
            user,
            ..Default::default()
        };
        let (id, value) = Self::insert_key(&mut c.tx, KeyKind::Admin, &name, at, c.at).await?;
        c.audit(AuditEvent::new(
            "api_key.created",
            by,
            &id,
            json!({"id": id, "data": {"scopes": ["admin"], "name": name}}),
        ))
        .await?;
        c.commit().await?;
        let mut k = self.key_by_id(Some(org), &id).await?;
        k.value = Some(value.clone());
        Ok((k, value))
    }

    /// A project key owned by a member of the project (`user`) or one of its service
    /// accounts.
    pub async fn create_project_key(
        &self,
        org: &str,
        project: &str,
        name: &str,
        owner: ProjectKeyOwner<'_>,
        read_only: bool,
        by: &Actor,
    ) -> Result<(ApiKey, String)> {
        let name = check_name("name", name)?;
        self.active_project(org, project).await?;
        let mut at = NewKey {
            org: Some(org),
            project: Some(project),
            read_only,
            ..Default::default()
        };
        match owner {
            ProjectKeyOwner::User(u) => {
                self.project_user(org, project, u).await?;
                at.user = Some(u);
            }
            ProjectKeyOwner::ServiceAccount(s) => {
                self.service_account(org, project, s).await?;
                at.service_account = Some(s);
            }
        }
        let mut c = self.change(org).await?;
        let (id, value) = Self::insert_key(&mut c.tx, KeyKind::Project, &name, at, c.at).await?;
        c.audit(
            AuditEvent::new(
                "api_key.created",
                by,
                &id,
                json!({"id": id, "data": {"scopes": [if read_only { "read_only" } else { "all" }], "name": name}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        let mut k = self.key_by_id(Some(org), &id).await?;
        k.value = Some(value.clone());
        Ok((k, value))
    }

    async fn key_by_id(&self, org: Option<&str>, id: &str) -> Result<ApiKey> {
        let with_org = format!("{KEY_SELECT} WHERE organization_id = $1 AND id = $2");
        let operator = format!("{KEY_SELECT} WHERE organization_id IS NULL AND id = $1");
        let row: Option<KeyRow> = match org {
            Some(o) => sqlx::query_as(&with_org).bind(o).bind(id),
            None => sqlx::query_as(&operator).bind(id),
        }
        .fetch_optional(&self.pool)
        .await?;
        row.map(KeyRow::object)
            .ok_or_else(|| PlatformError::not_found("API key", id))
    }

    /// Live admin keys of `org`.
    pub async fn admin_keys(&self, org: &str, page: &Page) -> Result<List<ApiKey>> {
        let l: List<KeyRow> = page_of(
            self,
            &format!(
                "{KEY_SELECT} WHERE organization_id = $1 AND kind = 'admin' AND revoked_at IS NULL"
            ),
            &[org],
            page,
        )
        .await?;
        Ok(List::new(
            l.data.into_iter().map(KeyRow::object).collect(),
            l.has_more,
        ))
    }

    pub async fn admin_key(&self, org: &str, id: &str) -> Result<ApiKey> {
        let k = self.key_by_id(Some(org), id).await?;
        if k.object != "organization.admin_api_key" || k.revoked_at.is_some() {
            return Err(PlatformError::not_found("admin API key", id));
        }
        Ok(k)
    }

    /// Live keys of a project.
    pub async fn project_keys(
        &self,
        org: &str,
        project: &str,
        page: &Page,
    ) -> Result<List<ApiKey>> {
        self.project(org, project).await?;
        let l: List<KeyRow> = page_of(
            self,
            &format!("{KEY_SELECT} WHERE organization_id = $1 AND project_id = $2 AND kind = 'project' AND revoked_at IS NULL"),
            &[org, project],
            page,
        )
        .await?;
        Ok(List::new(
            l.data.into_iter().map(KeyRow::object).collect(),
            l.has_more,
        ))
    }

    pub async fn project_key(&self, org: &str, project: &str, id: &str) -> Result<ApiKey> {
        self.project(org, project).await?;
        let k = self.key_by_id(Some(org), id).await?;
        if k.project_id.as_deref() != Some(project) || k.revoked_at.is_some() {
            return Err(PlatformError::not_found("API key", id));
        }
        Ok(k)
    }

    /// Revoke a live key of `org` (admin or project, as `kind` says); `NotFound` otherwise.
    pub async fn revoke_key(
        &self,
        org: &str,
        kind: KeyKind,
        project: Option<&str>,
        id: &str,
        by: &Actor,
    ) -> Result<()> {
        let mut c = self.change(org).await?;
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE organization_id = $2 AND id = $3 AND kind = $4 \
             AND revoked_at IS NULL AND ($5 = '' OR project_id = $5)",
        )
        .bind(c.at)
        .bind(org)
        .bind(id)
        .bind(kind.as_str())
        .bind(project.unwrap_or(""))
        .execute(&mut *c.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(PlatformError::not_found("API key", id));
        }
        let mut e = AuditEvent::new("api_key.deleted", by, id, json!({"id": id}));
        if let Some(p) = project {
            e = e.in_project(p);
        }
        c.audit(e).await?;
        c.commit().await
    }

    /// Every key of an organization, or the operator keys (`org` `None`), revoked ones too:
    /// for the CLI's listing.
    pub async fn all_keys(&self, org: Option<&str>) -> Result<Vec<ApiKey>> {
        let with_org = format!("{KEY_SELECT} WHERE organization_id = $1 ORDER BY id");
        let operator = format!("{KEY_SELECT} WHERE organization_id IS NULL ORDER BY id");
        let rows: Vec<KeyRow> = match org {
            Some(o) => sqlx::query_as(&with_org).bind(o),
            None => sqlx::query_as(&operator),
        }
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(KeyRow::object).collect())
    }

    /// Revoke any key by id or redacted value, from the CLI (audited in its organization).
    pub async fn revoke_any_key(&self, id: &str) -> Result<ApiKey> {
        let row: Option<KeyRow> = sqlx::query_as(&format!(
            "{KEY_SELECT} WHERE (id = $1 OR redacted_value = $1) AND revoked_at IS NULL ORDER BY id LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let k = row
            .map(KeyRow::object)
            .ok_or_else(|| PlatformError::not_found("live API key", id))?;
        match &k.organization_id {
            Some(org) => {
                let kind = if k.object == "organization.admin_api_key" {
                    KeyKind::Admin
                } else {
                    KeyKind::Project
                };
                self.revoke_key(org, kind, k.project_id.as_deref(), &k.id, &Actor::cli())
                    .await?
            }
            None => {
                let mut tx = self.begin_write().await?;
                sqlx::query(
                    "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND organization_id IS NULL",
                )
                .bind(now())
                .bind(&k.id)
                .execute(&mut *tx)
                .await?;
                if self.backend() == crate::Backend::Postgres {
                    crate::store::notify_credentials(&mut tx, "*").await?;
                }
                tx.commit().await?;
                self.cache.invalidate("*");
            }
        }
        Ok(k)
    }

    /// The credential of a presented key, or `None` for an unknown, revoked or orphaned key
    /// (its project archived, its user removed, its service account deleted).
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Credential>> {
        let hash = secret_hash(presented.trim());
        if let Some((cred, last_used)) = self.cache.get(&hash) {
            self.touch(&hash, &cred.key_id, last_used);
            return Ok(Some(cred));
        }
        let generation = self.cache.generation();
        type Row = (
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT k.id, k.kind, k.organization_id, k.project_id, k.scope, k.user_id, u.email, \
                    k.service_account_id, k.last_used_at \
             FROM api_keys k \
             LEFT JOIN projects p ON p.id = k.project_id \
             LEFT JOIN users u ON u.id = k.user_id \
             LEFT JOIN service_accounts s ON s.id = k.service_account_id \
             WHERE k.hash = $1 AND k.revoked_at IS NULL AND p.archived_at IS NULL \
               AND u.deleted_at IS NULL AND s.deleted_at IS NULL",
        )
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some((key_id, kind, org, project, scope, user, email, sa, last_used)) = row else {
            return Ok(None);
        };
        let cred = Credential {
            key_id,
            kind: KeyKind::from_db(&kind),
            organization_id: org,
            project_id: project,
            read_only: scope == "read_only",
            user_id: user,
            user_email: email,
            service_account_id: sa,
            role: None,
        };
        let last_used = self.touch(&hash, &cred.key_id, last_used);
        if let Some(g) = generation {
            self.cache.put(hash, cred.clone(), last_used, g);
        }
        Ok(Some(cred))
    }

    /// Mark a key used: `last_used_at` to the minute, one write a minute per key, not one per
    /// request. Returns when it was last written.
    fn touch(&self, hash: &str, key_id: &str, last_used: Option<i64>) -> Option<i64> {
        let t = now();
        if last_used.is_some_and(|l| t - l < 60) {
            return last_used;
        }
        self.cache.touched(hash, t);
        let pool = self.pool.clone();
        let id = key_id.to_string();
        tokio::spawn(async move {
            let _ = sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(t)
                .bind(id)
                .execute(&pool)
                .await;
        });
        Some(t)
    }

    /// Create a service account in a project, with its first key.
    pub async fn create_service_account(
        &self,
        org: &str,
        project: &str,
        name: &str,
        by: &Actor,
    ) -> Result<CreatedServiceAccount> {
        let name = check_name("name", name)?;
        self.active_project(org, project).await?;
        let mut c = self.change(org).await?;
        let account = ServiceAccount {
            object: "organization.project.service_account",
            id: new_id("svc_acct_"),
            name,
            role: "member".into(),
            created_at: c.at,
        };
        sqlx::query(
            "INSERT INTO service_accounts (id, organization_id, project_id, name, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&account.id)
        .bind(org)
        .bind(project)
        .bind(&account.name)
        .bind(&account.role)
        .bind(account.created_at)
        .execute(&mut *c.tx)
        .await?;
        let at = NewKey {
            org: Some(org),
            project: Some(project),
            service_account: Some(&account.id),
            ..Default::default()
        };
        let key_name = account.name.clone();
        let (key_id, value) =
            Self::insert_key(&mut c.tx, KeyKind::Project, &key_name, at, c.at).await?;
        c.audit(
            AuditEvent::new(
                "service_account.created",
                by,
                &account.id,
                json!({"id": account.id, "data": {"role": account.role}}),
            )
            .in_project(project),
        )
        .await?;
        c.audit(
            AuditEvent::new(
                "api_key.created",
                by,
                &key_id,
                json!({"id": key_id, "data": {"scopes": ["all"], "name": key_name}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        Ok(CreatedServiceAccount {
            api_key: NewKeyValue {
                object: "organization.project.service_account.api_key",
                value,
                name: key_name,
                created_at: account.created_at,
                id: key_id,
            },
            account,
        })
    }

    pub async fn service_accounts(
        &self,
        org: &str,
        project: &str,
        page: &Page,
    ) -> Result<List<ServiceAccount>> {
        self.project(org, project).await?;
        let mut l: List<ServiceAccount> = page_of(
            self,
            "SELECT id, name, role, created_at FROM service_accounts WHERE organization_id = $1 AND project_id = $2 AND deleted_at IS NULL",
            &[org, project],
            page,
        )
        .await?;
        for s in &mut l.data {
            s.object = "organization.project.service_account";
        }
        Ok(l)
    }

    pub async fn service_account(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<ServiceAccount> {
        let row: Option<ServiceAccount> = sqlx::query_as(
            "SELECT id, name, role, created_at FROM service_accounts WHERE organization_id = $1 AND project_id = $2 AND id = $3 AND deleted_at IS NULL",
        )
        .bind(org)
        .bind(project)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let mut s = row.ok_or_else(|| PlatformError::not_found("service account", id))?;
        s.object = "organization.project.service_account";
        Ok(s)
    }

    /// Delete a service account; its keys are revoked in the same transaction.
    pub async fn delete_service_account(
        &self,
        org: &str,
        project: &str,
        id: &str,
        by: &Actor,
    ) -> Result<()> {
        self.service_account(org, project, id).await?;
        let mut c = self.change(org).await?;
        sqlx::query(
            "UPDATE service_accounts SET deleted_at = $1 WHERE organization_id = $2 AND id = $3",
        )
        .bind(c.at)
        .bind(org)
        .bind(id)
        .execute(&mut *c.tx)
        .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE organization_id = $2 AND service_account_id = $3 AND revoked_at IS NULL",
        )
        .bind(c.at)
        .bind(org)
        .bind(id)
        .execute(&mut *c.tx)
        .await?;
        c.audit(
            AuditEvent::new("service_account.deleted", by, id, json!({"id": id}))
                .in_project(project),
        )
        .await?;
        c.commit().await
    }
}

/// Who owns a new project key.
#[derive(Debug, Clone, Copy)]
pub enum ProjectKeyOwner<'a> {
    User(&'a str),
    ServiceAccount(&'a str),
}
