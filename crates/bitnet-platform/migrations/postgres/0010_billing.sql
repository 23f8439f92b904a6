-- Billing (issue 16): one invoice per organization per month, its lines per project, model and
-- token type, and the billing provider's ids (Stripe's customer, invoice items and invoice),
-- written as each is made so a close that is retried after a crash reuses them.
CREATE TABLE billing_customers (
    organization_id TEXT PRIMARY KEY REFERENCES organizations(id),
    provider TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- status: draft (lines may still be recomputed), finalized (sent to the customer: immutable),
-- paid, void. Amounts: `total` in cents, `total_exact` in picodollars (1e-12 USD).
CREATE TABLE invoices (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    period TEXT NOT NULL,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    total BIGINT NOT NULL,
    total_exact BIGINT NOT NULL,
    provider TEXT,
    provider_invoice_id TEXT,
    provider_status TEXT,
    hosted_invoice_url TEXT,
    created_at BIGINT NOT NULL,
    finalized_at BIGINT,
    paid_at BIGINT,
    voided_at BIGINT,
    -- Until when a running close holds the draft (unix seconds).
    closing_until BIGINT,
    UNIQUE (organization_id, period)
);
CREATE INDEX invoices_provider ON invoices (provider_invoice_id);

CREATE TABLE invoice_lines (
    invoice_id TEXT NOT NULL REFERENCES invoices(id),
    seq BIGINT NOT NULL,
    project_id TEXT NOT NULL,
    model TEXT NOT NULL,
    token_type TEXT NOT NULL,
    tokens BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    amount_exact BIGINT NOT NULL,
    provider_item_id TEXT,
    PRIMARY KEY (invoice_id, seq)
);
