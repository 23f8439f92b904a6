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

/// Run `f` to completion on a fresh single-threaded runtime (a test's own).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
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

/// localstripe (PyPI, a Stripe API emulator: customers, invoice items, invoices, payment and
/// signed webhooks) on a free loopback port, from the venv `scripts/fetch-test-assets.sh`
/// makes; stopped when dropped.
#[derive(Debug)]
pub struct Localstripe {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    child: std::process::Child,
}

impl Localstripe {
    /// `None` (with a note on stderr) when localstripe is not installed, outside CI; under
    /// CI (`CI` set) a missing emulator fails the test instead of skipping it.
    pub fn start() -> Option<Self> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bin = root.join("target/test-assets/venv/bin/localstripe");
        if !bin.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "localstripe is not installed at {} (scripts/fetch-test-assets.sh installs it)",
                bin.display()
            );
            eprintln!("skipping: localstripe is not installed (run scripts/fetch-test-assets.sh)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Its store is kept in memory only: localstripe would otherwise write every change to
        // /tmp/localstripe.pickle, which concurrent tests' emulators share.
        let child = std::process::Command::new(bin.with_file_name("python"))
            .args([
                "-c",
                "import localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; \
                 from localstripe.server import start; start()",
                "--port",
                &port.to_string(),
                "--from-scratch",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("localstripe starts");
        let me = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
        };
        // A slow, shared machine may take many seconds to start Python.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "localstripe did not listen on {port} within 120 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Some(me)
    }
}

impl Localstripe {
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
        crate::sso::install_tls_provider();
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth("sk_test_bitnet")
            .form(form)
            .send()
            .await
            .expect("localstripe answers");
        let status = r.status();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        assert!(status.is_success(), "localstripe {path}: {status} {v}");
        v
    }

    /// localstripe makes an invoice (`POST /v1/invoices`) only for a customer with a
    /// subscription, where Stripe needs none: give `customer` a $0 monthly one (its own first
    /// invoice is $0 and paid at once; later invoices carry its $0 line beside the items).
    pub async fn zero_subscription(&self, customer: &str) {
        let plan = self
            .post(
                "/v1/plans",
                &[
                    ("amount", "0"),
                    ("currency", "usd"),
                    ("interval", "month"),
                    ("product[name]", "bitnet usage"),
                ],
            )
            .await;
        let plan = plan["id"].as_str().expect("a plan id").to_string();
        self.post(
            "/v1/subscriptions",
            &[("customer", customer), ("items[0][plan]", &plan)],
        )
        .await;
    }

    /// A customer ready for invoices (see [`Self::zero_subscription`]); its id.
    pub async fn customer(&self, name: &str, extra: &[(&str, &str)]) -> String {
        let mut form = vec![("name", name)];
        form.extend_from_slice(extra);
        let c = self.post("/v1/customers", &form).await;
        let id = c["id"].as_str().expect("a customer id").to_string();
        self.zero_subscription(&id).await;
        id
    }
}

impl Drop for Localstripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
