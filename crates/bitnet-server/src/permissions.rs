//! The permission table: every `/v1` route, the access it needs, and which credentials have
//! that access. The router mounts exactly these routes, [`authorize`] checks each request
//! against the table before its handler runs, and a test walks every route with every kind of
//! credential. A route missing from the table is refused (fail closed).
//!
//! Objects are scoped separately, in the store: a handler only ever asks for objects of the
//! caller's organization, so another organization's id is a plain 404.

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bitnet_platform::keys::KeyKind;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// List the models (project keys, read-only ones too).
    Models,
    /// Run a model (project keys, not read-only ones).
    Inference,
    /// Read the project's files (project keys, read-only ones too).
    FilesRead,
    /// Upload and delete the project's files (project keys, not read-only ones).
    FilesWrite,
    /// Move and remove the registry's aliases and versions (project keys that are not
    /// read-only, admin keys, organization owners).
    ModelsWrite,
    /// Read the organization's projects, users, keys and audit log (admin keys).
    OrgRead,
    /// Change them (admin keys).
    OrgWrite,
    /// Read one project's users, service accounts and keys (as `OrgRead`).
    ProjectRead,
    /// Change them: admin keys, organization owners, and the project's own owners.
    ProjectWrite,
    /// Make a project key of one's own: signed-in members of the project the route names.
    OwnProjectKey,
    /// Create organizations and their first admin keys (operator keys).
    Operator,
    /// Anyone: signing in, the public keys. These routes take no credential.
    Public,
}

/// The kinds of credential a request can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Operator,
    Admin,
    Project,
    ProjectReadOnly,
    /// A signed-in user whose organization role is `owner`.
    UserOwner,
    /// A signed-in user whose organization role is `reader`.
    UserReader,
    /// A signed-in `reader` of the organization who is an `owner` of the project the route
    /// names (the route's `{project_id}`).
    ProjectOwner,
    /// A signed-in `reader` of the organization who is a `member` of the project the route
    /// names.
    ProjectMember,
}

impl Who {
    pub fn of(c: &Caller) -> Self {
        match (c.kind(), c.cred.read_only) {
            (KeyKind::Operator, _) => Self::Operator,
            (KeyKind::Admin, _) => Self::Admin,
            (KeyKind::Project, false) => Self::Project,
            (KeyKind::Project, true) => Self::ProjectReadOnly,
            (KeyKind::Session, _) if c.cred.role.as_deref() == Some("owner") => Self::UserOwner,
            (KeyKind::Session, _) => Self::UserReader,
        }
    }

    pub const ALL: [Who; 8] = [
        Who::Operator,
        Who::Admin,
        Who::Project,
        Who::ProjectReadOnly,
        Who::UserOwner,
        Who::UserReader,
        Who::ProjectOwner,
        Who::ProjectMember,
    ];
}

/// Whether `who` has `access`.
pub fn allows(who: Who, access: Access) -> bool {
    use Access as A;
    use Who as W;
    matches!(
        (who, access),
        (
            W::Project,
            A::Models | A::Inference | A::FilesRead | A::FilesWrite | A::ModelsWrite
        ) | (W::ProjectReadOnly, A::Models | A::FilesRead)
            | (
                W::Admin | W::UserOwner,
                A::OrgRead | A::OrgWrite | A::ProjectRead | A::ProjectWrite | A::ModelsWrite
            )
            | (W::UserReader, A::OrgRead | A::ProjectRead)
            | (
                W::ProjectOwner,
                A::OrgRead | A::ProjectRead | A::ProjectWrite | A::OwnProjectKey
            )
            | (
                W::ProjectMember,
                A::OrgRead | A::ProjectRead | A::OwnProjectKey
            )
            | (W::Operator, A::Operator)
            | (_, A::Public)
    )
}

/// Every `/v1` route the router mounts: method, path template, access.
pub const ROUTES: &[(Method, &str, Access)] = {
    use Access::*;
    const G: Method = Method::GET;
    const P: Method = Method::POST;
    const D: Method = Method::DELETE;
    &[
        (G, "/v1/models", Models),
        (G, "/v1/models/{model}", Models),
        (G, "/v1/models/{model}/versions", Models),
        (P, "/v1/models/{model}/aliases/{alias}", ModelsWrite),
        (D, "/v1/models/{model}/aliases/{alias}", ModelsWrite),
        (D, "/v1/models/{model}/versions/{version}", ModelsWrite),
        (P, "/v1/quantization/jobs", FilesWrite),
        (G, "/v1/quantization/jobs", FilesRead),
        (G, "/v1/quantization/jobs/{job_id}", FilesRead),
        (G, "/v1/quantization/jobs/{job_id}/events", FilesRead),
        (P, "/v1/quantization/jobs/{job_id}/cancel", FilesWrite),
        (
            P,
            "/v1/operator/organizations/{organization_id}/models/{model}/share",
            Operator,
        ),
        (P, "/v1/chat/completions", Inference),
        (P, "/v1/completions", Inference),
        (G, "/v1/organization/projects", OrgRead),
        (P, "/v1/organization/projects", OrgWrite),
        (G, "/v1/organization/projects/{project_id}", ProjectRead),
        (P, "/v1/organization/projects/{project_id}", OrgWrite),
        (
            P,
            "/v1/organization/projects/{project_id}/archive",
            OrgWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/users",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/users",
            ProjectWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/users/{user_id}",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/users/{user_id}",
            ProjectWrite,
        ),
        (
            D,
            "/v1/organization/projects/{project_id}/users/{user_id}",
            ProjectWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/service_accounts",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/service_accounts",
            ProjectWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}",
            ProjectRead,
        ),
        (
            D,
            "/v1/organization/projects/{project_id}/service_accounts/{service_account_id}",
            ProjectWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/api_keys",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/api_keys",
            OwnProjectKey,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/api_keys/{key_id}",
            ProjectRead,
        ),
        (
            D,
            "/v1/organization/projects/{project_id}/api_keys/{key_id}",
            ProjectWrite,
        ),
        (G, "/v1/organization/users", OrgRead),
        (G, "/v1/organization/users/{user_id}", OrgRead),
        (P, "/v1/organization/users/{user_id}", OrgWrite),
        (D, "/v1/organization/users/{user_id}", OrgWrite),
        (G, "/v1/organization/invites", OrgRead),
        (P, "/v1/organization/invites", OrgWrite),
        (G, "/v1/organization/invites/{invite_id}", OrgRead),
        (D, "/v1/organization/invites/{invite_id}", OrgWrite),
        (G, "/v1/organization/admin_api_keys", OrgRead),
        (P, "/v1/organization/admin_api_keys", OrgWrite),
        (G, "/v1/organization/admin_api_keys/{key_id}", OrgRead),
        (D, "/v1/organization/admin_api_keys/{key_id}", OrgWrite),
        (G, "/v1/organization/audit_logs", OrgRead),
        (
            G,
            "/v1/organization/projects/{project_id}/rate_limits",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}",
            OrgWrite,
        ),
        (
            G,
            "/v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit",
            ProjectRead,
        ),
        (
            P,
            "/v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit",
            OrgWrite,
        ),
        (G, "/v1/organization/budget", OrgRead),
        (P, "/v1/organization/budget", OrgWrite),
        (
            G,
            "/v1/organization/projects/{project_id}/budget",
            ProjectRead,
        ),
        (P, "/v1/organization/projects/{project_id}/budget", OrgWrite),
        (G, "/v1/organization/usage/completions", OrgRead),
        (G, "/v1/organization/costs", OrgRead),
        (G, "/v1/organization/invoices", OrgRead),
        (G, "/v1/organization/invoices/{invoice_id}", OrgRead),
        (G, "/v1/operator/prices", Operator),
        (P, "/v1/operator/prices", Operator),
        (G, "/v1/files", FilesRead),
        (P, "/v1/files", FilesWrite),
        (G, "/v1/files/{file_id}", FilesRead),
        (D, "/v1/files/{file_id}", FilesWrite),
        (G, "/v1/files/{file_id}/content", FilesRead),
        (P, "/v1/uploads", FilesWrite),
        (P, "/v1/uploads/{upload_id}/parts", FilesWrite),
        (P, "/v1/uploads/{upload_id}/complete", FilesWrite),
        (P, "/v1/uploads/{upload_id}/cancel", FilesWrite),
        (G, "/v1/operator/organizations", Operator),
        (P, "/v1/operator/organizations", Operator),
        (G, "/v1/operator/organizations/{organization_id}", Operator),
        (
            P,
            "/v1/operator/organizations/{organization_id}/admin_api_keys",
            Operator,
        ),
        (P, "/v1/auth/login", Public),
        (P, "/v1/auth/refresh", Public),
        (P, "/v1/auth/logout", Public),
        (P, "/v1/auth/invites/accept", Public),
        (G, "/.well-known/jwks.json", Public),
        (G, "/v1/auth/sso/{organization}/start", Public),
        (G, "/v1/auth/sso/callback", Public),
        (P, "/v1/billing/webhooks/stripe", Public),
        (G, "/v1/organization/sso", OrgRead),
        (P, "/v1/organization/sso", OrgWrite),
        (D, "/v1/organization/sso", OrgWrite),
    ]
};

/// The access a route needs, if the table has it.
pub fn access(method: &Method, route: &str) -> Option<Access> {
    ROUTES
        .iter()
        .find(|(m, r, _)| m == method && *r == route)
        .map(|(_, _, a)| *a)
}

fn needs(a: Access) -> &'static str {
    match a {
        Access::Models => "a project API key (sk-proj-…)",
        Access::Inference => "a project API key (sk-proj-…) that is not read-only",
        Access::FilesRead => "a project API key (sk-proj-…)",
        Access::FilesWrite => "a project API key (sk-proj-…) that is not read-only",
        Access::ModelsWrite => {
            "a project API key (sk-proj-…) that is not read-only, an admin API key (sk-admin-…) or a signed-in owner of the organization"
        }
        Access::OrgRead => "an admin API key (sk-admin-…) or a signed-in user of the organization",
        Access::OrgWrite => {
            "an admin API key (sk-admin-…) or a signed-in owner of the organization"
        }
        Access::Public => "nothing",
        Access::ProjectRead => {
            "an admin API key (sk-admin-…) or a signed-in user of the organization"
        }
        Access::ProjectWrite => {
            "an admin API key (sk-admin-…), a signed-in owner of the organization, or an owner of the project"
        }
        Access::OwnProjectKey => "a signed-in member of the project (the key is the user's own)",
        Access::Operator => "an operator key (sk-op-…, from `bitnet keys create --operator`)",
    }
}

/// The path's value for a template's `{name}` segment.
fn path_param<'a>(template: &str, path: &'a str, name: &str) -> Option<&'a str> {
    let i = template.split('/').position(|seg| seg == name)?;
    path.split('/').nth(i)
}

/// Refuse (403) a caller the table does not allow on this route.
pub async fn authorize(
    State(s): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let Some(access) = access(req.method(), &route) else {
        // A method the route does not take: 405 with the methods the table lists (the table
        // and the router hold the same routes; a test checks it).
        let allowed: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, r, _)| *r == route)
            .map(|(m, _, _)| m.as_str())
            .collect();
        if !allowed.is_empty() {
            let mut r = ApiError::Http {
                status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
                message: format!(
                    "{route} does not take {}; it takes {}",
                    req.method(),
                    allowed.join(", ")
                ),
                code: "method_not_allowed",
            }
            .into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&allowed.join(",")) {
                r.headers_mut().insert(axum::http::header::ALLOW, v);
            }
            return Ok(r);
        }
        return Err(ApiError::Internal(format!(
            "{} {route} has no entry in the permission table",
            req.method()
        )));
    };
    let caller = req
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| ApiError::Unauthorized("no API key".into()))?;
    let mut who = Who::of(caller);
    // A signed-in user's role in the project the route names: a reader who owns the project
    // may change it, and its members may make keys of their own.
    let asks_role = (who == Who::UserReader && access == Access::ProjectWrite)
        || (caller.kind() == KeyKind::Session && access == Access::OwnProjectKey);
    if asks_role
        && let Some(project) = path_param(&route, req.uri().path(), "{project_id}")
        && let (Some(org), Some(user)) = (&caller.cred.organization_id, &caller.cred.user_id)
    {
        match s.store.project_role(org, project, user).await?.as_deref() {
            Some("owner") => who = Who::ProjectOwner,
            Some(_) if access == Access::OwnProjectKey => who = Who::ProjectMember,
            _ => {}
        }
    }
    if !allows(who, access) {
        // An id that is not the caller's organization's is not found, even where the caller
        // could not act anyway: a 403 would tell that the id exists elsewhere.
        if let Some(org) = caller.cred.organization_id.as_deref() {
            let path = req.uri().path();
            for (param, kind) in [
                ("{project_id}", "project"),
                ("{user_id}", "user"),
                ("{invite_id}", "invite"),
                ("{key_id}", "API key"),
                ("{file_id}", "file"),
                ("{upload_id}", "upload"),
                ("{job_id}", "quantization job"),
                ("{invoice_id}", "invoice"),
            ] {
                if let Some(id) = path_param(&route, path, param)
                    && !s.store.owns(org, kind, id).await?
                {
                    return Err(bitnet_platform::PlatformError::not_found(kind, id).into());
                }
            }
        }
        return Err(ApiError::Forbidden(format!(
            "{} {route} needs {}",
            req.method(),
            needs(access)
        )));
    }
    Ok(next.run(req).await)
}
