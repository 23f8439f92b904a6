//! The platform operator's commands, straight on the database: `bitnet orgs` (organizations),
//! `bitnet keys` (operator, admin and project keys) and `bitnet audit` (verify and export the
//! hash-chained audit log). Every change is audited, with the CLI as its actor.

use crate::config::{self, Config};
use anyhow::{Context, Result, bail};
use bitnet_platform::audit::Actor;
use bitnet_platform::keys::ApiKey;
use bitnet_platform::orgs::Organization;
use bitnet_platform::{Page, Store};
use std::path::PathBuf;

/// Where the database is: `--database`, else the config file's `server.database`.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Database URL: sqlite://PATH or postgres://USER@HOST/DB (default: `server.database` from
    /// the config file).
    #[arg(long, global = true)]
    pub database: Option<String>,
    /// Configuration file (default: $BITNET_CONFIG or ~/.config/bitnet/config.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl DbArgs {
    pub(crate) fn url(&self) -> Result<String> {
        let cfg = Config::load_or_default(&config::path(self.config.as_deref()))?;
        Ok(self.database.clone().unwrap_or(cfg.server.database))
    }

    /// The master key file `bitnet serve` would use with these arguments.
    fn master_key_file(&self) -> Result<PathBuf> {
        let cfg = Config::load_or_default(&config::path(self.config.as_deref()))?;
        let url = self.database.clone().unwrap_or(cfg.server.database.clone());
        Ok(beside_database(&url, self.database.is_some())
            .map(|(_, k)| k)
            .unwrap_or(cfg.server.master_key_file))
    }
}

pub async fn open_store(database: &str) -> Result<Store> {
    Store::open(database)
        .await
        .with_context(|| format!("cannot open the database {database}"))
}

/// The master key: `BITNET_MASTER_KEY` (the key itself), else the key file given, else the
/// default one (made with a new key if missing).
pub fn master_key(
    file: Option<&std::path::Path>,
    default: &std::path::Path,
) -> Result<std::sync::Arc<dyn bitnet_platform::crypto::KeyProvider>> {
    use bitnet_platform::crypto::MasterKey;
    let key = match std::env::var("BITNET_MASTER_KEY") {
        Ok(v) if !v.trim().is_empty() => {
            MasterKey::parse(&v).context("BITNET_MASTER_KEY is not a master key")?
        }
        _ => match file {
            Some(f) => MasterKey::from_file(f)?,
            None => MasterKey::load_or_create(default)?,
        },
    };
    Ok(std::sync::Arc::new(key))
}

/// Where a server on `database` keeps its files and master key when not told: beside an
/// SQLite file given on the command line, else the configured defaults.
pub fn beside_database(database: &str, given: bool) -> Option<(String, std::path::PathBuf)> {
    if !given {
        return None;
    }
    let path = database.strip_prefix("sqlite://")?.split('?').next()?;
    let p = std::path::Path::new(path);
    let (dir, stem) = (p.parent()?, p.file_stem()?.to_str()?);
    if path.contains(":memory:") || stem.is_empty() {
        return None;
    }
    let dir = std::path::absolute(dir).ok()?;
    Some((
        format!("file://{}", dir.join(format!("{stem}-storage")).display()),
        dir.join(format!("{stem}.master.key")),
    ))
}

pub(crate) fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

#[derive(Debug, clap::Args)]
pub struct OrgsArgs {
    #[command(subcommand)]
    pub action: OrgsAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum OrgsAction {
    /// Create an organization and print it (its `id` names it from then on).
    Create { name: String },
    /// List organizations.
    List,
}

pub fn orgs(args: OrgsArgs) -> Result<()> {
    let url = args.db.url()?;
    block_on(async move {
        let store = open_store(&url).await?;
        match args.action {
            OrgsAction::Create { name } => {
                let org = store.create_organization(&name, &Actor::cli()).await?;
                if args.db.json {
                    println!("{}", serde_json::to_string(&org)?);
                } else {
                    println!("{}", org.id);
                    eprintln!(
                        "created organization `{}`; give it an admin key with `bitnet keys create --org {} --admin`",
                        org.name, org.name
                    );
                }
            }
            OrgsAction::List => {
                let orgs = store.organizations(&Page::all()).await?.data;
                if args.db.json {
                    println!("{}", serde_json::to_string_pretty(&orgs)?);
                } else {
                    println!("{:<40}  NAME", "ID");
                    for o in orgs {
                        println!("{:<40}  {}", o.id, o.name);
                    }
                }
            }
        }
        Ok(())
    })
}

/// The organization `--org` names (id or name); without it, the one called `default`, or the
/// only one.
pub async fn pick_org(store: &Store, org: Option<&str>) -> Result<Organization> {
    if let Some(o) = org {
        return store.organization(o).await.map_err(|_| {
            anyhow::anyhow!("no organization with id or name {o:?} (`bitnet orgs list` shows them)")
        });
    }
    let all = store.organizations(&Page::all()).await?.data;
    if let Some(d) = all.iter().find(|o| o.name == "default") {
        return Ok(d.clone());
    }
    match all.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no organization yet: create one with `bitnet orgs create NAME` (or start `bitnet serve` once)"
        ),
        many => bail!(
            "name the organization with --org (one of: {})",
            many.iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// Create a key and print it (once: only its hash is stored). Default: a project key (for
    /// inference), made as a new service account of the organization's project.
    Create {
        /// A label: who or what uses the key (a project key's service account takes it).
        #[arg(long, default_value = "cli")]
        name: String,
        /// The organization (id or name; default: `default`, or the only one).
        #[arg(long)]
        org: Option<String>,
        /// An admin key: manages the organization (/v1/organization/...), cannot call models.
        #[arg(long, conflicts_with_all = ["operator", "project"])]
        admin: bool,
        /// An operator key: creates organizations and their admin keys (/v1/operator/...).
        #[arg(long, conflicts_with_all = ["org", "project"])]
        operator: bool,
        /// The project of a project key (id or name; default: the organization's first).
        #[arg(long)]
        project: Option<String>,
    },
    /// List keys (never the keys themselves: their redacted values).
    List {
        #[arg(long)]
        org: Option<String>,
        /// The operator keys instead.
        #[arg(long, conflicts_with = "org")]
        operator: bool,
    },
    /// Revoke a key by id or redacted value.
    Revoke { id: String },
    /// Re-wrap every organization's data key with a new master key (files and secrets are not
    /// rewritten). The current key: `BITNET_MASTER_KEY`, `--master-key-file`, or the file
    /// `bitnet serve` uses; the new one is made in `--new-master-key-file` if that is missing.
    /// Restart the servers with the new key afterwards.
    RotateMaster {
        #[arg(long, value_name = "PATH")]
        master_key_file: Option<PathBuf>,
        #[arg(long, value_name = "PATH")]
        new_master_key_file: PathBuf,
    },
}

fn print_key(key: &ApiKey, value: &str, json: bool) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(key)?;
        v["key"] = value.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{value}");
        eprintln!(
            "{} {} (\"{}\"): keep the key now, it is not shown again",
            key.object, key.id, key.name
        );
    }
    Ok(())
}

pub fn keys(args: KeysArgs) -> Result<()> {
    let url = args.db.url()?;
    let json = args.db.json;
    let default_master = args.db.master_key_file()?;
    block_on(async move {
        let store = open_store(&url).await?;
        match args.action {
            KeysAction::RotateMaster {
                master_key_file,
                new_master_key_file,
            } => {
                use bitnet_platform::crypto::{KeyProvider, MasterKey};
                if master_key_file.is_none()
                    && std::env::var("BITNET_MASTER_KEY").is_err()
                    && !default_master.exists()
                {
                    anyhow::bail!(
                        "no master key at {}: give --master-key-file or BITNET_MASTER_KEY",
                        default_master.display()
                    );
                }
                let old = master_key(master_key_file.as_deref(), &default_master)?;
                store
                    .clone()
                    .with_master_key(old.clone())
                    .check_master_key()
                    .await?;
                let new = MasterKey::load_or_create(&new_master_key_file)?;
                if new.key_id() == old.key_id() {
                    anyhow::bail!(
                        "{} holds the current master key ({}); give a new file",
                        new_master_key_file.display(),
                        old.key_id()
                    );
                }
                let n = store.with_master_key(old).rotate_master_key(&new).await?;
                println!("{}", new.key_id());
                eprintln!(
                    "{n} data keys now wrapped by master key {} ({}); start the servers with it",
                    new.key_id(),
                    new_master_key_file.display()
                );
                Ok(())
            }
            KeysAction::Create {
                name,
                org,
                admin,
                operator,
                project,
            } => {
                if operator {
                    let (key, value) = store.create_operator_key(&name).await?;
                    return print_key(&key, &value, json);
                }
                let org = pick_org(&store, org.as_deref()).await?;
                if admin {
                    let (key, value) = store
                        .create_admin_key(&org.id, &name, &Actor::cli())
                        .await?;
                    return print_key(&key, &value, json);
                }
                let project = pick_project(&store, &org, project.as_deref()).await?;
                let sa = store
                    .create_service_account(&org.id, &project, &name, &Actor::cli())
                    .await?;
                let key = store.project_key(&org.id, &project, &sa.api_key.id).await?;
                print_key(&key, &sa.api_key.value, json)
            }
            KeysAction::List { org, operator } => {
                let keys = if operator {
                    store.all_keys(None).await?
                } else {
                    let org = pick_org(&store, org.as_deref()).await?;
                    store.all_keys(Some(&org.id)).await?
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&keys)?);
                    return Ok(());
                }
                println!(
                    "{:<36}  {:<22}  {:<8}  {:<8}  NAME",
                    "ID", "KEY", "KIND", "STATE"
                );
                for k in keys {
                    let kind = match k.object {
                        "organization.admin_api_key" => "admin",
                        "organization.project.api_key" => "project",
                        _ => "operator",
                    };
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<36}  {:<22}  {kind:<8}  {state:<8}  {}",
                        k.id, k.redacted_value, k.name
                    );
                }
                Ok(())
            }
            KeysAction::Revoke { id } => {
                let k = store.revoke_any_key(&id).await.map_err(|_| {
                    anyhow::anyhow!("no active key with id or redacted value {id:?} (`bitnet keys list` shows them)")
                })?;
                eprintln!("revoked {} ({})", k.id, k.redacted_value);
                Ok(())
            }
        }
    })
}

/// A project of `org` by id or name; without one, its first active project, made if none.
async fn pick_project(store: &Store, org: &Organization, project: Option<&str>) -> Result<String> {
    let projects = store.projects(&org.id, &Page::all(), false).await?.data;
    if let Some(p) = project {
        return projects
            .iter()
            .find(|x| x.id == p || x.name == p)
            .map(|x| x.id.clone())
            .ok_or_else(|| {
                anyhow::anyhow!("organization `{}` has no active project {p:?}", org.name)
            });
    }
    match projects.first() {
        Some(p) => Ok(p.id.clone()),
        None => Ok(store
            .create_project(&org.id, "Default project", &Actor::cli())
            .await?
            .id),
    }
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: AuditAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditAction {
    /// Check every organization's hash chain (or one's); exits non-zero naming the first row
    /// that was edited, deleted, inserted or reordered.
    Verify {
        #[arg(long)]
        org: Option<String>,
    },
    /// Print an organization's audit log as JSON lines, oldest first.
    Export {
        #[arg(long)]
        org: Option<String>,
    },
}

pub fn audit(args: AuditArgs) -> Result<()> {
    let url = args.db.url()?;
    let json = args.db.json;
    block_on(async move {
        let store = open_store(&url).await?;
        match args.action {
            AuditAction::Verify { org } => {
                let only = match org {
                    Some(o) => Some(pick_org(&store, Some(&o)).await?.id),
                    None => None,
                };
                let reports = store.verify_audit(only.as_deref()).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                }
                let rows: u64 = reports.iter().map(|r| r.rows).sum();
                if let Some((r, bad)) = reports
                    .iter()
                    .find_map(|r| r.first_bad.as_ref().map(|b| (r, b)))
                {
                    bail!(
                        "audit log broken in organization {}: row {} (sequence {}): {}",
                        r.organization_id,
                        bad.id,
                        bad.seq,
                        bad.reason
                    );
                }
                if !json {
                    println!(
                        "audit log intact: {} organizations, {rows} events",
                        reports.len()
                    );
                }
                Ok(())
            }
            AuditAction::Export { org } => {
                let org = pick_org(&store, org.as_deref()).await?;
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for e in store.audit_export(&org.id).await? {
                    writeln!(out, "{}", serde_json::to_string(&e)?)?;
                }
                Ok(())
            }
        }
    })
}

#[derive(Debug, clap::Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    pub action: AuthAction,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuthAction {
    /// Make a new key for signing access tokens; the old one keeps verifying the tokens it
    /// signed until they expire (15 minutes). Prints the new key's id (`kid`).
    RotateSigningKey,
    /// Print the public keys that verify access tokens (what /.well-known/jwks.json serves).
    Jwks,
}

pub fn auth(args: AuthArgs) -> Result<()> {
    let url = args.db.url()?;
    let key_file = args.db.master_key_file()?;
    block_on(async move {
        // Signing keys are sealed with the master key `bitnet serve` uses on this database.
        let store = open_store(&url)
            .await?
            .with_master_key(master_key(None, &key_file)?);
        store
            .check_master_key()
            .await
            .context("the master key does not fit this database")?;
        match args.action {
            AuthAction::RotateSigningKey => {
                let kid = store.rotate_signing_key().await?;
                println!("{kid}");
                eprintln!(
                    "new signing key {kid}; tokens signed by the old one stay valid until they expire"
                );
            }
            AuthAction::Jwks => println!("{}", serde_json::to_string_pretty(&store.jwks().await?)?),
        }
        Ok(())
    })
}
