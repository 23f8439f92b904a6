//! The store on both backends: organizations stay apart, keys authenticate until revoked, the
//! audit chain catches edits, deletions and reorderings, and an SQLite database from before
//! organizations migrates with its keys working.

use bitnet_platform::audit::{Actor, AuditQuery};
use bitnet_platform::keys::{KeyKind, ProjectKeyOwner};
use bitnet_platform::testing::{TestDb, backends};
use bitnet_platform::{Page, PlatformError, Store};

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn not_found<T: std::fmt::Debug>(r: Result<T, PlatformError>) -> bool {
    matches!(r, Err(PlatformError::NotFound { .. }))
}

#[test]
fn organizations_never_see_each_others_objects() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let a = s.create_organization("a", &cli).await.unwrap();
            let b = s.create_organization("b", &cli).await.unwrap();
            assert!(matches!(
                s.create_organization("a", &cli).await,
                Err(PlatformError::Conflict(_))
            ));
            let pa = s.create_project(&a.id, "alpha", &cli).await.unwrap();
            let sa = s
                .create_service_account(&a.id, &pa.id, "bot", &cli)
                .await
                .unwrap();
            let user = s
                .create_user(&a.id, "Ann@Example.com", "Ann", "owner", None, &cli)
                .await
                .unwrap();
            assert_eq!(user.email, "ann@example.com");
            s.add_project_user(&a.id, &pa.id, &user.id, "member", &cli)
                .await
                .unwrap();
            let (ka, _) = s.create_admin_key(&a.id, "ops", &cli).await.unwrap();

            // B asks for each of A's objects by id: not found, every time.
            assert!(not_found(s.project(&b.id, &pa.id).await));
            assert!(not_found(s.rename_project(&b.id, &pa.id, "x", &cli).await));
            assert!(not_found(s.archive_project(&b.id, &pa.id, &cli).await));
            assert!(not_found(
                s.service_account(&b.id, &pa.id, &sa.account.id).await
            ));
            assert!(not_found(
                s.delete_service_account(&b.id, &pa.id, &sa.account.id, &cli)
                    .await
            ));
            assert!(not_found(s.user(&b.id, &user.id).await));
            assert!(not_found(s.delete_user(&b.id, &user.id, &cli).await));
            assert!(not_found(s.admin_key(&b.id, &ka.id).await));
            assert!(not_found(
                s.revoke_key(&b.id, KeyKind::Admin, None, &ka.id, &cli)
                    .await
            ));
            assert!(not_found(
                s.project_key(&b.id, &pa.id, &sa.api_key.id).await
            ));
            assert!(not_found(
                s.project_users(&b.id, &pa.id, &Page::default()).await
            ));
            // B's lists hold none of A's rows.
            assert!(
                s.projects(&b.id, &Page::default(), true)
                    .await
                    .unwrap()
                    .data
                    .is_empty()
            );
            assert!(
                s.users(&b.id, &Page::default(), &[])
                    .await
                    .unwrap()
                    .data
                    .is_empty()
            );
            assert!(
                s.admin_keys(&b.id, &Page::default())
                    .await
                    .unwrap()
                    .data
                    .is_empty()
            );
            let b_log = s
                .audit_logs(&b.id, &AuditQuery::default(), &Page::default(), None)
                .await
                .unwrap();
            assert_eq!(b_log.data.len(), 1, "only B's own organization.created");
            // A's own view.
            assert_eq!(
                s.projects(&a.id, &Page::default(), false)
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
fn keys_authenticate_until_revoked_and_follow_their_project() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("acme", &cli).await.unwrap();
            let p = s.create_project(&org.id, "prod", &cli).await.unwrap();
            let sa = s
                .create_service_account(&org.id, &p.id, "app", &cli)
                .await
                .unwrap();
            let secret = sa.api_key.value.clone();
            assert!(
                secret.starts_with("sk-proj-") && secret.len() == 8 + 48,
                "{secret}"
            );
            let who = s.authenticate(&secret).await.unwrap().unwrap();
            assert_eq!(who.kind, KeyKind::Project);
            assert_eq!(who.project_id.as_deref(), Some(p.id.as_str()));
            assert_eq!(
                who.service_account_id.as_deref(),
                Some(sa.account.id.as_str())
            );
            assert!(s.authenticate("sk-proj-wrong").await.unwrap().is_none());

            let (admin, admin_secret) = s.create_admin_key(&org.id, "ops", &cli).await.unwrap();
            assert!(admin_secret.starts_with("sk-admin-"));
            assert_eq!(admin.value.as_deref(), Some(admin_secret.as_str()));
            let listed = s.admin_keys(&org.id, &Page::default()).await.unwrap();
            assert_eq!(listed.data.len(), 1);
            assert!(
                listed.data[0].value.is_none(),
                "a listing never shows a key"
            );
            assert!(!listed.data[0].redacted_value.contains(&admin_secret[12..]));

            // A read-only user key next to the service account's.
            let u = s
                .create_user(&org.id, "bo@example.com", "Bo", "reader", None, &cli)
                .await
                .unwrap();
            s.add_project_user(&org.id, &p.id, &u.id, "member", &cli)
                .await
                .unwrap();
            let (uk, user_secret) = s
                .create_project_key(
                    &org.id,
                    &p.id,
                    "laptop",
                    ProjectKeyOwner::User(&u.id),
                    true,
                    &cli,
                )
                .await
                .unwrap();
            let who = s.authenticate(&user_secret).await.unwrap().unwrap();
            assert!(who.read_only);
            assert_eq!(who.user_email.as_deref(), Some("bo@example.com"));
            assert_eq!(uk.owner["user"]["role"], "member");
            assert_eq!(
                s.project_keys(&org.id, &p.id, &Page::default())
                    .await
                    .unwrap()
                    .data
                    .len(),
                2
            );

            // Removing the user from the project revokes their key there.
            s.remove_project_user(&org.id, &p.id, &u.id, &cli)
                .await
                .unwrap();
            assert!(s.authenticate(&user_secret).await.unwrap().is_none());
            // Revoking works once; the second time there is no live key.
            s.revoke_key(&org.id, KeyKind::Admin, None, &admin.id, &cli)
                .await
                .unwrap();
            assert!(s.authenticate(&admin_secret).await.unwrap().is_none());
            assert!(not_found(
                s.revoke_key(&org.id, KeyKind::Admin, None, &admin.id, &cli)
                    .await
            ));
            // Archiving the project stops its keys; it can no longer change.
            s.archive_project(&org.id, &p.id, &cli).await.unwrap();
            assert!(s.authenticate(&secret).await.unwrap().is_none());
            assert!(matches!(
                s.create_service_account(&org.id, &p.id, "late", &cli).await,
                Err(PlatformError::Conflict(_))
            ));
            assert_eq!(s.project(&org.id, &p.id).await.unwrap().status, "archived");
            // Operator keys belong to no organization.
            let (_, op) = s.create_operator_key("root").await.unwrap();
            let who = s.authenticate(&op).await.unwrap().unwrap();
            assert_eq!((who.kind, who.organization_id), (KeyKind::Operator, None));
        });
    }
}

#[test]
fn lists_page_by_id_with_has_more() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("acme", &cli).await.unwrap();
            let mut ids = Vec::new();
            for i in 0..5 {
                ids.push(
                    s.create_project(&org.id, &format!("p{i}"), &cli)
                        .await
                        .unwrap()
                        .id,
                );
            }
            let first = s
                .projects(&org.id, &Page::new(Some(2), None).unwrap(), false)
                .await
                .unwrap();
            assert_eq!(
                first.data.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
                ids[..2]
            );
            assert!(first.has_more);
            assert_eq!(first.last_id.as_deref(), Some(ids[1].as_str()));
            let rest = s
                .projects(
                    &org.id,
                    &Page::new(Some(10), first.last_id.clone()).unwrap(),
                    false,
                )
                .await
                .unwrap();
            assert_eq!(rest.data.len(), 3);
            assert!(!rest.has_more);
            assert!(Page::new(Some(0), None).is_err() && Page::new(Some(101), None).is_err());
            // The audit log runs newest first, filtered by type.
            let q = AuditQuery {
                event_types: vec!["project.created".into()],
                ..Default::default()
            };
            let log = s
                .audit_logs(&org.id, &q, &Page::new(Some(2), None).unwrap(), None)
                .await
                .unwrap();
            assert_eq!(log.data.len(), 2);
            assert!(log.has_more);
            assert_eq!(log.data[0].details.1["id"], ids[4].as_str());
            let older = s
                .audit_logs(
                    &org.id,
                    &q,
                    &Page::new(Some(10), log.last_id.clone()).unwrap(),
                    None,
                )
                .await
                .unwrap();
            assert_eq!(older.data.len(), 3);
            assert_eq!(older.data[2].details.1["id"], ids[0].as_str());
        });
    }
}

/// Run one statement straight on the database, behind the store's back.
async fn exec(sql: &str, url: &str) {
    use sqlx::Connection;
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::Executor::execute(&mut c, sql).await.unwrap();
}

/// A store whose organization `acme` has five audit events (its creation, four projects), and
/// their ids in order.
async fn five_events(url: &str) -> (Store, String, Vec<String>) {
    let s = Store::open(url).await.unwrap();
    let cli = Actor::cli();
    let org = s.create_organization("acme", &cli).await.unwrap();
    for i in 0..4 {
        s.create_project(&org.id, &format!("p{i}"), &cli)
            .await
            .unwrap();
    }
    let ids: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM audit_logs WHERE organization_id = $1 ORDER BY seq")
            .bind(&org.id)
            .fetch_all(&sqlx::AnyPool::connect(url).await.unwrap())
            .await
            .unwrap();
    (s, org.id, ids.into_iter().map(|r| r.0).collect())
}

/// The first bad row `verify` names, if any.
async fn first_bad(s: &Store, org: Option<&str>) -> Option<String> {
    let reports = s.verify_audit(org).await.unwrap();
    reports.into_iter().find_map(|c| c.first_bad).map(|b| b.id)
}

#[test]
fn audit_verify_finds_the_first_tampered_row() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        // An edited row is named; another organization's chain is untouched.
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, _, ids) = five_events(&db.url).await;
            let other = s.create_organization("other", &Actor::cli()).await.unwrap();
            assert_eq!(first_bad(&s, None).await, None);
            let rows: u64 = s
                .verify_audit(None)
                .await
                .unwrap()
                .iter()
                .map(|r| r.rows)
                .sum();
            assert_eq!(rows, 6);
            exec(
                &format!(
                    "UPDATE audit_logs SET details = '{{}}' WHERE id = '{}'",
                    ids[2]
                ),
                &db.url,
            )
            .await;
            assert_eq!(first_bad(&s, None).await.as_deref(), Some(ids[2].as_str()));
            assert_eq!(first_bad(&s, Some(&other.id)).await, None);
        });
        // A deleted row: the next one no longer links.
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, _, ids) = five_events(&db.url).await;
            exec(
                &format!("DELETE FROM audit_logs WHERE id = '{}'", ids[1]),
                &db.url,
            )
            .await;
            assert_eq!(first_bad(&s, None).await.as_deref(), Some(ids[2].as_str()));
        });
        // Two rows swapped (their sequence numbers exchanged).
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, _, ids) = five_events(&db.url).await;
            for (id, seq) in [(&ids[1], -1), (&ids[2], 2), (&ids[1], 3)] {
                exec(
                    &format!("UPDATE audit_logs SET seq = {seq} WHERE id = '{id}'"),
                    &db.url,
                )
                .await;
            }
            assert_eq!(first_bad(&s, None).await.as_deref(), Some(ids[2].as_str()));
        });
        // The last row deleted: the organization's recorded head says so.
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, org, _) = five_events(&db.url).await;
            exec("DELETE FROM audit_logs WHERE seq = 5", &db.url).await;
            assert_eq!(first_bad(&s, Some(&org)).await.as_deref(), Some("(end)"));
        });
    }
}

/// A database made by the server before organizations (migrations 0001 and 0002, one admin
/// key, one user key, usage rows) opens with its keys working as admin and project keys.
#[test]
fn a_database_from_before_organizations_keeps_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    run(async {
        use sha2::{Digest, Sha256};
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
        let migrator = sqlx::migrate::Migrator::new(root.as_path()).await.unwrap();
        let old: Vec<_> = migrator
            .iter()
            .filter(|m| m.version <= 2)
            .cloned()
            .collect();
        let mut m2 = sqlx::migrate::Migrator::new(root.as_path()).await.unwrap();
        m2.migrations = std::borrow::Cow::Owned(old);
        m2.run_direct(&mut c).await.unwrap();
        for (id, key, role) in [
            ("k-admin", "bnk_adminadminadmin", "admin"),
            ("k-user", "bnk_useruseruser", "user"),
        ] {
            let h: [u8; 32] = Sha256::digest(key.as_bytes()).into();
            sqlx::query("INSERT INTO api_keys (id, tenant_id, name, prefix, hash, role, created_at) VALUES (?, 'default', ?, ?, ?, ?, 1)")
                .bind(id)
                .bind(role)
                .bind(&key[..12])
                .bind(h.as_slice())
                .bind(role)
                .execute(&mut c)
                .await
                .unwrap();
        }
        sqlx::query("INSERT INTO usage (request_id, tenant_id, key_id, model, endpoint, prompt_tokens, completion_tokens, latency_ms, status, created_at) VALUES ('r1', 'default', 'k-user', 'm', 'chat', 3, 4, 5, 200, 1)")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();

        let s = Store::open(&url).await.unwrap();
        let admin = s
            .authenticate("bnk_adminadminadmin")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(admin.kind, KeyKind::Admin);
        assert_eq!(admin.organization_id.as_deref(), Some("default"));
        let user = s.authenticate("bnk_useruseruser").await.unwrap().unwrap();
        assert_eq!(user.kind, KeyKind::Project);
        assert_eq!(user.project_id.as_deref(), Some("proj_default"));
        assert_eq!(s.usage_totals("default").await.unwrap(), (1, 3, 4));
        let row: (Option<String>,) =
            sqlx::query_as("SELECT project_id FROM usage WHERE request_id = 'r1'")
                .fetch_one(&sqlx::AnyPool::connect(&url).await.unwrap())
                .await
                .unwrap();
        assert_eq!(row.0.as_deref(), Some("proj_default"));
        // A new change in the migrated organization starts its audit chain.
        s.create_project("default", "next", &Actor::cli())
            .await
            .unwrap();
        assert!(
            s.verify_audit(None)
                .await
                .unwrap()
                .iter()
                .all(|r| r.first_bad.is_none())
        );
    });
}

/// A fresh SQLite database (0001 inserts a default tenant) starts with no organization.
#[test]
fn a_fresh_database_has_no_organizations() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            assert!(
                s.organizations(&Page::default())
                    .await
                    .unwrap()
                    .data
                    .is_empty()
            );
            // Opening again runs no migration twice.
            drop(s);
            Store::open(&db.url).await.unwrap();
        });
    }
}

/// Users sign in with a password; the access token names them until they are removed; a
/// refresh token is spent on use and its reuse revokes the family; rotated keys keep verifying.
#[test]
fn passwords_access_tokens_and_refresh_rotation() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("acme", &cli).await.unwrap();
            let invite = s
                .create_invite(&org.id, "ann@example.com", "owner", vec![], &cli)
                .await
                .unwrap();
            let secret = invite.token.clone().unwrap();
            assert!(matches!(
                s.accept_invite(&secret, "Ann", "short", &cli).await,
                Err(PlatformError::Invalid { .. })
            ));
            let t = s
                .accept_invite(&secret, "Ann", "correct horse battery", &cli)
                .await
                .unwrap();
            assert!(
                s.accept_invite(&secret, "Ann", "correct horse battery", &cli)
                    .await
                    .is_err(),
                "an invite works once"
            );
            let who = s
                .authenticate_token(&t.access_token)
                .await
                .unwrap()
                .expect("a valid token");
            assert_eq!(who.kind, KeyKind::Session);
            assert_eq!(who.role.as_deref(), Some("owner"));
            assert_eq!(
                s.invite(&org.id, &invite.id).await.unwrap().status,
                "accepted"
            );

            assert!(matches!(
                s.login(None, "ann@example.com", "wrong password!!", &cli)
                    .await,
                Err(PlatformError::Unauthorized(_))
            ));
            assert!(matches!(
                s.login(None, "nobody@example.com", "correct horse battery", &cli)
                    .await,
                Err(PlatformError::Unauthorized(_))
            ));
            let t2 = s
                .login(None, "ANN@example.com", "correct horse battery", &cli)
                .await
                .unwrap();
            // A tampered token is refused.
            let mut forged = t2.access_token.clone();
            forged.pop();
            forged.push(if t2.access_token.ends_with('A') {
                'B'
            } else {
                'A'
            });
            assert!(s.authenticate_token(&forged).await.unwrap().is_none());

            // Rotation: the old key still verifies its tokens; both are in the JWKS.
            let old_kid = s.jwks().await.unwrap()["keys"][0]["kid"]
                .as_str()
                .unwrap()
                .to_string();
            let new_kid = s.rotate_signing_key().await.unwrap();
            assert!(
                s.authenticate_token(&t2.access_token)
                    .await
                    .unwrap()
                    .is_some()
            );
            let jwks = s.jwks().await.unwrap();
            let kids: Vec<&str> = jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap())
                .collect();
            assert!(
                kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()),
                "{kids:?}"
            );

            // Refresh: spent on use; presenting it again revokes the family.
            let r1 = s.refresh(&t2.refresh_token, &cli).await.unwrap();
            let r2 = s.refresh(&r1.refresh_token, &cli).await.unwrap();
            assert!(
                s.refresh(&t2.refresh_token, &cli).await.is_err(),
                "a spent token is refused"
            );
            assert!(
                s.refresh(&r2.refresh_token, &cli).await.is_err(),
                "its family is revoked"
            );
            // Another session (the first login) is untouched.
            assert!(s.refresh(&t.refresh_token, &cli).await.is_ok());

            // Removing the user ends their access at once.
            s.delete_user(&org.id, &who.user_id.clone().unwrap(), &cli)
                .await
                .unwrap();
            assert!(
                s.authenticate_token(&t2.access_token)
                    .await
                    .unwrap()
                    .is_none()
            );
            // Logins and the reuse were audited.
            let log = s
                .audit_logs(
                    &org.id,
                    &AuditQuery {
                        event_types: vec!["login.failed".into(), "login.succeeded".into()],
                        ..Default::default()
                    },
                    &Page::default(),
                    None,
                )
                .await
                .unwrap();
            let kinds: Vec<&str> = log.data.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(
                kinds.iter().filter(|k| **k == "login.failed").count(),
                2,
                "{kinds:?}"
            );
            assert!(kinds.contains(&"login.succeeded"));
        });
    }
}

/// Poll `f` until it is true; how long it took, or `None` after `limit`.
async fn within<F, Fut>(limit: std::time::Duration, mut f: F) -> Option<std::time::Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if f().await {
            return Some(t.elapsed());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    None
}

/// Two replicas on one PostgreSQL database, each with its credential cache: a revocation,
/// a removed user and a revoked operator key reach the other replica in under a second, and
/// the cache really serves callers (a change behind the store's back, which notifies no one,
/// goes unseen until the next notification).
#[test]
fn credential_caches_forget_changes_on_every_replica_within_a_second() {
    let Some(backend) = backends()
        .into_iter()
        .find(|b| *b == bitnet_platform::Backend::Postgres)
    else {
        eprintln!("skipped: no PostgreSQL (BITNET_TEST_POSTGRES=skip)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(backend, dir.path());
    run(async {
        let one = Store::open(&db.url).await.unwrap();
        let two = Store::open(&db.url).await.unwrap();
        one.start_credential_cache().await.unwrap();
        two.start_credential_cache().await.unwrap();
        assert!(two.credential_cache().is_live());
        let cli = Actor::cli();
        let org = one.create_organization("acme", &cli).await.unwrap();
        let other = one.create_organization("other", &cli).await.unwrap();
        let p = one.create_project(&org.id, "p", &cli).await.unwrap();
        let sa = one
            .create_service_account(&org.id, &p.id, "bot", &cli)
            .await
            .unwrap();
        let key = sa.api_key.value.clone();
        let (admin, admin_secret) = one.create_admin_key(&org.id, "ops", &cli).await.unwrap();

        // Replica two caches both callers.
        assert!(two.authenticate(&key).await.unwrap().is_some());
        assert!(two.authenticate(&admin_secret).await.unwrap().is_some());
        assert_eq!(two.credential_cache().len(), 2);

        // Behind the store's back (no notification): the cached caller is still served.
        exec(
            &format!(
                "UPDATE api_keys SET revoked_at = 1 WHERE id = '{}'",
                admin.id
            ),
            &db.url,
        )
        .await;
        assert!(two.authenticate(&admin_secret).await.unwrap().is_some());
        // Another organization's change leaves acme's callers cached.
        one.create_project(&other.id, "q", &cli).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(two.authenticate(&admin_secret).await.unwrap().is_some());

        // Through replica one: the service account goes, and with it its key, on replica
        // two in under a second (and the directly revoked admin key with the same
        // notification).
        one.delete_service_account(&org.id, &p.id, &sa.account.id, &cli)
            .await
            .unwrap();
        let took = within(std::time::Duration::from_secs(5), || async {
            two.authenticate(&key).await.unwrap().is_none()
        })
        .await
        .expect("replica two still accepts a deleted service account's key after 5 s");
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        assert!(two.authenticate(&admin_secret).await.unwrap().is_none());

        // An operator key (no organization) revoked on one is refused by two.
        let (op, op_secret) = one.create_operator_key("ops").await.unwrap();
        assert!(two.authenticate(&op_secret).await.unwrap().is_some());
        one.revoke_any_key(&op.id).await.unwrap();
        let took = within(std::time::Duration::from_secs(5), || async {
            two.authenticate(&op_secret).await.unwrap().is_none()
        })
        .await
        .expect("replica two still accepts a revoked operator key after 5 s");
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    });
}
