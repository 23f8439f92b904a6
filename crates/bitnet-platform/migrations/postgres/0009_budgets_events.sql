-- Budgets (issue 16): a monthly hard cap per organization (project_id '') and per project,
-- and thresholds (fractions of the cap) that emit an event when spend passes them.
CREATE TABLE budgets (
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    project_id TEXT NOT NULL DEFAULT '',
    monthly_limit BIGINT,
    thresholds TEXT NOT NULL DEFAULT '[]',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (organization_id, project_id)
);

-- Spend per organization and per project per month (`YYYY-MM`, UTC), in picodollars: settled
-- spend, and what requests in flight have reserved. Kept for every organization and project
-- that has usage, so a budget set mid-month starts from the month's true spend.
CREATE TABLE budget_periods (
    organization_id TEXT NOT NULL,
    project_id TEXT NOT NULL DEFAULT '',
    period TEXT NOT NULL,
    spent BIGINT NOT NULL DEFAULT 0,
    reserved BIGINT NOT NULL DEFAULT 0,
    alerted BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, project_id, period)
);

-- What a reservation holds against its budgets (its worst-case cost) and its month.
ALTER TABLE usage_reservations ADD COLUMN reserved_cost BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_reservations ADD COLUMN period TEXT NOT NULL DEFAULT '';

-- The transactional outbox: every event is written in the transaction of the change it tells
-- of, then published at least once with its stable id (consumers dedupe on it).
CREATE TABLE events (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    organization_id TEXT,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX events_unpublished ON events (published_at, seq);

-- Per-key rate limits (requests and tokens per minute over every model), beside the project's.
CREATE TABLE key_rate_limits (
    key_id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    max_requests_per_1_minute BIGINT,
    max_tokens_per_1_minute BIGINT,
    updated_at BIGINT NOT NULL
);
