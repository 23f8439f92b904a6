//! Test databases: a fresh SQLite file or a fresh PostgreSQL database per test, removed
//! afterwards. Tests of the store, the server and the CLI run on both backends.
//!
//! PostgreSQL comes from `BITNET_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, the server every machine here runs); set it
//! to `skip` to run the SQLite half alone.

use crate::Backend;

/// A database that exists for one test.
#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    /// The PostgreSQL database to drop, with the server's admin URL.
    drop: Option<(String, String)>,
    _dir: Option<std::path::PathBuf>,
}

/// The PostgreSQL server tests use, or `None` when told to skip it.
pub fn postgres_admin_url() -> Option<String> {
    match std::env::var("BITNET_TEST_POSTGRES") {
        Ok(v) if v == "skip" => None,
        Ok(v) if !v.is_empty() => Some(v),
        _ => Some("postgres://postgres@127.0.0.1:5432/postgres".into()),
    }
}

/// The backends a test runs on: SQLite, and PostgreSQL unless skipped.
pub fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Sqlite];
    if postgres_admin_url().is_some() {
        b.push(Backend::Postgres);
    }
    b
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

impl TestDb {
    /// A fresh, empty database of `backend` (SQLite in `dir`). Panics with a clear message
    /// when PostgreSQL does not answer (tests need it; `BITNET_TEST_POSTGRES=skip` opts out).
    pub fn new(backend: Backend, dir: &std::path::Path) -> Self {
        match backend {
            Backend::Sqlite => {
                let path = dir.join(format!("bitnet-{}.db", uuid::Uuid::new_v4().simple()));
                Self {
                    url: format!("sqlite://{}", path.display()),
                    backend,
                    drop: None,
                    _dir: Some(path),
                }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url().expect("PostgreSQL tests are skipped");
                let name = format!("bitnet_test_{}", uuid::Uuid::new_v4().simple());
                let a = admin.clone();
                let n = name.clone();
                // On its own thread: callers may already be inside a runtime.
                std::thread::spawn(move || {
                    block_on(async move {
                        use sqlx::Connection;
                        let mut c = sqlx::PgConnection::connect(&a).await.unwrap_or_else(|e| {
                            panic!("PostgreSQL at {a} does not answer ({e}); start it, or set BITNET_TEST_POSTGRES=skip")
                        });
                        sqlx::Executor::execute(&mut c, format!("CREATE DATABASE {n}").as_str())
                            .await
                            .expect("CREATE DATABASE");
                    })
                })
                .join()
                .expect("creating the test database");
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
                Self {
                    url: format!("{base}/{name}"),
                    backend,
                    drop: Some((admin, name)),
                    _dir: None,
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.drop.take() {
            let _ = std::thread::spawn(move || {
                block_on(async move {
                    use sqlx::Connection;
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ = sqlx::Executor::execute(
                            &mut c,
                            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                        )
                        .await;
                    }
                })
            })
            .join();
        }
    }
}
