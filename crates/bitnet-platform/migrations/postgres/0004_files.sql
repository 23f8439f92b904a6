-- Encryption at rest: one data key per organization ('platform' for the platform's own),
-- wrapped by the master key it names.
CREATE TABLE data_keys (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL UNIQUE,
    master_key_id TEXT NOT NULL,
    wrapped TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Files (OpenAI's Files API): a project's uploads. The bytes live in the artifact storage as
-- one or more sealed segments, in order.
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    md5 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    deleted_at BIGINT
);
CREATE INDEX files_project ON files (organization_id, project_id, id);

CREATE TABLE file_segments (
    file_id TEXT NOT NULL REFERENCES files(id),
    seq INTEGER NOT NULL,
    object TEXT NOT NULL,
    start_at BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    data_key_id TEXT NOT NULL,
    PRIMARY KEY (file_id, seq)
);
