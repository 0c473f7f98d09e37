-- The daemon's own state. Runs with search_path set to the configured state schema.

-- One row per account the daemon has synced.
CREATE TABLE accounts (
    account_id        text PRIMARY KEY,
    -- Short hash of the token last used, to notice rotation; never the token itself.
    token_fingerprint text,
    status            text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'auth_failed')),
    auth_failed_at    timestamptz,
    -- The settings document Wazzup last acknowledged, and its hash.
    settings_hash     text,
    settings_doc      jsonb,
    last_cycle_at     timestamptz,
    last_success_at   timestamptz,
    last_error        text
);

-- What Wazzup acknowledged, per user: the hash of the payload it accepted.
CREATE TABLE mirror_users (
    account_id text NOT NULL,
    user_id    text NOT NULL,
    hash       text NOT NULL,
    synced_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, user_id)
);

-- Records refused locally (kind 'invalid') or by Wazzup (kind 'rejected').
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    account_id      text NOT NULL,
    entity          text NOT NULL CHECK (entity IN ('user', 'settings', 'delete')),
    record_id       text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('invalid', 'rejected')),
    error_code      text NOT NULL,
    error_message   text NOT NULL,
    http_status     int,
    payload         jsonb,
    payload_hash    text,
    attempts        int NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz,
    resolved_at     timestamptz,
    resolution      text
);

-- One open row per record.
CREATE UNIQUE INDEX dead_letters_open_record
    ON dead_letters (account_id, entity, record_id) WHERE resolved_at IS NULL;
CREATE INDEX dead_letters_by_account ON dead_letters (account_id, resolved_at);
