//! The admin API: API keys over HTTP (the same operations as `bitnet keys`), for admin keys only.

use crate::AppState;
use crate::api::ApiJson;
use crate::error::ApiError;
use crate::store::{KeyInfo, Principal, Role};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateKey {
    /// A label for the key (who or what uses it).
    pub name: String,
    /// `user` (default) or `admin`.
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key itself: shown this once, stored only as a hash.
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<KeyInfo>,
}

fn admin_only(who: &Principal) -> Result<(), ApiError> {
    if who.role == Role::Admin {
        Ok(())
    } else {
        Err(ApiError::Forbidden("this needs an admin key".into()))
    }
}

#[utoipa::path(post, path = "/v1/admin/keys", tag = "admin", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 400, body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_key(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    admin_only(&who)?;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad("name", "name must be 1 to 200 characters"));
    }
    let role = match req.role.as_deref() {
        None | Some("user") => Role::User,
        Some("admin") => Role::Admin,
        Some(other) => {
            return Err(ApiError::bad(
                "role",
                format!("role must be `user` or `admin`, got `{other}`"),
            ));
        }
    };
    let (info, key) = s.store.create_key(name, role).await?;
    tracing::info!(key_id = %info.id, by = %who.key_id, "API key created");
    Ok((StatusCode::CREATED, Json(CreatedKey { key, info })))
}

#[utoipa::path(get, path = "/v1/admin/keys", tag = "admin",
    responses((status = 200, body = KeyList), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_keys(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Json<KeyList>, ApiError> {
    admin_only(&who)?;
    Ok(Json(KeyList {
        data: s.store.list_keys(&who.tenant_id).await?,
    }))
}

#[utoipa::path(delete, path = "/v1/admin/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "The key's id or prefix")),
    responses((status = 204, description = "Revoked"), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    admin_only(&who)?;
    if s.store.revoke_key(&who.tenant_id, &id).await? {
        tracing::info!(key = %id, by = %who.key_id, "API key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound {
            message: format!("no live key with id or prefix `{id}`"),
            code: "key_not_found",
        })
    }
}
