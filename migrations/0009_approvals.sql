-- A person between the CRM and risky changes: held changes wait in `approvals` until someone
-- decides; users who left the CRM keep their Wazzup user (not their access) for a grace.

CREATE TABLE approvals (
    id              bigserial PRIMARY KEY,
    account_id      text NOT NULL,
    -- The user, and the channel for a role row; NULL for an account-level hold (mass_leave).
    user_id         text,
    channel_id      text,
    -- What is held, as `plan --detail` names it: role_granted, role_changed, new_clients_on,
    -- user_deleted, or mass_leave.
    action          text NOT NULL,
    reason          text NOT NULL CHECK (reason IN ('widens_access', 'mass_delete', 'mass_leave')),
    -- The values before and after, as the history shows them (phones masked).
    before          jsonb,
    after           jsonb,
    -- The CRM content the hold was computed from, and its hash: the role row as the CRM has
    -- it, the user that is gone, or the users that would leave.
    content         jsonb NOT NULL,
    content_hash    text NOT NULL,
    -- waiting, then approved (goes out next cycle) or rejected (kept out while the content is
    -- the same); applied once it went out; superseded when the CRM content changed.
    status          text NOT NULL DEFAULT 'waiting'
                    CHECK (status IN ('waiting', 'approved', 'rejected', 'applied', 'superseded')),
    held_at         timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz,
    -- Who decided: a person's name (`--by`), `cli` (`--allow-mass-delete`) or `config`
    -- (`sync.allow_mass_delete`).
    decided_by      text,
    note            text,
    closed_at       timestamptz
);
-- At most one open hold per change: per role row, per user, or per account.
CREATE UNIQUE INDEX approvals_open ON approvals
    (account_id, reason, coalesce(user_id, ''), coalesce(channel_id, ''))
    WHERE status IN ('waiting', 'approved', 'rejected');
CREATE INDEX approvals_waiting ON approvals (held_at) WHERE status = 'waiting';

-- When the user left the CRM; the user is deleted from Wazzup `sync.delete_grace` later.
ALTER TABLE mirror_users ADD COLUMN left_at timestamptz;
CREATE INDEX mirror_users_leaving ON mirror_users (account_id) WHERE left_at IS NOT NULL;

-- When an account whose CRM rows did not change must be looked at again (a grace ending).
ALTER TABLE accounts ADD COLUMN due_at timestamptz;

-- The history records decisions, and the access of users who left the CRM.
ALTER TABLE changes DROP CONSTRAINT changes_action_check;
ALTER TABLE changes ADD CONSTRAINT changes_action_check CHECK (action IN (
    'user_created', 'user_updated', 'user_deleted',
    'role_granted', 'role_changed', 'role_revoked',
    'new_clients_on', 'new_clients_off', 'phone_hidden', 'phone_shown',
    'push_for_managers_on', 'push_for_managers_off',
    'refused', 'refusal_closed', 'approved', 'rejected'));
ALTER TABLE changes DROP CONSTRAINT changes_cause_check;
ALTER TABLE changes ADD CONSTRAINT changes_cause_check
    CHECK (cause IN ('crm_change', 'drift_repair', 'retry', 'manual', 'left_crm'));
-- The approval a change or a decision belongs to.
ALTER TABLE changes ADD COLUMN approval_id bigint;
