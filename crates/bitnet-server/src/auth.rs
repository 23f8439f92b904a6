//! Who is calling: the bearer key becomes a [`Caller`] (the key's credential and the audit
//! log's actor, with the client's address and the request id), before the permission table
//! ([`crate::permissions`]) decides whether the route is open to it.

use crate::AppState;
use crate::error::ApiError;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use bitnet_platform::audit::Actor;
use bitnet_platform::keys::{Credential, KeyKind};
use std::net::SocketAddr;

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub struct Caller {
    pub cred: Credential,
    /// The audit log's actor: the key, its owner, the client's address and the request id.
    pub actor: Actor,
}

impl Caller {
    /// The caller's organization. Operator keys have none; the permission table keeps them off
    /// every route that asks.
    pub fn org(&self) -> Result<&str, ApiError> {
        self.cred.organization_id.as_deref().ok_or_else(|| {
            ApiError::Forbidden(
                "this route belongs to an organization; operator keys manage organizations only"
                    .into(),
            )
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.cred.kind
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("no API key".into()))
    }
}

/// The bearer token: `Authorization: Bearer KEY`, or `x-api-key: KEY`.
pub fn bearer(h: &axum::http::HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// The client's address, when the server knows it.
pub fn client_ip(req: &Request) -> Option<String> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
}

/// Authenticate every `/v1` route's caller (401 without a live key).
pub async fn authenticate(
    State(s): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = bearer(req.headers()).ok_or_else(|| {
        ApiError::Unauthorized(
            "no API key: send `Authorization: Bearer KEY` (`bitnet keys create` makes one)".into(),
        )
    })?;
    // An access token (three dot-separated parts) or an API key.
    let cred = if key.split('.').count() == 3 && !key.starts_with("sk-") {
        s.store.authenticate_token(key).await?.ok_or_else(|| {
            ApiError::Unauthorized(
                "the access token is not valid, has expired, or its user was removed; sign in again"
                    .into(),
            )
        })?
    } else {
        s.store.authenticate(key).await?.ok_or_else(|| {
            ApiError::Unauthorized("the API key is not valid or was revoked".into())
        })?
    };
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let actor = cred.actor().at(client_ip(&req), request_id);
    req.extensions_mut().insert(Caller { cred, actor });
    Ok(next.run(req).await)
}
