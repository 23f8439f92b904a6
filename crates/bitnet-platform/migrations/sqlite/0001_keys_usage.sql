-- Tenants own everything; this issue runs with the one default tenant.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO tenants (id, name, created_at) VALUES ('default', 'default', unixepoch());

-- API keys: only the SHA-256 of the key is kept; `prefix` (the key's first 12 characters) is
-- shown in listings and finds the row.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL UNIQUE,
    hash BLOB NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- One row per request that reached a model (metering reads these). `request_id` is unique, so a
-- request is never counted twice.
CREATE TABLE usage (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    key_id TEXT REFERENCES api_keys(id),
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    status INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX usage_tenant_time ON usage (tenant_id, created_at);
