//! The server's one error type, answered in OpenAI's JSON error shape
//! (`{"error": {"message", "type", "param", "code"}}`) with a stable `code` per kind, so the
//! official clients raise their typed exceptions (`BadRequestError`, `AuthenticationError`,
//! `NotFoundError`, `RateLimitError`, ...).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter has no meaning or is out of range; `param` names it.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    /// The change conflicts with what is stored (a duplicate name, an archived project).
    #[error("{0}")]
    Conflict(String),
    /// The body is over the server's limit.
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full: retry after this many seconds.
    #[error("the server is busy ({0}); retry shortly")]
    Overloaded(&'static str, u64),
    /// Over a rate limit (`rate_limit_exceeded`, type `requests` or `tokens`) or out of
    /// budget (`insufficient_quota`): 429 with the `x-ratelimit-*` headers and Retry-After.
    #[error("{message}")]
    RateLimited {
        message: String,
        kind: &'static str,
        code: &'static str,
        retry_after: u64,
        headers: Box<axum::http::HeaderMap>,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An HTTP-level refusal (405, 408, 414, 431) said in the OpenAI shape.
    #[error("{message}")]
    Http {
        status: StatusCode,
        message: String,
        code: &'static str,
    },
    /// Details are logged with the request id, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }

    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
            code: "unsupported_value",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Overloaded(..) | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Http { status, .. } => *status,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::BadRequest { param, code, .. } => ("invalid_request_error", param.clone(), *code),
            Self::Unauthorized(_) => ("authentication_error", None, "invalid_api_key"),
            Self::Forbidden(_) => ("permission_error", None, "insufficient_permissions"),
            Self::TooLarge(_) => ("invalid_request_error", None, "body_too_large"),
            Self::NotFound { code, .. } => ("invalid_request_error", None, *code),
            Self::Conflict(_) => ("invalid_request_error", None, "conflict"),
            Self::Overloaded(..) => ("rate_limit_error", None, "server_busy"),
            Self::RateLimited { kind, code, .. } => (*kind, None, *code),
            Self::Timeout(_) => ("timeout_error", None, "timeout"),
            Self::ShuttingDown => ("server_error", None, "shutting_down"),
            Self::Http { code, .. } => ("invalid_request_error", None, *code),
            Self::Internal(_) => ("server_error", None, "internal_error"),
        };
        let message = match self {
            Self::Internal(_) => "internal server error; the server log has details".into(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                param,
                code: Some(code.into()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut r = (self.status(), Json(self.body())).into_response();
        match self {
            Self::Overloaded(_, secs) => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::RateLimited {
                retry_after,
                headers,
                ..
            } => {
                r.headers_mut().extend(*headers);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        r
    }
}

impl From<bitnet_platform::PlatformError> for ApiError {
    fn from(e: bitnet_platform::PlatformError) -> Self {
        use bitnet_platform::PlatformError as P;
        match e {
            P::NotFound { .. } => Self::NotFound {
                message: e.to_string(),
                code: "not_found",
            },
            P::Invalid { param, message } => Self::BadRequest {
                message,
                param: Some(param.into()),
                code: "invalid_value",
            },
            P::Conflict(m) => Self::Conflict(m),
            P::Quota(m) => Self::RateLimited {
                message: m,
                kind: "insufficient_quota",
                code: "insufficient_quota",
                retry_after: 3600,
                headers: Box::default(),
            },
            P::Forbidden(m) => Self::Forbidden(m),
            P::Upstream(m) => Self::Http {
                status: axum::http::StatusCode::BAD_GATEWAY,
                message: m,
                code: "identity_provider_error",
            },
            P::Unauthorized(m) => Self::Http {
                status: axum::http::StatusCode::UNAUTHORIZED,
                message: m,
                code: "invalid_credentials",
            },
            P::TooLarge(m) => Self::TooLarge(m),
            P::Storage(m) => Self::Http {
                status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                message: format!("storage: {m}"),
                code: "storage_error",
            },
            other => Self::Internal(other.to_string()),
        }
    }
}
