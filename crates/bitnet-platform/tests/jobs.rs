//! The quantization job queue on both backends: idempotent creation, exclusive claims, leases
//! that run out and pass the job to another worker, the per-organization limit (exact under
//! concurrent claims from two stores), retries with backoff, attempts that run out, cancels.

use bitnet_platform::audit::Actor;
use bitnet_platform::crypto::MasterKey;
use bitnet_platform::jobs::{Beat, JobParams};
use bitnet_platform::storage::Storage;
use bitnet_platform::testing::{TestDb, backends};
use bitnet_platform::{PlatformError, Store};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn params() -> JobParams {
    JobParams {
        to: "tq2_0".into(),
        embeddings: None,
        name: Some("tiny".into()),
        suffix: None,
    }
}

/// An organization with a project and a model file in it: (org, project, file).
async fn model_file(s: &Store, storage: &Storage, name: &str) -> (String, String, String) {
    let cli = Actor::cli();
    let org = s.create_organization(name, &cli).await.unwrap();
    let p = s.create_project(&org.id, "p", &cli).await.unwrap();
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
        b"GGUF\x03\0\0\0 a model, as far as its first bytes go",
    ))]);
    let seg = s
        .write_segment(storage, &org.id, body, 1 << 20)
        .await
        .unwrap();
    let f = s
        .create_file(storage, &org.id, &p.id, "model", "m.gguf", &[seg], &cli)
        .await
        .unwrap();
    (org.id, p.id, f.id)
}

async fn open(url: &str, dir: &std::path::Path) -> (Store, Storage) {
    let store = Store::open(url)
        .await
        .unwrap()
        .with_master_key(Arc::new(MasterKey::from_bytes(&[5; 32])));
    let storage = Storage::open(&format!("file://{}", dir.join("st").display())).unwrap();
    (store, storage)
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn jobs_are_idempotent_claimed_once_and_taken_over_when_a_lease_runs_out() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, storage) = open(&db.url, dir.path()).await;
            let (org, p, file) = model_file(&s, &storage, "acme").await;
            let cli = Actor::cli();
            // Validation, then idempotency.
            let bad = JobParams {
                to: "q4_0".into(),
                ..params()
            };
            assert!(matches!(
                s.create_job(&org, &p, &file, &bad, None, &cli).await,
                Err(PlatformError::Invalid { .. })
            ));
            let j = s
                .create_job(&org, &p, &file, &params(), Some("k1"), &cli)
                .await
                .unwrap();
            assert_eq!(j.status, "queued");
            let again = s
                .create_job(&org, &p, &file, &params(), Some("k1"), &cli)
                .await
                .unwrap();
            assert_eq!(again.id, j.id);
            let other = JobParams {
                to: "i2_s".into(),
                ..params()
            };
            assert!(matches!(
                s.create_job(&org, &p, &file, &other, Some("k1"), &cli)
                    .await,
                Err(PlatformError::Conflict(_))
            ));
            assert_eq!(
                s.jobs(&org, &p, &Default::default())
                    .await
                    .unwrap()
                    .data
                    .len(),
                1
            );

            // Worker A claims it; B finds nothing while A's lease holds.
            let a = s.claim_job("worker-a", LONG, 4).await.unwrap().unwrap();
            assert_eq!((a.id.as_str(), a.attempts), (j.id.as_str(), 1));
            assert!(s.claim_job("worker-b", LONG, 4).await.unwrap().is_none());
            assert_eq!(
                s.heartbeat(&j.id, "worker-a", LONG).await.unwrap(),
                Beat::Continue
            );
            // A's last heartbeat left it a millisecond, and then A went silent (killed): once
            // the lease has run out, B takes the job over.
            assert_eq!(
                s.heartbeat(&j.id, "worker-a", Duration::from_millis(1))
                    .await
                    .unwrap(),
                Beat::Continue
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let b = s.claim_job("worker-b", LONG, 4).await.unwrap().unwrap();
            assert_eq!((b.id.as_str(), b.attempts), (j.id.as_str(), 2));
            // A comes back: its lease is gone, and it cannot finish the job.
            assert_eq!(
                s.heartbeat(&j.id, "worker-a", LONG).await.unwrap(),
                Beat::Lost
            );
            assert!(
                !s.job_succeeded(&j.id, "worker-a", &["file-x".into()])
                    .await
                    .unwrap()
            );
            assert!(
                s.job_succeeded(&j.id, "worker-b", &["file-y".into()])
                    .await
                    .unwrap()
            );
            let done = s.job(&org, &p, &j.id).await.unwrap();
            assert_eq!(done.status, "succeeded");
            assert_eq!(done.result_files, vec!["file-y".to_string()]);
            assert!(done.finished_at.is_some());
            let events = s.job_events(&org, &p, &j.id, None, 100).await.unwrap();
            let text: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
            assert!(
                text.iter()
                    .any(|m| m.contains("ran out") && m.contains("worker-b")),
                "{text:?}"
            );
            assert!(text.last().unwrap().contains("succeeded"), "{text:?}");
            // Another organization does not see the job.
            let (org2, p2, _) = model_file(&s, &storage, "other").await;
            assert!(matches!(
                s.job(&org2, &p2, &j.id).await,
                Err(PlatformError::NotFound { .. })
            ));
        });
    }
}

#[test]
fn the_per_organization_limit_retries_attempts_and_cancels() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, storage) = open(&db.url, dir.path()).await;
            let cli = Actor::cli();
            let (o1, p1, f1) = model_file(&s, &storage, "one").await;
            let (o2, p2, f2) = model_file(&s, &storage, "two").await;
            let j1 = s
                .create_job(&o1, &p1, &f1, &params(), None, &cli)
                .await
                .unwrap();
            let j2 = s
                .create_job(&o1, &p1, &f1, &params(), None, &cli)
                .await
                .unwrap();
            let j3 = s
                .create_job(&o2, &p2, &f2, &params(), None, &cli)
                .await
                .unwrap();
            // One at a time per organization: the second claim skips o1's second job.
            let c1 = s.claim_job("w1", LONG, 1).await.unwrap().unwrap();
            let c2 = s.claim_job("w2", LONG, 1).await.unwrap().unwrap();
            assert_eq!(
                (c1.id.as_str(), c2.id.as_str()),
                (j1.id.as_str(), j3.id.as_str())
            );
            assert!(s.claim_job("w3", LONG, 1).await.unwrap().is_none());

            // A failure that may pass: queued again, not before its backoff.
            assert!(
                s.job_failed(&j1.id, "w1", "io", "disk hiccup", true)
                    .await
                    .unwrap()
            );
            assert_eq!(s.job(&o1, &p1, &j1.id).await.unwrap().status, "queued");
            // o1 has a free slot now: its other job runs; the retried one waits its backoff.
            let c3 = s.claim_job("w3", LONG, 2).await.unwrap().unwrap();
            assert_eq!(c3.id, j2.id);
            assert!(s.claim_job("w4", LONG, 2).await.unwrap().is_none());
            tokio::time::sleep(bitnet_platform::jobs::backoff(1) + Duration::from_millis(200))
                .await;
            let again = s.claim_job("w4", LONG, 2).await.unwrap().unwrap();
            assert_eq!((again.id.as_str(), again.attempts), (j1.id.as_str(), 2));
            // Bad input: failed for good, with the error object.
            assert!(
                s.job_failed(&j1.id, "w4", "invalid_model", "no config.json", false)
                    .await
                    .unwrap()
            );
            let failed = s.job(&o1, &p1, &j1.id).await.unwrap();
            assert_eq!(failed.status, "failed");
            assert_eq!(failed.error.as_ref().unwrap()["message"], "no config.json");

            // A claimed job checks its file first, then runs (only its own worker moves it).
            assert_eq!(
                s.job(&o1, &p1, &j2.id).await.unwrap().status,
                "validating_files"
            );
            assert!(!s.job_running(&j2.id, "someone-else").await.unwrap());
            assert!(s.job_running(&j2.id, "w3").await.unwrap());
            // Cancel a running job: its worker learns it at the next heartbeat.
            let c = s.cancel_job(&o1, &p1, &j2.id, &cli).await.unwrap();
            assert_eq!(c.status, "running");
            assert_eq!(s.heartbeat(&j2.id, "w3", LONG).await.unwrap(), Beat::Cancel);
            assert!(s.job_cancelled(&j2.id, "w3").await.unwrap());
            assert_eq!(s.job(&o1, &p1, &j2.id).await.unwrap().status, "cancelled");
            assert!(matches!(
                s.cancel_job(&o1, &p1, &j2.id, &cli).await,
                Err(PlatformError::Conflict(_))
            ));
            // A queued job is cancelled at once and never claimed.
            let j4 = s
                .create_job(&o2, &p2, &f2, &params(), None, &cli)
                .await
                .unwrap();
            assert_eq!(
                s.cancel_job(&o2, &p2, &j4.id, &cli).await.unwrap().status,
                "cancelled"
            );
            assert!(s.job_succeeded(&j3.id, "w2", &[]).await.unwrap());
            assert!(s.claim_job("w5", LONG, 2).await.unwrap().is_none());

            // A job whose workers keep dying fails once its attempts are spent.
            let j5 = s
                .create_job(&o2, &p2, &f2, &params(), None, &cli)
                .await
                .unwrap();
            let short = Duration::from_millis(100);
            for attempt in 1..=3 {
                let c = s.claim_job("dying", short, 2).await.unwrap().unwrap();
                assert_eq!((c.id.as_str(), c.attempts), (j5.id.as_str(), attempt));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert!(s.claim_job("dying", short, 2).await.unwrap().is_none());
            let lost = s.job(&o2, &p2, &j5.id).await.unwrap();
            assert_eq!(lost.status, "failed");
            assert_eq!(lost.error.unwrap()["code"], "worker_lost");
        });
    }
}

/// Two stores (two workers' processes) claim at once, many times: the organization's limit
/// holds exactly.
#[test]
fn concurrent_claims_respect_the_limit_exactly() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, storage) = open(&db.url, dir.path()).await;
            let (s2, _) = open(&db.url, dir.path()).await;
            let cli = Actor::cli();
            let (o, p, f) = model_file(&s, &storage, "busy").await;
            for _ in 0..12 {
                s.create_job(&o, &p, &f, &params(), None, &cli)
                    .await
                    .unwrap();
            }
            let mut tasks = Vec::new();
            for i in 0..16 {
                let st = if i % 2 == 0 { s.clone() } else { s2.clone() };
                tasks.push(tokio::spawn(async move {
                    st.claim_job(&format!("w{i}"), LONG, 3)
                        .await
                        .unwrap()
                        .is_some()
                }));
            }
            let mut claimed = 0;
            for t in tasks {
                claimed += t.await.unwrap() as usize;
            }
            assert_eq!(claimed, 3);
        });
    }
}

/// A finished job's result becomes a file and a registry version in one transaction, only while
/// the job is the worker's; versions, aliases, references, deletion rules and sharing.
#[test]
fn finished_jobs_become_registry_versions_with_aliases() {
    use bitnet_platform::registry::NewVersion;
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        run(async {
            let (s, storage) = open(&db.url, dir.path()).await;
            let (org, p, file) = model_file(&s, &storage, "acme").await;
            let cli = Actor::cli();
            let nv = |job: &str| NewVersion {
                name: "tiny".into(),
                format: "tq2_0".into(),
                architecture: "bitnet-25".into(),
                parameters: 1234,
                source_file_id: Some(file.clone()),
                job_id: Some(job.to_string()),
                report: serde_json::json!({"cosine": 0.9}),
            };
            let result = |bytes: &'static [u8]| {
                futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(bytes))])
            };
            let mut made = Vec::new();
            for (i, key) in ["one", "two"].into_iter().enumerate() {
                let j = s
                    .create_job(&org, &p, &file, &params(), Some(key), &cli)
                    .await
                    .unwrap();
                let claimed = s.claim_job("w1", LONG, 4).await.unwrap().unwrap();
                assert_eq!(claimed.id, j.id);
                let seg = s
                    .write_segment_at(
                        &storage,
                        &org,
                        &format!("orgs/{org}/jobs/{}/attempt-1.gguf", j.id),
                        result(b"GGUF\x03\0\0\0 result"),
                        1 << 20,
                    )
                    .await
                    .unwrap();
                // Another worker cannot complete it; nothing is made.
                assert!(
                    s.job_completed(&j.id, "w2", &seg, "tiny.gguf", &nv(&j.id))
                        .await
                        .unwrap()
                        .is_none()
                );
                assert!(
                    s.resolve_model(&org, &format!("tiny:{}", i + 1))
                        .await
                        .unwrap()
                        .is_none()
                );
                let (f, model) = s
                    .job_completed(&j.id, "w1", &seg, "tiny.gguf", &nv(&j.id))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(model, format!("tiny:{}", i + 1));
                let done = s.job(&org, &p, &j.id).await.unwrap();
                assert_eq!(done.status, "succeeded");
                assert_eq!(done.result_files, vec![f.id.clone()]);
                assert_eq!(done.quantized_model.as_deref(), Some(model.as_str()));
                made.push(f);
            }
            let m = s.registry_model(&org, "tiny").await.unwrap();
            assert_eq!(m.versions, vec![1, 2]);
            assert_eq!(
                m.aliases.get("prod"),
                Some(&1),
                "prod stays on the first version"
            );
            assert_eq!(m.aliases.get("latest"), Some(&2), "latest moves");
            let id = |r: Option<bitnet_platform::registry::Resolved>| r.map(|r| r.id);
            assert_eq!(
                id(s.resolve_model(&org, "tiny").await.unwrap()),
                Some("tiny:1".into())
            );
            assert_eq!(
                id(s.resolve_model(&org, "tiny:latest").await.unwrap()),
                Some("tiny:2".into())
            );
            assert_eq!(
                id(s.resolve_model(&org, "tiny:2").await.unwrap()),
                Some("tiny:2".into())
            );
            assert_eq!(id(s.resolve_model(&org, "tiny:3").await.unwrap()), None);
            assert_eq!(id(s.resolve_model(&org, "tiny:nope").await.unwrap()), None);
            assert_eq!(id(s.resolve_model(&org, "other").await.unwrap()), None);
            let r = s.resolve_model(&org, "tiny:2").await.unwrap().unwrap();
            assert_eq!(r.file_id, made[1].id);
            assert_eq!(r.sha256, made[1].sha256);
            // Deletion is refused while an alias points at the version, and its file stays.
            assert!(matches!(
                s.delete_model_version(&org, "tiny", 1, &cli).await,
                Err(PlatformError::Conflict(_))
            ));
            assert!(matches!(
                s.delete_file(&storage, &org, &p, &made[0].id, &cli).await,
                Err(PlatformError::Conflict(_))
            ));
            let m = s.set_alias(&org, "tiny", "prod", 2, &cli).await.unwrap();
            assert_eq!(m.default_version, Some(2));
            assert_eq!(
                id(s.resolve_model(&org, "tiny").await.unwrap()),
                Some("tiny:2".into())
            );
            assert!(matches!(
                s.set_alias(&org, "tiny", "prod", 9, &cli).await,
                Err(PlatformError::NotFound { .. })
            ));
            assert!(matches!(
                s.set_alias(&org, "tiny", "7", 1, &cli).await,
                Err(PlatformError::Invalid { .. })
            ));
            s.delete_model_version(&org, "tiny", 1, &cli).await.unwrap();
            assert_eq!(
                s.registry_model(&org, "tiny").await.unwrap().versions,
                vec![2]
            );
            assert_eq!(id(s.resolve_model(&org, "tiny:1").await.unwrap()), None);
            s.delete_file(&storage, &org, &p, &made[0].id, &cli)
                .await
                .unwrap();
            // Another organization sees nothing until the model is shared.
            let other = s.create_organization("globex", &cli).await.unwrap();
            assert_eq!(id(s.resolve_model(&other.id, "tiny").await.unwrap()), None);
            assert!(s.registry_models(&other.id).await.unwrap().is_empty());
            assert!(matches!(
                s.model_versions(&other.id, "tiny").await,
                Err(PlatformError::NotFound { .. })
            ));
            assert!(matches!(
                s.set_alias(&other.id, "tiny", "prod", 2, &cli).await,
                Err(PlatformError::NotFound { .. })
            ));
            s.share_model(&org, "tiny", true, &cli).await.unwrap();
            assert_eq!(
                id(s.resolve_model(&other.id, "tiny").await.unwrap()),
                Some("tiny:2".into())
            );
            let listed = s.registry_models(&other.id).await.unwrap();
            assert_eq!(listed.len(), 1);
            assert!(listed[0].shared);
            // Sharing does not let the other organization change it.
            assert!(matches!(
                s.set_alias(&other.id, "tiny", "prod", 2, &cli).await,
                Err(PlatformError::NotFound { .. })
            ));
            s.share_model(&org, "tiny", false, &cli).await.unwrap();
            assert_eq!(id(s.resolve_model(&other.id, "tiny").await.unwrap()), None);
            // The audit chain holds every change.
            let chains = s.verify_audit(Some(&org)).await.unwrap();
            assert!(chains.iter().all(|c| c.first_bad.is_none()), "{chains:?}");
            assert!(chains[0].rows >= 8);
        });
    }
}
