//! Price plans: what a model's tokens cost, per 1M input, cached input and output tokens,
//! set by the operator. Plans are versioned by validity dates and never edited once they
//! apply: a new price is a new plan from its `valid_from` (now or later), and the plan it
//! replaces ends there. A usage row is costed when it settles, at the plan valid when its
//! request started, so a price change never rewrites the past.

use crate::Store;
use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now};
use serde::Serialize;

/// `price` (ours; OpenAI publishes prices but has no API for them). Amounts are microdollars
/// per 1M tokens (`1_250_000` is $1.25 per 1M).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Price {
    pub id: String,
    #[sqlx(skip)]
    pub object: &'static str,
    /// A served model's id, a registry model's name (any of its versions), or `*`.
    pub model: String,
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub currency: String,
    pub valid_from: i64,
    pub valid_until: Option<i64>,
    pub created_at: i64,
}

const COLS: &str =
    "id, model, input, cached_input, output, currency, valid_from, valid_until, created_at";

/// Every plan, to cost a batch of usage rows.
#[derive(Debug, Clone, Default)]
pub struct PriceBook(Vec<Price>);

impl PriceBook {
    /// The plan for `model` at unix second `at`: the model's own, else its registry name's
    /// (`NAME` of `NAME:VERSION`), else `*`'s.
    pub fn at(&self, model: &str, at: i64) -> Option<&Price> {
        let base = model.split_once(':').map_or(model, |(n, _)| n);
        [model, base, "*"].into_iter().find_map(|m| {
            self.0.iter().find(|p| {
                p.model == m && p.valid_from <= at && p.valid_until.is_none_or(|u| at < u)
            })
        })
    }
}

impl Store {
    /// Every plan, newest first within a model.
    pub async fn prices(&self) -> Result<Vec<Price>> {
        let rows: Vec<Price> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM prices ORDER BY model, valid_from DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|mut p| {
                p.object = "price";
                p
            })
            .collect())
    }

    pub async fn price_book(&self) -> Result<PriceBook> {
        Ok(PriceBook(self.prices().await?))
    }

    /// A new plan for `model` from `valid_from` (default: now; never in the past), ending the
    /// plan in force then. Amounts are microdollars per 1M tokens.
    pub async fn set_price(
        &self,
        model: &str,
        input: i64,
        cached_input: i64,
        output: i64,
        valid_from: Option<i64>,
    ) -> Result<Price> {
        let model = model.trim();
        if model.is_empty() || model.len() > 256 {
            return Err(PlatformError::invalid(
                "model",
                "model must be a model's name or `*`",
            ));
        }
        for (param, v) in [
            ("input", input),
            ("cached_input", cached_input),
            ("output", output),
        ] {
            if v < 0 {
                return Err(PlatformError::invalid(
                    param,
                    format!("{param} must not be negative"),
                ));
            }
        }
        let at = now();
        let from = valid_from.unwrap_or(at);
        if from < at {
            return Err(PlatformError::invalid(
                "valid_from",
                "a price starts now or later: the past is never repriced",
            ));
        }
        // Write first: on SQLite the transaction then holds the write lock from its start (a
        // read first would fail with SQLITE_BUSY if any other write landed in between, such
        // as an API key's `last_used_at`). A refusal below rolls this back.
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE prices SET valid_until = $1 WHERE model = $2 AND (valid_until IS NULL OR valid_until > $1)",
        )
        .bind(from)
        .bind(model)
        .execute(&mut *tx)
        .await?;
        let (later,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM prices WHERE model = $1 AND valid_from >= $2")
                .bind(model)
                .bind(from)
                .fetch_one(&mut *tx)
                .await?;
        if later > 0 {
            return Err(PlatformError::Conflict(format!(
                "`{model}` has a price starting at or after {from}; a new one must start later"
            )));
        }
        let p = Price {
            id: new_id("price_"),
            object: "price",
            model: model.to_string(),
            input,
            cached_input,
            output,
            currency: "usd".into(),
            valid_from: from,
            valid_until: None,
            created_at: at,
        };
        sqlx::query(&format!(
            "INSERT INTO prices ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&p.id)
        .bind(&p.model)
        .bind(p.input)
        .bind(p.cached_input)
        .bind(p.output)
        .bind(&p.currency)
        .bind(p.valid_from)
        .bind(p.valid_until)
        .bind(p.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(p)
    }
}
