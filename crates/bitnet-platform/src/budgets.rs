//! Budgets: a monthly hard cap on spend per organization and per project, and thresholds
//! (fractions of the cap) that emit a `budget.threshold_reached` event when spend passes them.
//!
//! Spend is kept per organization and project per UTC month (`budget_periods`), settled from
//! usage rows as they are written, so it is the month's true spend whenever a budget is set.
//! A request under a capped budget reserves its worst case (prompt at the input price plus
//! `max_tokens` at the output price) before it runs, in the transaction of its reservation:
//! `spent + reserved + this <= cap`, or the request is refused (`insufficient_quota`). It
//! settles to what it used. So spend never passes the cap, across any number of replicas (the
//! period's row is locked while it is checked, on PostgreSQL; SQLite has one writer).

use crate::Store;
use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use serde::Serialize;
use serde_json::json;

/// A budget and its month so far. Money is in picodollars (1e-12 USD).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    pub object: &'static str,
    /// `None`: the whole organization's.
    pub project_id: Option<String>,
    /// The hard cap per month; `None`: no cap.
    pub monthly_limit: Option<i64>,
    /// Fractions of the cap (0 < t ≤ 1) whose passing emits an event.
    pub thresholds: Vec<f64>,
    /// `YYYY-MM` (UTC).
    pub period: String,
    pub spent: i64,
    pub reserved: i64,
}

/// The UTC month of unix second `t`: (year, month 1-12). Days to civil date after Howard
/// Hinnant's `civil_from_days` (public domain, howardhinnant.github.io/date_algorithms.html).
pub fn month_of(t: i64) -> (i64, u32) {
    let z = t.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m)
}

/// Unix second of the first instant of (year, month). Inverse of [`month_of`] at day 1
/// (Hinnant's `days_from_civil`).
pub fn month_start(year: i64, month: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400
}

/// `YYYY-MM` of unix second `t`.
pub fn period_of(t: i64) -> String {
    let (y, m) = month_of(t);
    format!("{y:04}-{m:02}")
}

/// (start, end) unix seconds of a `YYYY-MM` period.
pub fn period_bounds(period: &str) -> Option<(i64, i64)> {
    let (y, m) = period.split_once('-')?;
    let (y, m): (i64, u32) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) || y.to_string().len() != 4 {
        return None;
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    Some((month_start(y, m), month_start(ny, nm)))
}

/// A budget as metering reads it.
#[derive(Debug, Clone)]
pub(crate) struct BudgetRow {
    pub organization_id: String,
    /// '' for the organization's own.
    pub scope: String,
    pub limit: Option<i64>,
    pub thresholds: Vec<f64>,
}

/// Every budget (a small table: one row per organization or project that set one), read once
/// per metering batch.
pub(crate) async fn all(pool: &sqlx::AnyPool) -> Result<Vec<BudgetRow>> {
    let rows: Vec<(String, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT organization_id, project_id, monthly_limit, thresholds FROM budgets",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(o, p, l, t)| {
            let mut thresholds: Vec<f64> = serde_json::from_str(&t).unwrap_or_default();
            thresholds.sort_by(f64::total_cmp);
            BudgetRow {
                organization_id: o,
                scope: p,
                limit: l,
                thresholds,
            }
        })
        .collect())
}

/// One budget scope's check at reservation: its period row is made, then `reserved` grows by
/// `cost` only while the cap holds.
pub(crate) async fn reserve_in(
    conn: &mut sqlx::AnyConnection,
    org: &str,
    scope: &str,
    period: &str,
    cost: i64,
    cap: Option<i64>,
) -> Result<bool> {
    sqlx::query(
        "INSERT INTO budget_periods (organization_id, project_id, period, spent, reserved, alerted) \
         VALUES ($1, $2, $3, 0, 0, 0) ON CONFLICT (organization_id, project_id, period) DO NOTHING",
    )
    .bind(org)
    .bind(scope)
    .bind(period)
    .execute(&mut *conn)
    .await?;
    let n = sqlx::query(
        "UPDATE budget_periods SET reserved = reserved + $1 \
         WHERE organization_id = $2 AND project_id = $3 AND period = $4 \
         AND ($5 < 0 OR spent + reserved + $1 <= $5)",
    )
    .bind(cost)
    .bind(org)
    .bind(scope)
    .bind(period)
    .bind(cap.unwrap_or(-1))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Settle one request in one scope: its reservation goes, its cost is spent; thresholds newly
/// passed emit their events.
pub(crate) async fn settle_in(
    conn: &mut sqlx::AnyConnection,
    org: &str,
    scope: &str,
    period: &str,
    reserved: i64,
    cost: i64,
    budget: Option<&BudgetRow>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO budget_periods (organization_id, project_id, period, spent, reserved, alerted) \
         VALUES ($1, $2, $3, $4, 0, 0) ON CONFLICT (organization_id, project_id, period) \
         DO UPDATE SET spent = budget_periods.spent + $4, reserved = budget_periods.reserved - $5",
    )
    .bind(org)
    .bind(scope)
    .bind(period)
    .bind(cost)
    .bind(reserved)
    .execute(&mut *conn)
    .await?;
    let Some(BudgetRow {
        limit: Some(cap),
        thresholds: ts,
        ..
    }) = budget
    else {
        return Ok(());
    };
    let cap = *cap;
    if ts.is_empty() {
        return Ok(());
    }
    let (spent, alerted): (i64, i64) = sqlx::query_as(
        "SELECT spent, alerted FROM budget_periods WHERE organization_id = $1 AND project_id = $2 AND period = $3",
    )
    .bind(org)
    .bind(scope)
    .bind(period)
    .fetch_one(&mut *conn)
    .await?;
    let passed = ts
        .iter()
        .filter(|&&t| spent as f64 >= t * cap as f64)
        .count() as i64;
    if passed <= alerted {
        return Ok(());
    }
    sqlx::query(
        "UPDATE budget_periods SET alerted = $1 WHERE organization_id = $2 AND project_id = $3 AND period = $4",
    )
    .bind(passed)
    .bind(org)
    .bind(scope)
    .bind(period)
    .execute(&mut *conn)
    .await?;
    for (i, t) in ts
        .iter()
        .enumerate()
        .take(passed as usize)
        .skip(alerted as usize)
    {
        let project = (!scope.is_empty()).then_some(scope);
        crate::events::emit(
            conn,
            &format!(
                "evt_budget_{org}_{}_{period}_{i}",
                if scope.is_empty() { "org" } else { scope }
            ),
            Some(org),
            "budget.threshold_reached",
            &json!({"project_id": project, "period": period, "threshold": t,
                    "monthly_limit": cap, "spent": spent}),
        )
        .await?;
    }
    Ok(())
}

impl Store {
    /// The budget of `org` (`project` `None`) or of one of its projects, with this month's
    /// spend.
    pub async fn budget(&self, org: &str, project: Option<&str>) -> Result<Budget> {
        if let Some(p) = project {
            self.project(org, p).await?;
        }
        let scope = project.unwrap_or("");
        let row: Option<(Option<i64>, String)> = sqlx::query_as(
            "SELECT monthly_limit, thresholds FROM budgets WHERE organization_id = $1 AND project_id = $2",
        )
        .bind(org)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await?;
        let period = period_of(crate::ids::now());
        let spend: Option<(i64, i64)> = sqlx::query_as(
            "SELECT spent, reserved FROM budget_periods WHERE organization_id = $1 AND project_id = $2 AND period = $3",
        )
        .bind(org)
        .bind(scope)
        .bind(&period)
        .fetch_optional(&self.pool)
        .await?;
        let (limit, thresholds) = row.unwrap_or((None, "[]".into()));
        let (spent, reserved) = spend.unwrap_or((0, 0));
        Ok(Budget {
            object: if project.is_some() {
                "project.budget"
            } else {
                "organization.budget"
            },
            project_id: project.map(str::to_string),
            monthly_limit: limit,
            thresholds: serde_json::from_str(&thresholds).unwrap_or_default(),
            period,
            spent,
            reserved,
        })
    }

    /// Set the budget of `org` or of one of its projects: a monthly cap in picodollars (`None`:
    /// none) and thresholds, fractions of the cap in (0, 1].
    pub async fn set_budget(
        &self,
        org: &str,
        project: Option<&str>,
        monthly_limit: Option<i64>,
        thresholds: Vec<f64>,
        by: &Actor,
    ) -> Result<Budget> {
        if monthly_limit.is_some_and(|l| l < 0) {
            return Err(PlatformError::invalid(
                "monthly_limit",
                "monthly_limit must not be negative",
            ));
        }
        if thresholds.len() > 10 || thresholds.iter().any(|t| !(*t > 0.0 && *t <= 1.0)) {
            return Err(PlatformError::invalid(
                "thresholds",
                "thresholds are at most 10 fractions of the limit, each above 0 and at most 1",
            ));
        }
        if let Some(p) = project {
            self.active_project(org, p).await?;
        }
        let scope = project.unwrap_or("");
        let mut c = self.change(org).await?;
        sqlx::query("DELETE FROM budgets WHERE organization_id = $1 AND project_id = $2")
            .bind(org)
            .bind(scope)
            .execute(&mut *c.tx)
            .await?;
        sqlx::query(
            "INSERT INTO budgets (organization_id, project_id, monthly_limit, thresholds, updated_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(org)
        .bind(scope)
        .bind(monthly_limit)
        .bind(serde_json::to_string(&thresholds).unwrap_or_default())
        .bind(c.at)
        .execute(&mut *c.tx)
        .await?;
        let mut e = AuditEvent::new(
            "budget.updated",
            by,
            project.unwrap_or(org),
            json!({"id": project.unwrap_or(org), "changes_requested": {
                "monthly_limit": monthly_limit, "thresholds": thresholds}}),
        );
        if let Some(p) = project {
            e = e.in_project(p);
        }
        c.audit(e).await?;
        c.commit().await?;
        self.budget(org, project).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_their_bounds() {
        assert_eq!(month_of(0), (1970, 1));
        // 2024-02-29T23:59:59Z and the next second.
        assert_eq!(month_of(1_709_251_199), (2024, 2));
        assert_eq!(month_of(1_709_251_200), (2024, 3));
        assert_eq!(period_of(1_798_761_599), "2026-12");
        assert_eq!(period_of(1_798_761_600), "2027-01");
        assert_eq!(
            period_bounds("2024-02"),
            Some((1_706_745_600, 1_709_251_200))
        );
        assert_eq!(
            period_bounds("2026-12"),
            Some((1_796_083_200, 1_798_761_600))
        );
        assert_eq!(period_bounds("2026-13"), None);
        assert_eq!(period_bounds("x"), None);
    }
}
