//! The metering API, in the shapes of OpenAI's Administration API: project rate limits
//! (`/v1/organization/projects/{project_id}/rate_limits`), completions usage
//! (`/v1/organization/usage/completions`) and costs (`/v1/organization/costs`), plus the
//! operator's price plans (`/v1/operator/prices`), which OpenAI has no API for.

use crate::AppState;
use crate::api::ApiJson;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::org::Params;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use bitnet_platform::prices::Price;
use bitnet_platform::ratelimits::{RateLimit, limit_model, model_of_rate_limit};
use bitnet_platform::usage::{Group, UsageGroup, UsageQuery};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use utoipa::ToSchema;

type Answer<T> = Result<Json<T>, ApiError>;

/// The models a project's rate limits list: those served from the command line, the
/// organization's registry models, and any with a limit set.
async fn limit_models(s: &AppState, org: &str, set: &[RateLimit]) -> Result<Vec<String>, ApiError> {
    let mut names: Vec<String> = s.models.iter().map(|m| m.id.clone()).collect();
    if s.registry.is_some() {
        names.extend(
            s.store
                .registry_models(org)
                .await?
                .into_iter()
                .map(|m| m.id),
        );
    }
    names.extend(set.iter().map(|l| l.model.clone()));
    names
        .iter_mut()
        .for_each(|n| *n = limit_model(n).to_string());
    names.sort();
    names.dedup();
    Ok(names)
}

/// `GET /v1/organization/projects/{project_id}/rate_limits`: one `project.rate_limit` per
/// model, `null` where no limit is set; `after` / `before` / `limit` page by id.
pub async fn list_rate_limits(
    State(s): State<AppState>,
    who: Caller,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q.as_deref())?;
    let org = who.org()?;
    let set = s.store.rate_limits(org, &project).await?;
    let mut all: Vec<RateLimit> = limit_models(&s, org, &set)
        .await?
        .into_iter()
        .map(|m| {
            set.iter()
                .find(|l| l.model == m)
                .cloned()
                .unwrap_or_else(|| RateLimit::new(&m, None, None))
        })
        .collect();
    let limit = match p.int("limit")? {
        None => 100,
        Some(l @ 1..=100) => l as usize,
        Some(l) => {
            return Err(ApiError::bad(
                "limit",
                format!("limit must be between 1 and 100, got {l}"),
            ));
        }
    };
    if let Some(a) = p.one("after") {
        all.retain(|l| l.id.as_str() > a);
    }
    if let Some(b) = p.one("before") {
        all.retain(|l| l.id.as_str() < b);
    }
    let has_more = all.len() > limit;
    all.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "first_id": all.first().map(|l| l.id.clone()),
        "last_id": all.last().map(|l| l.id.clone()),
        "data": all,
        "has_more": has_more,
    })))
}

/// The body of `POST .../rate_limits/{rate_limit_id}`: what to change (`null` lifts a limit).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitBody {
    #[serde(default, deserialize_with = "present")]
    pub max_requests_per_1_minute: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    pub max_tokens_per_1_minute: Option<Option<i64>>,
}

/// A field sent as `null` is `Some(None)`; one left out is `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// `POST /v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}`.
pub async fn modify_rate_limit(
    State(s): State<AppState>,
    who: Caller,
    Path((project, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<RateLimitBody>,
) -> Answer<RateLimit> {
    let org = who.org()?;
    let Some(model) = model_of_rate_limit(&id) else {
        return Err(ApiError::NotFound {
            message: format!("no rate limit `{id}`; their ids are rl-MODEL"),
            code: "not_found",
        });
    };
    let set = s.store.rate_limits(org, &project).await?;
    if !limit_models(&s, org, &set)
        .await?
        .iter()
        .any(|m| m == model)
    {
        return Err(ApiError::NotFound {
            message: format!("no rate limit `{id}`: no model `{model}` is served to this project"),
            code: "not_found",
        });
    }
    let now = set.iter().find(|l| l.model == model);
    let rpm = body
        .max_requests_per_1_minute
        .unwrap_or_else(|| now.and_then(|l| l.max_requests_per_1_minute));
    let tpm = body
        .max_tokens_per_1_minute
        .unwrap_or_else(|| now.and_then(|l| l.max_tokens_per_1_minute));
    Ok(Json(
        s.store
            .set_rate_limit(org, &project, model, rpm, tpm, &who.actor)
            .await?,
    ))
}

/// `GET /v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit`: a project key's
/// own limits (over every model).
pub async fn get_key_rate_limit(
    State(s): State<AppState>,
    who: Caller,
    Path((project, key)): Path<(String, String)>,
) -> Answer<bitnet_platform::ratelimits::KeyRateLimit> {
    Ok(Json(
        s.store.key_rate_limit(who.org()?, &project, &key).await?,
    ))
}

/// `POST .../api_keys/{key_id}/rate_limit`: set them (`null` lifts one).
pub async fn set_key_rate_limit(
    State(s): State<AppState>,
    who: Caller,
    Path((project, key)): Path<(String, String)>,
    ApiJson(body): ApiJson<RateLimitBody>,
) -> Answer<bitnet_platform::ratelimits::KeyRateLimit> {
    let org = who.org()?;
    let now = s.store.key_rate_limit(org, &project, &key).await?;
    let rpm = body
        .max_requests_per_1_minute
        .unwrap_or(now.max_requests_per_1_minute);
    let tpm = body
        .max_tokens_per_1_minute
        .unwrap_or(now.max_tokens_per_1_minute);
    Ok(Json(
        s.store
            .set_key_rate_limit(org, &project, &key, rpm, tpm, &who.actor)
            .await?,
    ))
}

/// `1m`, `1h`, `1d` in seconds, with OpenAI's default and largest page of buckets.
fn bucket_width(p: &Params, allowed: &[&str]) -> Result<(i64, usize, usize), ApiError> {
    let w = p.one("bucket_width").unwrap_or("1d");
    if !allowed.contains(&w) {
        return Err(ApiError::bad(
            "bucket_width",
            format!(
                "bucket_width must be one of {}, got `{w}`",
                allowed.join(", ")
            ),
        ));
    }
    Ok(match w {
        "1m" => (60, 60, 1440),
        "1h" => (3600, 24, 168),
        _ => (86_400, 7, 31),
    })
}

/// The buckets of one page: their starts, the end, and the next page's cursor.
struct Window {
    starts: Vec<i64>,
    end: i64,
    width: i64,
    next_page: Option<String>,
}

fn window(p: &Params, width: i64, default: usize, max: usize) -> Result<Window, ApiError> {
    let start = p
        .int("start_time")?
        .ok_or_else(|| ApiError::bad("start_time", "start_time (unix seconds) is required"))?;
    let end = match p.int("end_time")? {
        Some(e) => e,
        // Through the current second.
        None => bitnet_platform::ids::now() + 1,
    };
    if start < 0 || end <= start {
        return Err(ApiError::bad(
            "end_time",
            "end_time must be after start_time (unix seconds)",
        ));
    }
    let limit = match p.int("limit")? {
        None => default,
        Some(l) if l >= 1 && l as usize <= max => l as usize,
        Some(l) => {
            return Err(ApiError::bad(
                "limit",
                format!("limit must be between 1 and {max} for this bucket_width, got {l}"),
            ));
        }
    };
    // The cursor is the start of the page's first bucket.
    let first = match p.one("page") {
        None => start,
        Some(c) => c
            .strip_prefix("page_")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|&n| n >= start && n < end && (n - start) % width == 0)
            .ok_or_else(|| {
                ApiError::bad("page", "page is not a cursor from this query's next_page")
            })?,
    };
    let mut starts = Vec::new();
    let mut t = first;
    while t < end && starts.len() < limit {
        starts.push(t);
        t += width;
    }
    Ok(Window {
        starts,
        end,
        width,
        next_page: (t < end).then(|| format!("page_{t}")),
    })
}

fn groups(p: &Params, allowed: &[&str]) -> Result<Vec<String>, ApiError> {
    let g = p.many("group_by");
    for v in &g {
        if !allowed.contains(&v.as_str()) {
            return Err(ApiError::bad(
                "group_by",
                format!("group_by takes {}, got `{v}`", allowed.join(", ")),
            ));
        }
    }
    Ok(g)
}

async fn totals(
    s: &AppState,
    org: &str,
    w: &Window,
    p: &Params,
    group_by: Vec<Group>,
) -> Result<BTreeMap<i64, Vec<UsageGroup>>, ApiError> {
    let (Some(&first), Some(&last)) = (w.starts.first(), w.starts.last()) else {
        return Ok(BTreeMap::new());
    };
    let q = UsageQuery {
        start: first,
        end: (last + w.width).min(w.end),
        width: w.width,
        project_ids: p.many("project_ids"),
        user_ids: p.many("user_ids"),
        api_key_ids: p.many("api_key_ids"),
        models: p.many("models"),
        group_by,
    };
    let mut by: BTreeMap<i64, Vec<UsageGroup>> = BTreeMap::new();
    for g in s.store.usage_groups(org, &q).await? {
        by.entry(g.bucket).or_default().push(g);
    }
    Ok(by)
}

fn page(w: &Window, mut results: impl FnMut(i64) -> Vec<Value>) -> Value {
    let data: Vec<Value> = w
        .starts
        .iter()
        .map(|&t| {
            json!({
                "object": "bucket",
                "start_time": t,
                "end_time": (t + w.width).min(w.end),
                "results": results(t),
            })
        })
        .collect();
    json!({
        "object": "page",
        "data": data,
        "has_more": w.next_page.is_some(),
        "next_page": w.next_page,
    })
}

/// `GET /v1/organization/usage/completions`.
pub async fn usage_completions(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q.as_deref())?;
    let (width, default, max) = bucket_width(&p, &["1m", "1h", "1d"])?;
    let w = window(&p, width, default, max)?;
    let g = groups(
        &p,
        &["project_id", "user_id", "api_key_id", "model", "batch"],
    )?;
    if p.flag("batch")? {
        // No batch API here: every request is a direct one.
        return Ok(Json(page(&w, |_| Vec::new())));
    }
    let group_by: Vec<Group> = g
        .iter()
        .filter_map(|v| match v.as_str() {
            "project_id" => Some(Group::Project),
            "user_id" => Some(Group::User),
            "api_key_id" => Some(Group::ApiKey),
            "model" => Some(Group::Model),
            _ => None,
        })
        .collect();
    let by = totals(&s, who.org()?, &w, &p, group_by.clone()).await?;
    let has = |k: &str| g.iter().any(|v| v == k);
    Ok(Json(page(&w, |t| {
        by.get(&t)
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        json!({
                            "object": "organization.usage.completions.result",
                            "input_tokens": r.input_tokens,
                            "output_tokens": r.output_tokens,
                            "input_cached_tokens": r.cached_tokens,
                            "input_audio_tokens": 0,
                            "output_audio_tokens": 0,
                            "num_model_requests": r.requests,
                            "project_id": r.project_id,
                            "user_id": r.user_id,
                            "api_key_id": r.api_key_id,
                            "model": r.model,
                            "batch": has("batch").then_some(false),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    })))
}

/// Picodollars as OpenAI's amount (dollars as a number).
fn amount(pico: i64) -> Value {
    json!({"value": pico as f64 / 1e12, "currency": "usd"})
}

/// `GET /v1/organization/costs`: daily buckets, grouped by `project_id` and `line_item`
/// (`MODEL, input` / `MODEL, cached input` / `MODEL, output`).
pub async fn costs(
    State(s): State<AppState>,
    who: Caller,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let p = Params::parse(q.as_deref())?;
    let (width, _, _) = bucket_width(&p, &["1d"])?;
    let w = window(&p, width, 7, 180)?;
    let g = groups(&p, &["project_id", "line_item"])?;
    let (by_project, by_item) = (
        g.iter().any(|v| v == "project_id"),
        g.iter().any(|v| v == "line_item"),
    );
    let mut group_by = Vec::new();
    if by_project {
        group_by.push(Group::Project);
    }
    if by_item {
        group_by.push(Group::Model);
    }
    let by = totals(&s, who.org()?, &w, &p, group_by).await?;
    Ok(Json(page(&w, |t| {
        let mut out = Vec::new();
        for r in by.get(&t).into_iter().flatten() {
            if by_item {
                let model = r.model.as_deref().unwrap_or("-");
                for (kind, pico) in [
                    ("input", r.cost_input),
                    ("cached input", r.cost_cached),
                    ("output", r.cost_output),
                ] {
                    if pico > 0 {
                        out.push(json!({
                            "object": "organization.costs.result",
                            "amount": amount(pico),
                            "line_item": format!("{model}, {kind}"),
                            "project_id": r.project_id,
                        }));
                    }
                }
            } else {
                out.push(json!({
                    "object": "organization.costs.result",
                    "amount": amount(r.cost_input + r.cost_cached + r.cost_output),
                    "line_item": null,
                    "project_id": r.project_id,
                }));
            }
        }
        out
    })))
}

/// A price plan as the API shows it: dollars per 1M tokens.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceObject {
    pub object: &'static str,
    pub id: String,
    pub model: String,
    /// USD per 1M input tokens.
    pub input: f64,
    /// USD per 1M input tokens taken from the prefix cache.
    pub cached_input: f64,
    /// USD per 1M output tokens.
    pub output: f64,
    pub currency: String,
    pub valid_from: i64,
    pub valid_until: Option<i64>,
    pub created_at: i64,
}

impl From<Price> for PriceObject {
    fn from(p: Price) -> Self {
        let usd = |micro: i64| micro as f64 / 1e6;
        Self {
            object: "price",
            id: p.id,
            model: p.model,
            input: usd(p.input),
            cached_input: usd(p.cached_input),
            output: usd(p.output),
            currency: p.currency,
            valid_from: p.valid_from,
            valid_until: p.valid_until,
            created_at: p.created_at,
        }
    }
}

/// `POST /v1/operator/prices`: a new plan for a model (USD per 1M tokens, at most six
/// decimals), from `valid_from` (default now).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceBody {
    /// A served model's id, a registry model's name, or `*` for every other model.
    pub model: String,
    pub input: f64,
    /// Default: the input price.
    pub cached_input: Option<f64>,
    pub output: f64,
    pub valid_from: Option<i64>,
}

fn micro(param: &str, usd: f64) -> Result<i64, ApiError> {
    let m = (usd * 1e6).round();
    if !usd.is_finite() || usd < 0.0 || m > 1e15 || ((usd * 1e6) - m).abs() > 1e-6 * m.max(1.0) {
        return Err(ApiError::bad(
            param,
            format!("{param} must be dollars per 1M tokens, at least 0, with at most six decimals"),
        ));
    }
    Ok(m as i64)
}

pub async fn create_price(
    State(s): State<AppState>,
    ApiJson(b): ApiJson<PriceBody>,
) -> Answer<PriceObject> {
    let input = micro("input", b.input)?;
    let cached = micro("cached_input", b.cached_input.unwrap_or(b.input))?;
    let output = micro("output", b.output)?;
    Ok(Json(
        s.store
            .set_price(&b.model, input, cached, output, b.valid_from)
            .await?
            .into(),
    ))
}

pub async fn list_prices(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let data: Vec<PriceObject> = s
        .store
        .prices()
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

/// A budget as the API shows it: money as OpenAI's amounts (`{"value", "currency"}`).
fn budget_object(b: bitnet_platform::budgets::Budget) -> Value {
    json!({
        "object": b.object,
        "project_id": b.project_id,
        "monthly_limit": b.monthly_limit.map(amount),
        "thresholds": b.thresholds,
        "period": b.period,
        "spent": amount(b.spent),
        "reserved": amount(b.reserved),
    })
}

/// `POST .../budget`: the monthly hard cap in dollars (`null`: none) and the thresholds,
/// fractions of it whose passing emits a `budget.threshold_reached` event.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    pub monthly_limit: Option<f64>,
    #[serde(default)]
    pub thresholds: Vec<f64>,
}

fn cap_of(b: &BudgetBody) -> Result<Option<i64>, ApiError> {
    b.monthly_limit
        .map(|usd| {
            if !usd.is_finite() || !(0.0..=1e6).contains(&usd) {
                return Err(ApiError::bad(
                    "monthly_limit",
                    "monthly_limit must be dollars from 0 to 1,000,000",
                ));
            }
            Ok((usd * 1e12).round() as i64)
        })
        .transpose()
}

/// `GET /v1/organization/budget`.
pub async fn get_org_budget(
    State(s): State<AppState>,
    who: Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(budget_object(s.store.budget(who.org()?, None).await?)))
}

/// `POST /v1/organization/budget`.
pub async fn set_org_budget(
    State(s): State<AppState>,
    who: Caller,
    ApiJson(b): ApiJson<BudgetBody>,
) -> Result<Json<Value>, ApiError> {
    let cap = cap_of(&b)?;
    Ok(Json(budget_object(
        s.store
            .set_budget(who.org()?, None, cap, b.thresholds, &who.actor)
            .await?,
    )))
}

/// `GET /v1/organization/projects/{project_id}/budget`.
pub async fn get_project_budget(
    State(s): State<AppState>,
    who: Caller,
    Path(project): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(budget_object(
        s.store.budget(who.org()?, Some(&project)).await?,
    )))
}

/// `POST /v1/organization/projects/{project_id}/budget`.
pub async fn set_project_budget(
    State(s): State<AppState>,
    who: Caller,
    Path(project): Path<String>,
    ApiJson(b): ApiJson<BudgetBody>,
) -> Result<Json<Value>, ApiError> {
    let cap = cap_of(&b)?;
    Ok(Json(budget_object(
        s.store
            .set_budget(who.org()?, Some(&project), cap, b.thresholds, &who.actor)
            .await?,
    )))
}

macro_rules! doc {
    ($method:ident, $path:literal, $name:ident $(, $param:literal)*) => {
        #[utoipa::path($method, path = $path, tag = "organization",
            params($(($param = String, Path, description = "An id of the caller's organization")),*),
            responses((status = 200, description = "OpenAI's Administration API object"),
                      (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
                      (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
            security(("api_key" = [])))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

doc!(
    get,
    "/v1/organization/projects/{project_id}/rate_limits",
    doc_list_rate_limits,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/rate_limits/{rate_limit_id}",
    doc_modify_rate_limit,
    "project_id",
    "rate_limit_id"
);
doc!(
    get,
    "/v1/organization/usage/completions",
    doc_usage_completions
);
doc!(get, "/v1/organization/costs", doc_costs);
doc!(get, "/v1/operator/prices", doc_list_prices);
doc!(post, "/v1/operator/prices", doc_create_price);
doc!(get, "/v1/organization/budget", doc_get_org_budget);
doc!(post, "/v1/organization/budget", doc_set_org_budget);
doc!(
    get,
    "/v1/organization/projects/{project_id}/budget",
    doc_get_project_budget,
    "project_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/budget",
    doc_set_project_budget,
    "project_id"
);
doc!(
    get,
    "/v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit",
    doc_get_key_rate_limit,
    "project_id",
    "key_id"
);
doc!(
    post,
    "/v1/organization/projects/{project_id}/api_keys/{key_id}/rate_limit",
    doc_set_key_rate_limit,
    "project_id",
    "key_id"
);
