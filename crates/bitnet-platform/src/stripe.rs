//! Stripe as the billing provider: customers, invoice items and invoices over Stripe's REST API
//! (form-encoded requests, JSON answers, `Authorization: Bearer sk_...`), and the check of the
//! signed webhooks Stripe sends back.
//!
//! Each line goes out as an invoice item of the organization's customer, and the invoice is
//! made from the customer's pending items (`pending_invoice_items_behavior=include`), then
//! finalized: with [`Collect::Charge`] through `/pay`, which finalizes and charges the
//! customer's default payment method at once (a failed charge leaves the invoice open, for
//! Stripe's retries); with [`Collect::Finalize`] through `/finalize`, leaving collection to
//! the account's Stripe settings. Every object carries `metadata[bitnet_invoice]` (and the
//! items `metadata[bitnet_line]`), and every create an `Idempotency-Key`, so a retried close
//! finds what an earlier attempt made. Wire format: Stripe's API reference
//! (docs.stripe.com/api: invoices, invoiceitems, customers; webhooks' `Stripe-Signature`).

use crate::billing::{BillingProvider, Invoice, InvoiceLine, RemoteInvoice};
use crate::error::{PlatformError, Result};
use serde_json::Value;
use std::collections::BTreeMap;

/// How a finalized invoice is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// Finalize and charge the customer's default payment method now (`/pay`).
    Charge,
    /// Finalize only (`/finalize`); Stripe collects as the account is set up to.
    Finalize,
}

impl std::str::FromStr for Collect {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "charge" => Ok(Self::Charge),
            "finalize" => Ok(Self::Finalize),
            _ => Err(format!("expected `charge` or `finalize`, not {s:?}")),
        }
    }
}

/// A Stripe account's API.
#[derive(Debug, Clone)]
pub struct Stripe {
    http: reqwest::Client,
    base: String,
    key: String,
    collect: Collect,
}

impl Stripe {
    /// `base`: `https://api.stripe.com`, or an emulator's address.
    pub fn new(base: &str, key: &str, collect: Collect) -> Result<Self> {
        crate::sso::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| PlatformError::Upstream(format!("cannot build an HTTP client: {e}")))?;
        if key.trim().is_empty() {
            return Err(PlatformError::Invalid {
                param: "stripe_api_key",
                message: "a Stripe secret key (sk_...) is required".into(),
            });
        }
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
            collect,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(String, String)],
        idempotency: Option<&str>,
    ) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.key);
        if method == reqwest::Method::GET {
            req = req.query(form);
        } else {
            req = req.form(form);
        }
        if let Some(k) = idempotency {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req.send().await.map_err(|e| {
            let mut m = format!("Stripe {method} {path}: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            PlatformError::Upstream(m)
        })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = json["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.chars().take(200).collect());
            return Err(PlatformError::Upstream(format!(
                "Stripe {method} {path}: {status}: {message}"
            )));
        }
        if json.is_null() {
            return Err(PlatformError::Upstream(format!(
                "Stripe {method} {path}: an answer that is not JSON"
            )));
        }
        Ok(json)
    }

    /// Every object of a list endpoint (Stripe's `starting_after` pagination).
    async fn list_all(&self, path: &str, customer: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![
                ("customer".to_string(), customer.to_string()),
                ("limit".to_string(), "100".to_string()),
            ];
            if let Some(a) = &after {
                q.push(("starting_after".into(), a.clone()));
            }
            let page = self.call(reqwest::Method::GET, path, &q, None).await?;
            let data = page["data"].as_array().cloned().unwrap_or_default();
            after = data
                .last()
                .and_then(|d| d["id"].as_str())
                .map(str::to_string);
            out.extend(data);
            if !page["has_more"].as_bool().unwrap_or(false) || after.is_none() {
                return Ok(out);
            }
        }
    }
}

fn remote(v: &Value) -> Result<RemoteInvoice> {
    let id = v["id"]
        .as_str()
        .ok_or_else(|| PlatformError::Upstream("Stripe: an invoice without an id".into()))?;
    Ok(RemoteInvoice {
        id: id.to_string(),
        status: v["status"].as_str().unwrap_or("draft").to_string(),
        subtotal: v["subtotal"].as_i64().unwrap_or(0),
        hosted_invoice_url: v["hosted_invoice_url"].as_str().map(str::to_string),
    })
}

/// Whether a Stripe object was made for our invoice `invoice_id`: by its metadata, or for an
/// invoice by its description (which names the id too, for emulators that drop an invoice's
/// metadata).
fn tagged(v: &Value, invoice_id: &str) -> bool {
    v["metadata"]["bitnet_invoice"].as_str() == Some(invoice_id)
        || (v["object"] == "invoice"
            && v["description"]
                .as_str()
                .is_some_and(|d| d.ends_with(&format!("({invoice_id})"))))
}

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

impl BillingProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn create_customer(&self, organization_id: &str, name: &str) -> Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/customers",
                &[
                    kv("name", name),
                    kv("metadata[bitnet_organization]", organization_id),
                ],
                Some(&format!("bitnet-customer-{organization_id}")),
            )
            .await?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| PlatformError::Upstream("Stripe: a customer without an id".into()))
    }

    async fn find_invoice(
        &self,
        customer: &str,
        invoice_id: &str,
    ) -> Result<Option<RemoteInvoice>> {
        let all = self.list_all("/v1/invoices", customer).await?;
        all.iter()
            .find(|v| tagged(v, invoice_id) && v["status"].as_str() != Some("void"))
            .map(remote)
            .transpose()
    }

    async fn invoice(&self, id: &str) -> Result<RemoteInvoice> {
        remote(
            &self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/invoices/{id}"),
                    &[],
                    None,
                )
                .await?,
        )
    }

    async fn pending_items(
        &self,
        customer: &str,
        invoice_id: &str,
    ) -> Result<BTreeMap<i64, String>> {
        let all = self.list_all("/v1/invoiceitems", customer).await?;
        Ok(all
            .iter()
            .filter(|v| tagged(v, invoice_id) && v["invoice"].is_null())
            .filter_map(|v| {
                let line = v["metadata"]["bitnet_line"].as_str()?.parse().ok()?;
                Some((line, v["id"].as_str()?.to_string()))
            })
            .collect())
    }

    async fn create_item(
        &self,
        customer: &str,
        invoice: &Invoice,
        line: &InvoiceLine,
    ) -> Result<String> {
        let project = line.project_id.as_deref().unwrap_or("no project");
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/invoiceitems",
                &[
                    kv("customer", customer),
                    kv("amount", line.amount),
                    kv("currency", &invoice.currency),
                    kv(
                        "description",
                        format!(
                            "{} {} tokens of {}, {project}, {}",
                            line.tokens,
                            line.token_type.replace('_', " "),
                            line.model,
                            invoice.period
                        ),
                    ),
                    kv("metadata[bitnet_invoice]", &invoice.id),
                    kv("metadata[bitnet_line]", line.line),
                    kv("metadata[tokens]", line.tokens),
                    kv(
                        "metadata[amount_decimal]",
                        crate::billing::cents_decimal(line.amount_exact),
                    ),
                ],
                Some(&format!("{}-line-{}", invoice.id, line.line)),
            )
            .await?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| PlatformError::Upstream("Stripe: an invoice item without an id".into()))
    }

    async fn create_invoice(&self, customer: &str, invoice: &Invoice) -> Result<RemoteInvoice> {
        remote(
            &self
                .call(
                    reqwest::Method::POST,
                    "/v1/invoices",
                    &[
                        kv("customer", customer),
                        kv("pending_invoice_items_behavior", "include"),
                        kv(
                            "description",
                            format!("Usage for {} ({})", invoice.period, invoice.id),
                        ),
                        kv("metadata[bitnet_invoice]", &invoice.id),
                        kv("metadata[bitnet_period]", &invoice.period),
                    ],
                    Some(&format!("{}-invoice", invoice.id)),
                )
                .await?,
        )
    }

    async fn finalize(&self, id: &str) -> Result<RemoteInvoice> {
        let path = match self.collect {
            Collect::Charge => format!("/v1/invoices/{id}/pay"),
            Collect::Finalize => format!("/v1/invoices/{id}/finalize"),
        };
        match self.call(reqwest::Method::POST, &path, &[], None).await {
            Ok(v) => remote(&v),
            Err(e) => {
                // A charge that fails still finalizes the invoice (it stays open for Stripe's
                // retries): what counts is whether it left draft.
                let now = self.invoice(id).await?;
                if now.status == "draft" {
                    Err(e)
                } else {
                    tracing::warn!(invoice = id, error = %e, "the invoice is finalized but its charge failed");
                    Ok(now)
                }
            }
        }
    }
}

/// Check a webhook's `Stripe-Signature` header (`t=TIMESTAMP,v1=HEX[,v1=HEX...]`): one `v1`
/// must be the HMAC-SHA256, under the endpoint's secret, of `TIMESTAMP.BODY`, and the
/// timestamp within `tolerance` seconds of `now` (replays of old deliveries are refused).
pub fn verify_signature(
    body: &[u8],
    header: &str,
    secret: &str,
    now: i64,
    tolerance: i64,
) -> std::result::Result<(), String> {
    let mut t: Option<i64> = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse().ok(),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let t = t.ok_or("the Stripe-Signature header has no timestamp")?;
    if sigs.is_empty() {
        return Err("the Stripe-Signature header has no v1 signature".into());
    }
    if (now - t).abs() > tolerance {
        return Err(format!(
            "the signature's timestamp is {}s away from now (more than {tolerance}s)",
            now - t
        ));
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let ok = sigs
        .iter()
        .filter_map(|s| hex(s))
        .any(|sig| ring::hmac::verify(&key, &signed, &sig).is_ok());
    if ok {
        Ok(())
    } else {
        Err("no signature matches the endpoint's secret".into())
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An invoice event of a webhook's body (`invoice.paid`, `invoice.voided`, ...): (event id,
/// Stripe's invoice id, its status). Other events are `None`.
pub fn invoice_event(body: &[u8]) -> Option<(String, String, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    if !v["type"].as_str()?.starts_with("invoice.") {
        return None;
    }
    let o = &v["data"]["object"];
    Some((
        v["id"].as_str()?.to_string(),
        o["id"].as_str()?.to_string(),
        o["status"].as_str()?.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut m = format!("{t}.").into_bytes();
        m.extend_from_slice(body);
        let tag = ring::hmac::sign(&key, &m);
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn webhook_signatures() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{"id":"in_1","status":"paid"}}}"#;
        let t = 1_765_000_000;
        let good = sign("whsec_a", t, body);
        let header = format!("t={t},v1={good}");
        assert_eq!(
            verify_signature(body, &header, "whsec_a", t + 10, 300),
            Ok(())
        );
        // A rotated secret: Stripe sends one v1 per live secret.
        let two = format!("t={t},v1={},v1={good}", sign("whsec_old", t, body));
        assert_eq!(verify_signature(body, &two, "whsec_a", t, 300), Ok(()));
        assert!(verify_signature(body, &header, "whsec_b", t, 300).is_err());
        assert!(verify_signature(b"{}", &header, "whsec_a", t, 300).is_err());
        assert!(verify_signature(body, &header, "whsec_a", t + 301, 300).is_err());
        assert!(verify_signature(body, &format!("v1={good}"), "whsec_a", t, 300).is_err());
        assert!(verify_signature(body, &format!("t={t},v1=zz"), "whsec_a", t, 300).is_err());
        assert!(verify_signature(body, "", "whsec_a", t, 300).is_err());
        assert_eq!(
            invoice_event(body),
            Some(("evt_1".into(), "in_1".into(), "paid".into()))
        );
        assert_eq!(
            invoice_event(br#"{"id":"evt_2","type":"customer.created"}"#),
            None
        );
        assert_eq!(invoice_event(b"not json"), None);
    }
}
