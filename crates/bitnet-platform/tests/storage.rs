//! Sealed artifact storage on a local directory and on a real S3-compatible server that checks
//! request signatures (SeaweedFS, started by `scripts/tests/seaweedfs.sh`): ranges come back
//! right, no plaintext is stored, a tampered or truncated object is refused, a wrong master
//! key is named as such, and rotating the master key keeps everything readable.

use bitnet_platform::crypto::{KeyProvider, MasterKey};
use bitnet_platform::storage::Storage;
use bitnet_platform::testing::{TestDb, backends};
use bitnet_platform::{PlatformError, Store};
use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The storages to test: a directory, and the S3 bucket of `BITNET_TEST_S3` (default
/// `s3://bitnet-test`, SeaweedFS on 127.0.0.1:8333 with the test credentials) unless it is
/// `skip`.
fn storages(dir: &std::path::Path) -> Vec<Storage> {
    let mut out =
        vec![Storage::open(&format!("file://{}", dir.join("objects").display())).unwrap()];
    let s3 = std::env::var("BITNET_TEST_S3").unwrap_or_else(|_| "s3://bitnet-test".into());
    if s3 != "skip" {
        let prefix = format!("{s3}/run-{}", uuid::Uuid::new_v4());
        let endpoint = std::env::var("BITNET_TEST_S3_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:8333".into());
        out.push(
            Storage::open_with(
                &prefix,
                &[
                    ("aws_endpoint", endpoint.as_str()),
                    ("aws_access_key_id", "bitnet-test"),
                    ("aws_secret_access_key", "bitnet-test-secret"),
                    ("aws_region", "us-east-1"),
                ],
            )
            .unwrap(),
        );
    } else {
        eprintln!("skipped S3: BITNET_TEST_S3=skip");
    }
    out
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn read(
    s: &Storage,
    store: &Store,
    org: &str,
    seg: &bitnet_platform::files::Segment,
    r: std::ops::Range<u64>,
) -> Result<Vec<u8>, PlatformError> {
    let key = store.data_key_by_id(Some(org), &seg.data_key_id).await?;
    let mut stream = s
        .read_sealed(&seg.object, &key, seg.written.bytes, r)
        .await?;
    let mut out = Vec::new();
    while let Some(piece) = stream.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

#[test]
fn sealed_objects_round_trip_in_ranges_and_refuse_tampering() {
    for_each_storage(|storage, store, org, _url| async move {
        let content = pseudo_random(1_000_003, 11);
        // Fed in odd-sized pieces, as a network delivers them.
        let pieces: Vec<Result<Bytes, std::io::Error>> = content
            .chunks(77_777)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let seg = store
            .write_segment(&storage, &org, futures_util::stream::iter(pieces), 10 << 20)
            .await
            .unwrap();
        assert_eq!(seg.written.bytes, 1_000_003);
        assert_eq!(
            seg.written.sha256,
            bitnet_platform::ids::hex(&<sha2::Sha256 as sha2::Digest>::digest(&content))
        );
        for r in [
            0..1_000_003u64,
            0..1,
            262_143..262_145,
            500_000..999_999,
            1_000_002..1_000_003,
        ] {
            let got = read(&storage, &store, &org, &seg, r.clone()).await.unwrap();
            assert!(got == content[r.start as usize..r.end as usize], "{r:?}");
        }
        // No 32-byte run of plaintext is stored.
        let raw = storage.raw(&seg.object).await.unwrap();
        assert_eq!(raw.len(), 16 + 1_000_003 + 4 * 16);
        for at in [0usize, 400_000, 999_971] {
            assert!(!raw.windows(32).any(|w| w == &content[at..at + 32]));
        }
        // One flipped bit, or the last chunk cut off, is refused (not garbage).
        let mut bad = raw.to_vec();
        bad[300_000] ^= 1;
        storage.put_raw(&seg.object, bad.into()).await.unwrap();
        let e = read(&storage, &store, &org, &seg, 0..1_000_003)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        // The chunks before the damaged one still read.
        assert!(read(&storage, &store, &org, &seg, 0..1000).await.is_ok());
        let cut = raw.slice(..16 + 3 * (256 * 1024 + 16));
        storage.put_raw(&seg.object, cut).await.unwrap();
        let e = read(&storage, &store, &org, &seg, 0..1_000_003)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not authenticate"), "{e}");
        // Over the limit: refused, nothing left behind.
        let before = storage.list("").await.unwrap().len();
        let big =
            futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 5000]))]);
        let e = store
            .write_segment(&storage, &org, big, 4096)
            .await
            .unwrap_err();
        assert!(matches!(e, PlatformError::TooLarge(_)), "{e}");
        assert_eq!(storage.list("").await.unwrap().len(), before);
        // An upload that breaks off leaves nothing either.
        let broken = futures_util::stream::iter([
            Ok(Bytes::from(vec![1u8; 300_000])),
            Err(std::io::Error::other("connection reset")),
        ]);
        assert!(
            store
                .write_segment(&storage, &org, broken, 10 << 20)
                .await
                .is_err()
        );
        assert_eq!(storage.list("").await.unwrap().len(), before);
    });
}

#[test]
fn a_wrong_master_key_is_named_and_rotation_keeps_everything_readable() {
    for_each_storage(|storage, store, org, _url| async move {
        let content = pseudo_random(300_000, 5);
        let seg = store
            .write_segment(
                &storage,
                &org,
                futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(content.clone()))]),
                1 << 20,
            )
            .await
            .unwrap();
        let secret = store
            .seal_secret(Some(&org), "client-secret-42")
            .await
            .unwrap();
        assert!(secret.starts_with("enc:v1:") && !secret.contains("client-secret-42"));

        // The same database with another master key: a clear error naming both keys.
        let wrong = MasterKey::from_bytes(&[9; 32]);
        let other = store.clone().with_master_key(Arc::new(wrong));
        let e = other
            .data_key_by_id(Some(&org), &seg.data_key_id)
            .await
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("master key") && m.contains("mk_"), "{m}");
        assert!(other.open_secret(Some(&org), &secret).await.is_err());

        // Rotate to a new master key: the data keys are re-wrapped, the objects untouched.
        let raw_before = storage.raw(&seg.object).await.unwrap();
        let new = MasterKey::from_bytes(&[3; 32]);
        let new_id = new.key_id().to_string();
        assert!(store.rotate_master_key(&new).await.unwrap() >= 1);
        assert_eq!(storage.raw(&seg.object).await.unwrap(), raw_before);
        let rotated = store.clone().with_master_key(Arc::new(new));
        assert_eq!(
            read(&storage, &rotated, &org, &seg, 0..300_000)
                .await
                .unwrap(),
            content
        );
        assert_eq!(
            rotated.open_secret(Some(&org), &secret).await.unwrap(),
            "client-secret-42"
        );
        // The old key no longer opens them.
        let e = read(&storage, &store, &org, &seg, 0..10).await.unwrap_err();
        assert!(e.to_string().contains(&new_id), "{e}");
    });
}

/// Run `f` on each database backend with each storage, a store with a master key, and an
/// organization.
fn for_each_storage<F, Fut>(f: F)
where
    F: Fn(Storage, Store, String, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        for storage in storages(dir.path()) {
            run(async {
                let store = Store::open(&db.url)
                    .await
                    .unwrap()
                    .with_master_key(Arc::new(MasterKey::from_bytes(&[1; 32])));
                let org = store
                    .create_organization(
                        &format!("o-{}", uuid::Uuid::new_v4()),
                        &bitnet_platform::audit::Actor::cli(),
                    )
                    .await
                    .unwrap();
                f(storage, store, org.id, db.url.clone()).await;
            });
        }
    }
}

/// An upload left pending past its hour is marked expired by the sweep, and its parts leave
/// storage; it takes no more parts.
#[test]
fn expired_uploads_are_swept_with_their_parts() {
    for_each_storage(|storage, store, org, url| async move {
        let cli = bitnet_platform::audit::Actor::cli();
        let p = store.create_project(&org, "p", &cli).await.unwrap();
        let u = store
            .create_upload(
                &org,
                &p.id,
                "a.bin",
                "model",
                10,
                "application/octet-stream",
                1 << 20,
                &cli,
            )
            .await
            .unwrap();
        let part =
            || futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"12345"))]);
        store
            .add_upload_part(&storage, &org, &p.id, &u.id, part())
            .await
            .unwrap();
        let before = storage.list("").await.unwrap().len();
        assert_eq!(store.sweep_expired_uploads(&storage).await.unwrap(), 0);
        // An hour later (set behind the store's back).
        let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query("UPDATE uploads SET expires_at = 1 WHERE id = $1")
            .bind(&u.id)
            .execute(&mut c)
            .await
            .unwrap();
        assert_eq!(
            store.upload(&org, &p.id, &u.id).await.unwrap().status,
            "expired"
        );
        assert_eq!(store.sweep_expired_uploads(&storage).await.unwrap(), 1);
        assert_eq!(storage.list("").await.unwrap().len(), before - 1);
        assert!(
            store
                .add_upload_part(&storage, &org, &p.id, &u.id, part())
                .await
                .is_err()
        );
        assert_eq!(storage.list("").await.unwrap().len(), before - 1);
    });
}
