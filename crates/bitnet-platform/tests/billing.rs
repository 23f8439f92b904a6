//! Billing on both backends, against a real Stripe API emulator (localstripe) on loopback:
//! a closed month's invoice has one line per project, model and token type whose cents add up
//! to the exact total; a close that crashes after any one of its Stripe calls and is run again
//! leaves exactly one Stripe invoice with exactly our items and total; a period still open or
//! with requests in flight is refused; a Stripe invoice holding items that are not ours is
//! never finalized; the provider's word moves an invoice to paid once.

use bitnet_platform::audit::Actor;
use bitnet_platform::billing::{
    BillingProvider, Closed, Invoice, InvoiceLine, PICO_PER_CENT, RemoteInvoice,
};
use bitnet_platform::budgets::{month_of, month_start, period_of};
use bitnet_platform::ids::now;
use bitnet_platform::stripe::{Collect, Stripe};
use bitnet_platform::testing::{Localstripe, TestDb, backends};
use bitnet_platform::usage::UsageRow;
use bitnet_platform::{PlatformError, Result, Store};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Stripe, with a crash right after its `at`-th call has taken effect there (the answer is
/// lost, as when the process dies before writing it down). New customers get the $0
/// subscription localstripe needs to make invoices.
struct CrashAfter<'a> {
    ls: &'a Localstripe,
    inner: &'a Stripe,
    at: usize,
    calls: AtomicUsize,
}

impl CrashAfter<'_> {
    fn tick<T>(&self, r: Result<T>) -> Result<T> {
        let v = r?;
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            return Err(PlatformError::Upstream(format!(
                "crash after call {}",
                self.at
            )));
        }
        Ok(v)
    }
}

impl BillingProvider for CrashAfter<'_> {
    fn name(&self) -> &'static str {
        "stripe"
    }
    async fn create_customer(&self, org: &str, name: &str) -> Result<String> {
        let id = self.inner.create_customer(org, name).await?;
        self.ls.zero_subscription(&id).await;
        self.tick(Ok(id))
    }
    async fn find_invoice(&self, c: &str, i: &str) -> Result<Option<RemoteInvoice>> {
        self.tick(self.inner.find_invoice(c, i).await)
    }
    async fn invoice(&self, id: &str) -> Result<RemoteInvoice> {
        self.tick(self.inner.invoice(id).await)
    }
    async fn pending_items(&self, c: &str, i: &str) -> Result<BTreeMap<i64, String>> {
        self.tick(self.inner.pending_items(c, i).await)
    }
    async fn create_item(&self, c: &str, i: &Invoice, l: &InvoiceLine) -> Result<String> {
        self.tick(self.inner.create_item(c, i, l).await)
    }
    async fn create_invoice(&self, c: &str, i: &Invoice) -> Result<RemoteInvoice> {
        self.tick(self.inner.create_invoice(c, i).await)
    }
    async fn finalize(&self, id: &str) -> Result<RemoteInvoice> {
        self.tick(self.inner.finalize(id).await)
    }
}

/// Last month (UTC): `YYYY-MM` and its first second.
fn last_month() -> (String, i64) {
    let (y, m) = month_of(now());
    let (y, m) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
    let start = month_start(y, m);
    (period_of(start), start)
}

// $3 per 1M input tokens, $1.50 cached, $15 output (microdollars per 1M).
const PRICE: (i64, i64, i64) = (3_000_000, 1_500_000, 15_000_000);

/// Usage of last month for `org`: three requests per model; returns the exact picodollars
/// each line must carry, keyed (model, token type).
async fn month_of_usage(
    s: &Store,
    org: &str,
    project: &str,
    at: i64,
) -> BTreeMap<(String, String), i64> {
    let mut want = BTreeMap::new();
    let mut rows = Vec::new();
    for (mi, model) in ["m-large", "m-small"].iter().enumerate() {
        for i in 0..3i64 {
            let (prompt, cached, completion) =
                (123_457 + 1000 * i + mi as i64, 10_000 + i, 54_321 + 7 * i);
            rows.push(UsageRow {
                request_id: format!("req_{org}_{model}_{i}"),
                client_request_id: None,
                organization_id: org.into(),
                project_id: Some(project.into()),
                key_id: None,
                user_id: None,
                service_account_id: None,
                model: model.to_string(),
                endpoint: "chat.completions".into(),
                prompt_tokens: prompt as u64,
                cached_tokens: cached as u64,
                completion_tokens: completion as u64,
                max_tokens: 0,
                latency_ms: 10,
                status: 200,
                created_at: at + 3600 * (i + 1),
            });
            for (kind, n, per) in [
                ("input", prompt - cached, PRICE.0),
                ("cached_input", cached, PRICE.1),
                ("output", completion, PRICE.2),
            ] {
                *want
                    .entry((model.to_string(), kind.to_string()))
                    .or_insert(0) += n * per;
            }
        }
    }
    s.settle(&rows).await.unwrap();
    want
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> Value {
    http.get(format!("{base}{path}"))
        .bearer_auth("sk_test_bitnet")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Stripe's invoices of `customer` made by a close (not the subscription's), and its items
/// still pending.
async fn stripe_state(http: &reqwest::Client, base: &str, customer: &str) -> (Vec<Value>, usize) {
    let inv = get(
        http,
        base,
        &format!("/v1/invoices?customer={customer}&limit=100"),
    )
    .await;
    let items = get(
        http,
        base,
        &format!("/v1/invoiceitems?customer={customer}&limit=100"),
    )
    .await;
    let invoices = inv["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["status"] != "void"
                && v["description"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("Usage for"))
        })
        .cloned()
        .collect();
    (invoices, items["data"].as_array().unwrap().len())
}

/// A store on `db` with a price plan valid since before last month (prices cannot be set in
/// the past through the API: this seeds history), and a raw pool on the same database.
async fn priced_store(db: &TestDb) -> (Store, sqlx::AnyPool) {
    let s = Store::open(&db.url).await.unwrap();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO prices (id, model, input, cached_input, output, currency, valid_from, valid_until, created_at) \
         VALUES ('price_hist', '*', $1, $2, $3, 'usd', 0, NULL, 0)",
    )
    .bind(PRICE.0)
    .bind(PRICE.1)
    .bind(PRICE.2)
    .execute(&pool)
    .await
    .unwrap();
    (s, pool)
}

#[test]
fn a_month_closes_into_one_exact_invoice_even_when_every_step_crashes_once() {
    let Some(ls) = Localstripe::start() else {
        return;
    };
    let stripe = Stripe::new(&ls.url, "sk_test_bitnet", Collect::Charge).unwrap();
    let http = reqwest::Client::new();
    let (period, start) = last_month();
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, _pool) = priced_store(&db).await;
            let cli = Actor::cli();

            // Crash after call 1, 2, ... of the close, then close again without crashing,
            // each time for a new organization, until a close makes fewer calls than `at`.
            let mut at = 1;
            loop {
                let org = s
                    .create_organization(&format!("o{at}"), &cli)
                    .await
                    .unwrap()
                    .id;
                let p = s.create_project(&org, "p", &cli).await.unwrap().id;
                let want = month_of_usage(&s, &org, &p, start).await;
                let crashing = CrashAfter {
                    ls: &ls,
                    inner: &stripe,
                    at,
                    calls: AtomicUsize::new(0),
                };
                let first = s.close_period(&org, &period, Some(&crashing), &cli).await;
                let crashed = first.is_err();
                if let Err(e) = &first {
                    assert!(e.to_string().contains("crash after call"), "{e}");
                    let d = s.invoice_for(&org, &period).await.unwrap().unwrap();
                    assert_eq!(d.status, "draft", "a crashed close leaves its draft");
                    let again = CrashAfter {
                        ls: &ls,
                        inner: &stripe,
                        at: 0,
                        calls: AtomicUsize::new(0),
                    };
                    let Closed::Finalized(_) = s
                        .close_period(&org, &period, Some(&again), &cli)
                        .await
                        .unwrap()
                    else {
                        panic!("the retried close finalizes");
                    };
                } else {
                    assert!(matches!(first.unwrap(), Closed::Finalized(_)));
                }
                let inv = s.invoice_for(&org, &period).await.unwrap().unwrap();

                // Our invoice: one line per model and token type, exact to the cent.
                assert_eq!(inv.status, "finalized", "no card on file: open at Stripe");
                assert_eq!(inv.lines.len(), want.len());
                let exact: i64 = want.values().sum();
                assert_eq!(inv.total_exact, exact);
                assert_eq!(inv.total, (exact + PICO_PER_CENT / 2) / PICO_PER_CENT);
                assert_eq!(inv.lines.iter().map(|l| l.amount).sum::<i64>(), inv.total);
                for l in &inv.lines {
                    let w = want[&(l.model.clone(), l.token_type.clone())];
                    assert_eq!(l.amount_exact, w);
                    assert!((l.amount * PICO_PER_CENT - w).abs() < PICO_PER_CENT);
                    assert_eq!(l.project_id.as_deref(), Some(p.as_str()));
                }

                // Stripe's: exactly one invoice of ours, with our lines and total, nothing
                // left pending (no item made twice).
                let (_, customer) = s.billing_customer(&org).await.unwrap().unwrap();
                let (invoices, pending) = stripe_state(&http, &ls.url, &customer).await;
                assert_eq!(invoices.len(), 1, "crash after call {at}: {invoices:?}");
                assert_eq!(
                    invoices[0]["id"].as_str(),
                    inv.provider_invoice_id.as_deref()
                );
                assert_eq!(invoices[0]["subtotal"].as_i64(), Some(inv.total));
                assert_eq!(invoices[0]["status"], "open");
                assert_eq!(
                    invoices[0]["description"],
                    format!("Usage for {period} ({})", inv.id)
                );
                let lines = get(
                    &http,
                    &ls.url,
                    &format!("/v1/invoices/{}/lines", invoices[0]["id"].as_str().unwrap()),
                )
                .await;
                let items: Vec<&Value> = lines["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|l| l["type"] == "invoiceitem")
                    .collect();
                assert_eq!(items.len(), inv.lines.len());
                let mut amounts: Vec<i64> = items
                    .iter()
                    .map(|l| l["amount"].as_i64().unwrap())
                    .collect();
                let mut ours: Vec<i64> = inv.lines.iter().map(|l| l.amount).collect();
                amounts.sort();
                ours.sort();
                assert_eq!(amounts, ours);
                assert_eq!(pending, 0);

                // Closing again does nothing.
                assert!(matches!(
                    s.close_period(&org, &period, Some(&stripe), &cli)
                        .await
                        .unwrap(),
                    Closed::AlreadyClosed(_)
                ));
                assert_eq!(stripe_state(&http, &ls.url, &customer).await.0.len(), 1);
                if !crashed {
                    // 1 customer + 1 search + 1 pending list + 6 items + 1 invoice + 1 finalize
                    assert_eq!(at, 12, "a close makes 11 Stripe calls");
                    break;
                }
                at += 1;
            }

            // Stripe's word: paid, once (a repeated delivery changes nothing).
            let org = s.organization("o1").await.unwrap().id;
            let inv = s.invoice_for(&org, &period).await.unwrap().unwrap();
            let remote = inv.provider_invoice_id.clone().unwrap();
            let paid = s
                .provider_invoice_update("stripe", &remote, "paid")
                .await
                .unwrap();
            assert_eq!(paid.unwrap().status, "paid");
            assert!(
                s.provider_invoice_update("stripe", &remote, "paid")
                    .await
                    .unwrap()
                    .is_none()
            );
            assert!(
                s.provider_invoice_update("stripe", &remote, "void")
                    .await
                    .unwrap()
                    .is_none(),
                "paid stays paid"
            );
            let events = s.events_of(&org).await.unwrap();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(
                kinds.iter().filter(|k| **k == "invoice.finalized").count(),
                1
            );
            assert_eq!(kinds.iter().filter(|k| **k == "invoice.paid").count(), 1);
            assert!(
                s.provider_invoice_update("stripe", "in_unknown", "paid")
                    .await
                    .unwrap()
                    .is_none()
            );

            // Another organization's invoice is not found.
            let other = s.organization("o2").await.unwrap().id;
            assert!(matches!(
                s.invoice(&other, &inv.id).await,
                Err(PlatformError::NotFound { .. })
            ));
            assert_eq!(
                s.invoices(&org, &bitnet_platform::Page::all())
                    .await
                    .unwrap()
                    .data
                    .len(),
                1
            );
        });
    }
}

#[test]
fn periods_open_or_in_flight_and_foreign_stripe_items_are_refused() {
    let Some(ls) = Localstripe::start() else {
        return;
    };
    let stripe = Stripe::new(&ls.url, "sk_test_bitnet", Collect::Charge).unwrap();
    let http = reqwest::Client::new();
    let (period, start) = last_month();
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, pool) = priced_store(&db).await;
            let cli = Actor::cli();
            let org = s.create_organization("a", &cli).await.unwrap().id;
            let p = s.create_project(&org, "p", &cli).await.unwrap().id;
            let want = month_of_usage(&s, &org, &p, start).await;

            // This month is not over; a malformed period is a clear error.
            let this = period_of(now());
            let e = s
                .close_period(&org, &this, Some(&stripe), &cli)
                .await
                .unwrap_err();
            assert!(
                matches!(e, PlatformError::Conflict(ref m) if m.contains("not over")),
                "{e}"
            );
            assert!(matches!(
                s.close_period(&org, "2026-13", Some(&stripe), &cli).await,
                Err(PlatformError::Invalid {
                    param: "period",
                    ..
                })
            ));

            // A request of last month still in flight holds the close back.
            let mut late = UsageRow {
                request_id: "req_late".into(),
                client_request_id: None,
                organization_id: org.clone(),
                project_id: Some(p.clone()),
                key_id: None,
                user_id: None,
                service_account_id: None,
                model: "m-large".into(),
                endpoint: "chat.completions".into(),
                prompt_tokens: 10,
                cached_tokens: 0,
                completion_tokens: 0,
                max_tokens: 10,
                latency_ms: 0,
                status: 200,
                created_at: start + 86_400,
            };
            s.reserve(&late, "r1", 600).await.unwrap();
            let e = s
                .close_period(&org, &period, Some(&stripe), &cli)
                .await
                .unwrap_err();
            assert!(
                matches!(e, PlatformError::Conflict(ref m) if m.contains("in flight")),
                "{e}"
            );
            late.completion_tokens = 5;
            s.settle(std::slice::from_ref(&late)).await.unwrap();

            // A Stripe customer that already holds a pending item that is not ours: the
            // invoice would bill it too, so the close stops before finalizing.
            let cus = ls.customer("a", &[]).await;
            http.post(format!("{}/v1/invoiceitems", ls.url))
                .bearer_auth("sk_test_bitnet")
                .form(&[
                    ("customer", cus.as_str()),
                    ("amount", "999"),
                    ("currency", "usd"),
                ])
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap();
            s.set_billing_customer(&org, "stripe", &cus, &cli)
                .await
                .unwrap();
            let e = s
                .close_period(&org, &period, Some(&stripe), &cli)
                .await
                .unwrap_err();
            assert!(
                matches!(e, PlatformError::Conflict(ref m) if m.contains("not this period's usage")),
                "{e}"
            );
            let inv = s.invoice_for(&org, &period).await.unwrap().unwrap();
            assert_eq!(inv.status, "draft");
            let (invoices, _) = stripe_state(&http, &ls.url, &cus).await;
            assert_eq!(invoices.len(), 1, "{invoices:?}");
            assert_eq!(
                invoices[0]["status"], "draft",
                "Stripe's invoice is not finalized"
            );
            assert_eq!(invoices[0]["subtotal"].as_i64(), Some(inv.total + 999));
            // The late request is on the draft: it settled before the lines were drafted.
            assert_eq!(
                inv.total_exact,
                want.values().sum::<i64>() + 10 * 3_000_000 + 5 * 15_000_000
            );

            // Two closes of one invoice at once: one sends it, the other is refused while it
            // holds the draft (or finds it closed); Stripe gets one invoice.
            let both = s.create_organization("c", &cli).await.unwrap().id;
            let bp = s.create_project(&both, "p", &cli).await.unwrap().id;
            month_of_usage(&s, &both, &bp, start).await;
            let cus = ls.customer("c", &[]).await;
            s.set_billing_customer(&both, "stripe", &cus, &cli)
                .await
                .unwrap();
            let (x, y) = tokio::join!(
                s.close_period(&both, &period, Some(&stripe), &cli),
                s.close_period(&both, &period, Some(&stripe), &cli)
            );
            let finalized = [&x, &y]
                .iter()
                .filter(|r| matches!(r, Ok(Closed::Finalized(_))))
                .count();
            assert_eq!(finalized, 1, "{x:?} {y:?}");
            for r in [&x, &y] {
                match r {
                    Ok(_) => {}
                    Err(PlatformError::Conflict(m)) => assert!(m.contains("another close"), "{m}"),
                    Err(e) => panic!("{e}"),
                }
            }
            let (invoices, pending) = stripe_state(&http, &ls.url, &cus).await;
            assert_eq!((invoices.len(), pending), (1, 0), "{invoices:?}");
            // Held by a close whose process died: refused until the hold lapses.
            let held = s.create_organization("d", &cli).await.unwrap().id;
            let hp = s.create_project(&held, "p", &cli).await.unwrap().id;
            month_of_usage(&s, &held, &hp, start).await;
            let d = s.draft_invoice(&held, &period).await.unwrap();
            sqlx::query("UPDATE invoices SET closing_until = $1 WHERE id = $2")
                .bind(now() + 60)
                .bind(&d.id)
                .execute(&pool)
                .await
                .unwrap();
            let e = s
                .close_period::<Stripe>(&held, &period, None, &cli)
                .await
                .unwrap_err();
            assert!(
                matches!(e, PlatformError::Conflict(ref m) if m.contains("another close")),
                "{e}"
            );
            sqlx::query("UPDATE invoices SET closing_until = $1 WHERE id = $2")
                .bind(now() - 1)
                .bind(&d.id)
                .execute(&pool)
                .await
                .unwrap();
            assert!(matches!(
                s.close_period::<Stripe>(&held, &period, None, &cli)
                    .await
                    .unwrap(),
                Closed::Finalized(_)
            ));

            // Without a provider, a month closes here only; an organization without usage
            // gets an empty invoice.
            let empty = s.create_organization("b", &cli).await.unwrap().id;
            let c = s
                .close_period::<Stripe>(&empty, &period, None, &cli)
                .await
                .unwrap();
            assert_eq!(
                (c.invoice().status.as_str(), c.invoice().total),
                ("finalized", 0)
            );
            assert!(c.invoice().provider.is_none());
            let mut billable = vec![org.clone(), both.clone(), held.clone()];
            billable.sort();
            assert_eq!(s.billable_organizations(&period).await.unwrap(), billable);
        });
    }
}
