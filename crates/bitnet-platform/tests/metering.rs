//! Metering on both backends: a reservation settles into exactly one usage row (by its
//! replica, or from its checkpoint once its replica stops), costed at the price valid when it
//! started; usage sums by bucket and group; rate limits are kept per project and model.

use bitnet_platform::audit::Actor;
use bitnet_platform::ids::now;
use bitnet_platform::testing::{TestDb, backends};
use bitnet_platform::usage::{Group, LOST_STATUS, UsageQuery, UsageRow};
use bitnet_platform::{PlatformError, Store};

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn row(org: &str, project: &str, id: &str, model: &str, at: i64) -> UsageRow {
    UsageRow {
        request_id: id.into(),
        client_request_id: None,
        organization_id: org.into(),
        project_id: Some(project.into()),
        key_id: Some("key_1".into()),
        user_id: None,
        service_account_id: None,
        model: model.into(),
        endpoint: "chat.completions".into(),
        prompt_tokens: 100,
        cached_tokens: 0,
        completion_tokens: 0,
        max_tokens: 50,
        latency_ms: 0,
        status: 499,
        created_at: at,
    }
}

/// (model, requests, completion tokens, cost) of an organization's usage, by model.
async fn rows(s: &Store, org: &str) -> Vec<(String, i64, i64, i64)> {
    let q = UsageQuery {
        start: 0,
        end: now() + 10,
        width: 10 * 365 * 86_400,
        group_by: vec![Group::Model],
        ..Default::default()
    };
    s.usage_groups(org, &q)
        .await
        .unwrap()
        .into_iter()
        .map(|g| {
            (
                g.model.unwrap(),
                g.requests,
                g.output_tokens,
                g.cost_input + g.cost_cached + g.cost_output,
            )
        })
        .collect()
}

#[test]
fn reservations_settle_once_by_their_replica_or_from_their_checkpoint() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("a", &cli).await.unwrap().id;
            let p = s.create_project(&org, "p", &cli).await.unwrap().id;
            // $1 per 1M input, $0.5 cached, $2 output; the registry name covers its versions.
            s.set_price("m", 1_000_000, 500_000, 2_000_000, None)
                .await
                .unwrap();
            let t = now();

            // Settled by its replica: one row, costed.
            let mut a = row(&org, &p, "req_a", "m:3", t);
            s.reserve(&a, "r1", 60).await.unwrap();
            a.completion_tokens = 10;
            a.cached_tokens = 40;
            a.status = 200;
            s.settle(std::slice::from_ref(&a)).await.unwrap();
            s.settle(std::slice::from_ref(&a)).await.unwrap();
            assert_eq!(s.reservations(&org).await.unwrap(), 0);
            // 60 input × $1/1M + 40 cached × $0.5/1M + 10 output × $2/1M, in picodollars.
            let cost = 60 * 1_000_000 + 40 * 500_000 + 10 * 2_000_000;
            assert_eq!(rows(&s, &org).await, vec![("m:3".into(), 1, 10, cost)]);

            // Its replica dies after sending 7 tokens: kept alive it stays, expired it settles
            // with the 7 it recorded, once.
            let b = row(&org, &p, "req_b", "m:3", t);
            s.reserve(&b, "r2", 1).await.unwrap();
            s.checkpoint("req_b", 7, 0).await.unwrap();
            assert_eq!(s.keep_reservations("r2", 60).await.unwrap(), 1);
            assert_eq!(s.settle_expired(100).await.unwrap(), 0);
            s.keep_reservations("r2", -1).await.unwrap();
            assert_eq!(s.settle_expired(100).await.unwrap(), 1);
            assert_eq!(s.settle_expired(100).await.unwrap(), 0);
            let lost: Vec<(i64, i64, i64)> = s
                .usage_groups(
                    &org,
                    &UsageQuery {
                        start: 0,
                        end: now() + 10,
                        width: 1,
                        group_by: vec![Group::Model],
                        ..Default::default()
                    },
                )
                .await
                .unwrap()
                .into_iter()
                .map(|g| (g.requests, g.output_tokens, g.input_tokens))
                .collect();
            assert_eq!(lost.iter().map(|l| l.0).sum::<i64>(), 2);
            assert_eq!(lost.iter().map(|l| l.1).sum::<i64>(), 17);
            let statuses: Vec<(i64,)> = status_of(&db.url, "req_b").await;
            assert_eq!(statuses, vec![(i64::from(LOST_STATUS),)]);

            // The replica was only slow: its own late settle replaces the expired row.
            let mut c = row(&org, &p, "req_c", "m:3", t);
            s.reserve(&c, "r3", -1).await.unwrap();
            s.checkpoint("req_c", 3, 0).await.unwrap();
            assert_eq!(s.settle_expired(100).await.unwrap(), 1);
            c.completion_tokens = 5;
            c.status = 200;
            s.settle(std::slice::from_ref(&c)).await.unwrap();
            assert_eq!(status_of(&db.url, "req_c").await, vec![(200,)]);
            let total: i64 = rows(&s, &org).await.iter().map(|r| r.2).sum();
            assert_eq!(total, 10 + 7 + 5);
        });
    }
}

/// A usage row's status, read with sqlx (the store has no row listing).
async fn status_of(url: &str, id: &str) -> Vec<(i64,)> {
    sqlx::any::install_default_drivers();
    use sqlx::Connection;
    let mut c = sqlx::AnyConnection::connect(url).await.unwrap();
    sqlx::query_as("SELECT status FROM usage WHERE request_id = $1")
        .bind(id)
        .fetch_all(&mut c)
        .await
        .unwrap()
}

#[test]
fn prices_never_reprice_the_past_and_usage_sums_by_bucket_and_group() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("a", &cli).await.unwrap().id;
            let other = s.create_organization("b", &cli).await.unwrap().id;
            let p1 = s.create_project(&org, "p1", &cli).await.unwrap().id;
            let p2 = s.create_project(&org, "p2", &cli).await.unwrap().id;
            let pb = s.create_project(&other, "pb", &cli).await.unwrap().id;
            assert!(matches!(
                s.set_price("m", 1, 1, 1, Some(now() - 100)).await,
                Err(PlatformError::Invalid { .. })
            ));
            let first = s
                .set_price("*", 1_000_000, 1_000_000, 1_000_000, None)
                .await
                .unwrap();
            let later = now() + 3600;
            let second = s
                .set_price("*", 3_000_000, 3_000_000, 3_000_000, Some(later))
                .await
                .unwrap();
            assert!(matches!(
                s.set_price("*", 1, 1, 1, Some(later)).await,
                Err(PlatformError::Conflict(_))
            ));
            let plans = s.prices().await.unwrap();
            let old = plans.iter().find(|p| p.id == first.id).unwrap();
            assert_eq!(old.valid_until, Some(later));
            assert_eq!(second.valid_until, None);

            // Rows an hour apart, in two projects and two models; one of another organization.
            let t0 = now() - now() % 3600 - 7200;
            let mut all = Vec::new();
            for (i, (proj, model, at)) in [
                (&p1, "x", t0 + 10),
                (&p1, "y", t0 + 20),
                (&p2, "x", t0 + 3600 + 5),
                (&p2, "x", t0 + 3600 + 6),
            ]
            .into_iter()
            .enumerate()
            {
                let mut r = row(&org, proj, &format!("r{i}"), model, at);
                r.completion_tokens = 1 + i as u64;
                r.status = 200;
                all.push(r);
            }
            let mut foreign = row(&other, &pb, "rb", "x", t0 + 10);
            foreign.completion_tokens = 1000;
            all.push(foreign);
            s.settle(&all).await.unwrap();
            let q = |group_by: Vec<Group>| UsageQuery {
                start: t0,
                end: t0 + 3 * 3600,
                width: 3600,
                group_by,
                ..Default::default()
            };
            let g = s.usage_groups(&org, &q(vec![])).await.unwrap();
            let buckets: Vec<(i64, i64, i64)> = g
                .iter()
                .map(|g| (g.bucket, g.requests, g.output_tokens))
                .collect();
            assert_eq!(buckets, vec![(t0, 2, 3), (t0 + 3600, 2, 7)]);
            let g = s
                .usage_groups(&org, &q(vec![Group::Project, Group::Model]))
                .await
                .unwrap();
            assert_eq!(g.len(), 3);
            assert!(
                g.iter()
                    .any(|g| g.project_id.as_deref() == Some(p2.as_str())
                        && g.model.as_deref() == Some("x")
                        && g.requests == 2)
            );
            // Filtered to one project; the other organization's row is never counted.
            let mut only = q(vec![]);
            only.project_ids = vec![p1.clone(), pb.clone()];
            let g = s.usage_groups(&org, &only).await.unwrap();
            assert_eq!(g.iter().map(|g| g.output_tokens).sum::<i64>(), 3);
            // These rows started before the first plan: no price applied, no cost.
            assert!(g.iter().all(|g| g.cost_input == 0));
        });
    }
}

#[test]
fn rate_limits_are_kept_per_project_and_model() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("a", &cli).await.unwrap().id;
            let other = s.create_organization("b", &cli).await.unwrap().id;
            let p = s.create_project(&org, "p", &cli).await.unwrap().id;
            let l = s
                .set_rate_limit(&org, &p, "m", Some(10), None, &cli)
                .await
                .unwrap();
            assert_eq!(l.id, "rl-m");
            assert_eq!(
                s.rate_limit_for(&p, "m:7")
                    .await
                    .unwrap()
                    .unwrap()
                    .max_requests_per_1_minute,
                Some(10)
            );
            assert!(s.rate_limit_for(&p, "n").await.unwrap().is_none());
            assert!(matches!(
                s.set_rate_limit(&other, &p, "m", Some(1), None, &cli).await,
                Err(PlatformError::NotFound { .. })
            ));
            assert!(matches!(
                s.set_rate_limit(&org, &p, "m", Some(0), None, &cli).await,
                Err(PlatformError::Invalid { .. })
            ));
            s.set_rate_limit(&org, &p, "m", None, None, &cli)
                .await
                .unwrap();
            assert!(s.rate_limits(&org, &p).await.unwrap().is_empty());
        });
    }
}

/// A capped budget refuses the request whose worst case would pass it, in any scope; settling
/// returns what was not used; thresholds emit one event each; the outbox holds every change.
#[test]
fn budgets_never_pass_their_cap_and_thresholds_and_changes_reach_the_outbox() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let s = Store::open(&db.url).await.unwrap();
            let cli = Actor::cli();
            let org = s.create_organization("a", &cli).await.unwrap().id;
            let p = s.create_project(&org, "p", &cli).await.unwrap().id;
            let q = s.create_project(&org, "q", &cli).await.unwrap().id;
            // $1 per 1M tokens in and out: a request of 100 prompt + 50 max costs at most
            // 150 µ$ = 150_000_000 picodollars.
            s.set_price("m", 1_000_000, 1_000_000, 1_000_000, None)
                .await
                .unwrap();
            let worst = 150_000_000;
            // Project p may spend 3.5 worst cases; the organization 5.
            s.set_budget(&org, Some(&p), Some(worst * 7 / 2), vec![0.5], &cli)
                .await
                .unwrap();
            s.set_budget(&org, None, Some(worst * 5), vec![0.5, 0.9], &cli)
                .await
                .unwrap();
            let t = now();
            let mut held = Vec::new();
            for i in 0..4 {
                let r = row(&org, &p, &format!("p{i}"), "m", t);
                let got = s.reserve(&r, "r1", 60).await;
                if i < 3 {
                    got.unwrap();
                    held.push(r);
                } else {
                    assert!(matches!(got, Err(PlatformError::Quota(_))), "{got:?}");
                }
            }
            let b = s.budget(&org, Some(&p)).await.unwrap();
            assert_eq!((b.spent, b.reserved), (0, 3 * worst));
            // Each used 100 in + 10 out: 110 µ$; the rest of the reservation comes back.
            for r in &mut held {
                r.completion_tokens = 10;
                r.status = 200;
            }
            s.settle(&held).await.unwrap();
            let b = s.budget(&org, Some(&p)).await.unwrap();
            assert_eq!((b.spent, b.reserved), (3 * 110_000_000, 0));
            // Room again in p (3.5 × 150 − 3 × 110 = 195 ≥ 150): one more fits, a second not.
            s.reserve(&row(&org, &p, "p4", "m", t), "r1", 60)
                .await
                .unwrap();
            assert!(matches!(
                s.reserve(&row(&org, &p, "p5", "m", t), "r1", 60).await,
                Err(PlatformError::Quota(_))
            ));
            // The organization's cap binds project q too: 5 × 150 − 330 − 150 = 270 µ$ left.
            s.reserve(&row(&org, &q, "q0", "m", t), "r1", 60)
                .await
                .unwrap();
            assert!(matches!(
                s.reserve(&row(&org, &q, "q1", "m", t), "r1", 60).await,
                Err(PlatformError::Quota(_))
            ));
            let whole = s.budget(&org, None).await.unwrap();
            assert!(whole.spent + whole.reserved <= worst * 5);

            let events = s.events_of(&org).await.unwrap();
            let kinds = |k: &str| events.iter().filter(|e| e.kind == k).count();
            // p passed half its cap (330 ≥ 262.5) once; the organization passed neither 50%
            // (375) nor 90%.
            assert_eq!(kinds("budget.threshold_reached"), 1, "{events:?}");
            assert_eq!(kinds("usage.recorded"), 3);
            assert_eq!(kinds("audit.project.created"), 2);
            assert_eq!(kinds("audit.budget.updated"), 2);
            let ids: std::collections::HashSet<&str> =
                events.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids.len(), events.len(), "event ids are unique");

            // A sink that fails leaves the batch unpublished; one that works takes it all.
            let pending = s.events_pending().await.unwrap();
            assert!(pending >= events.len() as i64);
            let failed = s
                .publish_events(1000, |_| async { Err("sink down".to_string()) })
                .await;
            assert!(failed.is_err());
            assert_eq!(s.events_pending().await.unwrap(), pending);
            let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let g = got.clone();
            let n = s
                .publish_events(1000, |batch| async move {
                    g.lock().unwrap().extend(batch);
                    Ok(())
                })
                .await
                .unwrap();
            assert_eq!(n as i64, pending);
            assert_eq!(s.events_pending().await.unwrap(), 0);
            let got = got.lock().unwrap();
            assert!(events.iter().all(|e| got.iter().any(|g| g.id == e.id)));
        });
    }
}
