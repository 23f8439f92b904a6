//! Serving the model registry: versions are loaded on first use (their GGUF fetched from
//! storage into a local cache directory, its SHA-256 checked), kept within a memory budget
//! (least recently used first out), and unloaded when idle. A request holds its model's engine
//! while it runs, so moving `prod` to a new version, or evicting an old one, never drops an
//! in-flight stream: the old engine finishes its sequences and stops.
//!
//! Routes beside OpenAI's `GET /v1/models[/{model}]`: `GET /v1/models/{model}/versions`,
//! `POST /v1/models/{model}/aliases/{alias}` (`{"version": N}`),
//! `DELETE /v1/models/{model}/aliases/{alias}`, `DELETE /v1/models/{model}/versions/{version}`.

use crate::AppState;
use crate::ServedModel;
use crate::auth::Caller;
use crate::engine::EngineConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::Json;
use axum::extract::{Path, State};
use bitnet_platform::registry::{ModelVersion, RegistryModel, Resolved};
use bitnet_platform::storage::Storage;
use bitnet_platform::{List, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How registry models are served.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where fetched versions are kept while loaded.
    pub cache_dir: PathBuf,
    /// Bytes of loaded versions (their file sizes) kept at most; the least recently used go
    /// first. A version larger than the budget is still served, alone.
    pub memory_budget: u64,
    /// A version unused this long is unloaded.
    pub idle_unload: Duration,
    pub engine: EngineConfig,
    pub head_quant: Option<bitnet_model::HeadQuant>,
    pub ctx: Option<usize>,
}

struct Entry {
    model: Arc<ServedModel>,
    bytes: u64,
    last_used: Instant,
    path: PathBuf,
}

/// The loaded registry versions of one server.
pub struct ModelCache {
    store: Store,
    storage: Arc<Storage>,
    cfg: RegistryConfig,
    metrics: Arc<Metrics>,
    entries: Mutex<HashMap<String, Entry>>,
    loading: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("cfg", &self.cfg)
            .field("loaded", &self.loaded())
            .finish()
    }
}

impl ModelCache {
    pub fn new(
        store: Store,
        storage: Arc<Storage>,
        cfg: RegistryConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        // A directory of this process's own (servers on one host may share the work
        // directory); those of processes that are gone are removed.
        std::fs::create_dir_all(&cfg.cache_dir)?;
        if let Ok(dir) = std::fs::read_dir(&cfg.cache_dir) {
            for e in dir.flatten() {
                let stale = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("pid-"))
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
                if stale {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let mut cfg = cfg;
        cfg.cache_dir = cfg.cache_dir.join(format!("pid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cfg.cache_dir);
        std::fs::create_dir_all(&cfg.cache_dir)?;
        Ok(Self {
            store,
            storage,
            cfg,
            metrics,
            entries: Mutex::new(HashMap::new()),
            loading: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The loaded versions: (`NAME:VERSION`, bytes).
    pub fn loaded(&self) -> Vec<(String, u64)> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, u64)> = e.values().map(|e| (e.model.id.clone(), e.bytes)).collect();
        v.sort();
        v
    }

    fn hit(&self, version_id: &str) -> Option<Arc<ServedModel>> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.get_mut(version_id).map(|e| {
            e.last_used = Instant::now();
            e.model.clone()
        })
    }

    /// The engine of version `r`, loaded if needed.
    pub async fn get(&self, r: &Resolved) -> Result<Arc<ServedModel>, ApiError> {
        if let Some(m) = self.hit(&r.version_id) {
            return Ok(m);
        }
        let gate = {
            let mut l = self.loading.lock().await;
            l.entry(r.version_id.clone()).or_default().clone()
        };
        let _held = gate.lock().await;
        if let Some(m) = self.hit(&r.version_id) {
            return Ok(m);
        }
        let loaded = self.load(r).await;
        self.loading.lock().await.remove(&r.version_id);
        let (model, path) = loaded?;
        let model = Arc::new(model);
        let evicted = {
            let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            e.insert(
                r.version_id.clone(),
                Entry {
                    model: model.clone(),
                    bytes: r.bytes as u64,
                    last_used: Instant::now(),
                    path,
                },
            );
            // Least recently used first, never the one just loaded.
            let mut evicted = Vec::new();
            loop {
                let total: u64 = e.values().map(|x| x.bytes).sum();
                if total <= self.cfg.memory_budget {
                    break;
                }
                let Some(victim) = e
                    .iter()
                    .filter(|(k, _)| **k != r.version_id)
                    .min_by_key(|(_, x)| x.last_used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                if let Some(x) = e.remove(&victim) {
                    evicted.push(x);
                }
            }
            evicted
        };
        for x in evicted {
            tracing::info!(model = %x.model.id, "unloaded to stay within the model memory budget");
            let _ = std::fs::remove_file(&x.path);
        }
        tracing::info!(model = %r.id, bytes = r.bytes, "registry model loaded");
        Ok(model)
    }

    /// Fetch (checking the SHA-256) and load version `r`.
    async fn load(&self, r: &Resolved) -> Result<(ServedModel, PathBuf), ApiError> {
        let path = self.cfg.cache_dir.join(format!("{}.gguf", r.version_id));
        let tmp = self
            .cfg
            .cache_dir
            .join(format!(".{}.{}.part", r.version_id, std::process::id()));
        let (_, mut body) = self
            .store
            .file_content(
                &self.storage,
                &r.organization_id,
                &r.project_id,
                &r.file_id,
                None,
            )
            .await?;
        let io =
            |e: std::io::Error| ApiError::Internal(format!("cannot cache model {}: {e}", r.id));
        let mut out = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut sha = Sha256::new();
        let fetched = async {
            while let Some(piece) = body.next().await {
                let piece = piece?;
                sha.update(&piece);
                out.write_all(&piece).await.map_err(io)?;
            }
            out.flush().await.map_err(io)?;
            Ok::<(), ApiError>(())
        }
        .await;
        drop(out);
        let digest = bitnet_platform::ids::hex(&sha.finalize());
        if let Err(e) = fetched {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        if digest != r.sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ApiError::Internal(format!(
                "model {} read back from storage with SHA-256 {digest}, not {}",
                r.id, r.sha256
            )));
        }
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        let (id, cfg, metrics, p) = (
            r.id.clone(),
            self.cfg.clone(),
            self.metrics.clone(),
            path.clone(),
        );
        let served = tokio::task::spawn_blocking(move || -> Result<ServedModel, ApiError> {
            let mut loaded = bitnet_model::load(&p)
                .map_err(|e| ApiError::Internal(format!("cannot load model {id}: {e}")))?;
            if let Some(q) = cfg.head_quant {
                loaded.model.quantize_head(q);
            }
            if let Some(c) = cfg.ctx {
                loaded.model.spec.context = c;
            }
            ServedModel::start(id, loaded, &cfg.engine, metrics).map_err(ApiError::Internal)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("loading a model failed: {e}")))?;
        match served {
            Ok(m) => Ok((m, path)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(e)
            }
        }
    }

    /// Unload the versions unused for the idle time.
    pub fn unload_idle(&self) {
        let gone: Vec<Entry> = {
            let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let idle: Vec<String> = e
                .iter()
                .filter(|(_, x)| x.last_used.elapsed() >= self.cfg.idle_unload)
                .map(|(k, _)| k.clone())
                .collect();
            idle.iter().filter_map(|k| e.remove(k)).collect()
        };
        for x in gone {
            tracing::info!(model = %x.model.id, "idle registry model unloaded");
            let _ = std::fs::remove_file(&x.path);
        }
    }

    /// Cancel every running generation (shutdown).
    pub fn cancel_all(&self) {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for x in e.values() {
            x.model.engine.cancel_all();
        }
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

/// A model of `GET /v1/models`: a served file's, or a registry model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
    /// Tokens a sequence may hold (loaded models only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// Registry models: alias → version, live versions, the version `NAME` serves, and
    /// whether the operator shares it with every organization.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub registry: Option<serde_json::Value>,
}

fn registry_object(m: RegistryModel) -> ModelObject {
    ModelObject {
        id: m.id.clone(),
        object: "model",
        created: m.created,
        owned_by: m.owned_by.clone(),
        context_length: None,
        registry: Some(serde_json::json!({
            "aliases": m.aliases, "versions": m.versions,
            "default_version": m.default_version, "shared": m.shared,
        })),
    }
}

fn served_object(m: &ServedModel) -> ModelObject {
    ModelObject {
        id: m.id.clone(),
        object: "model",
        created: m.created as i64,
        owned_by: "bitnet-rust".into(),
        context_length: Some(m.context),
        registry: None,
    }
}

/// OpenAI's model list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelsList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// `GET /v1/models`: the models served from the command line, then the registry's models the
/// caller's organization may call.
#[utoipa::path(get, path = "/v1/models", tag = "inference",
    responses((status = 200, body = ModelsList), (status = 401, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_models(State(s): State<AppState>, who: Caller) -> Answer<ModelsList> {
    let mut data: Vec<ModelObject> = s.models.iter().map(|m| served_object(m)).collect();
    if s.registry.is_some()
        && let Some(org) = who.cred.organization_id.as_deref()
    {
        data.extend(
            s.store
                .registry_models(org)
                .await?
                .into_iter()
                .map(registry_object),
        );
    }
    Ok(Json(ModelsList {
        object: "list",
        data,
    }))
}

/// `GET /v1/models/{model}`.
pub async fn get_model(
    State(s): State<AppState>,
    who: Caller,
    Path(name): Path<String>,
) -> Answer<ModelObject> {
    if let Some(m) = s.model(&name) {
        return Ok(Json(served_object(&m)));
    }
    Ok(Json(registry_object(
        s.store.registry_model(who.org()?, &name).await?,
    )))
}

/// `GET /v1/models/{model}/versions`.
pub async fn list_versions(
    State(s): State<AppState>,
    who: Caller,
    Path(name): Path<String>,
) -> Answer<List<ModelVersion>> {
    Ok(Json(List::new(
        s.store.model_versions(who.org()?, &name).await?,
        false,
    )))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    /// The version the alias points at.
    pub version: i64,
}

/// `POST /v1/models/{model}/aliases/{alias}`.
pub async fn set_alias(
    State(s): State<AppState>,
    who: Caller,
    Path((name, alias)): Path<(String, String)>,
    crate::api::ApiJson(b): crate::api::ApiJson<AliasBody>,
) -> Answer<ModelObject> {
    Ok(Json(registry_object(
        s.store
            .set_alias(who.org()?, &name, &alias, b.version, &who.actor)
            .await?,
    )))
}

/// `DELETE /v1/models/{model}/aliases/{alias}`.
pub async fn delete_alias(
    State(s): State<AppState>,
    who: Caller,
    Path((name, alias)): Path<(String, String)>,
) -> Answer<ModelObject> {
    Ok(Json(registry_object(
        s.store
            .delete_alias(who.org()?, &name, &alias, &who.actor)
            .await?,
    )))
}

/// `DELETE /v1/models/{model}/versions/{version}`.
pub async fn delete_version(
    State(s): State<AppState>,
    who: Caller,
    Path((name, version)): Path<(String, String)>,
) -> Answer<bitnet_platform::Deleted> {
    let v: i64 = version
        .parse()
        .map_err(|_| ApiError::bad("version", "a version is a number"))?;
    s.store
        .delete_model_version(who.org()?, &name, v, &who.actor)
        .await?;
    Ok(Json(bitnet_platform::Deleted::new(
        "model.version",
        &format!("{name}:{v}"),
    )))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareBody {
    /// Whether every organization may call the model.
    pub shared: bool,
}

/// `POST /v1/operator/organizations/{organization_id}/models/{model}/share` (operator keys):
/// share an organization's model with every organization, or stop sharing it.
pub async fn share_model(
    State(s): State<AppState>,
    who: Caller,
    Path((org, name)): Path<(String, String)>,
    crate::api::ApiJson(b): crate::api::ApiJson<ShareBody>,
) -> Answer<ModelObject> {
    let org = s.store.organization(&org).await?;
    Ok(Json(registry_object(
        s.store
            .share_model(&org.id, &name, b.shared, &who.actor)
            .await?,
    )))
}

macro_rules! doc {
    ($method:ident, $path:literal, $name:ident $(, $param:literal)*) => {
        #[utoipa::path($method, path = $path, tag = "models",
            params($(($param = String, Path, description = "A registry model, alias or version")),*),
            responses((status = 200, description = "A model object, its versions, or a deletion"),
                      (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
                      (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
                      (status = 409, body = crate::error::ErrorBody)),
            security(("api_key" = [])))]
        #[allow(dead_code)]
        fn $name() {}
    };
}

doc!(get, "/v1/models/{model}", doc_get_model, "model");
doc!(
    get,
    "/v1/models/{model}/versions",
    doc_list_versions,
    "model"
);
doc!(
    delete,
    "/v1/models/{model}/aliases/{alias}",
    doc_delete_alias,
    "model",
    "alias"
);
doc!(
    delete,
    "/v1/models/{model}/versions/{version}",
    doc_delete_version,
    "model",
    "version"
);

/// `POST /v1/models/{model}/aliases/{alias}` with its body described.
#[utoipa::path(post, path = "/v1/models/{model}/aliases/{alias}", tag = "models", request_body = AliasBody,
    params(("model" = String, Path, description = "A registry model"), ("alias" = String, Path, description = "The alias: prod, latest, or any name")),
    responses((status = 200, description = "The model object"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_set_alias() {}

/// The operator's share route with its body described.
#[utoipa::path(post, path = "/v1/operator/organizations/{organization_id}/models/{model}/share", tag = "operator", request_body = ShareBody,
    params(("organization_id" = String, Path, description = "An organization's id or name"), ("model" = String, Path, description = "One of its registry models")),
    responses((status = 200, description = "The model object"),
              (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
#[allow(dead_code)]
fn doc_share_model() {}
