//! The router without a socket (`tower::ServiceExt::oneshot`), on both store backends, over a
//! tiny real model: every route of the permission table with every kind of credential, and
//! another organization's admin key against every route that takes one of A's ids.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bitnet_platform::audit::Actor;
use bitnet_platform::keys::ProjectKeyOwner;
use bitnet_platform::storage::Storage;
use bitnet_platform::testing::{TestDb, backends};
use bitnet_platform::{Backend, Store};
use bitnet_server::metrics::Metrics;
use bitnet_server::permissions::{Access, ROUTES, Who, allows};
use bitnet_server::usage::UsageLog;
use bitnet_server::{AppState, ServedModel, ServerConfig};
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

/// A tiny BitNet-shaped model with random ternary weights and a real tokenizer (the
/// SentencePiece one of a test GGUF), enough to run inference through the router.
fn tiny_model() -> bitnet_model::LoadedModel {
    use bitnet_model::spec::{Activation, Family, ModelSpec, RopeStyle};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let gguf = bitnet_formats::gguf::GgufFile::open(
        root.join("testdata/models/tiny-llama-spm/tiny-llama-spm.gguf"),
    )
    .unwrap();
    let mut tokenizer = bitnet_formats::tokenizer::TextTokenizer::from_gguf(&gguf.header).unwrap();
    tokenizer.chat_template =
        Some("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}".into());
    let spec = ModelSpec {
        family: Family::BitNet,
        arch_name: "tiny synthetic".into(),
        hidden: 64,
        intermediate: 128,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        vocab: tokenizer.vocab_size(),
        context: 256,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::NeoX,
        activation: Activation::Relu2,
        tied_embeddings: true,
    };
    bitnet_model::LoadedModel {
        model: bitnet_model::synthetic::random_model(spec, bitnet_formats::gguf::GgmlType::F16, 7)
            .unwrap(),
        tokenizer: Some(tokenizer),
        description: "tiny synthetic".into(),
        sampling: Default::default(),
    }
}

fn state(store: Store, storage: &Storage) -> AppState {
    let metrics = Arc::new(Metrics::new());
    // With a Stripe webhook secret, so that the webhook route answers (400 to an unsigned body).
    let config = ServerConfig {
        stripe_webhook_secret: Some("whsec_router_test".into()),
        ..ServerConfig::default()
    };
    let model =
        ServedModel::start("tiny".into(), tiny_model(), &config.engine, metrics.clone()).unwrap();
    let (usage, _) = UsageLog::start(
        store.clone(),
        bitnet_server::limits::Limiter::local(),
        bitnet_server::usage::MeterConfig::default(),
        metrics.clone(),
    );
    AppState::new(vec![model], store, metrics, usage, config).with_storage(storage.clone())
}

/// The store (with a master key) and a file storage in `dir`.
async fn open(url: &str, dir: &std::path::Path) -> (Store, Storage) {
    let key = Arc::new(bitnet_platform::crypto::MasterKey::from_bytes(&[7; 32]));
    let store = Store::open(url).await.unwrap().with_master_key(key);
    let storage = Storage::open(&format!("file://{}", dir.join("storage").display())).unwrap();
    (store, storage)
}

/// One organization's objects, and every kind of credential.
struct Fixture {
    org: String,
    project: String,
    user: String,
    /// A user of the organization in no project.
    outsider: String,
    service_account: String,
    project_key_id: String,
    admin_key_id: String,
    invite: String,
    file: String,
    /// A `model` file, and a queued quantization job of it.
    model_file: String,
    job: String,
    /// An upload with room for another part, and one ready to complete with its part.
    upload: String,
    whole_upload: (String, String),
    /// A closed (empty) invoice of a month long past.
    invoice: String,
    keys: Vec<(Who, String)>,
}

async fn fixture(s: &Store, storage: &Storage, name: &str) -> Fixture {
    let cli = Actor::cli();
    let org = s.create_organization(name, &cli).await.unwrap();
    let p = s.create_project(&org.id, "prod", &cli).await.unwrap();
    let sa = s
        .create_service_account(&org.id, &p.id, "app", &cli)
        .await
        .unwrap();
    let u = s
        .create_user(
            &org.id,
            &format!("ann@{name}.example.com"),
            "Ann",
            "reader",
            None,
            &cli,
        )
        .await
        .unwrap();
    s.add_project_user(&org.id, &p.id, &u.id, "member", &cli)
        .await
        .unwrap();
    let outsider = s
        .create_user(
            &org.id,
            &format!("cy@{name}.example.com"),
            "Cy",
            "reader",
            None,
            &cli,
        )
        .await
        .unwrap();
    let (_, read_only) = s
        .create_project_key(
            &org.id,
            &p.id,
            "ro",
            ProjectKeyOwner::User(&u.id),
            true,
            &cli,
        )
        .await
        .unwrap();
    let (admin, admin_secret) = s.create_admin_key(&org.id, "ops", &cli).await.unwrap();
    // A second admin key: the one the tests delete.
    let (spare, _) = s.create_admin_key(&org.id, "spare", &cli).await.unwrap();
    let invite = s
        .create_invite(
            &org.id,
            &format!("bo@{name}.example.com"),
            "reader",
            vec![],
            &cli,
        )
        .await
        .unwrap();
    s.set_sso(&org.id, &serde_json::from_value(sso()).unwrap(), &cli)
        .await
        .unwrap();
    let (_, operator) = s
        .create_operator_key(&format!("root-{name}"))
        .await
        .unwrap();
    let _ = admin;
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"a file of the fixture",
    ))]);
    let seg = s
        .write_segment(storage, &org.id, body, 1 << 20)
        .await
        .unwrap();
    let file = s
        .create_file(
            storage,
            &org.id,
            &p.id,
            "user_data",
            "notes.txt",
            &[seg],
            &cli,
        )
        .await
        .unwrap();
    // A model file; two jobs of it finished as versions 1 and 2 of registry model `reg`
    // (version 1 under `prod` and `staging`, version 2 under no alias), and a third queued.
    let gguf = || {
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"GGUF\x03\0\0\0 a model, as far as its first bytes go",
        ))])
    };
    let seg = s
        .write_segment(storage, &org.id, gguf(), 1 << 20)
        .await
        .unwrap();
    let model_file = s
        .create_file(storage, &org.id, &p.id, "model", "m.gguf", &[seg], &cli)
        .await
        .unwrap();
    let params = bitnet_platform::jobs::JobParams {
        to: "tq2_0".into(),
        embeddings: None,
        name: Some("reg".into()),
        suffix: None,
    };
    for k in 0..2 {
        let j = s
            .create_job(&org.id, &p.id, &model_file.id, &params, None, &cli)
            .await
            .unwrap();
        let worker = format!("fixture-{name}");
        let claimed = loop {
            // Other fixtures' jobs may be claimed first: finish only this one.
            let c = s
                .claim_job(&worker, std::time::Duration::from_secs(600), 100)
                .await
                .unwrap()
                .unwrap();
            if c.id == j.id {
                break c;
            }
        };
        let seg = s
            .write_segment(storage, &org.id, gguf(), 1 << 20)
            .await
            .unwrap();
        let nv = bitnet_platform::registry::NewVersion {
            name: "reg".into(),
            format: "tq2_0".into(),
            architecture: "bitnet-25".into(),
            parameters: 1,
            source_file_id: Some(model_file.id.clone()),
            job_id: Some(claimed.id.clone()),
            report: serde_json::json!({}),
        };
        s.job_completed(&claimed.id, &worker, &seg, &format!("reg-{k}.gguf"), &nv)
            .await
            .unwrap()
            .unwrap();
    }
    s.set_alias(&org.id, "reg", "staging", 1, &cli)
        .await
        .unwrap();
    s.delete_alias(&org.id, "reg", "latest", &cli)
        .await
        .unwrap();
    let job = s
        .create_job(&org.id, &p.id, &model_file.id, &params, None, &cli)
        .await
        .unwrap();
    // Two uploads with a 5-byte part each: one with room for another part (to add to and to
    // cancel), one whose part makes it whole (to complete).
    let hello = || {
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"hello"))])
    };
    let mut uploads = Vec::new();
    for size in [10, 5] {
        let u = s
            .create_upload(
                &org.id,
                &p.id,
                "a.bin",
                "user_data",
                size,
                "application/octet-stream",
                1 << 20,
                &cli,
            )
            .await
            .unwrap();
        let part = s
            .add_upload_part(storage, &org.id, &p.id, &u.id, hello())
            .await
            .unwrap();
        uploads.push((u.id, part.id));
    }
    // Four signed-in users: an owner and a reader of the organization, and readers who own
    // and who are members of the fixture's project.
    let mut sessions = Vec::new();
    for (who, role) in [
        (Who::UserOwner, "owner"),
        (Who::UserReader, "reader"),
        (Who::ProjectOwner, "reader"),
        (Who::ProjectMember, "reader"),
    ] {
        let email = format!("{who:?}@{name}.example.com").to_lowercase();
        // Signed in directly (as single sign-on does): the password path has its own tests.
        let u = s
            .create_user(&org.id, &email, role, role, None, &cli)
            .await
            .unwrap();
        if let Some(role) = match who {
            Who::ProjectOwner => Some("owner"),
            Who::ProjectMember => Some("member"),
            _ => None,
        } {
            s.add_project_user(&org.id, &p.id, &u.id, role, &cli)
                .await
                .unwrap();
        }
        let t = s.sign_in(&org.id, &u, &cli).await.unwrap();
        sessions.push((who, t.access_token));
    }
    let invoice = s
        .close_period::<bitnet_platform::stripe::Stripe>(&org.id, "2020-01", None, &cli)
        .await
        .unwrap()
        .invoice()
        .id
        .clone();
    Fixture {
        invoice,
        org: org.id,
        project: p.id,
        user: u.id,
        outsider: outsider.id,
        service_account: sa.account.id,
        project_key_id: sa.api_key.id.clone(),
        admin_key_id: spare.id,
        invite: invite.id,
        file: file.id,
        model_file: model_file.id,
        job: job.id,
        upload: uploads[0].0.clone(),
        whole_upload: uploads[1].clone(),
        keys: vec![
            (Who::Operator, operator),
            (Who::Admin, admin_secret),
            (Who::Project, sa.api_key.value),
            (Who::ProjectReadOnly, read_only),
            (Who::UserOwner, sessions[0].1.clone()),
            (Who::UserReader, sessions[1].1.clone()),
            (Who::ProjectOwner, sessions[2].1.clone()),
            (Who::ProjectMember, sessions[3].1.clone()),
        ],
    }
}

impl Fixture {
    fn path(&self, template: &str) -> String {
        // The usage and cost reports need a start.
        let query = if template.ends_with("/usage/completions") || template.ends_with("/costs") {
            "?start_time=0"
        } else {
            ""
        };
        template
            .replace("{project_id}", &self.project)
            .replace("{rate_limit_id}", "rl-tiny")
            .replace("{user_id}", &self.user)
            .replace("{service_account_id}", &self.service_account)
            .replace("{invite_id}", &self.invite)
            .replace("{file_id}", &self.file)
            .replace(
                "{upload_id}",
                if template.ends_with("/complete") {
                    &self.whole_upload.0
                } else {
                    &self.upload
                },
            )
            .replace("{job_id}", &self.job)
            .replace("{invoice_id}", &self.invoice)
            .replace("{model}", "reg")
            .replace("{alias}", "staging")
            .replace("{version}", "2")
            .replace("{organization_id}", &self.org)
            .replace("{organization}", &self.org)
            .replace(
                "{key_id}",
                if template.contains("admin_api_keys") {
                    &self.admin_key_id
                } else {
                    &self.project_key_id
                },
            )
            + query
    }

    fn key(&self, who: Who) -> &str {
        &self.keys.iter().find(|(w, _)| *w == who).unwrap().1
    }
}

/// A single sign-on connection (never contacted here).
fn sso() -> Value {
    json!({"issuer": "http://127.0.0.1:9/idp", "client_id": "bitnet", "client_secret": "s3cret",
           "allowed_domains": ["example.com"], "default_role": "reader"})
}

/// A valid body for each route that takes one.
fn body(method: &Method, route: &str, f: &Fixture) -> Value {
    if method != Method::POST {
        return Value::Null;
    }
    match route {
        "/v1/chat/completions" => {
            json!({"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "a"}]})
        }
        "/v1/completions" => json!({"model": "tiny", "max_tokens": 1, "prompt": "a"}),
        "/v1/organization/projects/{project_id}/users" => {
            // A user in no project yet (the fixture's is a member already).
            json!({"user_id": f.outsider, "role": "owner"})
        }
        r if r.ends_with("/users/{user_id}") => json!({"role": "owner"}),
        "/v1/organization/invites" => json!({"email": "cy@example.com", "role": "reader"}),
        "/v1/organization/sso" => sso(),
        "/v1/organization/projects/{project_id}/archive" => Value::Null,
        "/v1/files" => {
            json!({"multipart": [["purpose", null, "user_data"], ["file", "a.txt", "hello"]]})
        }
        "/v1/uploads" => {
            json!({"filename": "b.bin", "purpose": "model", "bytes": 3, "mime_type": "application/octet-stream"})
        }
        "/v1/uploads/{upload_id}/parts" => json!({"multipart": [["data", "blob", "hello"]]}),
        "/v1/uploads/{upload_id}/complete" => json!({"part_ids": [f.whole_upload.1]}),
        "/v1/uploads/{upload_id}/cancel" => Value::Null,
        "/v1/quantization/jobs" => json!({"file": f.model_file, "to": "tq2_0"}),
        "/v1/quantization/jobs/{job_id}/cancel" => Value::Null,
        "/v1/models/{model}/aliases/{alias}" => json!({"version": 1}),
        r if r.ends_with("/rate_limits/{rate_limit_id}") || r.ends_with("/rate_limit") => {
            json!({"max_requests_per_1_minute": 1000})
        }
        "/v1/operator/prices" => json!({"model": "tiny", "input": 1, "output": 2}),
        r if r.ends_with("/budget") => json!({"monthly_limit": 100, "thresholds": [0.5]}),
        "/v1/operator/organizations/{organization_id}/models/{model}/share" => {
            json!({"shared": true})
        }
        _ => json!({"name": "new name"}),
    }
}

async fn call(
    app: &axum::Router,
    method: &Method,
    path: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method.clone()).uri(path);
    if !key.is_empty() {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let b = if body.is_null() {
        Body::empty()
    } else if let Some(fields) = body.get("multipart").and_then(Value::as_array) {
        // [[name, filename or null, content], ...] as multipart/form-data.
        let mut text = String::new();
        for f in fields {
            text.push_str("--XyZ\r\nContent-Disposition: form-data; name=\"");
            text.push_str(f[0].as_str().unwrap());
            text.push('"');
            if let Some(name) = f[1].as_str() {
                text.push_str(&format!("; filename=\"{name}\""));
            }
            text.push_str("\r\n\r\n");
            text.push_str(f[2].as_str().unwrap());
            text.push_str("\r\n");
        }
        text.push_str("--XyZ--\r\n");
        req = req.header("content-type", "multipart/form-data; boundary=XyZ");
        Body::from(text)
    } else {
        req = req.header("content-type", "application/json");
        Body::from(body.to_string())
    };
    let resp = app.clone().oneshot(req.body(b).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every route × every credential: allowed ones pass the permission check (and succeed, on a
/// fresh fixture), refused ones get 403 in OpenAI's shape; no credential gets 401.
#[test]
fn every_route_answers_each_credential_as_the_table_says() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        runtime().block_on(async {
            let (store, storage) = open(&db.url, dir.path()).await;
            let app = bitnet_server::router(state(store.clone(), &storage));
            for (i, (method, route, access)) in ROUTES.iter().enumerate() {
                // A fresh organization per route: the allowed call may delete what it names.
                let f = fixture(&store, &storage, &format!("org{i}")).await;
                let path = f.path(route);
                let body = body(method, route, &f);
                if *access == Access::Public {
                    // Signing in takes no credential: the route answers (a 400 for the body
                    // that is not its own, the keys for the JWKS, a 502 for the single sign-on
                    // provider that is not there), never 401 or 403.
                    let (s, e) = call(&app, method, &path, "", &body).await;
                    let s = if s == StatusCode::BAD_GATEWAY {
                        StatusCode::OK
                    } else {
                        s
                    };
                    assert!(
                        s == StatusCode::OK || s == StatusCode::BAD_REQUEST,
                        "{method} {route}: {s} {e}"
                    );
                    continue;
                }
                let (s, e) = call(&app, method, &path, "", &body).await;
                assert_eq!(
                    s,
                    StatusCode::UNAUTHORIZED,
                    "{method} {route} without a key: {e}"
                );
                // Refused credentials ask first, so nothing has changed when they do; each
                // allowed one gets a fresh organization (the call before may have deleted what
                // the path names).
                let mut order = Who::ALL.to_vec();
                order.sort_by_key(|w| allows(*w, *access));
                for (j, who) in order.into_iter().enumerate() {
                    let fresh;
                    let f = if allows(who, *access) {
                        fresh = fixture(&store, &storage, &format!("org{i}-{j}")).await;
                        &fresh
                    } else {
                        &f
                    };
                    let (path, body) = (f.path(route), self::body(method, route, f));
                    let (s, e) = call(&app, method, &path, f.key(who), &body).await;
                    if allows(who, *access) {
                        assert!(
                            s.is_success(),
                            "{backend:?} {method} {route} as {who:?}: expected success, got {s} {e}"
                        );
                    } else {
                        assert_eq!(
                            s,
                            StatusCode::FORBIDDEN,
                            "{backend:?} {method} {route} as {who:?}: {e}"
                        );
                        assert_eq!(e["error"]["type"], "permission_error");
                    }
                }
            }
        });
    }
}

/// Organization B's admin key against every organization route that takes an id of A's: 404
/// (never 403: existence is not leaked), and nothing of A's changes; B's lists show nothing of
/// A's. The operator routes sit above organizations and are not scoped.
#[test]
fn another_organizations_ids_are_not_found() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        runtime().block_on(async {
            let (store, storage) = open(&db.url, dir.path()).await;
            let app = bitnet_server::router(state(store.clone(), &storage));
            let a = fixture(&store, &storage, "a").await;
            let b = fixture(&store, &storage, "b").await;
            let b_admin = b.key(Who::Admin);
            let before = store.verify_audit(Some(&a.org)).await.unwrap()[0].rows;
            let mut checked = 0;
            for (method, route, _) in ROUTES {
                if !route.starts_with("/v1/organization/")
                    && !route.starts_with("/v1/files")
                    && !route.starts_with("/v1/uploads")
                    && !route.starts_with("/v1/quantization")
                {
                    continue;
                }
                let path = a.path(route);
                // B's admin key, B's signed-in owner, and B's project keys (which may not manage
                // anything, but still must not learn that A's ids exist) alike.
                for b_key in [
                    b_admin,
                    b.key(Who::UserOwner),
                    b.key(Who::Project),
                    b.key(Who::ProjectReadOnly),
                ] {
                    if route.contains('{') {
                        let (s, e) =
                            call(&app, method, &path, b_key, &body(method, route, &a)).await;
                        assert_eq!(s, StatusCode::NOT_FOUND, "{backend:?} {method} {path}: {e}");
                        checked += 1;
                    } else if *method == Method::GET {
                        let (s, list) = call(&app, method, &path, b_key, &Value::Null).await;
                        // Project keys list files only, the others organizations' objects
                        // only; each sees B's rows only.
                        let project_key =
                            b_key == b.key(Who::Project) || b_key == b.key(Who::ProjectReadOnly);
                        let may = project_key
                            == (route.starts_with("/v1/files")
                                || route.starts_with("/v1/quantization"));
                        let expect = if may {
                            StatusCode::OK
                        } else {
                            StatusCode::FORBIDDEN
                        };
                        assert_eq!(s, expect, "{list}");
                        let text = list.to_string();
                        for id in [
                            &a.org,
                            &a.project,
                            &a.user,
                            &a.outsider,
                            &a.service_account,
                            &a.project_key_id,
                            &a.admin_key_id,
                            &a.invite,
                            &a.file,
                            &a.upload,
                            &a.model_file,
                            &a.job,
                        ] {
                            assert!(
                                !text.contains(id.as_str()),
                                "{route} shows A's {id}: {text}"
                            );
                        }
                    }
                }
            }
            assert!(checked >= 20, "{checked}");
            // A's audit chain gained nothing from B's attempts.
            let after = store.verify_audit(Some(&a.org)).await.unwrap();
            assert_eq!(after[0].rows, before);
            assert!(after[0].first_bad.is_none());
            // And A's keys still work.
            let (s, _) = call(
                &app,
                &Method::GET,
                "/v1/models",
                a.key(Who::Project),
                &Value::Null,
            )
            .await;
            assert_eq!(s, StatusCode::OK);
        });
        if backend == Backend::Sqlite {
            drop(db);
        }
    }
}

/// Malformed input to the organization API is a 400 in OpenAI's shape and changes nothing.
#[test]
fn malformed_organization_requests_are_400s_that_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(Backend::Sqlite, dir.path());
    runtime().block_on(async {
        let (store, storage) = open(&db.url, dir.path()).await;
        let app = bitnet_server::router(state(store.clone(), &storage));
        let f = fixture(&store, &storage, "a").await;
        let admin = f.key(Who::Admin);
        let rows = store.verify_audit(Some(&f.org)).await.unwrap()[0].rows;
        let p = format!("/v1/organization/projects/{}/users", f.project);
        for (method, path, body) in [
            (
                Method::POST,
                "/v1/organization/projects",
                json!({"name": ""}),
            ),
            (
                Method::POST,
                "/v1/organization/projects",
                json!({"nom": "x"}),
            ),
            (
                Method::POST,
                "/v1/organization/projects",
                json!({"name": 7}),
            ),
            (
                Method::POST,
                "/v1/organization/invites",
                json!({"email": "not-an-email", "role": "reader"}),
            ),
            (
                Method::POST,
                "/v1/organization/invites",
                json!({"email": "a@b.co", "role": "god"}),
            ),
            (
                Method::POST,
                &p,
                json!({"user_id": "user-nobody", "role": "member"}),
            ),
            (
                Method::POST,
                &p,
                json!({"user_id": f.user, "role": "emperor"}),
            ),
            (
                Method::GET,
                "/v1/organization/projects?limit=0",
                Value::Null,
            ),
            (
                Method::GET,
                "/v1/organization/projects?limit=abc",
                Value::Null,
            ),
            (
                Method::GET,
                "/v1/organization/projects?include_archived=maybe",
                Value::Null,
            ),
            (
                Method::GET,
                "/v1/organization/audit_logs?effective_at[gt]=soon",
                Value::Null,
            ),
            (
                Method::GET,
                "/v1/organization/audit_logs?after=audit_log-nope",
                Value::Null,
            ),
        ] {
            let (s, e) = call(&app, &method, path, admin, &body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {path} {body}: {e}");
            assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        }
        assert_eq!(
            store.verify_audit(Some(&f.org)).await.unwrap()[0].rows,
            rows
        );
    });
}

/// A project's owner (an organization reader) changes that project and no other.
#[test]
fn a_project_owner_changes_that_project_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new(Backend::Sqlite, dir.path());
    runtime().block_on(async {
        let (store, storage) = open(&db.url, dir.path()).await;
        let app = bitnet_server::router(state(store.clone(), &storage));
        let f = fixture(&store, &storage, "a").await;
        let other = store
            .create_project(&f.org, "other", &Actor::cli())
            .await
            .unwrap();
        let owner = f.key(Who::ProjectOwner);
        let body = json!({"name": "bot"});
        let mine = format!("/v1/organization/projects/{}/service_accounts", f.project);
        let theirs = format!("/v1/organization/projects/{}/service_accounts", other.id);
        assert_eq!(
            call(&app, &Method::POST, &mine, owner, &body).await.0,
            StatusCode::OK
        );
        assert_eq!(
            call(&app, &Method::POST, &theirs, owner, &body).await.0,
            StatusCode::FORBIDDEN
        );
        // Reading the other project is a reader's right.
        assert_eq!(
            call(&app, &Method::GET, &theirs, owner, &Value::Null)
                .await
                .0,
            StatusCode::OK
        );
        // Archiving or renaming a project is the organization's business.
        let archive = format!("/v1/organization/projects/{}/archive", f.project);
        assert_eq!(
            call(&app, &Method::POST, &archive, owner, &Value::Null)
                .await
                .0,
            StatusCode::FORBIDDEN
        );
    });
}

/// A member makes a project key of its own: it runs the models, it is listed as the user's,
/// another project refuses it, and it dies when the member leaves the project.
#[test]
fn a_project_member_makes_a_key_of_its_own() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        runtime().block_on(async {
            let (store, storage) = open(&db.url, dir.path()).await;
            let app = bitnet_server::router(state(store.clone(), &storage));
            let f = fixture(&store, &storage, "a").await;
            let other = store
                .create_project(&f.org, "other", &Actor::cli())
                .await
                .unwrap();
            let member = f.key(Who::ProjectMember);
            let keys = format!("/v1/organization/projects/{}/api_keys", f.project);
            let (s, key) = call(
                &app,
                &Method::POST,
                &keys,
                member,
                &json!({"name": "laptop"}),
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{key}");
            let secret = key["value"].as_str().unwrap().to_string();
            assert!(secret.starts_with("sk-proj-"), "{key}");
            assert_eq!(key["owner"]["type"], "user", "{key}");
            let user = key["owner"]["user"]["id"].as_str().unwrap().to_string();
            // It runs the models; its secret is not shown again.
            assert_eq!(
                call(&app, &Method::GET, "/v1/models", &secret, &Value::Null)
                    .await
                    .0,
                StatusCode::OK
            );
            let (_, listed) =
                call(&app, &Method::GET, &keys, f.key(Who::Admin), &Value::Null).await;
            let mine: Vec<&Value> = listed["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| k["id"] == key["id"])
                .collect();
            assert_eq!(mine.len(), 1, "{listed}");
            assert!(mine[0].get("value").is_none(), "{listed}");
            // Not a member of the other project: refused.
            let theirs = format!("/v1/organization/projects/{}/api_keys", other.id);
            assert_eq!(
                call(&app, &Method::POST, &theirs, member, &json!({"name": "x"}))
                    .await
                    .0,
                StatusCode::FORBIDDEN
            );
            // Leaving the project revokes the key.
            let leave = format!("/v1/organization/projects/{}/users/{user}", f.project);
            let (s, e) = call(
                &app,
                &Method::DELETE,
                &leave,
                f.key(Who::Admin),
                &Value::Null,
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{e}");
            assert_eq!(
                call(&app, &Method::GET, "/v1/models", &secret, &Value::Null)
                    .await
                    .0,
                StatusCode::UNAUTHORIZED
            );
        });
    }
}

/// A raw request: status, headers, body bytes.
async fn raw(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    (parts.status, parts.headers, bytes.to_vec())
}

fn multipart(purpose: &str, filename: &str, content: &[u8]) -> (String, Vec<u8>) {
    let b = "bitnetBoundary7";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

/// A file larger than a few sealed chunks goes up, comes back whole and in ranges (across
/// chunk boundaries, from the end, a 416 past it), is listed, is sealed on disk (no plaintext
/// run of it is there), is not another project's, and is gone from disk once deleted.
#[test]
fn files_go_up_and_come_back_whole_and_in_ranges_sealed_on_disk() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        runtime().block_on(async {
            let (store, storage) = open(&db.url, dir.path()).await;
            let app = bitnet_server::router(state(store.clone(), &storage));
            let f = fixture(&store, &storage, "a").await;
            let key = f.key(Who::Project);
            // 700 kB of pseudo-random bytes: three chunks, the last one short.
            let mut x = 0x9e3779b97f4a7c15u64;
            let content: Vec<u8> = (0..700_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // A GGUF by its first bytes: a model file may be uploaded as one.
            let mut content = content;
            content[..4].copy_from_slice(b"GGUF");
            let (ct, body) = multipart("model", "weights.bin", &content);
            let req = Request::post("/v1/files")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", ct)
                .body(Body::from(body))
                .unwrap();
            let (s, _, b) = raw(&app, req).await;
            let file: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(s, StatusCode::OK, "{file}");
            assert_eq!(file["object"], "file");
            assert_eq!(file["bytes"], 700_000);
            assert_eq!(file["purpose"], "model");
            assert_eq!(file["filename"], "weights.bin");
            let id = file["id"].as_str().unwrap().to_string();
            assert!(id.starts_with("file-"));
            let get = |range: Option<&str>| {
                let mut r = Request::get(format!("/v1/files/{id}/content"))
                    .header("authorization", format!("Bearer {key}"));
                if let Some(v) = range {
                    r = r.header("range", v);
                }
                r.body(Body::empty()).unwrap()
            };
            let (s, h, b) = raw(&app, get(None)).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(h["content-length"], "700000");
            assert!(b == content, "the content differs");
            for (spec, want) in [
                ("bytes=0-0", 0..1),
                ("bytes=262140-262150", 262_140..262_151),
                ("bytes=100000-600000", 100_000..600_001),
                ("bytes=524288-", 524_288..700_000),
                ("bytes=-10", 699_990..700_000),
                ("bytes=699999-800000", 699_999..700_000),
            ] {
                let (s, h, b) = raw(&app, get(Some(spec))).await;
                assert_eq!(s, StatusCode::PARTIAL_CONTENT, "{spec}");
                assert_eq!(
                    h["content-range"].to_str().unwrap(),
                    format!("bytes {}-{}/700000", want.start, want.end - 1),
                    "{spec}"
                );
                assert!(b == content[want.clone()], "{spec}: wrong bytes");
            }
            let (s, h, _) = raw(&app, get(Some("bytes=700000-"))).await;
            assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
            assert_eq!(h["content-range"], "bytes */700000");

            // Listed (newest first), with the fixture's five files (a text, a model file and
            // the two registry versions made of it).
            let (s, list) = call(&app, &Method::GET, "/v1/files", key, &Value::Null).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");
            assert_eq!(list["data"].as_array().unwrap().len(), 5, "{list}");
            let (_, only) = call(
                &app,
                &Method::GET,
                "/v1/files?purpose=model",
                key,
                &Value::Null,
            )
            .await;
            assert_eq!(only["data"].as_array().unwrap().len(), 4, "{only}");
            let (_, text) = call(
                &app,
                &Method::GET,
                "/v1/files?purpose=user_data",
                key,
                &Value::Null,
            )
            .await;
            assert_eq!(text["data"].as_array().unwrap().len(), 1, "{text}");

            // Sealed on disk: no 32-byte run of the content is there.
            let objects = storage.list("").await.unwrap();
            assert!(!objects.is_empty());
            for o in &objects {
                let stored = storage.raw(o).await.unwrap();
                for probe in [
                    &content[..32],
                    &content[300_000..300_032],
                    &content[699_968..],
                ] {
                    assert!(
                        !stored.windows(32).any(|w| w == probe),
                        "{o} holds plaintext"
                    );
                }
            }

            // Another project of the same organization does not see it.
            let other = store
                .create_project(&f.org, "other", &Actor::cli())
                .await
                .unwrap();
            let sa = store
                .create_service_account(&f.org, &other.id, "bot", &Actor::cli())
                .await
                .unwrap();
            let (s, _) = call(
                &app,
                &Method::GET,
                &format!("/v1/files/{id}"),
                &sa.api_key.value,
                &Value::Null,
            )
            .await;
            assert_eq!(s, StatusCode::NOT_FOUND);

            // Deleted: gone from the API and from disk.
            let (s, d) = call(
                &app,
                &Method::DELETE,
                &format!("/v1/files/{id}"),
                key,
                &Value::Null,
            )
            .await;
            assert_eq!(s, StatusCode::OK, "{d}");
            assert_eq!(d, json!({"object": "file", "id": id, "deleted": true}));
            let (s, _, _) = raw(&app, get(None)).await;
            assert_eq!(s, StatusCode::NOT_FOUND);
            assert_eq!(storage.list("").await.unwrap().len(), objects.len() - 1);

            // Bad forms: 400 in OpenAI's shape, nothing stored.
            let before = storage.list("").await.unwrap().len();
            for (ct, body) in [
                multipart("nonsense", "a.bin", b"x"),
                multipart("model", "notes.txt", b"plain text is not a model file"),
                (
                    "multipart/form-data; boundary=zz".to_string(),
                    b"--zz\r\nbroken".to_vec(),
                ),
                ("application/json".to_string(), b"{}".to_vec()),
            ] {
                let req = Request::post("/v1/files")
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", ct)
                    .body(Body::from(body))
                    .unwrap();
                let (s, _, b) = raw(&app, req).await;
                let e: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                assert!(s.is_client_error(), "{s} {e}");
                assert!(e["error"]["message"].is_string(), "{e}");
            }
            assert_eq!(storage.list("").await.unwrap().len(), before);
        });
    }
}

/// A file sent in three parts, out of order, becomes one file whose bytes are the parts in
/// the order `complete` names them; a wrong MD5 or size is a 400 that leaves the upload
/// pending; a part past the declared size is 413; a completed or cancelled upload takes no
/// more parts (409); cancelling removes the parts from storage.
#[test]
fn uploads_in_parts_become_one_file() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::new(backend, dir.path());
        runtime().block_on(async {
        let (store, storage) = open(&db.url, dir.path()).await;
        let app = bitnet_server::router(state(store.clone(), &storage));
        let f = fixture(&store, &storage, "a").await;
        let key = f.key(Who::Project);
        let post_part = |upload: &str, data: &[u8]| {
            let b = "pArTbOuNdArY";
            let mut body = format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"blob\"\r\n\r\n"
            )
            .into_bytes();
            body.extend_from_slice(data);
            body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
            Request::post(format!("/v1/uploads/{upload}/parts"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", format!("multipart/form-data; boundary={b}"))
                .body(Body::from(body))
                .unwrap()
        };
        let content: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut content = content;
        content[..4].copy_from_slice(b"GGUF");
        let (s, u) = call(
            &app,
            &Method::POST,
            "/v1/uploads",
            key,
            &json!({"filename": "big.gguf", "purpose": "model", "bytes": 600_000,
                    "mime_type": "application/octet-stream"}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{u}");
        assert_eq!(u["object"], "upload");
        assert_eq!(u["status"], "pending");
        assert!(u["file"].is_null());
        let id = u["id"].as_str().unwrap().to_string();
        // The parts go up last first.
        let mut parts = vec![String::new(); 3];
        for i in [2usize, 0, 1] {
            let (s, _, b) = raw(&app, post_part(&id, &content[i * 200_000..(i + 1) * 200_000])).await;
            let p: Value = serde_json::from_slice(&b).unwrap();
            assert_eq!(s, StatusCode::OK, "{p}");
            assert_eq!(p["object"], "upload.part");
            assert_eq!(p["upload_id"], id.as_str());
            parts[i] = p["id"].as_str().unwrap().to_string();
        }
        // No room for more.
        let (s, _, _) = raw(&app, post_part(&id, b"x")).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
        let complete = format!("/v1/uploads/{id}/complete");
        // A wrong MD5, a missing part, an unknown part: 400, still pending.
        for body in [
            json!({"part_ids": parts, "md5": "00000000000000000000000000000000"}),
            json!({"part_ids": [parts[0], parts[1]]}),
            json!({"part_ids": [parts[0], parts[1], "part_nope"]}),
            json!({"part_ids": [parts[0], parts[0], parts[1]]}),
        ] {
            let (s, e) = call(&app, &Method::POST, &complete, key, &body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        }
        let md5 = {
            use md5::Digest;
            bitnet_platform::ids::hex(&md5::Md5::digest(&content))
        };
        let (s, done) = call(
            &app,
            &Method::POST,
            &complete,
            key,
            &json!({"part_ids": parts, "md5": md5}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{done}");
        assert_eq!(done["status"], "completed");
        assert_eq!(done["file"]["object"], "file");
        assert_eq!(done["file"]["bytes"], 600_000);
        assert_eq!(done["file"]["filename"], "big.gguf");
        let file = done["file"]["id"].as_str().unwrap().to_string();
        // The file's bytes are the parts in order, across part boundaries too.
        let get = |range: &str| {
            Request::get(format!("/v1/files/{file}/content"))
                .header("authorization", format!("Bearer {key}"))
                .header("range", range)
                .body(Body::empty())
                .unwrap()
        };
        let (s, _, b) = raw(&app, get("bytes=0-")).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert!(b == content, "the file is not the parts in order");
        let (_, _, b) = raw(&app, get("bytes=199990-400009")).await;
        assert!(b == content[199_990..400_010], "a range across parts");
        // Done: no more parts, no cancel.
        let (s, _, _) = raw(&app, post_part(&id, b"x")).await;
        assert_eq!(s, StatusCode::CONFLICT);
        let cancel = format!("/v1/uploads/{id}/cancel");
        let (s, _) = call(&app, &Method::POST, &cancel, key, &Value::Null).await;
        assert_eq!(s, StatusCode::CONFLICT);

        // Another upload, cancelled: its parts leave storage.
        let before = storage.list("").await.unwrap().len();
        let (_, u2) = call(
            &app,
            &Method::POST,
            "/v1/uploads",
            key,
            &json!({"filename": "x.bin", "purpose": "model", "bytes": 10, "mime_type": "application/octet-stream"}),
        )
        .await;
        let id2 = u2["id"].as_str().unwrap().to_string();
        let (s, _, _) = raw(&app, post_part(&id2, b"12345")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(storage.list("").await.unwrap().len(), before + 1);
        let (s, c) = call(&app, &Method::POST, &format!("/v1/uploads/{id2}/cancel"), key, &Value::Null).await;
        assert_eq!(s, StatusCode::OK, "{c}");
        assert_eq!(c["status"], "cancelled");
        assert_eq!(storage.list("").await.unwrap().len(), before);
        let (s, _, _) = raw(&app, post_part(&id2, b"x")).await;
        assert_eq!(s, StatusCode::CONFLICT);
        // A model upload whose bytes are no model file is refused when completed.
        let (_, u3) = call(
            &app,
            &Method::POST,
            "/v1/uploads",
            key,
            &json!({"filename": "m.gguf", "purpose": "model", "bytes": 5, "mime_type": "application/octet-stream"}),
        )
        .await;
        let id3 = u3["id"].as_str().unwrap().to_string();
        let (_, _, b) = raw(&app, post_part(&id3, b"hello")).await;
        let p3: Value = serde_json::from_slice(&b).unwrap();
        let (s, e) = call(
            &app,
            &Method::POST,
            &format!("/v1/uploads/{id3}/complete"),
            key,
            &json!({"part_ids": [p3["id"]]}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("model file"), "{e}");
        // Bad creations.
        for body in [
            json!({"filename": "x", "purpose": "nope", "bytes": 1, "mime_type": "a/b"}),
            json!({"filename": "x", "purpose": "model", "bytes": -1, "mime_type": "a/b"}),
            json!({"filename": "", "purpose": "model", "bytes": 1, "mime_type": "a/b"}),
            json!({"filename": "x", "purpose": "model", "bytes": 1}),
        ] {
            let (s, e) = call(&app, &Method::POST, "/v1/uploads", key, &body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {e}");
        }
    });
    }
}
