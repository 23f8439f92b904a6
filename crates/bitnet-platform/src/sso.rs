//! Single sign-on with OpenID Connect (authorization code flow with PKCE), one connection per
//! organization: its issuer, client id and secret, the email domains it admits and the role a
//! first-time user gets (just-in-time creation). Every outcome is audited as `login.succeeded`
//! or `login.failed`.
//!
//! The protocol steps are written here over `reqwest` and `jsonwebtoken` (which verifies the
//! id_token's signature from the provider's JWKS, its issuer, audience and expiry): the
//! `openidconnect` crate would bring a second reqwest major version and TLS stack beside the
//! ones the server already ships. Specs: OpenID Connect Core 1.0 §3.1 (code flow, id_token
//! validation), Discovery 1.0 §4, RFC 7636 (PKCE, S256).

use crate::audit::{Actor, AuditEvent};
use crate::error::{PlatformError, Result};
use crate::ids::{now, random_token, secret_hash};
use crate::sessions::{Tokens, session_actor};
use crate::users::check_org_role;
use crate::{Store, check_name};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A pending sign-in is valid this long (seconds).
const STATE_SECONDS: i64 = 600;

/// An organization's OpenID Connect connection, as set by its admins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SsoConfig {
    /// The provider's issuer URL (its discovery document is under
    /// `/.well-known/openid-configuration`).
    pub issuer: String,
    pub client_id: String,
    /// Never served back: listings show whether one is set.
    #[serde(default, skip_serializing)]
    pub client_secret: String,
    /// Email domains admitted (`example.com`); empty admits any.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// The organization role of a user's first sign-in.
    #[serde(default = "reader")]
    pub default_role: String,
}

fn reader() -> String {
    "reader".into()
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Deserialize)]
struct IdClaims {
    email: Option<String>,
    email_verified: Option<bool>,
    nonce: Option<String>,
    name: Option<String>,
}

/// Install the process's TLS crypto provider (ring: it builds with a C compiler alone, where
/// aws-lc needs cmake). Every HTTPS client of the process needs it (reqwest is built without a
/// provider of its own): the `bitnet` binary calls this first thing; a second call is a no-op.
pub fn install_tls_provider() {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn client() -> Result<reqwest::Client> {
    install_tls_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(15))
        .build()
        .map_err(|e| PlatformError::Upstream(format!("cannot build an HTTP client: {e}")))
}

async fn discover(http: &reqwest::Client, issuer: &str) -> Result<Discovery> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let up = |e: String| {
        PlatformError::Upstream(format!(
            "the identity provider's discovery document ({url}): {e}"
        ))
    };
    let d: Discovery = http
        .get(&url)
        .send()
        .await
        .map_err(|e| up(e.to_string()))?
        .error_for_status()
        .map_err(|e| up(e.to_string()))?
        .json()
        .await
        .map_err(|e| up(e.to_string()))?;
    if d.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(up(format!(
            "it names issuer {:?}, not {issuer:?}",
            d.issuer
        )));
    }
    Ok(d)
}

fn check_config(c: &SsoConfig) -> Result<SsoConfig> {
    let issuer = c.issuer.trim().trim_end_matches('/').to_string();
    if !(issuer.starts_with("https://") || issuer.starts_with("http://"))
        || issuer.contains(char::is_whitespace)
    {
        return Err(PlatformError::invalid(
            "issuer",
            "issuer must be an http(s) URL",
        ));
    }
    let client_id = check_name("client_id", &c.client_id)?;
    if c.client_secret.is_empty() || c.client_secret.len() > 1024 {
        return Err(PlatformError::invalid(
            "client_secret",
            "client_secret must be 1 to 1024 bytes",
        ));
    }
    let mut domains = Vec::new();
    for d in &c.allowed_domains {
        let d = d.trim().trim_start_matches('@').to_lowercase();
        if d.is_empty() || !d.contains('.') || d.contains(char::is_whitespace) || d.contains('@') {
            return Err(PlatformError::invalid(
                "allowed_domains",
                format!("`{d}` is not an email domain"),
            ));
        }
        domains.push(d);
    }
    Ok(SsoConfig {
        issuer,
        client_id,
        client_secret: c.client_secret.clone(),
        allowed_domains: domains,
        default_role: check_org_role(&c.default_role)?.to_string(),
    })
}

impl Store {
    /// Set (or replace) an organization's single sign-on connection.
    pub async fn set_sso(&self, org: &str, config: &SsoConfig, by: &Actor) -> Result<Value> {
        let c = check_config(config)?;
        // The client secret is kept sealed by the organization's data key where this process
        // has the master key (`bitnet serve` always does).
        let secret = if self.keys.is_some() {
            self.seal_secret(Some(org), &c.client_secret).await?
        } else {
            c.client_secret.clone()
        };
        let mut ch = self.change(org).await?;
        sqlx::query(
            "INSERT INTO sso_connections (organization_id, issuer, client_id, client_secret, allowed_domains, default_role, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT (organization_id) DO UPDATE SET issuer = $2, client_id = $3, \
             client_secret = $4, allowed_domains = $5, default_role = $6, updated_at = $7",
        )
        .bind(org)
        .bind(&c.issuer)
        .bind(&c.client_id)
        .bind(&secret)
        .bind(serde_json::to_string(&c.allowed_domains).unwrap_or_default())
        .bind(&c.default_role)
        .bind(ch.at)
        .execute(&mut *ch.tx)
        .await?;
        ch.audit(AuditEvent::new(
            "sso.updated",
            by,
            org,
            json!({"id": org, "data": {"issuer": c.issuer, "client_id": c.client_id, "allowed_domains": c.allowed_domains, "default_role": c.default_role}}),
        ))
        .await?;
        ch.commit().await?;
        self.sso(org).await
    }

    async fn sso_config(&self, org: &str) -> Result<SsoConfig> {
        let row: Option<(String, String, String, String, String)> = sqlx::query_as(
            "SELECT issuer, client_id, client_secret, allowed_domains, default_role FROM sso_connections WHERE organization_id = $1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        let (issuer, client_id, client_secret, domains, default_role) =
            row.ok_or_else(|| PlatformError::not_found("single sign-on connection", org))?;
        let client_secret = self.open_secret(Some(org), &client_secret).await?;
        Ok(SsoConfig {
            issuer,
            client_id,
            client_secret,
            allowed_domains: serde_json::from_str(&domains).unwrap_or_default(),
            default_role,
        })
    }

    /// The organization's connection, without its secret.
    pub async fn sso(&self, org: &str) -> Result<Value> {
        let c = self.sso_config(org).await?;
        Ok(
            json!({"object": "organization.sso_connection", "organization_id": org, "issuer": c.issuer,
                  "client_id": c.client_id, "client_secret_set": !c.client_secret.is_empty(),
                  "allowed_domains": c.allowed_domains, "default_role": c.default_role}),
        )
    }

    pub async fn delete_sso(&self, org: &str, by: &Actor) -> Result<()> {
        self.sso_config(org).await?;
        let mut ch = self.change(org).await?;
        sqlx::query("DELETE FROM sso_connections WHERE organization_id = $1")
            .bind(org)
            .execute(&mut *ch.tx)
            .await?;
        ch.audit(AuditEvent::new("sso.deleted", by, org, json!({"id": org})))
            .await?;
        ch.commit().await
    }

    /// Begin a sign-in: the URL of the provider's authorization endpoint to send the browser
    /// to, with a fresh state, nonce and PKCE challenge (kept, single use, ten minutes).
    /// `redirect_uri` is where the provider sends the browser back (our callback).
    pub async fn sso_start(&self, organization: &str, redirect_uri: &str) -> Result<String> {
        let org = self.organization(organization).await?;
        let c = self.sso_config(&org.id).await?;
        let d = discover(&client()?, &c.issuer).await?;
        let state = random_token(32)?;
        let nonce = random_token(32)?;
        // RFC 7636 §4.1: 43 to 128 unreserved characters; base62 is a subset.
        let verifier = random_token(64)?;
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let t = now();
        sqlx::query("DELETE FROM sso_states WHERE expires_at < $1")
            .bind(t)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO sso_states (state_hash, organization_id, verifier, nonce, redirect_uri, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(secret_hash(&state))
        .bind(&org.id)
        .bind(&verifier)
        .bind(&nonce)
        .bind(redirect_uri)
        .bind(t)
        .bind(t + STATE_SECONDS)
        .execute(&self.pool)
        .await?;
        let q = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", c.client_id.as_str()),
            ("redirect_uri", redirect_uri),
            ("scope", "openid email profile"),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| PlatformError::Upstream(e.to_string()))?;
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(format!("{}{sep}{q}", d.authorization_endpoint))
    }

    /// Finish a sign-in: the provider sent the browser back with `code` and `state`. The state
    /// is spent; the code is exchanged with the PKCE verifier; the id_token is verified
    /// (signature by the provider's JWKS, issuer, audience, expiry, nonce); the email's domain
    /// must be admitted. A first-time user is created with the connection's default role.
    pub async fn sso_callback(&self, code: &str, state: &str, by: &Actor) -> Result<Tokens> {
        let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
            "DELETE FROM sso_states WHERE state_hash = $1 RETURNING organization_id, verifier, nonce, redirect_uri, expires_at",
        )
        .bind(secret_hash(state))
        .fetch_optional(&self.pool)
        .await?;
        let Some((org, verifier, nonce, redirect_uri, expires)) = row else {
            return Err(PlatformError::invalid(
                "state",
                "unknown, used or expired sign-in state; start the sign-in again",
            ));
        };
        if expires <= now() {
            return Err(PlatformError::invalid(
                "state",
                "the sign-in took over ten minutes; start it again",
            ));
        }
        match self
            .sso_verify(&org, code, &verifier, &nonce, &redirect_uri)
            .await
        {
            Ok((email, name)) => self.sso_user(&org, &email, name.as_deref(), by).await,
            Err(e) => {
                let code = match &e {
                    PlatformError::Forbidden(_) => "domain_not_allowed",
                    _ => "sso_failed",
                };
                let who = Actor::anonymous(None).at(by.ip.clone(), by.request_id.clone());
                self.login_failed(&org, &who, code, &e.to_string()).await?;
                Err(e)
            }
        }
    }

    async fn sso_verify(
        &self,
        org: &str,
        code: &str,
        verifier: &str,
        nonce: &str,
        redirect_uri: &str,
    ) -> Result<(String, Option<String>)> {
        let c = self.sso_config(org).await?;
        let http = client()?;
        let d = discover(&http, &c.issuer).await?;
        let resp = http
            .post(&d.token_endpoint)
            .basic_auth(&c.client_id, Some(&c.client_secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .map_err(|e| {
                PlatformError::Upstream(format!("the identity provider's token endpoint: {e}"))
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(PlatformError::Unauthorized(format!(
                "the identity provider refused the code: {} ({})",
                body["error"].as_str().unwrap_or("no error code"),
                body["error_description"]
                    .as_str()
                    .unwrap_or("no description")
            )));
        }
        let id_token = body["id_token"].as_str().ok_or_else(|| {
            PlatformError::Unauthorized("the identity provider sent no id_token".into())
        })?;
        let claims = verify_id_token(&http, &d, &c, id_token).await?;
        if claims.nonce.as_deref() != Some(nonce) {
            return Err(PlatformError::Unauthorized(
                "the id_token's nonce is not this sign-in's".into(),
            ));
        }
        let email = claims
            .email
            .map(|e| e.trim().to_lowercase())
            .ok_or_else(|| {
                PlatformError::Unauthorized(
                    "the id_token has no email (ask for the `email` scope)".into(),
                )
            })?;
        if claims.email_verified == Some(false) {
            return Err(PlatformError::Forbidden(format!(
                "the provider has not verified {email}"
            )));
        }
        let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if !c.allowed_domains.is_empty() && !c.allowed_domains.iter().any(|d| d == domain) {
            return Err(PlatformError::Forbidden(format!(
                "{email}: this organization signs in users of {} only",
                c.allowed_domains.join(", ")
            )));
        }
        Ok((email, claims.name))
    }

    /// The organization's user with this email, made on first sign-in; then signed in.
    async fn sso_user(
        &self,
        org: &str,
        email: &str,
        name: Option<&str>,
        by: &Actor,
    ) -> Result<Tokens> {
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM users WHERE organization_id = $1 AND email = $2 AND deleted_at IS NULL",
        )
        .bind(org)
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        let user = match found {
            Some((id,)) => self.user(org, &id).await?,
            None => {
                let role = self.sso_config(org).await?.default_role;
                let display = name.filter(|n| !n.trim().is_empty()).unwrap_or(email);
                let who = session_actor("", email, by);
                self.create_user(org, email, display, &role, None, &who)
                    .await?
            }
        };
        let session = session_actor(&user.id, &user.email, by);
        self.sign_in(org, &user, &session).await
    }
}

/// Check an id_token: an algorithm of public-key signatures, the key (by `kid`) from the
/// provider's JWKS, the signature, `iss`, `aud`, `exp` (30 s of clock skew).
async fn verify_id_token(
    http: &reqwest::Client,
    d: &Discovery,
    c: &SsoConfig,
    token: &str,
) -> Result<IdClaims> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let bad =
        |why: String| PlatformError::Unauthorized(format!("the id_token is not valid: {why}"));
    let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
    let alg = header.alg;
    if !matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA
    ) {
        return Err(bad(format!(
            "it is signed with {alg:?}; only the provider's public keys are accepted"
        )));
    }
    let jwks: jsonwebtoken::jwk::JwkSet = http
        .get(&d.jwks_uri)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| {
            PlatformError::Upstream(format!(
                "the identity provider's keys ({}): {e}",
                d.jwks_uri
            ))
        })?
        .json()
        .await
        .map_err(|e| PlatformError::Upstream(format!("the identity provider's keys: {e}")))?;
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid),
        None => jwks.keys.first(),
    }
    .ok_or_else(|| bad("its key is not among the provider's".into()))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
    let mut v = Validation::new(alg);
    v.set_issuer(&[d.issuer.as_str()]);
    v.set_audience(&[c.client_id.as_str()]);
    v.leeway = 30;
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<IdClaims>(token, &key, &v)
        .map(|t| t.claims)
        .map_err(|e| bad(e.to_string()))
}
