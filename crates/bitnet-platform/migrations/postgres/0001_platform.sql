-- The platform schema on PostgreSQL. Ids carry their kind (`org-`, `proj_`, `user-`,
-- `svc_acct_`, `key_`, `invite-`, `audit_log-`, as OpenAI's Administration API spells them) and
-- a UUIDv7, so ordering by id is ordering by creation. Times are Unix seconds. Every row below
-- `organizations` carries its organization, and every query filters by it.

CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    -- The audit chain's head: the number of events and the hash of the last one. Every audited
    -- change updates this row first, which serializes an organization's changes.
    audit_seq BIGINT NOT NULL DEFAULT 0,
    audit_head TEXT NOT NULL DEFAULT ''
);

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    archived_at BIGINT
);
CREATE INDEX projects_org ON projects (organization_id, id);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'reader')),
    password_hash TEXT,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE UNIQUE INDEX users_org_email ON users (organization_id, email) WHERE deleted_at IS NULL;

CREATE TABLE project_users (
    project_id TEXT NOT NULL REFERENCES projects(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
    added_at BIGINT NOT NULL,
    PRIMARY KEY (project_id, user_id)
);

CREATE TABLE service_accounts (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
    created_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX service_accounts_project ON service_accounts (organization_id, project_id, id);

-- Only the SHA-256 of a key is kept (hex); it also finds the row.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    -- NULL only for operator keys, which sit above organizations.
    organization_id TEXT REFERENCES organizations(id),
    project_id TEXT REFERENCES projects(id),
    kind TEXT NOT NULL CHECK (kind IN ('operator', 'admin', 'project')),
    scope TEXT NOT NULL DEFAULT 'all' CHECK (scope IN ('all', 'read_only')),
    user_id TEXT REFERENCES users(id),
    service_account_id TEXT REFERENCES service_accounts(id),
    name TEXT NOT NULL,
    redacted_value TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_org ON api_keys (organization_id, kind, id);

CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'reader')),
    projects TEXT NOT NULL DEFAULT '[]',
    invited_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    accepted_at BIGINT,
    deleted_at BIGINT
);
CREATE INDEX invites_org ON invites (organization_id, id);

-- Append-only and hash-chained per organization: `hash` is the SHA-256 of `prev_hash` and the
-- row's canonical content (see bitnet-platform's audit module); `seq` counts from 1.
CREATE TABLE audit_logs (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    seq BIGINT NOT NULL,
    type TEXT NOT NULL,
    effective_at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    actor_id TEXT,
    actor_email TEXT,
    project_id TEXT,
    target_id TEXT,
    details TEXT NOT NULL,
    outcome TEXT NOT NULL,
    ip TEXT,
    request_id TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (organization_id, seq)
);
CREATE INDEX audit_logs_type ON audit_logs (organization_id, type, seq);

-- One row per request that reached a model; `request_id` is the server's own and unique.
CREATE TABLE usage (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    client_request_id TEXT,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT,
    key_id TEXT,
    user_id TEXT,
    service_account_id TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    status BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX usage_org_time ON usage (organization_id, created_at);
