//! Encryption at rest: envelope encryption with AES-256-GCM (ring).
//!
//! A master key (32 bytes from `--master-key-file` or `BITNET_MASTER_KEY`, behind
//! [`KeyProvider`] so a cloud KMS can take its place) wraps one data key per organization
//! (`data_keys`); data keys encrypt artifacts in chunks ([`seal_chunk`], used by
//! [`crate::storage`]) and the secrets the platform keeps. Rotating the master key re-wraps the
//! data keys and rewrites nothing else.
//!
//! A master key is known by its id, a fingerprint (`mk_` + 16 hex of a SHA-256 of the key),
//! so a wrong key is named as such instead of decrypting to garbage.

use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now};
use crate::store::Store;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// The tag each sealed message carries.
pub const TAG_LEN: usize = 16;

/// Who wraps data keys: the local master key, or later a KMS.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The id of the key that wraps new data keys.
    fn key_id(&self) -> &str;
    /// Wrap a data key; `context` is bound to the result (it must be given again to unwrap).
    fn wrap(&self, data_key: &[u8; 32], context: &[u8]) -> Result<Vec<u8>>;
    /// Unwrap a data key wrapped by key `key_id`.
    fn unwrap(&self, key_id: &str, wrapped: &[u8], context: &[u8]) -> Result<[u8; 32]>;
}

/// A 32-byte master key held in memory.
pub struct MasterKey {
    id: String,
    key: LessSafeKey,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).finish()
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let fp = Sha256::new()
            .chain_update(b"bitnet master key id\n")
            .chain_update(bytes)
            .finalize();
        let id = format!("mk_{}", &crate::ids::hex(&fp)[..16]);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes"));
        Self { id, key }
    }

    /// A master key as written in a key file or variable: 64 hex digits or the base64 of 32
    /// bytes (a trailing newline is fine).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            crate::ids::unhex(t)
        } else {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .unwrap_or_default()
        };
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
            PlatformError::Config(
                "a master key is 32 bytes written as 64 hex digits or in base64 \
                 (`bitnet keys create-master > master.key` makes one)"
                    .into(),
            )
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Read a key file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            PlatformError::Config(format!(
                "cannot read the master key {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
    }

    /// A new random key, as a key file holds it (64 hex digits).
    pub fn generate() -> Result<String> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| PlatformError::Random(e.to_string()))?;
        Ok(crate::ids::hex(&k))
    }

    /// The key file at `path`, created with a new key (mode 0600) if there is none: the
    /// embedded default needs no setup.
    pub fn load_or_create(path: &std::path::Path) -> Result<Self> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    PlatformError::Config(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            // Written whole under a name of its own, then linked into place: two processes
            // starting at once agree on one key (the second link fails and it reads the first).
            let tmp = path.with_extension(format!("tmp-{}", crate::ids::new_id("")));
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let write = |o: &std::fs::OpenOptions| -> std::io::Result<()> {
                use std::io::Write;
                let mut f = o.open(&tmp)?;
                f.write_all(
                    format!("{}\n", Self::generate().map_err(std::io::Error::other)?).as_bytes(),
                )?;
                f.sync_all()?;
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                }
            };
            write(&o).map_err(|e| {
                PlatformError::Config(format!(
                    "cannot write the master key {}: {e}",
                    path.display()
                ))
            })?;
        }
        Self::from_file(path)
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl KeyProvider for MasterKey {
    fn key_id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, data_key: &[u8; 32], context: &[u8]) -> Result<Vec<u8>> {
        seal(&self.key, data_key, context)
    }

    fn unwrap(&self, key_id: &str, wrapped: &[u8], context: &[u8]) -> Result<[u8; 32]> {
        if key_id != self.id {
            return Err(PlatformError::Config(format!(
                "the data key was wrapped by master key {key_id}, but the master key given is {} \
                 (a wrong --master-key-file or BITNET_MASTER_KEY?)",
                self.id
            )));
        }
        let plain = open(&self.key, wrapped, context).map_err(|_| {
            PlatformError::Config(format!(
                "master key {key_id} cannot unwrap a data key: it was altered"
            ))
        })?;
        plain
            .try_into()
            .map_err(|_| PlatformError::Config("a wrapped data key is not 32 bytes".into()))
    }
}

/// Seal `plain` with a random nonce: `nonce ‖ ciphertext ‖ tag`.
fn seal(key: &LessSafeKey, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| PlatformError::Random(e.to_string()))?;
    let mut out = nonce.to_vec();
    let mut body = plain.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| PlatformError::Storage("encryption failed".into()))?;
    out.extend_from_slice(&body);
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open(key: &LessSafeKey, sealed: &[u8], aad: &[u8]) -> std::result::Result<Vec<u8>, ()> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(());
    }
    let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().map_err(|_| ())?;
    let mut body = sealed[NONCE_LEN..].to_vec();
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| ())?;
    Ok(plain.to_vec())
}

/// An organization's data key, unwrapped.
#[derive(Clone)]
pub struct DataKey {
    pub id: String,
    key: Arc<LessSafeKey>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").field("id", &self.id).finish()
    }
}

/// A chunk's nonce: the object's 7-byte random prefix, the chunk's index (big-endian), and a
/// byte that marks the last chunk, so chunks can be neither reordered, moved between objects,
/// nor cut off at a chunk boundary (the STREAM construction of Hoang, Reyhanitabar, Rogaway
/// and Vizár, "Online authenticated-encryption and its nonce-reuse misuse-resistance", 2015).
fn chunk_nonce(prefix: &[u8; 7], index: u32, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    Nonce::assume_unique_for_key(n)
}

impl DataKey {
    /// Encrypt chunk `index` of an object in place and append its tag.
    pub fn seal_chunk(
        &self,
        prefix: &[u8; 7],
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let tag = self
            .key
            .seal_in_place_separate_tag(chunk_nonce(prefix, index, last), Aad::empty(), buf)
            .map_err(|_| PlatformError::Storage("encryption failed".into()))?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypt chunk `index` (its ciphertext and tag) in place; `false` if it does not
    /// authenticate (altered, moved, reordered, or not the last chunk when `last` says so).
    pub fn open_chunk(&self, prefix: &[u8; 7], index: u32, last: bool, buf: &mut Vec<u8>) -> bool {
        match self
            .key
            .open_in_place(chunk_nonce(prefix, index, last), Aad::empty(), buf)
        {
            Ok(p) => {
                let n = p.len();
                buf.truncate(n);
                true
            }
            Err(_) => false,
        }
    }

    /// Seal a small secret (an SSO client secret, say) as text: `enc:v1:<data key id>:<base64>`.
    pub fn seal_secret(&self, plain: &str) -> Result<String> {
        use base64::Engine;
        let sealed = seal(&self.key, plain.as_bytes(), self.id.as_bytes())?;
        Ok(format!(
            "enc:v1:{}:{}",
            self.id,
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(sealed)
        ))
    }

    fn open_secret(&self, body: &str) -> Result<String> {
        use base64::Engine;
        let sealed = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(body)
            .map_err(|_| PlatformError::Storage("a sealed secret is not base64".into()))?;
        let plain = open(&self.key, &sealed, self.id.as_bytes()).map_err(|_| {
            PlatformError::Storage(format!("a secret sealed by {} was altered", self.id))
        })?;
        String::from_utf8(plain)
            .map_err(|_| PlatformError::Storage("a sealed secret is not text".into()))
    }
}

/// Where `None` means the platform itself (platform-wide models): its data key row has no
/// organization.
fn scope(org: Option<&str>) -> String {
    org.unwrap_or("platform").to_string()
}

fn context(id: &str, org: Option<&str>) -> Vec<u8> {
    format!("bitnet data key\n{id}\n{}", scope(org)).into_bytes()
}

impl Store {
    /// Give the store its master key: artifacts and secrets can then be sealed and opened.
    pub fn with_master_key(mut self, key: Arc<dyn KeyProvider>) -> Self {
        self.keys = Some(key);
        self
    }

    fn provider(&self) -> Result<&Arc<dyn KeyProvider>> {
        self.keys.as_ref().ok_or_else(|| {
            PlatformError::Config(
                "this needs the master key: give --master-key-file or BITNET_MASTER_KEY".into(),
            )
        })
    }

    /// Check that the master key opens the data keys already stored (a server started with
    /// the wrong key stops at once, naming both keys, instead of failing request by request).
    pub async fn check_master_key(&self) -> Result<()> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT id, scope, master_key_id, wrapped FROM data_keys ORDER BY created_at, id LIMIT 1",
        )
        .fetch_all(&self.pool)
        .await?;
        for (id, s, mk, wrapped) in rows {
            let org = (s != "platform").then_some(s.as_str());
            self.unwrap_row(&id, org, &mk, &wrapped)?;
        }
        Ok(())
    }

    /// The organization's current data key (made on first use).
    pub async fn data_key(&self, org: Option<&str>) -> Result<DataKey> {
        let provider = self.provider()?;
        let s = scope(org);
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT id, master_key_id, wrapped FROM data_keys WHERE scope = $1 ORDER BY created_at DESC, id DESC LIMIT 1",
        )
        .bind(&s)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((id, mk, wrapped)) = row {
            return self.unwrap_row(&id, org, &mk, &wrapped);
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| PlatformError::Random(e.to_string()))?;
        let id = new_id("dk_");
        let wrapped = provider.wrap(&raw, &context(&id, org))?;
        // Two replicas may race to make the first key: the unique scope keeps one, and both
        // then read it back.
        sqlx::query(
            "INSERT INTO data_keys (id, scope, master_key_id, wrapped, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope) DO NOTHING",
        )
        .bind(&id)
        .bind(&s)
        .bind(provider.key_id())
        .bind(crate::ids::hex(&wrapped))
        .bind(now())
        .execute(&self.pool)
        .await?;
        Box::pin(self.data_key(org)).await
    }

    /// The data key `id` of `org` (to open what it sealed).
    pub async fn data_key_by_id(&self, org: Option<&str>, id: &str) -> Result<DataKey> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT master_key_id, wrapped FROM data_keys WHERE scope = $1 AND id = $2",
        )
        .bind(scope(org))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let (mk, wrapped) = row.ok_or_else(|| PlatformError::not_found("data key", id))?;
        self.unwrap_row(id, org, &mk, &wrapped)
    }

    fn unwrap_row(&self, id: &str, org: Option<&str>, mk: &str, wrapped: &str) -> Result<DataKey> {
        let raw = self
            .provider()?
            .unwrap(mk, &crate::ids::unhex(wrapped), &context(id, org))?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).expect("32 bytes"));
        Ok(DataKey {
            id: id.to_string(),
            key: Arc::new(key),
        })
    }

    /// Seal a secret with the organization's data key.
    pub async fn seal_secret(&self, org: Option<&str>, plain: &str) -> Result<String> {
        self.data_key(org).await?.seal_secret(plain)
    }

    /// Open a secret [`Self::seal_secret`] sealed (text without the `enc:v1:` mark is taken
    /// as written before encryption at rest, and returned as is).
    pub async fn open_secret(&self, org: Option<&str>, stored: &str) -> Result<String> {
        let Some(rest) = stored.strip_prefix("enc:v1:") else {
            return Ok(stored.to_string());
        };
        let (id, body) = rest
            .split_once(':')
            .ok_or_else(|| PlatformError::Storage("a sealed secret has no data key id".into()))?;
        self.data_key_by_id(org, id).await?.open_secret(body)
    }

    /// Re-wrap every data key with `new` (the store's own provider unwraps them): nothing else
    /// is rewritten. Returns how many keys were re-wrapped.
    pub async fn rotate_master_key(&self, new: &dyn KeyProvider) -> Result<usize> {
        let old = self.provider()?;
        let rows: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT id, scope, master_key_id, wrapped FROM data_keys")
                .fetch_all(&self.pool)
                .await?;
        let mut tx = self.begin_write().await?;
        let mut n = 0;
        for (id, s, mk, wrapped) in rows {
            let org = (s != "platform").then_some(s.as_str());
            let ctx = context(&id, org);
            let raw = if mk == new.key_id() {
                continue;
            } else {
                old.unwrap(&mk, &crate::ids::unhex(&wrapped), &ctx)?
            };
            let rewrapped = new.wrap(&raw, &ctx)?;
            sqlx::query("UPDATE data_keys SET master_key_id = $1, wrapped = $2 WHERE id = $3")
                .bind(new.key_id())
                .bind(crate::ids::hex(&rewrapped))
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            n += 1;
        }
        tx.commit().await?;
        Ok(n)
    }
}
