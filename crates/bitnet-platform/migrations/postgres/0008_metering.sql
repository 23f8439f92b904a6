-- Metering (issue 16): a request reserves before it runs and settles into one usage row after;
-- rate limits per project and model; price plans that cost each usage row when it settles.

-- Prompt tokens taken from the prefix cache, and the row's cost in picodollars (1e-12 USD) at
-- the prices valid when the request started: a later price change never rewrites it.
ALTER TABLE usage ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cost_input BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cost_cached BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cost_output BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN price_id TEXT;
-- 1 when the row was settled from an expired reservation (its replica died): a late settle
-- by a replica that was only slow replaces it.
ALTER TABLE usage ADD COLUMN expired BIGINT NOT NULL DEFAULT 0;
CREATE INDEX usage_org_project_time ON usage (organization_id, project_id, created_at);

-- A request in flight. The replica serving it keeps `expires_at` ahead while it lives and
-- records the tokens it has sent before sending them; settling deletes the row and writes the
-- usage row in one transaction. A dead replica's rows expire and any replica settles them
-- with what they hold.
CREATE TABLE usage_reservations (
    request_id TEXT PRIMARY KEY,
    client_request_id TEXT,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT,
    key_id TEXT,
    user_id TEXT,
    service_account_id TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    max_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    replica TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX usage_reservations_expiry ON usage_reservations (expires_at);
CREATE INDEX usage_reservations_replica ON usage_reservations (replica);

-- OpenAI's project rate limits: per project and model, requests and tokens per minute; NULL
-- is no limit.
CREATE TABLE rate_limits (
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL REFERENCES projects(id),
    model TEXT NOT NULL,
    max_requests_per_1_minute BIGINT,
    max_tokens_per_1_minute BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (project_id, model)
);

-- Price plans: per model (a served id, a registry model's name, or `*` for any other), in
-- microdollars per 1M tokens. A plan is never changed once it applies: a new price is a new
-- row from its `valid_from`, and the old one ends there.
CREATE TABLE prices (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    input BIGINT NOT NULL,
    cached_input BIGINT NOT NULL,
    output BIGINT NOT NULL,
    currency TEXT NOT NULL,
    valid_from BIGINT NOT NULL,
    valid_until BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX prices_model ON prices (model, valid_from);
