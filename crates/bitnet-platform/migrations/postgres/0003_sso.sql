-- Single sign-on: one OpenID Connect connection per organization, and the pending sign-ins
-- (state, PKCE verifier, nonce), each usable once and for ten minutes.
CREATE TABLE sso_connections (
    organization_id TEXT PRIMARY KEY REFERENCES organizations(id),
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_secret TEXT NOT NULL,
    allowed_domains TEXT NOT NULL DEFAULT '[]',
    default_role TEXT NOT NULL DEFAULT 'reader' CHECK (default_role IN ('owner', 'reader')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE sso_states (
    state_hash TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    verifier TEXT NOT NULL,
    nonce TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
