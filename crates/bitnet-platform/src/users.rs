//! Users of an organization (roles `owner` and `reader`), their project memberships (`owner`,
//! `member`, `viewer`) and invites.

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::new_id;
use crate::{HasId, List, Page, Store, check_name, page_of};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// An organization role.
pub fn check_org_role(role: &str) -> Result<&'static str> {
    match role {
        "owner" => Ok("owner"),
        "reader" => Ok("reader"),
        other => Err(PlatformError::invalid(
            "role",
            format!("role must be `owner` or `reader`, got `{other}`"),
        )),
    }
}

/// A project role.
pub fn check_project_role(role: &str) -> Result<&'static str> {
    match role {
        "owner" => Ok("owner"),
        "member" => Ok("member"),
        "viewer" => Ok("viewer"),
        other => Err(PlatformError::invalid(
            "role",
            format!("role must be `owner`, `member` or `viewer`, got `{other}`"),
        )),
    }
}

fn check_email(email: &str) -> Result<String> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
        })
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(PlatformError::invalid(
            "email",
            format!("`{email}` is not an email address"),
        ));
    }
    Ok(e)
}

/// `organization.user`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct User {
    #[sqlx(skip)]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub added_at: i64,
}

/// `organization.project.user`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProjectUser {
    #[sqlx(skip)]
    pub object: &'static str,
    pub id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub added_at: i64,
}

/// `organization.invite`.
#[derive(Debug, Clone, Serialize)]
pub struct Invite {
    pub object: &'static str,
    pub id: String,
    pub email: String,
    pub role: String,
    pub status: &'static str,
    pub invited_at: i64,
    pub expires_at: i64,
    pub accepted_at: Option<i64>,
    pub projects: Vec<InviteProject>,
    /// Beyond OpenAI (which emails a link): the secret that accepts the invite
    /// (`POST /v1/auth/invites/accept`), in the answer that created it only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InviteProject {
    pub id: String,
    pub role: String,
}

#[derive(Debug, sqlx::FromRow)]
struct InviteRow {
    id: String,
    email: String,
    role: String,
    projects: String,
    invited_at: i64,
    expires_at: i64,
    accepted_at: Option<i64>,
}

impl InviteRow {
    fn object(self, now: i64) -> Invite {
        Invite {
            object: "organization.invite",
            status: if self.accepted_at.is_some() {
                "accepted"
            } else if self.expires_at <= now {
                "expired"
            } else {
                "pending"
            },
            id: self.id,
            email: self.email,
            role: self.role,
            invited_at: self.invited_at,
            expires_at: self.expires_at,
            accepted_at: self.accepted_at,
            projects: serde_json::from_str(&self.projects).unwrap_or_default(),
            token: None,
        }
    }
}

impl HasId for InviteRow {
    fn id(&self) -> &str {
        &self.id
    }
}

impl HasId for Invite {
    fn id(&self) -> &str {
        &self.id
    }
}

impl HasId for User {
    fn id(&self) -> &str {
        &self.id
    }
}

impl HasId for ProjectUser {
    fn id(&self) -> &str {
        &self.id
    }
}

/// Invites are valid this long (OpenAI's are valid for a week too).
pub const INVITE_SECONDS: i64 = 7 * 24 * 3600;

const USER_COLS: &str = "id, name, email, role, created_at AS added_at";

impl Store {
    /// Add a user to `org` (invites being accepted, single sign-on's first login, tests).
    pub async fn create_user(
        &self,
        org: &str,
        email: &str,
        name: &str,
        role: &str,
        password_hash: Option<&str>,
        by: &Actor,
    ) -> Result<User> {
        let email = check_email(email)?;
        let name = check_name("name", name)?;
        let role = check_org_role(role)?;
        let mut c = self.change(org).await?;
        let taken: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM users WHERE organization_id = $1 AND email = $2 AND deleted_at IS NULL",
        )
        .bind(org)
        .bind(&email)
        .fetch_optional(&mut *c.tx)
        .await?;
        if taken.is_some() {
            return Err(PlatformError::Conflict(format!(
                "`{email}` is a user of this organization already"
            )));
        }
        let u = User {
            object: "organization.user",
            id: new_id("user-"),
            name,
            email,
            role: role.into(),
            added_at: c.at,
        };
        sqlx::query(
            "INSERT INTO users (id, organization_id, email, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&u.id)
        .bind(org)
        .bind(&u.email)
        .bind(&u.name)
        .bind(&u.role)
        .bind(password_hash)
        .bind(u.created())
        .execute(&mut *c.tx)
        .await?;
        c.audit(AuditEvent::new(
            "user.added",
            by,
            &u.id,
            json!({"id": u.id, "data": {"role": u.role}}),
        ))
        .await?;
        c.commit().await?;
        Ok(u)
    }

    pub async fn users(&self, org: &str, page: &Page, emails: &[String]) -> Result<List<User>> {
        let mut l: List<User> = if emails.is_empty() {
            page_of(
                self,
                &format!("SELECT {USER_COLS} FROM users WHERE organization_id = $1 AND deleted_at IS NULL"),
                &[org],
                page,
            )
            .await?
        } else {
            let marks: Vec<String> = (0..emails.len()).map(|i| format!("${}", i + 2)).collect();
            let lower: Vec<String> = emails.iter().map(|e| e.trim().to_lowercase()).collect();
            let mut binds = vec![org];
            binds.extend(lower.iter().map(String::as_str));
            page_of(
                self,
                &format!(
                    "SELECT {USER_COLS} FROM users WHERE organization_id = $1 AND deleted_at IS NULL AND email IN ({})",
                    marks.join(", ")
                ),
                &binds,
                page,
            )
            .await?
        };
        for u in &mut l.data {
            u.object = "organization.user";
        }
        Ok(l)
    }

    pub async fn user(&self, org: &str, id: &str) -> Result<User> {
        let row: Option<User> = sqlx::query_as(&format!(
            "SELECT {USER_COLS} FROM users WHERE organization_id = $1 AND id = $2 AND deleted_at IS NULL"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let mut u = row.ok_or_else(|| PlatformError::not_found("user", id))?;
        u.object = "organization.user";
        Ok(u)
    }

    pub async fn set_user_role(&self, org: &str, id: &str, role: &str, by: &Actor) -> Result<User> {
        let role = check_org_role(role)?;
        self.user(org, id).await?;
        let mut c = self.change(org).await?;
        sqlx::query("UPDATE users SET role = $1 WHERE organization_id = $2 AND id = $3")
            .bind(role)
            .bind(org)
            .bind(id)
            .execute(&mut *c.tx)
            .await?;
        c.audit(AuditEvent::new(
            "user.updated",
            by,
            id,
            json!({"id": id, "changes_requested": {"role": role}}),
        ))
        .await?;
        c.commit().await?;
        self.user(org, id).await
    }

    /// Remove a user: their memberships go and their keys are revoked, in one transaction.
    pub async fn delete_user(&self, org: &str, id: &str, by: &Actor) -> Result<()> {
        self.user(org, id).await?;
        let mut c = self.change(org).await?;
        sqlx::query("UPDATE users SET deleted_at = $1 WHERE organization_id = $2 AND id = $3")
            .bind(c.at)
            .bind(org)
            .bind(id)
            .execute(&mut *c.tx)
            .await?;
        sqlx::query("DELETE FROM project_users WHERE organization_id = $1 AND user_id = $2")
            .bind(org)
            .bind(id)
            .execute(&mut *c.tx)
            .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE organization_id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(c.at)
        .bind(org)
        .bind(id)
        .execute(&mut *c.tx)
        .await?;
        c.audit(AuditEvent::new("user.deleted", by, id, json!({"id": id})))
            .await?;
        c.commit().await
    }

    /// A user's role in a project, if a member.
    pub async fn project_role(
        &self,
        org: &str,
        project: &str,
        user: &str,
    ) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT role FROM project_users WHERE organization_id = $1 AND project_id = $2 AND user_id = $3",
        )
        .bind(org)
        .bind(project)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    pub async fn add_project_user(
        &self,
        org: &str,
        project: &str,
        user: &str,
        role: &str,
        by: &Actor,
    ) -> Result<ProjectUser> {
        let role = check_project_role(role)?;
        self.active_project(org, project).await?;
        // The user must be one of this organization's (`param` says which field was wrong).
        self.user(org, user).await.map_err(|_| {
            PlatformError::invalid(
                "user_id",
                format!("no user with id `{user}` in this organization"),
            )
        })?;
        let mut c = self.change(org).await?;
        let r = sqlx::query(
            "INSERT INTO project_users (project_id, user_id, organization_id, role, added_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(project)
        .bind(user)
        .bind(org)
        .bind(role)
        .bind(c.at)
        .execute(&mut *c.tx)
        .await?;
        if r.rows_affected() == 0 {
            return Err(PlatformError::Conflict(format!(
                "user `{user}` is in project `{project}` already"
            )));
        }
        c.audit(
            AuditEvent::new(
                "project.user.added",
                by,
                user,
                json!({"id": user, "data": {"role": role}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        self.project_user(org, project, user).await
    }

    pub async fn project_users(
        &self,
        org: &str,
        project: &str,
        page: &Page,
    ) -> Result<List<ProjectUser>> {
        self.project(org, project).await?;
        let mut l: List<ProjectUser> = page_of(
            self,
            "SELECT * FROM (SELECT u.id AS id, u.name AS name, u.email AS email, m.role AS role, m.added_at AS added_at, m.organization_id AS organization_id, m.project_id AS project_id \
             FROM project_users m JOIN users u ON u.id = m.user_id AND u.organization_id = m.organization_id) pu \
             WHERE organization_id = $1 AND project_id = $2",
            &[org, project],
            page,
        )
        .await?;
        for u in &mut l.data {
            u.object = "organization.project.user";
        }
        Ok(l)
    }

    pub async fn project_user(&self, org: &str, project: &str, user: &str) -> Result<ProjectUser> {
        let row: Option<ProjectUser> = sqlx::query_as(
            "SELECT u.id AS id, u.name AS name, u.email AS email, m.role AS role, m.added_at AS added_at \
             FROM project_users m JOIN users u ON u.id = m.user_id \
             WHERE m.organization_id = $1 AND m.project_id = $2 AND m.user_id = $3",
        )
        .bind(org)
        .bind(project)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        let mut u = row.ok_or_else(|| PlatformError::not_found("project user", user))?;
        u.object = "organization.project.user";
        Ok(u)
    }

    pub async fn set_project_user_role(
        &self,
        org: &str,
        project: &str,
        user: &str,
        role: &str,
        by: &Actor,
    ) -> Result<ProjectUser> {
        let role = check_project_role(role)?;
        self.active_project(org, project).await?;
        self.project_user(org, project, user).await?;
        let mut c = self.change(org).await?;
        sqlx::query(
            "UPDATE project_users SET role = $1 WHERE organization_id = $2 AND project_id = $3 AND user_id = $4",
        )
        .bind(role)
        .bind(org)
        .bind(project)
        .bind(user)
        .execute(&mut *c.tx)
        .await?;
        c.audit(
            AuditEvent::new(
                "project.user.updated",
                by,
                user,
                json!({"id": user, "changes_requested": {"role": role}}),
            )
            .in_project(project),
        )
        .await?;
        c.commit().await?;
        self.project_user(org, project, user).await
    }

    /// Take a user out of a project; their keys in it are revoked in the same transaction.
    pub async fn remove_project_user(
        &self,
        org: &str,
        project: &str,
        user: &str,
        by: &Actor,
    ) -> Result<()> {
        self.project(org, project).await?;
        self.project_user(org, project, user).await?;
        let mut c = self.change(org).await?;
        sqlx::query("DELETE FROM project_users WHERE organization_id = $1 AND project_id = $2 AND user_id = $3")
            .bind(org)
            .bind(project)
            .bind(user)
            .execute(&mut *c.tx)
            .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE organization_id = $2 AND project_id = $3 AND user_id = $4 AND revoked_at IS NULL",
        )
        .bind(c.at)
        .bind(org)
        .bind(project)
        .bind(user)
        .execute(&mut *c.tx)
        .await?;
        c.audit(
            AuditEvent::new("project.user.removed", by, user, json!({"id": user}))
                .in_project(project),
        )
        .await?;
        c.commit().await
    }

    pub async fn create_invite(
        &self,
        org: &str,
        email: &str,
        role: &str,
        projects: Vec<InviteProject>,
        by: &Actor,
    ) -> Result<Invite> {
        let email = check_email(email)?;
        let role = check_org_role(role)?;
        for p in &projects {
            check_project_role(&p.role)?;
            self.active_project(org, &p.id).await.map_err(|_| {
                PlatformError::invalid("projects", format!("no active project with id `{}`", p.id))
            })?;
        }
        let mut c = self.change(org).await?;
        let row = InviteRow {
            id: new_id("invite-"),
            email,
            role: role.into(),
            projects: serde_json::to_string(&projects).unwrap_or_else(|_| "[]".into()),
            invited_at: c.at,
            expires_at: c.at + INVITE_SECONDS,
            accepted_at: None,
        };
        let token = format!("inv_{}", crate::ids::random_token(40)?);
        sqlx::query(
            "INSERT INTO invites (id, organization_id, email, role, projects, invited_at, expires_at, token_hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&row.id)
        .bind(org)
        .bind(&row.email)
        .bind(&row.role)
        .bind(&row.projects)
        .bind(row.invited_at)
        .bind(row.expires_at)
        .bind(crate::ids::secret_hash(&token))
        .execute(&mut *c.tx)
        .await?;
        c.audit(AuditEvent::new(
            "invite.sent",
            by,
            &row.id,
            json!({"id": row.id, "data": {"email": row.email, "role": row.role}}),
        ))
        .await?;
        c.commit().await?;
        let mut invite = row.object(crate::ids::now());
        invite.token = Some(token);
        Ok(invite)
    }

    pub async fn invites(&self, org: &str, page: &Page) -> Result<List<Invite>> {
        let l: List<InviteRow> = page_of(
            self,
            "SELECT id, email, role, projects, invited_at, expires_at, accepted_at FROM invites WHERE organization_id = $1 AND deleted_at IS NULL",
            &[org],
            page,
        )
        .await?;
        let now = crate::ids::now();
        let has_more = l.has_more;
        Ok(List::new(
            l.data.into_iter().map(|r| r.object(now)).collect(),
            has_more,
        ))
    }

    pub async fn invite(&self, org: &str, id: &str) -> Result<Invite> {
        let row: Option<InviteRow> = sqlx::query_as(
            "SELECT id, email, role, projects, invited_at, expires_at, accepted_at FROM invites WHERE organization_id = $1 AND id = $2 AND deleted_at IS NULL",
        )
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
            .ok_or_else(|| PlatformError::not_found("invite", id))?
            .object(crate::ids::now()))
    }

    /// Delete a pending invite (accepted ones cannot be, as OpenAI's).
    pub async fn delete_invite(&self, org: &str, id: &str, by: &Actor) -> Result<()> {
        let inv = self.invite(org, id).await?;
        if inv.status == "accepted" {
            return Err(PlatformError::Conflict(format!(
                "invite `{id}` was accepted; remove the user instead"
            )));
        }
        let mut c = self.change(org).await?;
        sqlx::query("UPDATE invites SET deleted_at = $1 WHERE organization_id = $2 AND id = $3")
            .bind(c.at)
            .bind(org)
            .bind(id)
            .execute(&mut *c.tx)
            .await?;
        c.audit(AuditEvent::new("invite.deleted", by, id, json!({"id": id})))
            .await?;
        c.commit().await
    }
}

impl User {
    fn created(&self) -> i64 {
        self.added_at
    }
}
