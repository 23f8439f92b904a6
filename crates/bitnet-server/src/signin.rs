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

/// Where the provider sends the browser back: `--public-url` (or the request's `Host`) and
/// `/v1/auth/sso/callback`.
fn callback_url(s: &AppState, req: &Request) -> String {
    let base = s.config.public_url.clone().unwrap_or_else(|| {
        let host = req
            .headers()
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("127.0.0.1");
        format!("http://{host}")
    });
    format!("{}/v1/auth/sso/callback", base.trim_end_matches('/'))
}

/// Begin single sign-on for an organization (id or name): a redirect to its identity
/// provider.
#[utoipa::path(get, path = "/v1/auth/sso/{organization}/start", tag = "sign-in",
    params(("organization" = String, Path, description = "The organization's id or name")),
    responses((status = 302, description = "To the identity provider's authorization endpoint"),
              (status = 404, body = crate::error::ErrorBody), (status = 502, body = crate::error::ErrorBody)))]
pub async fn sso_start(
    State(s): State<AppState>,
    axum::extract::Path(org): axum::extract::Path<String>,
    req: Request,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let url = s.store.sso_start(&org, &callback_url(&s, &req)).await?;
    Ok((
        axum::http::StatusCode::FOUND,
        [(axum::http::header::LOCATION, url)],
    )
        .into_response())
}

/// The identity provider's redirect back: `code` and `state` (or its `error`).
#[utoipa::path(get, path = "/v1/auth/sso/callback", tag = "sign-in",
    params(("code" = Option<String>, Query, description = "The authorization code"),
           ("state" = Option<String>, Query, description = "The sign-in's state")),
    responses((status = 200, description = "Tokens for the signed-in user"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)))]
pub async fn sso_callback(
    State(s): State<AppState>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
    req: Request,
) -> Result<Json<Tokens>, ApiError> {
    let by = who(&req);
    let p = crate::org::Params::parse(q.as_deref())?;
    if let Some(e) = p.one("error") {
        return Err(ApiError::Http {
            status: axum::http::StatusCode::UNAUTHORIZED,
            message: format!(
                "the identity provider refused the sign-in: {e} ({})",
                p.one("error_description").unwrap_or("no description")
            ),
            code: "invalid_credentials",
        });
    }
    let (Some(code), Some(state)) = (p.one("code"), p.one("state")) else {
        return Err(ApiError::bad(
            "code",
            "the callback needs `code` and `state`",
        ));
    };
    Ok(Json(s.store.sso_callback(code, state, &by).await?))
}
