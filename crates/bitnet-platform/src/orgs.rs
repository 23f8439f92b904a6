//! Organizations: the tenants. Created by the platform operator (`bitnet orgs create`, the
//! operator API); everything else belongs to one.

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now};
use crate::{HasId, List, Page, Store, check_name, page_of};
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Organization {
    #[sqlx(skip)]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

impl HasId for Organization {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Organization {
    fn tagged(mut self) -> Self {
        self.object = "organization";
        self
    }
}

impl Store {
    /// Create an organization; its first audit event records who made it.
    pub async fn create_organization(&self, name: &str, by: &Actor) -> Result<Organization> {
        let name = check_name("name", name)?;
        let org = Organization {
            object: "organization",
            id: new_id("org-"),
            name,
            created_at: now(),
        };
        let inserted = sqlx::query(
            "INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&org.id)
        .bind(&org.name)
        .bind(org.created_at)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(PlatformError::Conflict(format!(
                "an organization named `{}` exists already",
                org.name
            )));
        }
        let mut c = self.change(&org.id).await?;
        c.audit(AuditEvent::new(
            "organization.created",
            by,
            &org.id,
            json!({"id": org.id, "data": {"name": org.name}}),
        ))
        .await?;
        c.commit().await?;
        Ok(org)
    }

    pub async fn organizations(&self, page: &Page) -> Result<List<Organization>> {
        let mut l: List<Organization> = page_of(
            self,
            "SELECT id, name, created_at FROM organizations WHERE 1 = 1",
            &[],
            page,
        )
        .await?;
        l.data = l.data.into_iter().map(Organization::tagged).collect();
        Ok(l)
    }

    /// Whether `org` has an object of `kind` (`project`, `user`, `invite`, `API key`) with this
    /// id, live or not: what the permission check asks before refusing, so that an id of
    /// another organization is a 404 like any unknown id.
    pub async fn owns(&self, org: &str, kind: &str, id: &str) -> Result<bool> {
        let table = match kind {
            "project" => "projects",
            "user" => "users",
            "invite" => "invites",
            "API key" => "api_keys",
            "file" => "files",
            "upload" => "uploads",
            "quantization job" => "quantization_jobs",
            "invoice" => "invoices",
            _ => return Ok(false),
        };
        let row: Option<(String,)> = sqlx::query_as(&format!(
            "SELECT id FROM {table} WHERE organization_id = $1 AND id = $2"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// An organization by id or by name.
    pub async fn organization(&self, id_or_name: &str) -> Result<Organization> {
        let row: Option<Organization> = sqlx::query_as(
            "SELECT id, name, created_at FROM organizations WHERE id = $1 OR name = $1 ORDER BY id LIMIT 1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Organization::tagged)
            .ok_or_else(|| PlatformError::not_found("organization", id_or_name))
    }
}
