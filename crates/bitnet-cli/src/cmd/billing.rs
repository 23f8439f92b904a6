//! `bitnet billing`: close a month into invoices (and send them through Stripe), list them, and
//! link an organization to its Stripe customer. Straight on the database, like `bitnet orgs`.

use super::platform::{DbArgs, block_on, open_store, pick_org};
use anyhow::{Context, Result, bail};
use bitnet_platform::audit::Actor;
use bitnet_platform::billing::{Closed, Invoice, cents_decimal};
use bitnet_platform::stripe::{Collect, Stripe};
use bitnet_platform::{Page, Store};

#[derive(Debug, clap::Args)]
pub struct BillingArgs {
    #[command(subcommand)]
    pub action: BillingAction,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Stripe's account and how invoices are collected.
#[derive(Debug, clap::Args)]
pub struct StripeArgs {
    /// Stripe secret key (`sk_live_...` / `sk_test_...`). Without one, invoices are closed
    /// here only (finalized in the database, sent nowhere).
    #[arg(long, env = "BITNET_STRIPE_API_KEY", hide_env_values = true)]
    pub stripe_api_key: Option<String>,
    /// Stripe's API address (a test emulator's, say).
    #[arg(
        long,
        env = "BITNET_STRIPE_API_BASE",
        default_value = "https://api.stripe.com"
    )]
    pub stripe_api_base: String,
    /// `charge`: finalize each invoice and charge the customer's default payment method now;
    /// `finalize`: finalize only, Stripe collects as the account is set up to.
    #[arg(long, default_value = "charge")]
    pub collect: Collect,
}

#[derive(Debug, clap::Subcommand)]
pub enum BillingAction {
    /// Close a month: draft each organization's invoice from its usage (lines per project,
    /// model and token type), send it to Stripe and finalize it. Run it again after any
    /// failure: it resumes, and never bills twice.
    ClosePeriod {
        /// The month, `YYYY-MM` (UTC); it must be over.
        #[arg(long)]
        period: String,
        /// Only this organization (id or name; default: every organization with usage in
        /// the month).
        #[arg(long = "org")]
        org: Option<String>,
        #[command(flatten)]
        stripe: StripeArgs,
    },
    /// List an organization's invoices.
    Invoices {
        #[arg(long = "org")]
        org: Option<String>,
    },
    /// Show one invoice with its lines.
    Show {
        invoice_id: String,
        #[arg(long = "org")]
        org: Option<String>,
    },
    /// Bill an organization through an existing Stripe customer (one that holds its payment
    /// method), instead of a new customer made at its first close.
    SetCustomer {
        #[arg(long = "org")]
        org: Option<String>,
        /// The Stripe customer id, `cus_...`.
        #[arg(long)]
        stripe_customer: String,
    },
}

fn print_invoice(inv: &Invoice) {
    println!(
        "{}  {}  {}  {} {}  ({} line(s){})",
        inv.id,
        inv.period,
        inv.status,
        format_cents(inv.total),
        inv.currency.to_uppercase(),
        inv.lines.len(),
        inv.provider_invoice_id
            .as_deref()
            .map(|s| format!(", Stripe {s}"))
            .unwrap_or_default()
    );
}

fn format_cents(c: i64) -> String {
    format!("{}.{:02}", c / 100, (c % 100).abs())
}

async fn close(
    store: &Store,
    orgs: Vec<String>,
    period: &str,
    stripe: &StripeArgs,
    json: bool,
) -> Result<()> {
    let provider = match stripe.stripe_api_key.as_deref().filter(|k| !k.is_empty()) {
        Some(key) => Some(Stripe::new(&stripe.stripe_api_base, key, stripe.collect)?),
        None => None,
    };
    if provider.is_none() && !json {
        eprintln!(
            "no Stripe key (--stripe-api-key or BITNET_STRIPE_API_KEY): invoices are closed here only"
        );
    }
    let mut failed = 0;
    let mut out = Vec::new();
    for org in orgs {
        match store
            .close_period(&org, period, provider.as_ref(), &Actor::cli())
            .await
        {
            Ok(c) => {
                if !json {
                    match &c {
                        Closed::Finalized(_) => eprint!("closed:         "),
                        Closed::AlreadyClosed(_) => eprint!("already closed: "),
                    }
                    print_invoice(c.invoice());
                }
                out.push(c.invoice().clone());
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {org}: {e}");
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if failed > 0 {
        bail!(
            "{failed} organization(s) not closed; run the same command again once fixed (it resumes)"
        );
    }
    Ok(())
}

pub fn billing(args: BillingArgs) -> Result<()> {
    let url = args.db.url()?;
    let json = args.db.json;
    block_on(async move {
        let store = open_store(&url).await?;
        match args.action {
            BillingAction::ClosePeriod {
                period,
                org,
                stripe,
            } => {
                if bitnet_platform::budgets::period_bounds(&period).is_none() {
                    bail!("--period must be a month as YYYY-MM, not {period:?}");
                }
                let orgs = match org {
                    Some(o) => vec![pick_org(&store, Some(&o)).await?.id],
                    None => store.billable_organizations(&period).await?,
                };
                if orgs.is_empty() && !json {
                    eprintln!("no organization has usage in {period}: nothing to close");
                }
                close(&store, orgs, &period, &stripe, json).await
            }
            BillingAction::Invoices { org } => {
                let org = pick_org(&store, org.as_deref()).await?;
                let all = store.invoices(&org.id, &Page::all()).await?.data;
                if json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else {
                    for inv in &all {
                        print_invoice(inv);
                    }
                }
                Ok(())
            }
            BillingAction::Show { invoice_id, org } => {
                let org = pick_org(&store, org.as_deref()).await?;
                let inv = store
                    .invoice(&org.id, &invoice_id)
                    .await
                    .with_context(|| format!("no invoice {invoice_id} in {}", org.name))?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&inv)?);
                } else {
                    print_invoice(&inv);
                    println!(
                        "{:>4}  {:<28}  {:<24}  {:<12}  {:>12}  {:>10}  EXACT CENTS",
                        "LINE", "PROJECT", "MODEL", "TOKENS", "COUNT", "AMOUNT"
                    );
                    for l in &inv.lines {
                        println!(
                            "{:>4}  {:<28}  {:<24}  {:<12}  {:>12}  {:>10}  {}",
                            l.line,
                            l.project_id.as_deref().unwrap_or("-"),
                            l.model,
                            l.token_type,
                            l.tokens,
                            format_cents(l.amount),
                            cents_decimal(l.amount_exact)
                        );
                    }
                }
                Ok(())
            }
            BillingAction::SetCustomer {
                org,
                stripe_customer,
            } => {
                let org = pick_org(&store, org.as_deref()).await?;
                store
                    .set_billing_customer(&org.id, "stripe", &stripe_customer, &Actor::cli())
                    .await?;
                eprintln!(
                    "{} is billed through Stripe customer {stripe_customer}",
                    org.name
                );
                Ok(())
            }
        }
    })
}
