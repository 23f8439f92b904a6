-- Organizations, projects, users, service accounts and keys (issue 14), on the SQLite schema of
-- 0001/0002. `api_keys` and `usage` are rebuilt (copied to new tables, the old ones dropped
-- children first, the new ones renamed), in the migration's one transaction.
-- A database that only holds 0001's empty default tenant starts with no organization (`bitnet
-- serve` makes one on first start); one with keys keeps it as organization `default`: its admin
-- keys stay admin keys, its user keys become project keys of a service account in a
-- `Default project`, and its usage rows are kept.

CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    audit_seq INTEGER NOT NULL DEFAULT 0,
    audit_head TEXT NOT NULL DEFAULT ''
);
INSERT INTO organizations (id, name, created_at)
    SELECT id, name, created_at FROM tenants t
    WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.tenant_id = t.id)
       OR EXISTS (SELECT 1 FROM usage u WHERE u.tenant_id = t.id);

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    archived_at INTEGER
);
CREATE INDEX projects_org ON projects (organization_id, id);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'reader')),
    password_hash TEXT,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE UNIQUE INDEX users_org_email ON users (organization_id, email) WHERE deleted_at IS NULL;

CREATE TABLE project_users (
    project_id TEXT NOT NULL REFERENCES projects(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
    added_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, user_id)
);

CREATE TABLE service_accounts (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'viewer')),
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX service_accounts_project ON service_accounts (organization_id, project_id, id);

INSERT INTO projects (id, organization_id, name, created_at)
    SELECT 'proj_default', id, 'Default project', created_at FROM organizations WHERE id = 'default';
INSERT INTO service_accounts (id, organization_id, project_id, name, role, created_at)
    SELECT 'svc_acct_default', id, 'proj_default', 'keys from before organizations', 'member', created_at
    FROM organizations WHERE id = 'default';

CREATE TABLE api_keys_v3 (
    id TEXT PRIMARY KEY,
    organization_id TEXT REFERENCES organizations(id),
    project_id TEXT REFERENCES projects(id),
    kind TEXT NOT NULL CHECK (kind IN ('operator', 'admin', 'project')),
    scope TEXT NOT NULL DEFAULT 'all' CHECK (scope IN ('all', 'read_only')),
    user_id TEXT REFERENCES users(id),
    service_account_id TEXT REFERENCES service_accounts(id),
    name TEXT NOT NULL,
    redacted_value TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at INTEGER
);
INSERT INTO api_keys_v3 (id, organization_id, project_id, kind, service_account_id, name,
                         redacted_value, hash, created_at, revoked_at)
    SELECT id, tenant_id,
           CASE role WHEN 'user' THEN 'proj_default' END,
           CASE role WHEN 'admin' THEN 'admin' ELSE 'project' END,
           CASE role WHEN 'user' THEN 'svc_acct_default' END,
           name, prefix || '...', lower(hex(hash)), created_at, revoked_at
    FROM api_keys;

CREATE TABLE invites (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('owner', 'reader')),
    projects TEXT NOT NULL DEFAULT '[]',
    invited_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    accepted_at INTEGER,
    deleted_at INTEGER
);
CREATE INDEX invites_org ON invites (organization_id, id);

CREATE TABLE audit_logs (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    effective_at INTEGER NOT NULL,
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

CREATE TABLE usage_v3 (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    client_request_id TEXT,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT,
    key_id TEXT,
    user_id TEXT,
    service_account_id TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    status INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
INSERT INTO usage_v3 (id, request_id, client_request_id, organization_id, project_id, key_id,
                      service_account_id, model, endpoint, prompt_tokens, completion_tokens,
                      latency_ms, status, created_at)
    SELECT u.id, u.request_id, u.client_request_id, u.tenant_id, k.project_id, u.key_id,
           k.service_account_id, u.model, u.endpoint, u.prompt_tokens, u.completion_tokens,
           u.latency_ms, u.status, u.created_at
    FROM usage u LEFT JOIN api_keys_v3 k ON k.id = u.key_id;
-- Children before parents, so no row is ever left pointing at nothing.
DROP TABLE usage;
DROP TABLE api_keys;
DROP TABLE tenants;
ALTER TABLE api_keys_v3 RENAME TO api_keys;
ALTER TABLE usage_v3 RENAME TO usage;
CREATE INDEX api_keys_org ON api_keys (organization_id, kind, id);
CREATE INDEX usage_org_time ON usage (organization_id, created_at);

