-- Users sent to Wazzup whose answer has not been recorded yet (the process may have died
-- in between). They may be in Wazzup: if the CRM drops them meanwhile, they are deleted.
CREATE TABLE pending_users (
    account_id text NOT NULL,
    user_id    text NOT NULL,
    since      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, user_id)
);
