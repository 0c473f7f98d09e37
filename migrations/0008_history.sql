-- The record: one row per cycle, and one row per change Wazzup acknowledged (and per dead
-- letter opened or closed), written in the same statement as the mirror, settings or dead
-- letter they describe. Kept `history.retention_days` (0: for ever); `run` prunes once a day.

CREATE TABLE cycles (
    id                bigserial PRIMARY KEY,
    -- The cycle's run_id in its log lines.
    run_id            text NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    trigger           text NOT NULL CHECK (trigger IN ('schedule', 'notify', 'sync', 'reconcile', 'retry')),
    -- The process that ran it (`instance`: host name and pid by default).
    instance          text NOT NULL,
    created           int NOT NULL DEFAULT 0,
    updated           int NOT NULL DEFAULT 0,
    deleted           int NOT NULL DEFAULT 0,
    settings_pushed   int NOT NULL DEFAULT 0,
    refused_locally   int NOT NULL DEFAULT 0,
    refused_by_wazzup int NOT NULL DEFAULT 0,
    requests          bigint NOT NULL DEFAULT 0,
    -- running while it runs; completed, partial (some account did not complete) or failed.
    outcome           text NOT NULL DEFAULT 'running'
                      CHECK (outcome IN ('running', 'completed', 'partial', 'failed'))
);
CREATE INDEX cycles_started ON cycles USING brin (started_at);

CREATE TABLE changes (
    id              bigserial PRIMARY KEY,
    -- NULL for a change made outside a cycle (a dead letter discarded by hand).
    cycle_id        bigint,
    account_id      text NOT NULL,
    -- NULL for a change of the whole account (push_for_managers_on/off).
    user_id         text,
    channel_id      text,
    action          text NOT NULL CHECK (action IN (
                        'user_created', 'user_updated', 'user_deleted',
                        'role_granted', 'role_changed', 'role_revoked',
                        'new_clients_on', 'new_clients_off', 'phone_hidden', 'phone_shown',
                        'push_for_managers_on', 'push_for_managers_off',
                        'refused', 'refusal_closed')),
    -- The values before and after, as sent (phones masked as the logs mask them).
    before          jsonb,
    after           jsonb,
    widens_access   boolean NOT NULL DEFAULT false,
    cause           text NOT NULL CHECK (cause IN ('crm_change', 'drift_repair', 'retry', 'manual')),
    acknowledged_at timestamptz NOT NULL DEFAULT now(),
    -- Who decided, for a change a person made.
    actor           text,
    note            text
);
-- One user's story, and who holds a role since when.
CREATE INDEX changes_by_user ON changes (account_id, user_id, acknowledged_at);
-- Time ranges and pruning; what one cycle did. Rows arrive in time order: small BRIN indexes.
CREATE INDEX changes_acknowledged ON changes USING brin (acknowledged_at);
CREATE INDEX changes_by_cycle ON changes USING brin (cycle_id);

-- Per role row of `accounts.settings_doc.user_roles`, in its order, a 64-bit hash of the row:
-- a push tells which role rows changed (for their history rows) without reading the document
-- back. Written with the document; NULL for a document written before this migration.
ALTER TABLE accounts ADD COLUMN settings_roles bigint[];
