//! The store: one set of queries over two real backends, SQLite (embedded, the default) and
//! PostgreSQL (shared by replicas), through sqlx's `Any` driver. Queries are written once in
//! the SQL both accept (`$1` parameters, `RETURNING`, `ON CONFLICT`); the schemas differ only
//! in column types and live in `migrations/{sqlite,postgres}`.

use crate::audit::{self, AuditEvent};
use crate::cache::CredentialCache;
use crate::error::{PlatformError, Result};
use crate::ids::now;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Transaction};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
    /// The URL, kept for PostgreSQL's listener (see [`crate::cache`]).
    url: String,
    pub(crate) cache: Arc<CredentialCache>,
    /// The master key, where this process was given one ([`crate::crypto`]).
    pub(crate) keys: Option<Arc<dyn crate::crypto::KeyProvider>>,
}

/// What a URL names, checked before anything connects.
pub fn backend_of(url: &str) -> Result<Backend> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(PlatformError::BadUrl(url.to_string()))
    }
}

impl Store {
    /// Open (creating an SQLite file if missing) the database at `url` and run the migrations.
    pub async fn open(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = backend_of(url)?;
        let given = url.to_string();
        let mut url = url.to_string();
        let mut memory = false;
        if backend == Backend::Sqlite {
            let rest = &url["sqlite:".len()..];
            memory = rest.contains(":memory:") || rest.contains("mode=memory");
            let path = rest.strip_prefix("//").unwrap_or(rest);
            let path = path.split('?').next().unwrap_or("");
            if !memory && !path.is_empty() {
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        PlatformError::Database(sqlx::Error::Configuration(
                            format!("cannot create {}: {e}", dir.display()).into(),
                        ))
                    })?;
                }
                if !url.contains("mode=") {
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str("mode=rwc");
                }
            }
        }
        let opts = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            // One connection for an in-memory database (each would be its own database).
            .max_connections(if memory { 1 } else { 8 })
            .acquire_timeout(Duration::from_secs(30))
            // A connection leaves the pool outside any transaction. One left inside (a rollback
            // lost to a cancelled call) would serve its next user from inside it: on SQLite,
            // reads from a snapshot taken before later commits (a revoked key still accepted)
            // and "commits" that only release a savepoint. The pool's test ping has already
            // run the commands queued before it (a dropped transaction's rollback), so a
            // transaction still open now is a leak: the connection is closed, not reused.
            .before_acquire(|conn, _| {
                Box::pin(async move {
                    if sqlx::Connection::is_in_transaction(conn) {
                        sqlx::Connection::ping(conn).await?;
                        if sqlx::Connection::is_in_transaction(conn) {
                            tracing::error!(
                                "a pooled database connection was left inside a transaction; \
                                 closing it"
                            );
                            return Ok(false);
                        }
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; the busy timeout makes a writer
                        // wait for another instead of failing; foreign keys are per connection.
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA busy_timeout = 10000",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA synchronous = NORMAL",
                        ] {
                            sqlx::Executor::execute(&mut *conn, pragma).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Self {
            pool,
            backend,
            url: given,
            cache: Arc::default(),
            keys: None,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn postgres_url(&self) -> Option<&str> {
        (self.backend == Backend::Postgres).then_some(self.url.as_str())
    }

    /// Begin a transaction that will write. On SQLite it takes the write lock at once (a write
    /// that changes nothing), waiting out the busy timeout if another connection holds it: a
    /// transaction that read first would instead fail with `SQLITE_BUSY` at its first write
    /// whenever any other write landed after its read (WAL's snapshot rule), however briefly.
    /// On PostgreSQL it is a plain `BEGIN`.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Sqlite {
            sqlx::query("UPDATE organizations SET audit_seq = audit_seq WHERE 0 = 1")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Begin a change to organization `org`: the organization's row is written first, which
    /// takes its lock (PostgreSQL) or the write lock (SQLite), so the organization's changes and
    /// their audit events are serialized and the hash chain has one order. `NotFound` if the
    /// organization does not exist.
    pub(crate) async fn change(&self, org: &str) -> Result<Change> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64, String)> = sqlx::query_as(
            "UPDATE organizations SET audit_seq = audit_seq WHERE id = $1 RETURNING audit_seq, audit_head",
        )
        .bind(org)
        .fetch_optional(&mut *tx)
        .await?;
        let (seq, head) = row.ok_or_else(|| PlatformError::not_found("organization", org))?;
        Ok(Change {
            tx,
            org: org.to_string(),
            seq,
            head,
            at: now(),
            backend: self.backend,
            cache: self.cache.clone(),
        })
    }
}

/// An open change to one organization: its statements and its audit events commit together.
#[derive(Debug)]
pub(crate) struct Change {
    pub tx: Transaction<'static, Any>,
    pub org: String,
    seq: i64,
    head: String,
    /// The change's time: the audit events' `effective_at` and the rows' timestamps.
    pub at: i64,
    backend: Backend,
    /// This replica's credential cache, cleared of the organization as soon as the change
    /// commits (the other replicas hear of it from PostgreSQL).
    cache: Arc<CredentialCache>,
}

impl Change {
    /// Append an event to the organization's audit chain, in this transaction.
    pub async fn audit(&mut self, event: AuditEvent) -> Result<()> {
        self.seq += 1;
        let row = audit::Row::chain(&self.org, self.seq, self.at, event, &self.head);
        row.insert(&mut self.tx).await?;
        // The outbox carries every audit event, in the same transaction.
        let object = serde_json::to_value(row.object()).unwrap_or_default();
        crate::events::emit(
            &mut self.tx,
            &format!("evt_{}", row.id),
            Some(&self.org),
            &format!("audit.{}", row.kind),
            &object,
        )
        .await?;
        self.head = row.hash;
        Ok(())
    }

    pub async fn commit(mut self) -> Result<()> {
        sqlx::query("UPDATE organizations SET audit_seq = $1, audit_head = $2 WHERE id = $3")
            .bind(self.seq)
            .bind(&self.head)
            .bind(&self.org)
            .execute(&mut *self.tx)
            .await?;
        // Every replica's credential cache forgets the organization's callers when this
        // commits (PostgreSQL delivers notifications at commit, and only then).
        if self.backend == Backend::Postgres {
            notify_credentials(&mut self.tx, &self.org).await?;
        }
        self.tx.commit().await?;
        // This replica forgets them now, not when its own notification comes back through the
        // listener: a request it serves right after the change must already see it.
        self.cache.invalidate(&self.org);
        Ok(())
    }
}

/// Tell every replica (on commit) that organization `org`'s credentials changed (`*`: any).
pub(crate) async fn notify_credentials(
    tx: &mut Transaction<'static, Any>,
    org: &str,
) -> Result<()> {
    sqlx::query("SELECT 1 FROM pg_notify($1, $2)")
        .bind(crate::cache::CHANNEL)
        .bind(org)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Actor;
    use crate::keys::KeyKind;
    use crate::testing::{TestDb, backends, block_on};

    /// Every pooled connection is left inside a transaction whose rollback was lost (the
    /// `Transaction` forgotten, as a cancelled call can leave it). A revoke made next must still
    /// commit, and the revoked key must be refused by this store and by a second one (another
    /// replica) at once.
    #[test]
    fn a_connection_left_inside_a_transaction_is_never_reused() {
        for backend in backends() {
            let dir = tempfile::tempdir().unwrap();
            let db = TestDb::new(backend, dir.path());
            block_on(async {
                let s = Store::open(&db.url).await.unwrap();
                let cli = Actor::cli();
                let org = s.create_organization("a", &cli).await.unwrap();
                let (key, secret) = s.create_admin_key(&org.id, "ops", &cli).await.unwrap();
                assert!(s.authenticate(&secret).await.unwrap().is_some());
                let mut held = Vec::new();
                for _ in 0..8 {
                    held.push(s.pool.acquire().await.unwrap());
                }
                for c in &mut held {
                    let mut tx = sqlx::Connection::begin(&mut **c).await.unwrap();
                    sqlx::query("SELECT COUNT(*) FROM api_keys")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    std::mem::forget(tx);
                }
                drop(held);
                s.revoke_key(&org.id, KeyKind::Admin, None, &key.id, &cli)
                    .await
                    .unwrap();
                assert!(
                    s.authenticate(&secret).await.unwrap().is_none(),
                    "{backend:?}"
                );
                let other = Store::open(&db.url).await.unwrap();
                assert!(
                    other.authenticate(&secret).await.unwrap().is_none(),
                    "{backend:?}: the revoke was not committed"
                );
            });
        }
    }

    /// The replica that makes a change refuses a revoked key at once, without waiting for its
    /// own notification to come back: here its cache is on but no listener runs, so nothing
    /// but the commit itself can clear it (a loaded replica's listener can lag the next request).
    #[test]
    fn the_replica_that_revokes_refuses_at_once_without_its_listener() {
        for backend in backends() {
            let dir = tempfile::tempdir().unwrap();
            let db = TestDb::new(backend, dir.path());
            block_on(async {
                let s = Store::open(&db.url).await.unwrap();
                s.cache.set_live(true);
                let cli = Actor::cli();
                let org = s.create_organization("a", &cli).await.unwrap();
                let (key, secret) = s.create_admin_key(&org.id, "ops", &cli).await.unwrap();
                let (_, other) = s.create_admin_key(&org.id, "other", &cli).await.unwrap();
                assert!(s.authenticate(&secret).await.unwrap().is_some());
                assert!(s.authenticate(&other).await.unwrap().is_some());
                assert_eq!(s.cache.len(), 2, "{backend:?}: both callers cached");
                s.revoke_key(&org.id, KeyKind::Admin, None, &key.id, &cli)
                    .await
                    .unwrap();
                assert!(
                    s.authenticate(&secret).await.unwrap().is_none(),
                    "{backend:?}: the revoked key still works on the replica that revoked it"
                );
                assert!(s.authenticate(&other).await.unwrap().is_some());
            });
        }
    }
}
