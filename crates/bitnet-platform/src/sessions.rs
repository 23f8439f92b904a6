//! Signing in: passwords (argon2id), short-lived access tokens (JWT, EdDSA over Ed25519, `kid`
//! in the header, keys rotated with old ones verifying until their tokens expire; published as a
//! JWKS) and rotating refresh tokens (a reused one revokes its whole family). Invites carry a
//! secret that accepts them, shown once like a key.

use crate::Store;
use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::{new_id, now, random_token, secret_hash};
use crate::keys::{Credential, KeyKind};
use crate::users::User;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Access tokens live this long (seconds).
pub const ACCESS_SECONDS: i64 = 15 * 60;
/// Refresh tokens live this long (seconds).
pub const REFRESH_SECONDS: i64 = 30 * 24 * 3600;
/// The `iss` of our tokens.
pub const ISSUER: &str = "bitnet";

/// What a sign-in returns (OAuth 2.0's token response).
#[derive(Debug, Clone, Serialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub refresh_token: String,
    pub user: Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    org: String,
    email: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// An argon2id PHC string of `password` (OWASP's parameters: argon2's defaults, m=19 MiB, t=2).
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PlatformError::Random(format!("argon2: {e}")))
}

fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A hash to verify against when the email is unknown, so both answers cost the same.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not a password anyone has").unwrap_or_default())
}

fn check_password(password: &str) -> Result<()> {
    let n = password.chars().count();
    if !(12..=256).contains(&n) {
        return Err(PlatformError::invalid(
            "password",
            "a password has 12 to 256 characters",
        ));
    }
    Ok(())
}

/// PKCS#8 v1 for an Ed25519 seed (RFC 8410): a fixed 16-byte prefix, then the 32 bytes.
fn pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

use crate::ids::unhex;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PlatformError::Random(format!("a blocking task failed: {e}")))
}

impl Store {
    /// Make a new signing key and retire the current one (it keeps verifying the tokens it
    /// signed until they expire). Returns the new key's id.
    pub async fn rotate_signing_key(&self) -> Result<String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| PlatformError::Random(e.to_string()))?;
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        let kid = new_id("sk_");
        // The private half is kept sealed by the platform's data key where this process has
        // the master key (`bitnet serve` and `bitnet auth` do).
        let private = if self.keys.is_some() {
            self.seal_secret(None, &crate::ids::hex(&seed)).await?
        } else {
            crate::ids::hex(&seed)
        };
        let t = now();
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
            .bind(t)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, private_key, public_key, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&kid)
        .bind(&private)
        .bind(crate::ids::hex(&public))
        .bind(t)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(kid)
    }

    /// The current signing key (made on first use).
    async fn signing_key(&self) -> Result<(String, EncodingKey)> {
        for _ in 0..2 {
            let row: Option<(String, String)> = sqlx::query_as(
                "SELECT kid, private_key FROM signing_keys WHERE retired_at IS NULL ORDER BY kid DESC LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await?;
            if let Some((kid, private)) = row {
                let private = self.open_secret(None, &private).await?;
                let seed: [u8; 32] = unhex(&private).try_into().map_err(|_| {
                    PlatformError::Conflict(format!("signing key {kid} is damaged"))
                })?;
                return Ok((kid, EncodingKey::from_ed_der(&pkcs8(&seed))));
            }
            self.rotate_signing_key().await?;
        }
        Err(PlatformError::Conflict(
            "no signing key could be made".into(),
        ))
    }

    /// The public keys that verify live tokens, as a JSON Web Key Set
    /// (`/.well-known/jwks.json`): the current key and those retired less than a token's
    /// lifetime ago.
    pub async fn jwks(&self) -> Result<Value> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT kid, public_key FROM signing_keys WHERE retired_at IS NULL OR retired_at > $1 ORDER BY kid",
        )
        .bind(now() - ACCESS_SECONDS)
        .fetch_all(&self.pool)
        .await?;
        let keys: Vec<Value> = rows
            .into_iter()
            .map(|(kid, public)| {
                json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                       "x": URL_SAFE_NO_PAD.encode(unhex(&public))})
            })
            .collect();
        Ok(json!({ "keys": keys }))
    }

    async fn decoding_key(&self, kid: &str) -> Result<Option<DecodingKey>> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT public_key FROM signing_keys WHERE kid = $1 AND (retired_at IS NULL OR retired_at > $2)",
        )
        .bind(kid)
        .bind(now() - ACCESS_SECONDS)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((public,)) => Some(
                DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(unhex(&public)))
                    .map_err(|e| PlatformError::Conflict(format!("signing key {kid}: {e}")))?,
            ),
            None => None,
        })
    }

    /// Tokens for a user: a new access token and a refresh token of `family` (a new family
    /// when `None`).
    async fn issue(
        &self,
        org: &str,
        user: &str,
        email: &str,
        family: Option<&str>,
    ) -> Result<Tokens> {
        let (kid, key) = self.signing_key().await?;
        let t = now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: user.into(),
            org: org.into(),
            email: email.into(),
            iat: t,
            exp: t + ACCESS_SECONDS,
            jti: new_id("at_"),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid);
        let access_token = jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| PlatformError::Conflict(format!("cannot sign a token: {e}")))?;
        let refresh_token = format!("rt_{}", random_token(48)?);
        let family = family.map_or_else(|| new_id("rtf_"), str::to_string);
        sqlx::query(
            "INSERT INTO refresh_tokens (id, family_id, organization_id, user_id, hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(new_id("rt_"))
        .bind(&family)
        .bind(org)
        .bind(user)
        .bind(secret_hash(&refresh_token))
        .bind(t)
        .bind(t + REFRESH_SECONDS)
        .execute(&self.pool)
        .await?;
        Ok(Tokens {
            access_token,
            token_type: "Bearer",
            expires_in: ACCESS_SECONDS,
            refresh_token,
            user: json!({"id": user, "email": email, "organization_id": org}),
        })
    }

    /// Tokens for a user the caller has already authenticated (single sign-on).
    pub async fn sign_in(&self, org: &str, user: &User, by: &Actor) -> Result<Tokens> {
        let mut c = self.change(org).await?;
        c.audit(AuditEvent::new(
            "login.succeeded",
            by,
            &user.id,
            json!({"id": user.id}),
        ))
        .await?;
        c.commit().await?;
        self.issue(org, &user.id, &user.email, None).await
    }

    /// Record a refused sign-in in `org`'s audit log.
    pub async fn login_failed(
        &self,
        org: &str,
        by: &Actor,
        code: &str,
        message: &str,
    ) -> Result<()> {
        let mut c = self.change(org).await?;
        let mut e = AuditEvent::new(
            "login.failed",
            by,
            "",
            json!({"error_code": code, "error_message": message}),
        );
        e.target_id = None;
        e.outcome = "failure";
        c.audit(e).await?;
        c.commit().await
    }

    /// Sign in with an email and a password. `organization` (id or name) is needed only when
    /// the email belongs to users of several organizations. Both outcomes are audited in the
    /// organization, when one is known.
    pub async fn login(
        &self,
        organization: Option<&str>,
        email: &str,
        password: &str,
        by: &Actor,
    ) -> Result<Tokens> {
        let email = email.trim().to_lowercase();
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT u.id, u.organization_id, u.password_hash FROM users u JOIN organizations o ON o.id = u.organization_id \
             WHERE u.email = $1 AND u.deleted_at IS NULL AND ($2 = '' OR o.id = $2 OR o.name = $2) ORDER BY u.id",
        )
        .bind(&email)
        .bind(organization.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        if rows.len() > 1 {
            return Err(PlatformError::invalid(
                "organization",
                "this email signs in to several organizations: name one in `organization`",
            ));
        }
        let row = rows.into_iter().next();
        let phc = row
            .as_ref()
            .and_then(|r| r.2.clone())
            .unwrap_or_else(|| dummy_hash().to_string());
        let pw = password.to_string();
        let ok = blocking(move || verify_password(&pw, &phc)).await?;
        // Whoever is signing in is known by the email they gave (in the actor's JSON too).
        let by = Actor::anonymous(Some(&email)).at(by.ip.clone(), by.request_id.clone());
        match row {
            Some((user, org, Some(_))) if ok => {
                let session = session_actor(&user, &email, &by);
                let mut c = self.change(&org).await?;
                c.audit(AuditEvent::new(
                    "login.succeeded",
                    &session,
                    &user,
                    json!({"id": user}),
                ))
                .await?;
                c.commit().await?;
                self.issue(&org, &user, &email, None).await
            }
            Some((_, org, _)) => {
                self.login_failed(&org, &by, "invalid_credentials", "wrong password")
                    .await?;
                Err(PlatformError::Unauthorized(
                    "wrong email or password".into(),
                ))
            }
            None => Err(PlatformError::Unauthorized(
                "wrong email or password".into(),
            )),
        }
    }

    /// Trade a refresh token for new tokens. The old one is spent; presenting a spent one again
    /// (a stolen copy, or the thief after the owner) revokes every token of its family.
    pub async fn refresh(&self, token: &str, by: &Actor) -> Result<Tokens> {
        // id, family, organization, user, expiry, spent, revoked.
        type Row = (
            String,
            String,
            String,
            String,
            i64,
            Option<i64>,
            Option<i64>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, family_id, organization_id, user_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE hash = $1",
        )
        .bind(secret_hash(token.trim()))
        .fetch_optional(&self.pool)
        .await?;
        let refused =
            || PlatformError::Unauthorized("the refresh token is not valid; sign in again".into());
        let Some((id, family, org, user, expires, used, revoked)) = row else {
            return Err(refused());
        };
        let t = now();
        if revoked.is_some() || expires <= t {
            return Err(refused());
        }
        // Spend it atomically: of two racing uses, one wins and the other is a reuse.
        let spent =
            sqlx::query("UPDATE refresh_tokens SET used_at = $1 WHERE id = $2 AND used_at IS NULL")
                .bind(t)
                .bind(&id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        if used.is_some() || spent == 0 {
            sqlx::query("UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
                .bind(t)
                .bind(&family)
                .execute(&self.pool)
                .await?;
            let mut c = self.change(&org).await?;
            let mut e = AuditEvent::new(
                "login.failed",
                by,
                &user,
                json!({"error_code": "refresh_token_reused", "error_message": "a spent refresh token was presented again; its sessions are revoked"}),
            );
            e.outcome = "failure";
            c.audit(e).await?;
            c.commit().await?;
            return Err(refused());
        }
        let email: Option<(String,)> = sqlx::query_as(
            "SELECT email FROM users WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL",
        )
        .bind(&user)
        .bind(&org)
        .fetch_optional(&self.pool)
        .await?;
        let Some((email,)) = email else {
            return Err(refused());
        };
        self.issue(&org, &user, &email, Some(&family)).await
    }

    /// Sign out: the refresh token's family is revoked (access tokens end at their expiry).
    pub async fn logout(&self, token: &str) -> Result<()> {
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $1 WHERE revoked_at IS NULL AND family_id = \
             (SELECT family_id FROM refresh_tokens WHERE hash = $2)",
        )
        .bind(now())
        .bind(secret_hash(token.trim()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The credential of an access token, or `None` when it is not one of ours, is expired, or
    /// its user is gone. The user's role is read now, not from the token.
    pub async fn authenticate_token(&self, token: &str) -> Result<Option<Credential>> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(None);
        };
        if header.alg != Algorithm::EdDSA {
            return Ok(None);
        }
        let Some(kid) = header.kid else {
            return Ok(None);
        };
        let Some(key) = self.decoding_key(&kid).await? else {
            return Ok(None);
        };
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_issuer(&[ISSUER]);
        v.leeway = 5;
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &key, &v) else {
            return Ok(None);
        };
        let c = data.claims;
        // The signature and expiry are checked on every request; whether the user still
        // exists, and its role, may come from the cache.
        let k = format!("user:{}:{}", c.org, c.sub);
        if let Some((mut cred, _)) = self.cache.get(&k) {
            cred.key_id = c.jti;
            return Ok(Some(cred));
        }
        let generation = self.cache.generation();
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT role, email FROM users WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL",
        )
        .bind(&c.sub)
        .bind(&c.org)
        .fetch_optional(&self.pool)
        .await?;
        let Some((role, email)) = row else {
            return Ok(None);
        };
        let cred = Credential {
            key_id: c.jti,
            kind: KeyKind::Session,
            organization_id: Some(c.org),
            project_id: None,
            read_only: role != "owner",
            user_id: Some(c.sub),
            user_email: Some(email),
            service_account_id: None,
            role: Some(role),
        };
        if let Some(g) = generation {
            self.cache.put(k, cred.clone(), None, g);
        }
        Ok(Some(cred))
    }

    /// Accept an invite with its secret: the user is created with the invite's role and
    /// projects and a password, and signed in.
    pub async fn accept_invite(
        &self,
        token: &str,
        name: &str,
        password: &str,
        by: &Actor,
    ) -> Result<Tokens> {
        check_password(password)?;
        let name = crate::check_name("name", name)?;
        // id, organization, email, role, projects, expiry, accepted.
        type Row = (String, String, String, String, String, i64, Option<i64>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, organization_id, email, role, projects, expires_at, accepted_at FROM invites \
             WHERE token_hash = $1 AND deleted_at IS NULL",
        )
        .bind(secret_hash(token.trim()))
        .fetch_optional(&self.pool)
        .await?;
        let Some((invite, org, email, role, projects, expires, accepted)) = row else {
            return Err(PlatformError::Unauthorized(
                "the invite is not valid".into(),
            ));
        };
        if accepted.is_some() || expires <= now() {
            return Err(PlatformError::Unauthorized(
                "the invite was used already or has expired; ask for a new one".into(),
            ));
        }
        let pw = password.to_string();
        let phc = blocking(move || hash_password(&pw)).await??;
        let user = new_id("user-");
        let mut c = self.change(&org).await?;
        let claimed = sqlx::query(
            "UPDATE invites SET accepted_at = $1 WHERE id = $2 AND accepted_at IS NULL",
        )
        .bind(c.at)
        .bind(&invite)
        .execute(&mut *c.tx)
        .await?
        .rows_affected();
        let taken: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM users WHERE organization_id = $1 AND email = $2 AND deleted_at IS NULL",
        )
        .bind(&org)
        .bind(&email)
        .fetch_optional(&mut *c.tx)
        .await?;
        if claimed == 0 || taken.is_some() {
            return Err(PlatformError::Conflict(format!(
                "the invite was used already, or `{email}` is a user already"
            )));
        }
        sqlx::query(
            "INSERT INTO users (id, organization_id, email, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&user)
        .bind(&org)
        .bind(&email)
        .bind(&name)
        .bind(&role)
        .bind(&phc)
        .bind(c.at)
        .execute(&mut *c.tx)
        .await?;
        let projects: Vec<crate::users::InviteProject> =
            serde_json::from_str(&projects).unwrap_or_default();
        for p in &projects {
            sqlx::query(
                "INSERT INTO project_users (project_id, user_id, organization_id, role, added_at) \
                 SELECT id, $2, organization_id, $3, $4 FROM projects WHERE id = $1 AND organization_id = $5 AND archived_at IS NULL",
            )
            .bind(&p.id)
            .bind(&user)
            .bind(&p.role)
            .bind(c.at)
            .bind(&org)
            .execute(&mut *c.tx)
            .await?;
        }
        let session = session_actor(&user, &email, by);
        c.audit(AuditEvent::new(
            "invite.accepted",
            &session,
            &invite,
            json!({"id": invite}),
        ))
        .await?;
        c.audit(AuditEvent::new(
            "user.added",
            &session,
            &user,
            json!({"id": user, "data": {"role": role}}),
        ))
        .await?;
        c.commit().await?;
        self.issue(&org, &user, &email, None).await
    }

    /// Set a user's password (the operator's CLI, and users changing their own).
    pub async fn set_password(
        &self,
        org: &str,
        user: &str,
        password: &str,
        by: &Actor,
    ) -> Result<()> {
        check_password(password)?;
        self.user(org, user).await?;
        let pw = password.to_string();
        let phc = blocking(move || hash_password(&pw)).await??;
        let mut c = self.change(org).await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE organization_id = $2 AND id = $3")
            .bind(&phc)
            .bind(org)
            .bind(user)
            .execute(&mut *c.tx)
            .await?;
        c.audit(AuditEvent::new(
            "user.updated",
            by,
            user,
            json!({"id": user, "changes_requested": {"password": "set"}}),
        ))
        .await?;
        c.commit().await
    }
}

/// A signed-in user as the audit log's actor.
pub fn session_actor(user: &str, email: &str, like: &Actor) -> Actor {
    Actor {
        json: json!({"type": "session", "session": {"user": {"id": user, "email": email}}}),
        id: Some(user.to_string()),
        email: Some(email.to_string()),
        ip: None,
        request_id: None,
    }
    .at(like.ip.clone(), like.request_id.clone())
}
