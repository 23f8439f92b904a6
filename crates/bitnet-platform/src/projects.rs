//! Projects: where inference keys and service accounts live.

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::new_id;
use crate::{HasId, List, Page, Store, check_name, page_of};
use serde::Serialize;
use serde_json::json;

/// `organization.project`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Project {
    pub id: String,
    #[sqlx(skip)]
    pub object: &'static str,
    pub name: String,
    pub created_at: i64,
    pub archived_at: Option<i64>,
    #[sqlx(skip)]
    pub status: &'static str,
}

impl HasId for Project {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Project {
    fn tagged(mut self) -> Self {
        self.object = "organization.project";
        self.status = if self.archived_at.is_some() {
            "archived"
        } else {
            "active"
        };
        self
    }
}

const COLS: &str = "id, name, created_at, archived_at";

impl Store {
    pub async fn create_project(&self, org: &str, name: &str, by: &Actor) -> Result<Project> {
        let name = check_name("name", name)?;
        let mut c = self.change(org).await?;
        let p = Project {
            id: new_id("proj_"),
            object: "",
            name,
            created_at: c.at,
            archived_at: None,
            status: "",
        }
        .tagged();
        sqlx::query(
            "INSERT INTO projects (id, organization_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&p.id)
        .bind(org)
        .bind(&p.name)
        .bind(p.created_at)
        .execute(&mut *c.tx)
        .await?;
        c.audit(
            AuditEvent::new(
                "project.created",
                by,
                &p.id,
                json!({"id": p.id, "data": {"name": p.name, "title": p.name}}),
            )
            .in_project(&p.id),
        )
        .await?;
        c.commit().await?;
        Ok(p)
    }

    /// Projects of `org`; archived ones only when asked (`include_archived`, as OpenAI's).
    pub async fn projects(
        &self,
        org: &str,
        page: &Page,
        include_archived: bool,
    ) -> Result<List<Project>> {
        let filter = if include_archived {
            ""
        } else {
            " AND archived_at IS NULL"
        };
        let mut l: List<Project> = page_of(
            self,
            &format!("SELECT {COLS} FROM projects WHERE organization_id = $1{filter}"),
            &[org],
            page,
        )
        .await?;
        l.data = l.data.into_iter().map(Project::tagged).collect();
        Ok(l)
    }

    /// A project of `org` (archived ones too); another organization's is not found.
    pub async fn project(&self, org: &str, id: &str) -> Result<Project> {
        let row: Option<Project> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM projects WHERE organization_id = $1 AND id = $2"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Project::tagged)
            .ok_or_else(|| PlatformError::not_found("project", id))
    }

    /// A project that can still change (not archived).
    pub async fn active_project(&self, org: &str, id: &str) -> Result<Project> {
        let p = self.project(org, id).await?;
        if p.archived_at.is_some() {
            return Err(PlatformError::Conflict(format!(
                "project `{id}` is archived; archived projects cannot change"
            )));
        }
        Ok(p)
    }

    pub async fn rename_project(
        &self,
        org: &str,
        id: &str,
        name: &str,
        by: &Actor,
    ) -> Result<Project> {
        let name = check_name("name", name)?;
        self.active_project(org, id).await?;
        let mut c = self.change(org).await?;
        let r = sqlx::query(
            "UPDATE projects SET name = $1 WHERE organization_id = $2 AND id = $3 AND archived_at IS NULL",
        )
        .bind(&name)
        .bind(org)
        .bind(id)
        .execute(&mut *c.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(PlatformError::not_found("project", id));
        }
        c.audit(
            AuditEvent::new(
                "project.updated",
                by,
                id,
                json!({"id": id, "changes_requested": {"title": name, "name": name}}),
            )
            .in_project(id),
        )
        .await?;
        c.commit().await?;
        self.project(org, id).await
    }

    /// Archive a project: its keys stop working at once and it can no longer change.
    pub async fn archive_project(&self, org: &str, id: &str, by: &Actor) -> Result<Project> {
        self.project(org, id).await?;
        let mut c = self.change(org).await?;
        let r = sqlx::query(
            "UPDATE projects SET archived_at = $1 WHERE organization_id = $2 AND id = $3 AND archived_at IS NULL",
        )
        .bind(c.at)
        .bind(org)
        .bind(id)
        .execute(&mut *c.tx)
        .await?;
        if r.rows_affected() > 0 {
            c.audit(AuditEvent::new("project.archived", by, id, json!({"id": id})).in_project(id))
                .await?;
        }
        c.commit().await?;
        self.project(org, id).await
    }
}
