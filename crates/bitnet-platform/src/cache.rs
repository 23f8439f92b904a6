//! The credential cache: a replica remembers which caller a key (or a signed-in user) is, so
//! the hot path of every request skips the database, and forgets it as soon as any replica
//! changes that organization.
//!
//! Only PostgreSQL, where replicas share a database, turns the cache on
//! ([`Store::start_credential_cache`]): every committed change to an organization sends
//! `NOTIFY bitnet_credentials, '<organization id>'` in its transaction, so the notification
//! leaves exactly when the change becomes visible, and every replica's listener drops that
//! organization's entries (`*` drops all). PostgreSQL delivers a notification within
//! milliseconds; the bound is one second.
//!
//! Four rules keep it from serving a stale caller:
//! - The replica that commits a change clears the organization from its own cache right after
//!   the commit, not when its notification comes back through its listener (which a loaded
//!   replica can hear after it has already served the next request).
//! - An entry read from the database before an invalidation is not stored after it: lookups
//!   take the cache's generation before they query and [`CredentialCache::put`] refuses an
//!   older one.
//! - While the listener is not connected (at start, or after PostgreSQL dropped it) the cache
//!   is empty and unused; it is cleared again when the listener reconnects, since changes may
//!   have been missed in between.
//! - Entries live at most [`TTL`], and the cache holds at most [`CAPACITY`] of them.

use crate::keys::Credential;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The channel committed changes are announced on.
pub const CHANNEL: &str = "bitnet_credentials";
/// How long an entry may be served without being read again.
pub const TTL: Duration = Duration::from_secs(30);
/// The most entries one replica keeps (a full cache is cleared).
pub const CAPACITY: usize = 100_000;

#[derive(Debug, Clone)]
struct Entry {
    cred: Credential,
    at: Instant,
    /// Seconds since the epoch the key's `last_used_at` was last written (API keys).
    last_used: Option<i64>,
}

#[derive(Debug, Default)]
pub struct CredentialCache {
    live: AtomicBool,
    generation: AtomicU64,
    entries: Mutex<HashMap<String, Entry>>,
}

impl CredentialCache {
    /// The generation a lookup saw before it read the database, or `None` when the cache is
    /// off.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.live
            .load(Ordering::Acquire)
            .then(|| self.generation.load(Ordering::Acquire))
    }

    /// A cached caller and when its key was last marked used.
    pub(crate) fn get(&self, k: &str) -> Option<(Credential, Option<i64>)> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.get(k)?;
        (e.at.elapsed() < TTL).then(|| (e.cred.clone(), e.last_used))
    }

    /// Remember a caller read from the database at `generation`, unless the organization
    /// changed since.
    pub(crate) fn put(&self, k: String, cred: Credential, last_used: Option<i64>, generation: u64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock: an invalidation bumps the generation under it too.
        if !self.live.load(Ordering::Acquire)
            || self.generation.load(Ordering::Acquire) != generation
        {
            return;
        }
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            k,
            Entry {
                cred,
                at: Instant::now(),
                last_used,
            },
        );
    }

    /// Note that a cached key's `last_used_at` was written at `t`.
    pub(crate) fn touched(&self, k: &str, t: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(k) {
            e.last_used = Some(t);
        }
    }

    /// Forget organization `org`'s callers (`*`: everyone's).
    pub fn invalidate(&self, org: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        if org == "*" {
            entries.clear();
        } else {
            entries.retain(|_, e| e.cred.organization_id.as_deref() != Some(org));
        }
    }

    pub(crate) fn set_live(&self, live: bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.clear();
        self.live.store(live, Ordering::Release);
    }

    /// Whether the cache is in use (its listener is connected).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// How many callers are cached.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store {
    /// Turn on the credential cache (PostgreSQL only; on SQLite this does nothing and every
    /// request reads the database file, which is fast and always current). Returns once the
    /// listener is connected; a task keeps it connected for the life of the process.
    pub async fn start_credential_cache(&self) -> crate::Result<()> {
        let Some(url) = self.postgres_url() else {
            return Ok(());
        };
        let listener = listen(url).await?;
        self.cache.set_live(true);
        let cache = self.cache.clone();
        let url = url.to_string();
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let l = match listener.as_mut() {
                    Some(l) => l,
                    None => match listen(&url).await {
                        Ok(l) => {
                            cache.set_live(true);
                            tracing::info!("credential cache: listener reconnected");
                            listener.insert(l)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "credential cache: cannot listen; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                match l.try_recv().await {
                    Ok(Some(n)) => cache.invalidate(n.payload()),
                    // The connection was lost: notifications may have been missed.
                    Ok(None) | Err(_) => {
                        cache.set_live(false);
                        tracing::warn!("credential cache: listener disconnected; cache off");
                        listener = None;
                    }
                }
            }
        });
        Ok(())
    }

    /// This replica's credential cache.
    pub fn credential_cache(&self) -> &CredentialCache {
        &self.cache
    }
}

async fn listen(url: &str) -> crate::Result<sqlx::postgres::PgListener> {
    let mut l = sqlx::postgres::PgListener::connect(url).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyKind;

    fn cred(org: &str) -> Credential {
        Credential {
            key_id: "key_1".into(),
            kind: KeyKind::Admin,
            organization_id: Some(org.into()),
            project_id: None,
            read_only: false,
            user_id: None,
            user_email: None,
            service_account_id: None,
            role: None,
        }
    }

    #[test]
    fn a_caller_read_before_an_invalidation_is_not_stored_after_it() {
        let c = CredentialCache::default();
        // Off: nothing is served or stored.
        assert_eq!(c.generation(), None);
        c.put("a".into(), cred("org_a"), None, 0);
        assert!(c.get("a").is_none());
        c.set_live(true);
        let g = c.generation().unwrap();
        // A lookup read the database at `g`; an invalidation lands before it stores.
        c.invalidate("org_a");
        c.put("a".into(), cred("org_a"), None, g);
        assert!(c.get("a").is_none(), "a stale caller was stored");
        let g = c.generation().unwrap();
        c.put("a".into(), cred("org_a"), None, g);
        c.put("b".into(), cred("org_b"), None, g);
        assert!(c.get("a").is_some());
        // One organization's change keeps the other's callers; `*` drops all.
        c.invalidate("org_b");
        assert!(c.get("a").is_some() && c.get("b").is_none());
        c.invalidate("*");
        assert!(c.is_empty());
        // A lost listener turns the cache off and empties it.
        c.put("a".into(), cred("org_a"), None, c.generation().unwrap());
        c.set_live(false);
        assert!(c.get("a").is_none() && c.is_empty());
    }
}
