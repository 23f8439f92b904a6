-- Usage rows are keyed by the server's own request id (`req_...`, unique); the id a client sent
-- in `x-request-id` is kept beside it, not unique (clients repeat ids).
ALTER TABLE usage ADD COLUMN client_request_id TEXT;
