-- Sign-in: the keys that sign access tokens (Ed25519; rotated, old ones verify until their
-- tokens expire), refresh tokens (SHA-256 only; rotated on use, in families so a reused one
-- revokes its family), and the secret that accepts an invite (SHA-256 only).
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    private_key TEXT NOT NULL,
    public_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);

CREATE TABLE refresh_tokens (
    id TEXT PRIMARY KEY,
    family_id TEXT NOT NULL,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

ALTER TABLE invites ADD COLUMN token_hash TEXT;
CREATE UNIQUE INDEX invites_token ON invites (token_hash);
