//! Billing: one invoice per organization per UTC month, made from its usage rows' costs, and
//! sent through a billing provider (Stripe, see [`crate::stripe`]) when one is configured.
//!
//! Closing a period is a resumable sequence, each step written down as soon as it is done, so
//! a close that crashed anywhere and is run again finishes the same invoice and never bills
//! twice:
//!
//! 1. The draft: the invoice row (one per organization and period: the table's unique key)
//!    and its lines, one per project, model and token type. A draft's lines are recomputed on
//!    each attempt until the first of them reaches the provider; then they are frozen.
//! 2. The provider's customer, made once per organization and kept.
//! 3. Each line as an invoice item, tagged with the invoice's id and the line's number, its id
//!    kept as soon as it is made; on a retry, items the provider holds under those tags are
//!    found and reused instead of made again.
//! 4. The provider's invoice from those items, tagged too, its id kept; on a retry it is found
//!    by its tag. Its total must equal ours to the cent, or the close stops before finalizing.
//! 5. Finalization at the provider (which may also charge the customer), then here:
//!    `finalized` (or already `paid`), with an audit event and an `invoice.finalized` event in
//!    the same transaction. A finalized invoice never changes again, except its payment state,
//!    which the provider's signed webhooks report.
//!
//! One close at a time per invoice: a close holds its draft for [`CLOSE_LEASE_S`] seconds at
//! most, and a second close meanwhile is refused with a clear error.
//!
//! A period closes only once it is over and no request of it is still in flight (their
//! reservations settle or expire within the metering TTL), so its usage is complete.
//! Amounts are exact: lines are summed in picodollars and rounded to cents once, the total
//! half up, each line's cents by largest remainder so they add up to the total exactly. Tax is
//! left to the provider.

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now};
use crate::{HasId, List, Page, Store};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;

/// Picodollars (the usage rows' unit) in one cent (the invoices' unit).
pub const PICO_PER_CENT: i64 = 10_000_000_000;

/// How long a close holds its invoice (seconds): a second close meanwhile is refused. A close
/// lets go when it ends, even on an error; one whose process died holds it this long.
pub const CLOSE_LEASE_S: i64 = 120;

/// `organization.invoice.line` (ours: OpenAI has no invoices API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceLine {
    pub object: &'static str,
    /// The line's number in its invoice (from 1); the provider's item carries it.
    pub line: i64,
    pub project_id: Option<String>,
    pub model: String,
    /// `input` (uncached prompt tokens), `cached_input` or `output`.
    pub token_type: String,
    pub tokens: i64,
    /// Cents.
    pub amount: i64,
    /// The exact amount in picodollars; serialized as cents in a decimal string (Stripe's
    /// `*_decimal` style).
    #[serde(rename = "amount_decimal", serialize_with = "as_cents_decimal")]
    pub amount_exact: i64,
    #[serde(skip)]
    pub provider_item_id: Option<String>,
}

/// `organization.invoice`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Invoice {
    pub id: String,
    pub object: &'static str,
    pub organization_id: String,
    /// `YYYY-MM` (UTC) and its bounds in unix seconds.
    pub period: String,
    pub period_start: i64,
    pub period_end: i64,
    /// `draft`, `finalized`, `paid`, `uncollectible` or `void`.
    pub status: String,
    pub currency: String,
    /// Cents, before tax.
    pub total: i64,
    /// The exact total in picodollars, serialized like a line's `amount_decimal`.
    #[serde(rename = "total_decimal", serialize_with = "as_cents_decimal")]
    pub total_exact: i64,
    pub lines: Vec<InvoiceLine>,
    pub created_at: i64,
    pub finalized_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub voided_at: Option<i64>,
    /// `stripe` when a provider billed it; `None` when it was closed here only.
    pub provider: Option<String>,
    pub provider_invoice_id: Option<String>,
    pub provider_status: Option<String>,
    pub hosted_invoice_url: Option<String>,
}

impl HasId for Invoice {
    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(sqlx::FromRow)]
struct InvoiceRow {
    id: String,
    organization_id: String,
    period: String,
    status: String,
    currency: String,
    total: i64,
    total_exact: i64,
    provider: Option<String>,
    provider_invoice_id: Option<String>,
    provider_status: Option<String>,
    hosted_invoice_url: Option<String>,
    created_at: i64,
    finalized_at: Option<i64>,
    paid_at: Option<i64>,
    voided_at: Option<i64>,
}

impl HasId for InvoiceRow {
    fn id(&self) -> &str {
        &self.id
    }
}

const INVOICE_COLS: &str = "id, organization_id, period, status, currency, total, total_exact, \
     provider, provider_invoice_id, provider_status, hosted_invoice_url, created_at, \
     finalized_at, paid_at, voided_at";

/// `pico` picodollars as cents with ten decimals: `1234567` → `"0.0001234567"`.
pub fn cents_decimal(pico: i64) -> String {
    let sign = if pico < 0 { "-" } else { "" };
    let p = pico.unsigned_abs();
    let per = PICO_PER_CENT as u64;
    format!("{sign}{}.{:010}", p / per, p % per)
}

fn as_cents_decimal<S: serde::Serializer>(
    pico: &i64,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&cents_decimal(*pico))
}

/// Round a total of picodollars to cents (half up) and share those cents among `amounts` by
/// largest remainder (ties to the earlier line), so the lines add up to the total exactly.
pub fn allocate_cents(amounts: &[i64]) -> (Vec<i64>, i64) {
    let total_pico: i64 = amounts.iter().sum();
    let total = (total_pico + PICO_PER_CENT / 2).div_euclid(PICO_PER_CENT);
    let mut cents: Vec<i64> = amounts
        .iter()
        .map(|a| a.div_euclid(PICO_PER_CENT))
        .collect();
    let mut left = total - cents.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..amounts.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(amounts[i].rem_euclid(PICO_PER_CENT)), i));
    for i in order {
        if left <= 0 {
            break;
        }
        cents[i] += 1;
        left -= 1;
    }
    (cents, total)
}

/// The provider's view of an invoice.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteInvoice {
    pub id: String,
    /// Stripe's: `draft`, `open`, `paid`, `uncollectible`, `void`.
    pub status: String,
    /// Cents, before tax.
    pub subtotal: i64,
    pub hosted_invoice_url: Option<String>,
}

/// A billing provider: where invoices go to be sent and paid. Every call that makes something
/// carries the invoice's id and line number as tags (and an idempotency key), so a retried
/// close finds what an earlier attempt made.
#[allow(async_fn_in_trait)]
pub trait BillingProvider {
    /// `stripe`, ...: stored beside the ids it returns.
    fn name(&self) -> &'static str;
    /// Make the organization's customer; returns its id.
    async fn create_customer(&self, organization_id: &str, name: &str) -> Result<String>;
    /// The invoice tagged with `invoice_id` under `customer`, if an earlier attempt made it.
    async fn find_invoice(&self, customer: &str, invoice_id: &str)
    -> Result<Option<RemoteInvoice>>;
    /// The invoice `id`.
    async fn invoice(&self, id: &str) -> Result<RemoteInvoice>;
    /// The items not yet on an invoice that are tagged with `invoice_id`: line number → id.
    async fn pending_items(
        &self,
        customer: &str,
        invoice_id: &str,
    ) -> Result<BTreeMap<i64, String>>;
    /// Make one line's invoice item; returns its id.
    async fn create_item(
        &self,
        customer: &str,
        invoice: &Invoice,
        line: &InvoiceLine,
    ) -> Result<String>;
    /// Make the invoice from the customer's pending items.
    async fn create_invoice(&self, customer: &str, invoice: &Invoice) -> Result<RemoteInvoice>;
    /// Finalize (and, as configured, charge) a draft invoice; returns its state after.
    async fn finalize(&self, id: &str) -> Result<RemoteInvoice>;
}

/// What a close did with one organization's period.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// Finalized now.
    Finalized(Invoice),
    /// Finalized by an earlier close: nothing was done.
    AlreadyClosed(Invoice),
}

impl Closed {
    pub fn invoice(&self) -> &Invoice {
        match self {
            Self::Finalized(i) | Self::AlreadyClosed(i) => i,
        }
    }
}

/// Our status for a provider's invoice status.
fn local_status(remote: &str) -> &'static str {
    match remote {
        "paid" => "paid",
        "void" => "void",
        "uncollectible" => "uncollectible",
        _ => "finalized",
    }
}

impl Store {
    async fn invoice_lines(&self, id: &str) -> Result<Vec<InvoiceLine>> {
        type LineRow = (i64, String, String, String, i64, i64, i64, Option<String>);
        let rows: Vec<LineRow> = sqlx::query_as(
            "SELECT seq, project_id, model, token_type, tokens, amount, amount_exact, provider_item_id \
             FROM invoice_lines WHERE invoice_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, project, model, kind, tokens, amount, exact, item)| InvoiceLine {
                    object: "organization.invoice.line",
                    line: seq,
                    project_id: (!project.is_empty()).then_some(project),
                    model,
                    token_type: kind,
                    tokens,
                    amount,
                    amount_exact: exact,
                    provider_item_id: item,
                },
            )
            .collect())
    }

    async fn invoice_of(&self, r: InvoiceRow) -> Result<Invoice> {
        let lines = self.invoice_lines(&r.id).await?;
        let (start, end) = crate::budgets::period_bounds(&r.period).unwrap_or((0, 0));
        Ok(Invoice {
            object: "organization.invoice",
            lines,
            period_start: start,
            period_end: end,
            id: r.id,
            organization_id: r.organization_id,
            period: r.period,
            status: r.status,
            currency: r.currency,
            total: r.total,
            total_exact: r.total_exact,
            provider: r.provider,
            provider_invoice_id: r.provider_invoice_id,
            provider_status: r.provider_status,
            hosted_invoice_url: r.hosted_invoice_url,
            created_at: r.created_at,
            finalized_at: r.finalized_at,
            paid_at: r.paid_at,
            voided_at: r.voided_at,
        })
    }

    /// An organization's invoice; another organization's id is not found.
    pub async fn invoice(&self, org: &str, id: &str) -> Result<Invoice> {
        let row: Option<InvoiceRow> = sqlx::query_as(&format!(
            "SELECT {INVOICE_COLS} FROM invoices WHERE organization_id = $1 AND id = $2"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => self.invoice_of(r).await,
            None => Err(PlatformError::NotFound {
                kind: "invoice",
                id: id.to_string(),
            }),
        }
    }

    /// An organization's invoice for `period`, if one was drafted.
    pub async fn invoice_for(&self, org: &str, period: &str) -> Result<Option<Invoice>> {
        let row: Option<InvoiceRow> = sqlx::query_as(&format!(
            "SELECT {INVOICE_COLS} FROM invoices WHERE organization_id = $1 AND period = $2"
        ))
        .bind(org)
        .bind(period)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some(self.invoice_of(r).await?)),
            None => Ok(None),
        }
    }

    /// An organization's invoices, oldest first, OpenAI's pagination.
    pub async fn invoices(&self, org: &str, page: &Page) -> Result<List<Invoice>> {
        let rows: List<InvoiceRow> = crate::page_of(
            self,
            &format!("SELECT {INVOICE_COLS} FROM invoices WHERE organization_id = $1"),
            &[org],
            page,
        )
        .await?;
        let mut data = Vec::with_capacity(rows.data.len());
        for r in rows.data {
            data.push(self.invoice_of(r).await?);
        }
        Ok(List::new(data, rows.has_more))
    }

    /// Organizations with usage in `period`: the ones a close of the period bills.
    pub async fn billable_organizations(&self, period: &str) -> Result<Vec<String>> {
        let (start, end) = bounds(period)?;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT organization_id FROM usage WHERE created_at >= $1 AND created_at < $2 \
             ORDER BY organization_id",
        )
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The organization's customer at a billing provider: (provider, customer id).
    pub async fn billing_customer(&self, org: &str) -> Result<Option<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT provider, customer_id FROM billing_customers WHERE organization_id = $1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Bill the organization through an existing customer of the provider (one the customer
    /// made with the provider's checkout, holding their payment method).
    pub async fn set_billing_customer(
        &self,
        org: &str,
        provider: &str,
        customer: &str,
        by: &Actor,
    ) -> Result<()> {
        if customer.trim().is_empty() {
            return Err(PlatformError::Invalid {
                param: "customer",
                message: "a customer id is required".into(),
            });
        }
        let mut c = self.change(org).await?;
        let at = c.at;
        upsert_customer(&mut c.tx, org, provider, customer, at).await?;
        c.audit(AuditEvent::new(
            "billing.customer_updated",
            by,
            org,
            json!({"provider": provider, "customer_id": customer}),
        ))
        .await?;
        c.commit().await
    }

    /// Step 1 of a close: the organization's invoice for `period`, drafted from its usage (or
    /// redrafted while no line has reached a provider). A finalized invoice is returned as it
    /// is. Refused while the period is not over or requests of it are still in flight.
    pub async fn draft_invoice(&self, org: &str, period: &str) -> Result<Invoice> {
        self.draft(org, period, false).await
    }

    /// The draft, and with `claim` this close's hold on it ([`CLOSE_LEASE_S`]): a second
    /// close of the same invoice meanwhile is refused, and nobody recomputes the lines of a
    /// held draft.
    async fn draft(&self, org: &str, period: &str, claim: bool) -> Result<Invoice> {
        let (start, end) = bounds(period)?;
        if let Some(inv) = self.invoice_for(org, period).await?
            && inv.status != "draft"
        {
            return Ok(inv);
        }
        if end > now() {
            return Err(PlatformError::Conflict(format!(
                "the period {period} is not over: it can be closed from {}",
                crate::budgets::period_of(end)
            )));
        }
        let (in_flight,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM usage_reservations WHERE organization_id = $1 \
             AND created_at >= $2 AND created_at < $3",
        )
        .bind(org)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await?;
        if in_flight > 0 {
            return Err(PlatformError::Conflict(format!(
                "{in_flight} request(s) of {period} are still in flight: close again once they \
                 settle (an abandoned one expires within the metering TTL)"
            )));
        }
        // Sums per project, model and token type, from the rows' costs (each priced when it
        // settled, at the plan valid when its request started).
        // (project, model, input, cached, output tokens, their costs)
        type SumRow = (String, String, i64, i64, i64, i64, i64, i64);
        let sums: Vec<SumRow> = sqlx::query_as(
            "SELECT COALESCE(project_id, ''), model, \
             CAST(COALESCE(SUM(CASE WHEN cached_tokens < prompt_tokens THEN prompt_tokens - cached_tokens ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN cached_tokens < prompt_tokens THEN cached_tokens ELSE prompt_tokens END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_input), 0) AS BIGINT), CAST(COALESCE(SUM(cost_cached), 0) AS BIGINT), \
             CAST(COALESCE(SUM(cost_output), 0) AS BIGINT) \
             FROM usage WHERE organization_id = $1 AND created_at >= $2 AND created_at < $3 \
             GROUP BY COALESCE(project_id, ''), model ORDER BY 1, 2",
        )
        .bind(org)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await?;
        let mut lines: Vec<(String, String, &'static str, i64, i64)> = Vec::new();
        for (project, model, input, cached, output, c_in, c_cached, c_out) in sums {
            for (kind, tokens, cost) in [
                ("input", input, c_in),
                ("cached_input", cached, c_cached),
                ("output", output, c_out),
            ] {
                if tokens > 0 || cost > 0 {
                    lines.push((project.clone(), model.clone(), kind, tokens, cost));
                }
            }
        }
        let exact: Vec<i64> = lines.iter().map(|l| l.4).collect();
        let (cents, total) = allocate_cents(&exact);
        let total_exact: i64 = exact.iter().sum();

        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO invoices (id, organization_id, period, status, currency, total, total_exact, created_at) \
             VALUES ($1, $2, $3, 'draft', 'usd', 0, 0, $4) ON CONFLICT (organization_id, period) DO NOTHING",
        )
        .bind(new_id("inv_"))
        .bind(org)
        .bind(period)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        // The row is locked from here to the commit; a line that reached a provider meanwhile
        // (a concurrent close) freezes the draft.
        let (id, status, held_until): (String, String, Option<i64>) = sqlx::query_as(
            "UPDATE invoices SET total = total WHERE organization_id = $1 AND period = $2 \
             RETURNING id, status, closing_until",
        )
        .bind(org)
        .bind(period)
        .fetch_one(&mut *tx)
        .await?;
        let t = now();
        let held = held_until.is_some_and(|u| u > t);
        if claim && held && status == "draft" {
            return Err(PlatformError::Conflict(format!(
                "another close is sending invoice {id} (its hold ends in {} s, sooner if it \
                 finishes): run this again after it",
                held_until.unwrap_or(t) - t
            )));
        }
        let (sent,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM invoice_lines WHERE invoice_id = $1 AND provider_item_id IS NOT NULL",
        )
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        if claim && status == "draft" {
            sqlx::query("UPDATE invoices SET closing_until = $1 WHERE id = $2")
                .bind(t + CLOSE_LEASE_S)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if status == "draft" && sent == 0 && !held {
            sqlx::query("DELETE FROM invoice_lines WHERE invoice_id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            for (i, ((project, model, kind, tokens, exact), amount)) in
                lines.iter().zip(&cents).enumerate()
            {
                sqlx::query(
                    "INSERT INTO invoice_lines (invoice_id, seq, project_id, model, token_type, tokens, amount, amount_exact) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&id)
                .bind(i as i64 + 1)
                .bind(project)
                .bind(model)
                .bind(*kind)
                .bind(*tokens)
                .bind(*amount)
                .bind(*exact)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE invoices SET total = $1, total_exact = $2 WHERE id = $3")
                .bind(total)
                .bind(total_exact)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.invoice(org, &id).await
    }

    async fn set_line_item(&self, invoice: &str, line: i64, item: &str) -> Result<()> {
        sqlx::query(
            "UPDATE invoice_lines SET provider_item_id = $1 WHERE invoice_id = $2 AND seq = $3",
        )
        .bind(item)
        .bind(invoice)
        .bind(line)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn set_provider_invoice(
        &self,
        invoice: &str,
        provider: &str,
        r: &RemoteInvoice,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE invoices SET provider = $1, provider_invoice_id = $2, provider_status = $3, \
             hosted_invoice_url = $4 WHERE id = $5",
        )
        .bind(provider)
        .bind(&r.id)
        .bind(&r.status)
        .bind(&r.hosted_invoice_url)
        .bind(invoice)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Step 5 here: the draft becomes finalized (or paid, if the provider says so already),
    /// with its audit and `invoice.finalized` events, in one transaction.
    async fn finalize_here(
        &self,
        inv: &Invoice,
        provider: Option<(&str, &RemoteInvoice)>,
        by: &Actor,
    ) -> Result<Invoice> {
        let mut c = self.change(&inv.organization_id).await?;
        let status = provider.map_or("finalized", |(_, r)| local_status(&r.status));
        let at = c.at;
        let n = sqlx::query(
            "UPDATE invoices SET status = $1, finalized_at = $2, \
             paid_at = CASE WHEN $1 = 'paid' THEN $2 ELSE paid_at END, \
             voided_at = CASE WHEN $1 = 'void' THEN $2 ELSE voided_at END, \
             provider = COALESCE($3, provider), provider_invoice_id = COALESCE($4, provider_invoice_id), \
             provider_status = COALESCE($5, provider_status), \
             hosted_invoice_url = COALESCE($6, hosted_invoice_url) \
             WHERE id = $7 AND status = 'draft'",
        )
        .bind(status)
        .bind(at)
        .bind(provider.map(|p| p.0))
        .bind(provider.map(|p| p.1.id.as_str()))
        .bind(provider.map(|p| p.1.status.as_str()))
        .bind(provider.and_then(|p| p.1.hosted_invoice_url.as_deref()))
        .bind(&inv.id)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if n == 1 {
            let data = json!({"id": inv.id, "period": inv.period, "total": inv.total,
                              "currency": inv.currency, "status": status,
                              "provider_invoice_id": provider.map(|p| p.1.id.clone())});
            c.audit(AuditEvent::new(
                "invoice.finalized",
                by,
                &inv.id,
                data.clone(),
            ))
            .await?;
            crate::events::emit(
                &mut c.tx,
                &format!("evt_{}_finalized", inv.id),
                Some(&inv.organization_id),
                "invoice.finalized",
                &data,
            )
            .await?;
        }
        c.commit().await?;
        self.invoice(&inv.organization_id, &inv.id).await
    }

    /// Close an organization's `period`: draft its invoice, send it through `provider` (when
    /// given) and finalize it. Safe to run again after any failure: see the module's steps.
    pub async fn close_period<P: BillingProvider>(
        &self,
        org: &str,
        period: &str,
        provider: Option<&P>,
        by: &Actor,
    ) -> Result<Closed> {
        let inv = self.draft(org, period, true).await?;
        if inv.status != "draft" {
            return Ok(Closed::AlreadyClosed(inv));
        }
        let sent = match provider.filter(|_| inv.total > 0) {
            Some(p) => self.send(&inv, p, by).await,
            // Nothing to send: closed here only.
            None => self.finalize_here(&inv, None, by).await,
        };
        // Let go of the hold, whatever happened (a finalized invoice needs none either).
        let released = sqlx::query("UPDATE invoices SET closing_until = NULL WHERE id = $1")
            .bind(&inv.id)
            .execute(&self.pool)
            .await;
        if let Err(e) = released {
            tracing::warn!(invoice = %inv.id, error = %e, "cannot release the close's hold; it lapses on its own");
        }
        Ok(Closed::Finalized(sent?))
    }

    /// Steps 2 to 5 of a close, through `p`.
    async fn send<P: BillingProvider>(&self, inv: &Invoice, p: &P, by: &Actor) -> Result<Invoice> {
        let org = inv.organization_id.as_str();
        let customer = match self.billing_customer(org).await? {
            Some((name, id)) if name == p.name() => id,
            _ => {
                let o = self.organization(org).await?;
                let id = p.create_customer(org, &o.name).await?;
                let mut conn = self.pool.acquire().await?;
                upsert_customer(&mut conn, org, p.name(), &id, now()).await?;
                id
            }
        };
        let found = match &inv.provider_invoice_id {
            Some(id) => Some(p.invoice(id).await?),
            None => p.find_invoice(&customer, &inv.id).await?,
        };
        let remote = match found {
            Some(r) => r,
            None => {
                let pending = p.pending_items(&customer, &inv.id).await?;
                for line in &inv.lines {
                    if line.provider_item_id.is_some() {
                        continue;
                    }
                    let item = match pending.get(&line.line) {
                        Some(id) => id.clone(),
                        None => p.create_item(&customer, inv, line).await?,
                    };
                    self.set_line_item(&inv.id, line.line, &item).await?;
                }
                p.create_invoice(&customer, inv).await?
            }
        };
        self.set_provider_invoice(&inv.id, p.name(), &remote)
            .await?;
        if remote.subtotal != inv.total {
            return Err(PlatformError::Conflict(format!(
                "{} invoice {} totals {} cents before tax, ours {} totals {}: it holds items that \
                 are not this period's usage (left pending on the customer?). Fix it at {}, then \
                 close again",
                p.name(),
                remote.id,
                remote.subtotal,
                inv.id,
                inv.total,
                p.name()
            )));
        }
        let remote = if remote.status == "draft" {
            p.finalize(&remote.id).await?
        } else {
            remote
        };
        self.finalize_here(inv, Some((p.name(), &remote)), by).await
    }

    /// A provider's word (its signed webhook) on one of its invoices: record its status and
    /// move ours from `finalized` to `paid`, `uncollectible` or `void` (from `uncollectible`
    /// to `paid` or `void`), with an event. Returns the invoice when its state changed.
    pub async fn provider_invoice_update(
        &self,
        provider: &str,
        remote_id: &str,
        remote_status: &str,
    ) -> Result<Option<Invoice>> {
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT id, organization_id, status FROM invoices WHERE provider = $1 AND provider_invoice_id = $2",
        )
        .bind(provider)
        .bind(remote_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, org, _)) = row else {
            return Ok(None);
        };
        // Deliveries come in any order and repeat: only a move forward is recorded (an
        // `invoice.created` that arrives after the invoice was paid changes nothing).
        let to = local_status(remote_status);
        if to == "finalized" {
            return Ok(None);
        }
        let mut c = self.change(&org).await?;
        let at = c.at;
        let moved = {
            sqlx::query(
                "UPDATE invoices SET status = $1, provider_status = $4, \
                 paid_at = CASE WHEN $1 = 'paid' THEN $2 ELSE paid_at END, \
                 voided_at = CASE WHEN $1 = 'void' THEN $2 ELSE voided_at END \
                 WHERE id = $3 AND (status = 'finalized' OR (status = 'uncollectible' AND $1 <> 'uncollectible'))",
            )
            .bind(to)
            .bind(at)
            .bind(&id)
            .bind(remote_status)
            .execute(&mut *c.tx)
            .await?
            .rows_affected()
        };
        if moved == 1 {
            let data = json!({"id": id, "status": to, "provider": provider,
                              "provider_invoice_id": remote_id});
            let kind = match to {
                "paid" => "invoice.paid",
                "void" => "invoice.void",
                _ => "invoice.uncollectible",
            };
            c.audit(AuditEvent::new(
                kind,
                &Actor::system(provider),
                &id,
                data.clone(),
            ))
            .await?;
            crate::events::emit(
                &mut c.tx,
                &format!("evt_{id}_{to}"),
                Some(&org),
                kind,
                &data,
            )
            .await?;
        }
        c.commit().await?;
        if moved == 1 {
            Ok(Some(self.invoice(&org, &id).await?))
        } else {
            Ok(None)
        }
    }
}

/// Record the organization's customer at a provider (replacing an earlier one).
async fn upsert_customer(
    conn: &mut sqlx::AnyConnection,
    org: &str,
    provider: &str,
    customer: &str,
    at: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO billing_customers (organization_id, provider, customer_id, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id) DO UPDATE \
         SET provider = excluded.provider, customer_id = excluded.customer_id",
    )
    .bind(org)
    .bind(provider)
    .bind(customer)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}

fn bounds(period: &str) -> Result<(i64, i64)> {
    crate::budgets::period_bounds(period).ok_or_else(|| PlatformError::Invalid {
        param: "period",
        message: format!("period must be YYYY-MM (a UTC month), not {period:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_add_up_to_the_rounded_total() {
        let c = PICO_PER_CENT;
        // 0.4 + 0.4 + 0.4 cents = 1.2 → 1 cent, to the first of the equal remainders.
        assert_eq!(allocate_cents(&[c * 4 / 10; 3]), (vec![1, 0, 0], 1));
        // 1.6 + 2.5 → 4.1 → 4: floors 1 + 2, the extra cent to the larger remainder (.6).
        assert_eq!(allocate_cents(&[c * 16 / 10, c * 25 / 10]), (vec![2, 2], 4));
        // half up on the total
        assert_eq!(allocate_cents(&[c / 2]), (vec![1], 1));
        assert_eq!(allocate_cents(&[c / 2 - 1]), (vec![0], 0));
        assert_eq!(allocate_cents(&[]), (vec![], 0));
        for n in 1..50i64 {
            let amounts: Vec<i64> = (0..n).map(|i| (i * 7_919_000_003) % (3 * c)).collect();
            let (cents, total) = allocate_cents(&amounts);
            assert_eq!(cents.iter().sum::<i64>(), total);
            for (a, x) in amounts.iter().zip(&cents) {
                assert!((x * c - a).abs() < c, "{a} pico became {x} cents");
            }
        }
    }

    #[test]
    fn decimal_cents() {
        assert_eq!(cents_decimal(0), "0.0000000000");
        assert_eq!(cents_decimal(1_234_567), "0.0001234567");
        assert_eq!(cents_decimal(25 * PICO_PER_CENT + 1), "25.0000000001");
    }
}
