-- Uploads (OpenAI's Uploads API): a file sent in parts, each a sealed object, that becomes a
-- file (its parts, in the order given, are the file's segments) when completed.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    file_id TEXT REFERENCES files(id)
);
CREATE INDEX uploads_project ON uploads (organization_id, project_id, id);

CREATE TABLE upload_parts (
    id TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL REFERENCES uploads(id),
    object TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    data_key_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
