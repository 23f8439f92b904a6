//! bitnet-platform: the platform's domain without HTTP. Organizations own projects, users,
//! service accounts, API keys, invites, an audit log and usage rows; the [`Store`] keeps them in
//! SQLite (embedded default) or PostgreSQL through the same queries, and every query that takes
//! an object's id takes its organization's id too, so another organization's object is simply
//! not found.
//!
//! ```no_run
//! # async fn demo() -> bitnet_platform::Result<()> {
//! use bitnet_platform::{Store, audit::Actor};
//! let store = Store::open("sqlite::memory:").await?;
//! let org = store.create_organization("acme", &Actor::cli()).await?;
//! let (key, secret) = store.create_admin_key(&org.id, "ops", &Actor::cli()).await?;
//! assert!(secret.starts_with("sk-admin-"));
//! let who = store.authenticate(&secret).await?.expect("a live key");
//! assert_eq!(who.organization_id.as_deref(), Some(org.id.as_str()));
//! # let _ = key; Ok(()) }
//! ```

pub mod audit;
pub mod billing;
pub mod budgets;
pub mod cache;
pub mod crypto;
pub mod error;
pub mod events;
pub mod files;
pub mod ids;
pub mod jobs;
pub mod keys;
pub mod orgs;
pub mod prices;
pub mod projects;
pub mod ratelimits;
pub mod registry;
pub mod sessions;
pub mod sso;
pub mod storage;
pub mod store;
pub mod stripe;
pub mod testing;
pub mod uploads;
pub mod usage;
pub mod users;

pub use error::{PlatformError, Result};
pub use store::{Backend, Store};

use serde::Serialize;

/// Objects that lists page through by id.
pub trait HasId {
    fn id(&self) -> &str;
}

/// OpenAI's list shape: `{"object": "list", "data": [...], "first_id", "last_id", "has_more"}`.
#[derive(Debug, Clone, Serialize)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

impl<T: HasId> List<T> {
    pub fn new(data: Vec<T>, has_more: bool) -> Self {
        Self {
            object: "list",
            first_id: data.first().map(|d| d.id().to_string()),
            last_id: data.last().map(|d| d.id().to_string()),
            data,
            has_more,
        }
    }
}

/// A page request: at most `limit` objects after the object `after`.
#[derive(Debug, Clone)]
pub struct Page {
    pub limit: usize,
    pub after: Option<String>,
}

impl Default for Page {
    fn default() -> Self {
        Self {
            limit: 20,
            after: None,
        }
    }
}

impl Page {
    /// OpenAI's bounds: `limit` from 1 to 100, 20 when omitted.
    pub fn new(limit: Option<i64>, after: Option<String>) -> Result<Self> {
        let limit = match limit {
            None => 20,
            Some(l @ 1..=100) => l as usize,
            Some(l) => {
                return Err(PlatformError::invalid(
                    "limit",
                    format!("limit must be between 1 and 100, got {l}"),
                ));
            }
        };
        Ok(Self { limit, after })
    }

    /// Everything (for the CLI).
    pub fn all() -> Self {
        Self {
            limit: 1_000_000,
            after: None,
        }
    }
}

/// `{"object": "<kind>.deleted", "id": ..., "deleted": true}`.
#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    pub object: &'static str,
    pub id: String,
    pub deleted: bool,
}

impl Deleted {
    pub fn new(object: &'static str, id: &str) -> Self {
        Self {
            object,
            id: id.to_string(),
            deleted: true,
        }
    }
}

/// A name a caller gave: trimmed, 1 to 200 characters.
pub(crate) fn check_name(param: &'static str, name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 || n.chars().any(char::is_control) {
        return Err(PlatformError::invalid(
            param,
            format!("{param} must be 1 to 200 printable characters"),
        ));
    }
    Ok(n.to_string())
}

/// Rows after the page's cursor, one extra to learn `has_more`: `base` selects with `$1` as
/// the organization and `extra` more parameters; this appends the cursor and the order.
pub(crate) async fn page_of<T>(
    store: &Store,
    base: &str,
    binds: &[&str],
    page: &Page,
) -> Result<List<T>>
where
    T: HasId + Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
{
    let mut sql = base.to_string();
    if page.after.is_some() {
        sql.push_str(&format!(" AND id > ${}", binds.len() + 1));
    }
    sql.push_str(&format!(
        " ORDER BY id LIMIT {}",
        page.limit.min(1_000_000) + 1
    ));
    let mut q = sqlx::query_as::<_, T>(&sql);
    for b in binds {
        q = q.bind(*b);
    }
    if let Some(a) = &page.after {
        q = q.bind(a.as_str());
    }
    let mut rows = q.fetch_all(&store.pool).await?;
    let has_more = rows.len() > page.limit;
    rows.truncate(page.limit);
    Ok(List::new(rows, has_more))
}
