//! The organization API, in the shape of OpenAI's Administration API: projects, their users,
//! service accounts and keys, the organization's users, invites, admin keys and audit log.
//! Every handler asks the store for objects of the caller's organization only, so another
//! organization's id is a 404. Which credentials may call each route is the permission table's
//! business ([`crate::permissions`]), not the handlers'.

use crate::AppState;
use crate::api::ApiJson;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use bitnet_platform::audit::{AuditLog, AuditQuery};
use bitnet_platform::keys::{
    ApiKey, CreatedServiceAccount, KeyKind, ProjectKeyOwner, ServiceAccount,
};
use bitnet_platform::projects::Project;
use bitnet_platform::users::{Invite, InviteProject, ProjectUser, User};
use bitnet_platform::{Deleted, List, Page};
use serde::Deserialize;
use utoipa::ToSchema;

type Answer<T> = Result<Json<T>, ApiError>;

/// A query string's pairs, in order (`event_types[]=a&event_types[]=b` keeps both).
#[derive(Debug)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(raw.unwrap_or(""))
            .map(Self)
            .map_err(|e| ApiError::BadRequest {
                message: format!("the query string is malformed: {e}"),
                param: None,
                code: "invalid_value",
            })
    }

    pub fn one(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key[]` (or plain `key`).
    pub fn many(&self, key: &str) -> Vec<String> {
        let bracketed = format!("{key}[]");
        self.0
            .iter()
            .filter(|(k, _)| *k == bracketed || k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.one(key)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad(key, format!("{key} must be an integer, got `{v}`")))
            })
            .transpose()
    }

    pub fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.one(key) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(v) => Err(ApiError::bad(
                key,
                format!("{key} must be true or false, got `{v}`"),
            )),
        }
    }

    pub fn page(&self) -> Result<Page, ApiError> {
        Ok(Page::new(
            self.int("limit")?,
            self.one("after").map(str::to_string),
        )?)
    }
}

/// `{"name": ...}`: creating or renaming a project, creating a service account or a key.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NameBody {
    pub name: String,
}

/// `{"role": ...}`: changing a user's role.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RoleBody {
    pub role: String,
}

/// `{"user_id": ..., "role": ...}`: adding a user to a project.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ProjectUserBody {
    pub user_id: String,
    /// `owner`, `member` or `viewer`.
    pub role: String,
}

/// An invite: the email, the organization role, and projects to join.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InviteBody {
    pub email: String,
    /// `owner` or `reader`.
    pub role: String,
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub projects: Option<Vec<InviteProjectBody>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct InviteProjectBody {
    pub id: String,
    pub role: String,
}

macro_rules! doc {
    ($method:ident, $path:literal, $name:ident $(, $param:literal)*) => {
        #[utoipa::path($method, path = $path, tag = "organization",
            params($(($param = String, Path, description = "An id of the caller's organization")),*),
            responses((status = 200, description = "OpenAI's Administration API object"),
                      (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
                      (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
            security(("api_key" = [])))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

pub async fn list_projects(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<Project>> {
    let p = Params::parse(q.as_deref())?;
    Ok(Json(
        s.store
            .projects(who.org()?, &p.page()?, p.flag("include_archived")?)
            .await?,
    ))
}

pub async fn create_project(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<NameBody>,
) -> Answer<Project> {
    Ok(Json(
        s.store
            .create_project(who.org()?, &b.name, &who.actor)
            .await?,
    ))
}

pub async fn get_project(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Project> {
    Ok(Json(s.store.project(who.org()?, &id).await?))
}

pub async fn modify_project(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<NameBody>,
) -> Answer<Project> {
    Ok(Json(
        s.store
            .rename_project(who.org()?, &id, &b.name, &who.actor)
            .await?,
    ))
}

pub async fn archive_project(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Project> {
    Ok(Json(
        s.store.archive_project(who.org()?, &id, &who.actor).await?,
    ))
}

pub async fn list_project_users(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer<List<ProjectUser>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.project_users(who.org()?, &p, &page).await?))
}

pub async fn add_project_user(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    ApiJson(b): ApiJson<ProjectUserBody>,
) -> Answer<ProjectUser> {
    Ok(Json(
        s.store
            .add_project_user(who.org()?, &p, &b.user_id, &b.role, &who.actor)
            .await?,
    ))
}

pub async fn get_project_user(
    State(s): State<AppState>,
    who: Caller,
    Path((p, u)): Path<(String, String)>,
) -> Answer<ProjectUser> {
    let org = who.org()?;
    s.store.project(org, &p).await?;
    Ok(Json(s.store.project_user(org, &p, &u).await?))
}

pub async fn modify_project_user(
    State(s): State<AppState>,
    who: Caller,
    Path((p, u)): Path<(String, String)>,
    ApiJson(b): ApiJson<RoleBody>,
) -> Answer<ProjectUser> {
    Ok(Json(
        s.store
            .set_project_user_role(who.org()?, &p, &u, &b.role, &who.actor)
            .await?,
    ))
}

pub async fn delete_project_user(
    State(s): State<AppState>,
    who: Caller,
    Path((p, u)): Path<(String, String)>,
) -> Answer<Deleted> {
    s.store
        .remove_project_user(who.org()?, &p, &u, &who.actor)
        .await?;
    Ok(Json(Deleted::new("organization.project.user.deleted", &u)))
}

pub async fn list_service_accounts(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer<List<ServiceAccount>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.service_accounts(who.org()?, &p, &page).await?))
}

pub async fn create_service_account(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    ApiJson(b): ApiJson<NameBody>,
) -> Answer<CreatedServiceAccount> {
    Ok(Json(
        s.store
            .create_service_account(who.org()?, &p, &b.name, &who.actor)
            .await?,
    ))
}

pub async fn get_service_account(
    State(s): State<AppState>,
    who: Caller,
    Path((p, id)): Path<(String, String)>,
) -> Answer<ServiceAccount> {
    Ok(Json(s.store.service_account(who.org()?, &p, &id).await?))
}

pub async fn delete_service_account(
    State(s): State<AppState>,
    who: Caller,
    Path((p, id)): Path<(String, String)>,
) -> Answer<Deleted> {
    s.store
        .delete_service_account(who.org()?, &p, &id, &who.actor)
        .await?;
    Ok(Json(Deleted::new(
        "organization.project.service_account.deleted",
        &id,
    )))
}

pub async fn list_project_keys(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer<List<ApiKey>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.project_keys(who.org()?, &p, &page).await?))
}

/// `{"name": ..., "read_only": false}`: a project key of one's own.
#[derive(Debug, Deserialize, ToSchema)]
pub struct OwnKeyBody {
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A signed-in member of the project makes a project key of its own (OpenAI's users make
/// theirs in its dashboard). The key dies with the membership. Its secret is in `value`, once.
pub async fn create_own_project_key(
    State(s): State<AppState>,
    who: Caller,
    Path(p): Path<String>,
    ApiJson(b): ApiJson<OwnKeyBody>,
) -> Answer<ApiKey> {
    let org = who.org()?;
    let user = who.cred.user_id.as_deref().ok_or_else(|| {
        ApiError::Forbidden("a project key of one's own needs a signed-in user".into())
    })?;
    let (key, _) = s
        .store
        .create_project_key(
            org,
            &p,
            &b.name,
            ProjectKeyOwner::User(user),
            b.read_only,
            &who.actor,
        )
        .await?;
    Ok(Json(key))
}

pub async fn get_project_key(
    State(s): State<AppState>,
    who: Caller,
    Path((p, id)): Path<(String, String)>,
) -> Answer<ApiKey> {
    Ok(Json(s.store.project_key(who.org()?, &p, &id).await?))
}

pub async fn delete_project_key(
    State(s): State<AppState>,
    who: Caller,
    Path((p, id)): Path<(String, String)>,
) -> Answer<Deleted> {
    let org = who.org()?;
    s.store.project(org, &p).await?;
    s.store
        .revoke_key(org, KeyKind::Project, Some(&p), &id, &who.actor)
        .await?;
    Ok(Json(Deleted::new(
        "organization.project.api_key.deleted",
        &id,
    )))
}

pub async fn list_users(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<User>> {
    let p = Params::parse(q.as_deref())?;
    Ok(Json(
        s.store
            .users(who.org()?, &p.page()?, &p.many("emails"))
            .await?,
    ))
}

pub async fn get_user(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<User> {
    Ok(Json(s.store.user(who.org()?, &id).await?))
}

pub async fn modify_user(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<RoleBody>,
) -> Answer<User> {
    Ok(Json(
        s.store
            .set_user_role(who.org()?, &id, &b.role, &who.actor)
            .await?,
    ))
}

pub async fn delete_user(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Deleted> {
    s.store.delete_user(who.org()?, &id, &who.actor).await?;
    Ok(Json(Deleted::new("organization.user.deleted", &id)))
}

pub async fn list_invites(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<Invite>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.invites(who.org()?, &page).await?))
}

pub async fn create_invite(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<InviteBody>,
) -> Answer<Invite> {
    let projects = b
        .projects
        .unwrap_or_default()
        .into_iter()
        .map(|p| InviteProject {
            id: p.id,
            role: p.role,
        })
        .collect();
    Ok(Json(
        s.store
            .create_invite(who.org()?, &b.email, &b.role, projects, &who.actor)
            .await?,
    ))
}

pub async fn get_invite(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Invite> {
    Ok(Json(s.store.invite(who.org()?, &id).await?))
}

pub async fn delete_invite(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Deleted> {
    s.store.delete_invite(who.org()?, &id, &who.actor).await?;
    Ok(Json(Deleted::new("organization.invite.deleted", &id)))
}

pub async fn list_admin_keys(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<ApiKey>> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.admin_keys(who.org()?, &page).await?))
}

pub async fn create_admin_key(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<NameBody>,
) -> Answer<ApiKey> {
    let (key, _) = s
        .store
        .create_admin_key_for(who.org()?, &b.name, who.cred.user_id.as_deref(), &who.actor)
        .await?;
    Ok(Json(key))
}

pub async fn get_admin_key(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<ApiKey> {
    Ok(Json(s.store.admin_key(who.org()?, &id).await?))
}

pub async fn delete_admin_key(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Answer<Deleted> {
    s.store
        .revoke_key(who.org()?, KeyKind::Admin, None, &id, &who.actor)
        .await?;
    Ok(Json(Deleted::new(
        "organization.admin_api_key.deleted",
        &id,
    )))
}

/// `GET /v1/organization/audit_logs` with OpenAI's filters: `effective_at[gt|gte|lt|lte]`,
/// `project_ids[]`, `event_types[]`, `actor_ids[]`, `actor_emails[]`, `resource_ids[]`,
/// `limit`, `after`, `before`. Newest first.
pub async fn list_audit_logs(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Answer<List<AuditLog>> {
    let p = Params::parse(q.as_deref())?;
    let query = AuditQuery {
        effective_gt: p.int("effective_at[gt]")?,
        effective_gte: p.int("effective_at[gte]")?,
        effective_lt: p.int("effective_at[lt]")?,
        effective_lte: p.int("effective_at[lte]")?,
        project_ids: p.many("project_ids"),
        event_types: p.many("event_types"),
        actor_ids: p.many("actor_ids"),
        actor_emails: p.many("actor_emails"),
        resource_ids: p.many("resource_ids"),
    };
    Ok(Json(
        s.store
            .audit_logs(who.org()?, &query, &p.page()?, p.one("before"))
            .await?,
    ))
}

/// The organization's single sign-on (OpenID Connect) connection.
pub async fn get_sso(State(s): State<AppState>, who: Caller) -> Answer<serde_json::Value> {
    Ok(Json(s.store.sso(who.org()?).await?))
}

/// Set or replace it: `{"issuer", "client_id", "client_secret", "allowed_domains": [...],
/// "default_role"}`.
pub async fn set_sso(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<bitnet_platform::sso::SsoConfig>,
) -> Answer<serde_json::Value> {
    Ok(Json(s.store.set_sso(who.org()?, &b, &who.actor).await?))
}

pub async fn delete_sso(State(s): State<AppState>, who: Caller) -> Answer<Deleted> {
    let org = who.org()?;
    s.store.delete_sso(org, &who.actor).await?;
    Ok(Json(Deleted::new(
        "organization.sso_connection.deleted",
        org,
    )))
}

doc!(get, "/v1/organization/projects", doc_list_projects);
doc!(post, "/v1/organization/projects", doc_create_project);
doc!(
    get,
    "/v1/organization/projects/{project_id}",
    doc_get_project,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}",
    doc_modify_project,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/archive",
    doc_archive_project,
    "project_id"
);
doc!(
    get,
    "/v1/organization/projects/{project_id}/users",
    doc_list_project_users,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/users",
    doc_add_project_user,
    "project_id"
);
doc!(
    get,
    "/v1/organization/projects/{project_id}/service_accounts",
    doc_list_service_accounts,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/service_accounts",
    doc_create_service_account,
    "project_id"
);
doc!(
    get,
    "/v1/organization/projects/{project_id}/api_keys",
    doc_list_project_keys,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/api_keys",
    doc_create_own_project_key,
    "project_id"
);
doc!(get, "/v1/organization/users", doc_list_users);
doc!(get, "/v1/organization/invites", doc_list_invites);
doc!(post, "/v1/organization/invites", doc_create_invite);
doc!(get, "/v1/organization/admin_api_keys", doc_list_admin_keys);
doc!(
    post,
    "/v1/organization/admin_api_keys",
    doc_create_admin_key
);
doc!(get, "/v1/organization/audit_logs", doc_list_audit_logs);
