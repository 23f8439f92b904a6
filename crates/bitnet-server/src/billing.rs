//! Invoices and the billing provider's webhooks. OpenAI's Administration API has no invoices;
//! ours follow its list shape and pagination: `GET /v1/organization/invoices` and
//! `GET /v1/organization/invoices/{invoice_id}` (`organization.invoice`, with its lines). Invoices
//! are made by `bitnet billing close-period`; Stripe reports their payment through
//! `POST /v1/billing/webhooks/stripe`, whose signature is checked against the endpoint's secret
//! (`--stripe-webhook-secret`) before anything is read.

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::org::Params;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use bitnet_platform::List;
use bitnet_platform::billing::Invoice;
use serde_json::{Value, json};

/// How far a webhook's signed timestamp may be from now (Stripe's libraries' default).
const WEBHOOK_TOLERANCE_S: i64 = 300;

/// `GET /v1/organization/invoices`: oldest first; `limit`, `after`.
pub async fn list_invoices(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<List<Invoice>>, ApiError> {
    let p = Params::parse(q.as_deref())?;
    Ok(Json(s.store.invoices(who.org()?, &p.page()?).await?))
}

/// `GET /v1/organization/invoices/{invoice_id}`.
pub async fn get_invoice(
    State(s): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> Result<Json<Invoice>, ApiError> {
    Ok(Json(s.store.invoice(who.org()?, &id).await?))
}

/// `POST /v1/billing/webhooks/stripe`: Stripe's events on the invoices it holds for us
/// (`invoice.paid`, `invoice.payment_succeeded`, `invoice.voided`,
/// `invoice.marked_uncollectible`, ...). Unsigned or wrongly signed bodies are refused with 400;
/// other event types are acknowledged and ignored. Deliveries may repeat: a state already
/// recorded changes nothing.
pub async fn stripe_webhook(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let Some(secret) = s.config.stripe_webhook_secret.as_deref() else {
        return Err(ApiError::NotFound {
            message: "this server takes no Stripe webhooks (no --stripe-webhook-secret)".into(),
            code: "unknown_url",
        });
    };
    let sig = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    bitnet_platform::stripe::verify_signature(
        &body,
        sig,
        secret,
        bitnet_platform::ids::now(),
        WEBHOOK_TOLERANCE_S,
    )
    .map_err(|m| ApiError::BadRequest {
        message: format!("the webhook's Stripe-Signature does not check: {m}"),
        param: None,
        code: "invalid_signature",
    })?;
    if let Some((event, invoice, status)) = bitnet_platform::stripe::invoice_event(&body) {
        let moved = s
            .store
            .provider_invoice_update("stripe", &invoice, &status)
            .await?;
        tracing::info!(
            event,
            invoice,
            status,
            changed = moved.is_some(),
            "Stripe invoice event"
        );
    }
    Ok(Json(json!({"received": true})))
}

#[utoipa::path(get, path = "/v1/organization/invoices", tag = "organization",
    params(("limit" = Option<u32>, Query, description = "At most this many (default 20)"),
           ("after" = Option<String>, Query, description = "The invoices after this id")),
    responses((status = 200, description = "A list of organization.invoice objects, oldest first"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_list_invoices() {}

#[utoipa::path(get, path = "/v1/organization/invoices/{invoice_id}", tag = "organization",
    params(("invoice_id" = String, Path, description = "An invoice of the caller's organization")),
    responses((status = 200, description = "An organization.invoice with its lines"),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_get_invoice() {}

#[utoipa::path(post, path = "/v1/billing/webhooks/stripe", tag = "operations",
    params(("Stripe-Signature" = String, Header, description = "t=TIMESTAMP,v1=HMAC-SHA256 of TIMESTAMP.BODY under the endpoint's secret")),
    request_body(content = String, content_type = "application/json", description = "A Stripe event"),
    responses((status = 200, description = "Received"),
              (status = 400, body = crate::error::ErrorBody, description = "The signature does not check"),
              (status = 404, body = crate::error::ErrorBody, description = "No webhook secret is configured")))]
#[allow(dead_code)]
fn doc_stripe_webhook() {}
