//! The model registry: an organization's models, their immutable versions and their aliases.
//!
//! A version is made by a quantization job: its artifact is a GGUF file of the project that ran
//! the job, with the content's SHA-256, format, architecture, parameter count, size, source file,
//! job and fidelity report. Versions are numbered 1, 2, ... per model and never renumbered (a
//! deleted version's number is not reused). Aliases (`prod`, `latest`, or any other name) point
//! at one version each: `latest` moves to every new version, `prod` is set on the first and
//! then moved by hand. A version an alias points at cannot be deleted.
//!
//! Requests name a model `NAME` (its `prod` version, else its `latest`), `NAME:ALIAS` or
//! `NAME:VERSION`. An organization sees its own models and those the operator shared
//! platform-wide; its own win on a name clash.

use crate::Store;
use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::new_id;
use crate::store::Change;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// One immutable version of a registry model (`model.version`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelVersion {
    pub object: &'static str,
    pub id: String,
    /// The model's name.
    pub model: String,
    pub version: i64,
    /// The aliases that point at this version.
    pub aliases: Vec<String>,
    /// The GGUF file holding the version (a file of `project_id`).
    pub file_id: String,
    pub project_id: String,
    pub source_file_id: Option<String>,
    pub job_id: Option<String>,
    pub sha256: String,
    /// The ternary type of the linear layers (`tq2_0`, `tq1_0`, `i2_s`).
    pub format: String,
    /// The GGUF architecture (`bitnet-25`, ...).
    pub architecture: String,
    pub parameters: i64,
    pub bytes: i64,
    /// The fidelity report of the conversion.
    pub report: Value,
    pub created_at: i64,
}

impl crate::HasId for ModelVersion {
    fn id(&self) -> &str {
        &self.id
    }
}

/// A registry model as OpenAI's model object, with the registry's fields beside.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryModel {
    /// The name requests use.
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    /// The organization that owns it.
    pub owned_by: String,
    /// Shared by the operator with every organization.
    pub shared: bool,
    /// Alias → version.
    pub aliases: BTreeMap<String, i64>,
    /// Live versions, oldest first.
    pub versions: Vec<i64>,
    /// The version `NAME` alone serves (`prod`, else `latest`).
    pub default_version: Option<i64>,
}

/// What a model reference resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `NAME:VERSION`.
    pub id: String,
    pub version_id: String,
    /// The organization that owns the model (the caller's, or the sharer's).
    pub organization_id: String,
    pub project_id: String,
    pub file_id: String,
    pub bytes: i64,
    pub sha256: String,
}

/// What a job hands the registry.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub name: String,
    pub format: String,
    pub architecture: String,
    pub parameters: i64,
    pub source_file_id: Option<String>,
    pub job_id: Option<String>,
    pub report: Value,
}

/// A model or alias name: 1 to 128 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit
/// (no `:` or `/`, which references and paths use).
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PlatformError::invalid(
            what,
            format!(
                "{what} {name:?} must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
        ))
    }
}

type VersionRow = (
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    String,
    i64,
    i64,
    String,
    i64,
);

const VERSION_COLS: &str = "v.id, m.name, v.version, v.project_id, v.file_id, v.source_file_id, \
                            v.job_id, v.sha256, v.format, v.architecture, v.parameters, v.bytes, \
                            v.report, v.created_at";

fn version_of(r: VersionRow, aliases: Vec<String>) -> ModelVersion {
    ModelVersion {
        object: "model.version",
        id: r.0,
        model: r.1,
        version: r.2,
        aliases,
        project_id: r.3,
        file_id: r.4,
        source_file_id: r.5,
        job_id: r.6,
        sha256: r.7,
        format: r.8,
        architecture: r.9,
        parameters: r.10,
        bytes: r.11,
        report: serde_json::from_str(&r.12).unwrap_or(Value::Null),
        created_at: r.13,
    }
}

impl Store {
    /// The model row `name` visible to `org`: its own, else one shared platform-wide.
    /// (id, owner, name, shared, created_at)
    async fn model_row(&self, org: &str, name: &str) -> Result<(String, String, bool, i64)> {
        let row: Option<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, organization_id, shared, created_at FROM registry_models \
             WHERE name = $1 AND (organization_id = $2 OR shared = 1) \
             ORDER BY CASE WHEN organization_id = $2 THEN 0 ELSE 1 END, created_at, id LIMIT 1",
        )
        .bind(name)
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        let (id, owner, shared, at) = row.ok_or_else(|| PlatformError::not_found("model", name))?;
        Ok((id, owner, shared != 0, at))
    }

    /// The model row `name` of `org` itself (changes need it to be the caller's own).
    async fn own_model_row(&self, org: &str, name: &str) -> Result<String> {
        let (id, owner, _, _) = self.model_row(org, name).await?;
        if owner != org {
            return Err(PlatformError::not_found("model", name));
        }
        Ok(id)
    }

    async fn model_object(
        &self,
        id: &str,
        name: &str,
        owner: &str,
        shared: bool,
        created: i64,
    ) -> Result<RegistryModel> {
        let aliases: Vec<(String, i64)> = sqlx::query_as(
            "SELECT alias, version FROM model_aliases WHERE model_id = $1 ORDER BY alias",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let versions: Vec<(i64,)> = sqlx::query_as(
            "SELECT version FROM model_versions WHERE model_id = $1 AND deleted_at IS NULL ORDER BY version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let aliases: BTreeMap<String, i64> = aliases.into_iter().collect();
        let default_version = aliases
            .get("prod")
            .or_else(|| aliases.get("latest"))
            .copied();
        Ok(RegistryModel {
            id: name.to_string(),
            object: "model",
            created,
            owned_by: owner.to_string(),
            shared,
            aliases,
            versions: versions.into_iter().map(|(v,)| v).collect(),
            default_version,
        })
    }

    /// The registry models `org` may call: its own and the shared ones, by name.
    pub async fn registry_models(&self, org: &str) -> Result<Vec<RegistryModel>> {
        let rows: Vec<(String, String, String, i64, i64)> = sqlx::query_as(
            "SELECT id, name, organization_id, shared, created_at FROM registry_models \
             WHERE organization_id = $1 OR shared = 1 ORDER BY name, CASE WHEN organization_id = $1 THEN 0 ELSE 1 END, created_at",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<RegistryModel> = Vec::new();
        for (id, name, owner, shared, at) in rows {
            if out.last().is_some_and(|m| m.id == name) {
                continue;
            }
            out.push(
                self.model_object(&id, &name, &owner, shared != 0, at)
                    .await?,
            );
        }
        Ok(out)
    }

    /// One registry model `org` may call.
    pub async fn registry_model(&self, org: &str, name: &str) -> Result<RegistryModel> {
        let (id, owner, shared, at) = self.model_row(org, name).await?;
        self.model_object(&id, name, &owner, shared, at).await
    }

    /// A model's live versions, oldest first.
    pub async fn model_versions(&self, org: &str, name: &str) -> Result<Vec<ModelVersion>> {
        let (id, _, _, _) = self.model_row(org, name).await?;
        let rows: Vec<VersionRow> = sqlx::query_as(&format!(
            "SELECT {VERSION_COLS} FROM model_versions v JOIN registry_models m ON m.id = v.model_id \
             WHERE v.model_id = $1 AND v.deleted_at IS NULL ORDER BY v.version"
        ))
        .bind(&id)
        .fetch_all(&self.pool)
        .await?;
        let aliases: Vec<(String, i64)> = sqlx::query_as(
            "SELECT alias, version FROM model_aliases WHERE model_id = $1 ORDER BY alias",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let names = aliases
                    .iter()
                    .filter(|(_, v)| *v == r.2)
                    .map(|(a, _)| a.clone())
                    .collect();
                version_of(r, names)
            })
            .collect())
    }

    /// What `reference` (`NAME`, `NAME:ALIAS` or `NAME:VERSION`) names for `org`; `Ok(None)`
    /// when no registry model has that name.
    pub async fn resolve_model(&self, org: &str, reference: &str) -> Result<Option<Resolved>> {
        let (name, tag) = match reference.split_once(':') {
            Some((n, t)) => (n, Some(t)),
            None => (reference, None),
        };
        if check_name("model", name).is_err() {
            return Ok(None);
        }
        let (id, owner, _, _) = match self.model_row(org, name).await {
            Ok(r) => r,
            Err(PlatformError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let version = match tag {
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                t.parse::<i64>().ok()
            }
            Some(alias) => self.alias_version(&id, alias).await?,
            None => match self.alias_version(&id, "prod").await? {
                Some(v) => Some(v),
                None => self.alias_version(&id, "latest").await?,
            },
        };
        let Some(version) = version else {
            return Ok(None);
        };
        let row: Option<(String, String, String, i64, String)> = sqlx::query_as(
            "SELECT id, project_id, file_id, bytes, sha256 FROM model_versions \
             WHERE model_id = $1 AND version = $2 AND deleted_at IS NULL",
        )
        .bind(&id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(vid, project, file, bytes, sha)| Resolved {
            id: format!("{name}:{version}"),
            version_id: vid,
            organization_id: owner,
            project_id: project,
            file_id: file,
            bytes,
            sha256: sha,
        }))
    }

    async fn alias_version(&self, model_id: &str, alias: &str) -> Result<Option<i64>> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT version FROM model_aliases WHERE model_id = $1 AND alias = $2")
                .bind(model_id)
                .bind(alias)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(v,)| v))
    }

    /// Point `alias` of the organization's model `name` at `version`.
    pub async fn set_alias(
        &self,
        org: &str,
        name: &str,
        alias: &str,
        version: i64,
        by: &Actor,
    ) -> Result<RegistryModel> {
        check_name("alias", alias)?;
        if alias.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PlatformError::invalid(
                "alias",
                "an alias cannot be a number (NAME:N names version N)",
            ));
        }
        let id = self.own_model_row(org, name).await?;
        let mut c = self.change(org).await?;
        let live: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM model_versions WHERE model_id = $1 AND version = $2 AND deleted_at IS NULL",
        )
        .bind(&id)
        .bind(version)
        .fetch_optional(&mut *c.tx)
        .await?;
        if live.is_none() {
            return Err(PlatformError::not_found(
                "model version",
                format!("{name}:{version}"),
            ));
        }
        upsert_alias(&mut c, &id, alias, version).await?;
        c.audit(AuditEvent::new(
            "model.alias_set",
            by,
            &id,
            json!({"id": id, "data": {"model": name, "alias": alias, "version": version}}),
        ))
        .await?;
        c.commit().await?;
        self.registry_model(org, name).await
    }

    /// Remove `alias` from the organization's model `name`.
    pub async fn delete_alias(
        &self,
        org: &str,
        name: &str,
        alias: &str,
        by: &Actor,
    ) -> Result<RegistryModel> {
        let id = self.own_model_row(org, name).await?;
        let mut c = self.change(org).await?;
        let n = sqlx::query("DELETE FROM model_aliases WHERE model_id = $1 AND alias = $2")
            .bind(&id)
            .bind(alias)
            .execute(&mut *c.tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Err(PlatformError::not_found(
                "model alias",
                format!("{name}:{alias}"),
            ));
        }
        c.audit(AuditEvent::new(
            "model.alias_deleted",
            by,
            &id,
            json!({"id": id, "data": {"model": name, "alias": alias}}),
        ))
        .await?;
        c.commit().await?;
        self.registry_model(org, name).await
    }

    /// Delete a version of the organization's model: refused while an alias points at it.
    /// Its file stays (a file of the project; the Files API deletes it).
    pub async fn delete_model_version(
        &self,
        org: &str,
        name: &str,
        version: i64,
        by: &Actor,
    ) -> Result<()> {
        let id = self.own_model_row(org, name).await?;
        let mut c = self.change(org).await?;
        let aliases: Vec<(String,)> = sqlx::query_as(
            "SELECT alias FROM model_aliases WHERE model_id = $1 AND version = $2 ORDER BY alias",
        )
        .bind(&id)
        .bind(version)
        .fetch_all(&mut *c.tx)
        .await?;
        if !aliases.is_empty() {
            let names: Vec<String> = aliases.into_iter().map(|(a,)| a).collect();
            return Err(PlatformError::Conflict(format!(
                "version {version} of {name} is what {} point{} at; move {} first",
                names.join(", "),
                if names.len() == 1 { "s" } else { "" },
                if names.len() == 1 { "it" } else { "them" }
            )));
        }
        let n = sqlx::query(
            "UPDATE model_versions SET deleted_at = $1 WHERE model_id = $2 AND version = $3 AND deleted_at IS NULL",
        )
        .bind(c.at)
        .bind(&id)
        .bind(version)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(PlatformError::not_found(
                "model version",
                format!("{name}:{version}"),
            ));
        }
        c.audit(AuditEvent::new(
            "model.version_deleted",
            by,
            &id,
            json!({"id": id, "data": {"model": name, "version": version}}),
        ))
        .await?;
        c.commit().await?;
        Ok(())
    }

    /// Share (or stop sharing) organization `org`'s model `name` with every organization
    /// (the operator's decision).
    pub async fn share_model(
        &self,
        org: &str,
        name: &str,
        shared: bool,
        by: &Actor,
    ) -> Result<RegistryModel> {
        let id = self.own_model_row(org, name).await?;
        let mut c = self.change(org).await?;
        sqlx::query("UPDATE registry_models SET shared = $1 WHERE id = $2")
            .bind(i64::from(shared))
            .bind(&id)
            .execute(&mut *c.tx)
            .await?;
        c.audit(AuditEvent::new(
            if shared {
                "model.shared"
            } else {
                "model.unshared"
            },
            by,
            &id,
            json!({"id": id, "data": {"model": name}}),
        ))
        .await?;
        c.commit().await?;
        self.registry_model(org, name).await
    }

    /// Whether a live version holds file `file_id` (such a file cannot be deleted).
    pub(crate) async fn file_in_registry(&self, file_id: &str) -> Result<Option<String>> {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT m.name, v.version FROM model_versions v JOIN registry_models m ON m.id = v.model_id \
             WHERE v.file_id = $1 AND v.deleted_at IS NULL LIMIT 1",
        )
        .bind(file_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(n, v)| format!("{n}:{v}")))
    }

    /// A new version of model `nv.name` (made if missing) held by `file`, within change `c`:
    /// `latest` moves to it, and `prod` is set when the model has none. Returns `NAME:VERSION`.
    pub(crate) async fn insert_version_in(
        &self,
        c: &mut Change,
        org: &str,
        project: &str,
        file: &crate::files::FileObject,
        nv: &NewVersion,
        by: &Actor,
    ) -> Result<String> {
        check_name("model", &nv.name)?;
        let existing: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM registry_models WHERE organization_id = $1 AND name = $2",
        )
        .bind(org)
        .bind(&nv.name)
        .fetch_optional(&mut *c.tx)
        .await?;
        let model_id = match existing {
            Some((id,)) => id,
            None => {
                let id = new_id("model_");
                sqlx::query(
                    "INSERT INTO registry_models (id, organization_id, name, shared, created_at) VALUES ($1, $2, $3, 0, $4)",
                )
                .bind(&id)
                .bind(org)
                .bind(&nv.name)
                .bind(c.at)
                .execute(&mut *c.tx)
                .await?;
                c.audit(AuditEvent::new(
                    "model.created",
                    by,
                    &id,
                    json!({"id": id, "data": {"model": nv.name}}),
                ))
                .await?;
                id
            }
        };
        // Numbers are never reused: deleted versions count.
        let (next,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions WHERE model_id = $1",
        )
        .bind(&model_id)
        .fetch_one(&mut *c.tx)
        .await?;
        let vid = new_id("mver_");
        sqlx::query(
            "INSERT INTO model_versions (id, model_id, version, project_id, file_id, source_file_id, job_id, sha256, format, architecture, parameters, bytes, report, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&vid)
        .bind(&model_id)
        .bind(next)
        .bind(project)
        .bind(&file.id)
        .bind(nv.source_file_id.as_deref())
        .bind(nv.job_id.as_deref())
        .bind(&file.sha256)
        .bind(&nv.format)
        .bind(&nv.architecture)
        .bind(nv.parameters)
        .bind(file.bytes)
        .bind(nv.report.to_string())
        .bind(c.at)
        .execute(&mut *c.tx)
        .await?;
        upsert_alias(c, &model_id, "latest", next).await?;
        let has_prod: Option<(i64,)> = sqlx::query_as(
            "SELECT version FROM model_aliases WHERE model_id = $1 AND alias = 'prod'",
        )
        .bind(&model_id)
        .fetch_optional(&mut *c.tx)
        .await?;
        if has_prod.is_none() {
            upsert_alias(c, &model_id, "prod", next).await?;
        }
        c.audit(
            AuditEvent::new(
                "model.version_created",
                by,
                &vid,
                json!({"id": vid, "data": {"model": nv.name, "version": next, "file": file.id, "sha256": file.sha256}}),
            )
            .in_project(project),
        )
        .await?;
        Ok(format!("{}:{next}", nv.name))
    }
}

async fn upsert_alias(c: &mut Change, model_id: &str, alias: &str, version: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO model_aliases (model_id, alias, version, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (model_id, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
    )
    .bind(model_id)
    .bind(alias)
    .bind(version)
    .bind(c.at)
    .execute(&mut *c.tx)
    .await?;
    Ok(())
}
