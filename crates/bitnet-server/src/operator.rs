//! The operator API: above organizations, for whoever runs the platform (operator keys, made
//! with `bitnet keys create --operator`). The same operations as `bitnet orgs` and
//! `bitnet keys create --org ORG --admin`.

use crate::AppState;
use crate::api::ApiJson;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::org::{NameBody, Params};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use bitnet_platform::List;
use bitnet_platform::keys::ApiKey;
use bitnet_platform::orgs::Organization;

pub async fn list_organizations(
    State(s): State<AppState>,
    _: Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<List<Organization>>, ApiError> {
    let page = Params::parse(q.as_deref())?.page()?;
    Ok(Json(s.store.organizations(&page).await?))
}

pub async fn create_organization(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<NameBody>,
) -> Result<Json<Organization>, ApiError> {
    Ok(Json(
        s.store.create_organization(&b.name, &who.actor).await?,
    ))
}

/// An organization by id (or name).
pub async fn get_organization(
    State(s): State<AppState>,
    _: Caller,
    Path(id): Path<String>,
) -> Result<Json<Organization>, ApiError> {
    Ok(Json(s.store.organization(&id).await?))
}

/// An admin key for an organization (its value is in this answer only).
pub async fn create_admin_key(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    ApiJson(b): ApiJson<NameBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let org = s.store.organization(&id).await?;
    let (key, _) = s
        .store
        .create_admin_key(&org.id, &b.name, &who.actor)
        .await?;
    Ok(Json(key))
}
