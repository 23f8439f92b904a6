//! Signing in, without a key: `POST /v1/auth/login` (email + password), `/v1/auth/refresh`,
//! `/v1/auth/logout`, `/v1/auth/invites/accept`, and `/.well-known/jwks.json` (the public keys
//! that verify our access tokens). An access token is then a bearer like a key: it carries a
//! user of one organization, with that user's current role.

use crate::AppState;
use crate::api::ApiJson;
use crate::auth::client_ip;
use crate::error::ApiError;
use axum::Json;
use axum::extract::{Request, State};
use bitnet_platform::audit::Actor;
use bitnet_platform::sessions::Tokens;
use serde::Deserialize;
use utoipa::ToSchema;

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginBody {
    pub email: String,
    pub password: String,
    /// The organization (id or name), when the email is a user of several.
    #[serde(default)]
    pub organization: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct AcceptInviteBody {
    /// The invite's secret (`token` in the answer that created the invite).
    pub token: String,
    pub name: String,
    /// 12 to 256 characters.
    pub password: String,
}

/// The anonymous actor of a sign-in request: its address and request id.
fn who(req: &Request) -> Actor {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Actor::anonymous(None).at(client_ip(req), id)
}

async fn body<T: serde::de::DeserializeOwned>(req: Request, s: &AppState) -> Result<T, ApiError> {
    use axum::extract::FromRequest;
    Ok(ApiJson::<T>::from_request(req, s).await?.0)
}

#[utoipa::path(post, path = "/v1/auth/login", tag = "sign-in", request_body = LoginBody,
    responses((status = 200, description = "An access token (JWT, EdDSA) and a refresh token"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn login(State(s): State<AppState>, req: Request) -> Result<Json<Tokens>, ApiError> {
    let by = who(&req);
    let b: LoginBody = body(req, &s).await?;
    Ok(Json(
        s.store
            .login(b.organization.as_deref(), &b.email, &b.password, &by)
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/auth/refresh", tag = "sign-in", request_body = RefreshBody,
    responses((status = 200, description = "New tokens; the refresh token sent is spent"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn refresh(State(s): State<AppState>, req: Request) -> Result<Json<Tokens>, ApiError> {
    let by = who(&req);
    let b: RefreshBody = body(req, &s).await?;
    Ok(Json(s.store.refresh(&b.refresh_token, &by).await?))
}

#[utoipa::path(post, path = "/v1/auth/logout", tag = "sign-in", request_body = RefreshBody,
    responses((status = 200, description = "The refresh token's sessions are revoked"), (status = 400, body = crate::error::ErrorBody)))]
pub async fn logout(
    State(s): State<AppState>,
    req: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b: RefreshBody = body(req, &s).await?;
    s.store.logout(&b.refresh_token).await?;
    Ok(Json(
        serde_json::json!({"object": "session.revoked", "revoked": true}),
    ))
}

#[utoipa::path(post, path = "/v1/auth/invites/accept", tag = "sign-in", request_body = AcceptInviteBody,
    responses((status = 200, description = "The new user, signed in"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn accept_invite(
    State(s): State<AppState>,
    req: Request,
) -> Result<Json<Tokens>, ApiError> {
    let by = who(&req);
    let b: AcceptInviteBody = body(req, &s).await?;
    Ok(Json(
        s.store
            .accept_invite(&b.token, &b.name, &b.password, &by)
            .await?,
    ))
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "sign-in",
    responses((status = 200, description = "The JSON Web Key Set that verifies access tokens")))]
pub async fn jwks(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(s.store.jwks().await?))
}
