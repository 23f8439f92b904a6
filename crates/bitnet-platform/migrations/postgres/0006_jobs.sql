-- Quantization jobs (shaped like OpenAI's fine-tuning jobs): a durable queue. A worker claims
-- a job with a lease (milliseconds since the epoch) that its heartbeats extend; a job whose
-- lease ran out is claimed again by another worker, up to max_attempts, with backoff.
CREATE TABLE quantization_jobs (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    file_id TEXT NOT NULL REFERENCES files(id),
    params TEXT NOT NULL,
    idempotency_key TEXT,
    status TEXT NOT NULL,
    error TEXT,
    result_files TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    run_after_ms BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_ms BIGINT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    finished_at BIGINT,
    UNIQUE (organization_id, project_id, idempotency_key)
);
CREATE INDEX quantization_jobs_queue ON quantization_jobs (status, run_after_ms);
CREATE INDEX quantization_jobs_project ON quantization_jobs (organization_id, project_id, id);

CREATE TABLE quantization_job_events (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES quantization_jobs(id),
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX quantization_job_events_job ON quantization_job_events (job_id, id);
