-- The model registry: an organization's models (or, shared by the operator, every
-- organization's), their immutable versions, and aliases (`prod`, `latest`, ...) naming one
-- version each. A version's artifact is a file (a GGUF) of the project that made it.
CREATE TABLE registry_models (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    shared INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    UNIQUE (organization_id, name)
);
CREATE INDEX registry_models_name ON registry_models (name);

CREATE TABLE model_versions (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL REFERENCES registry_models(id),
    version INTEGER NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(id),
    file_id TEXT NOT NULL REFERENCES files(id),
    source_file_id TEXT,
    job_id TEXT,
    sha256 TEXT NOT NULL,
    format TEXT NOT NULL,
    architecture TEXT NOT NULL,
    parameters BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    report TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    UNIQUE (model_id, version)
);
CREATE INDEX model_versions_file ON model_versions (file_id);

CREATE TABLE model_aliases (
    model_id TEXT NOT NULL REFERENCES registry_models(id),
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (model_id, alias)
);

-- The registry version a job made, as NAME:VERSION (OpenAI's fine_tuned_model).
ALTER TABLE quantization_jobs ADD COLUMN result_model TEXT;
