//! `accounts`: per account, the token last used (as a fingerprint), whether Wazzup refused it,
//! the settings document last acknowledged, and the CRM fingerprint of its last clean cycle.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::{PgExecutor, Row};

use super::Result;
use crate::domain::SettingsDoc;

/// What the state schema knows about one account.
#[derive(Debug, Clone, Default)]
pub struct AccountState {
    pub token_fingerprint: Option<String>,
    pub auth_failed_at: Option<DateTime<Utc>>,
    pub settings_hash: Option<String>,
    pub settings_doc: Option<SettingsDoc>,
    /// When the document is not loaded whole: enough of it to tell what a push changes
    /// (read as the account's cycle opens, see [`open_account`]).
    pub settings_outline: Option<AcknowledgedOutline>,
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    token_fingerprint: Option<String>,
    status: String,
    auth_failed_at: Option<DateTime<Utc>>,
    settings_hash: Option<String>,
    settings_doc: Option<sqlx::types::Json<SettingsDoc>>,
}

/// The account's state; its last settings document only when `with_doc` (it can be large).
pub async fn load_account(
    db: impl PgExecutor<'_>,
    account_id: &str,
    with_doc: bool,
) -> Result<AccountState> {
    let row: Option<AccountRow> = sqlx::query_as(
        "SELECT token_fingerprint, status, auth_failed_at, settings_hash,
                CASE WHEN $2 THEN settings_doc END AS settings_doc
         FROM accounts WHERE account_id = $1",
    )
    .bind(account_id)
    .bind(with_doc)
    .fetch_optional(db)
    .await?;
    Ok(match row {
        None => AccountState::default(),
        Some(r) => AccountState {
            token_fingerprint: r.token_fingerprint,
            auth_failed_at: if r.status == "auth_failed" {
                r.auth_failed_at
            } else {
                None
            },
            settings_hash: r.settings_hash,
            settings_doc: r.settings_doc.map(|d| d.0),
            settings_outline: None,
        },
    })
}

/// What a cycle reads of an account as it opens, in one round trip (see [`open_account`]).
#[derive(Debug, Default)]
pub struct Opening {
    pub account: AccountState,
    /// Users sent earlier whose answer was never recorded.
    pub pending: std::collections::HashSet<String>,
    /// Open dead letters, and those an operator discarded.
    pub dead_letters: Vec<super::OpenDeadLetter>,
    /// Users who left the CRM and are still in Wazzup, without access: when each left.
    pub leavers: HashMap<String, DateTime<Utc>>,
    /// Whether any approval of the account is open (waiting, approved, rejected).
    pub approvals_open: bool,
}

/// Opens an account's cycle in one statement: forgets its clean fingerprint (so that if the
/// process dies mid-way and the CRM then returns to its old rows, the account is still synced),
/// and reads its state (its last settings document whole only when `with_doc`, else its
/// outline), the users pending and its dead letters.
pub async fn open_account(
    db: impl PgExecutor<'_>,
    account_id: &str,
    with_doc: bool,
) -> Result<Opening> {
    let row = sqlx::query(
        "WITH cleared AS (
            UPDATE accounts SET source_fingerprint = NULL
            WHERE account_id = $1 AND source_fingerprint IS NOT NULL
         )
         SELECT a.token_fingerprint, a.status, a.auth_failed_at, a.settings_hash,
                CASE WHEN $2 THEN a.settings_doc END AS settings_doc,
                a.settings_doc IS NOT NULL AND NOT $2 AS outlined, a.settings_roles,
                CASE WHEN NOT $2 THEN a.settings_doc->'hide_phone_numbers_for_user_ids' END AS hidden,
                CASE WHEN NOT $2
                     THEN (a.settings_doc->>'push_input_output_message_events_for_managers')::bool
                END AS push,
                ARRAY(SELECT user_id FROM pending_users WHERE account_id = $1) AS pending,
                l.leaver_ids, l.left_at,
                EXISTS (SELECT 1 FROM approvals
                        WHERE account_id = $1 AND status IN ('waiting', 'approved', 'rejected'))
                    AS approvals_open,
                d.entity, d.record_id, d.kind, d.error_code, d.error_message, d.payload_hash,
                d.next_attempt_at, d.resolution
         FROM (SELECT 1) AS one
         LEFT JOIN accounts a ON a.account_id = $1
         CROSS JOIN LATERAL (
            SELECT array_agg(entity) AS entity, array_agg(record_id) AS record_id,
                   array_agg(kind) AS kind, array_agg(error_code) AS error_code,
                   array_agg(error_message) AS error_message,
                   array_agg(payload_hash) AS payload_hash,
                   array_agg(next_attempt_at) AS next_attempt_at,
                   array_agg(resolution) AS resolution
            FROM dead_letters
            WHERE account_id = $1 AND (resolved_at IS NULL OR resolution = 'discarded')
         ) AS d
         CROSS JOIN LATERAL (
            SELECT coalesce(array_agg(user_id), '{}') AS leaver_ids,
                   coalesce(array_agg(left_at), '{}') AS left_at
            FROM mirror_users WHERE account_id = $1 AND left_at IS NOT NULL
         ) AS l",
    )
    .bind(account_id)
    .bind(with_doc)
    .fetch_one(db)
    .await?;
    let status: Option<String> = row.try_get("status")?;
    let account = AccountState {
        token_fingerprint: row.try_get("token_fingerprint")?,
        auth_failed_at: match status.as_deref() {
            Some("auth_failed") => row.try_get("auth_failed_at")?,
            _ => None,
        },
        settings_hash: row.try_get("settings_hash")?,
        settings_doc: row
            .try_get::<Option<sqlx::types::Json<SettingsDoc>>, _>("settings_doc")?
            .map(|d| d.0),
        settings_outline: match row.try_get::<Option<bool>, _>("outlined")? {
            Some(true) => Some(AcknowledgedOutline {
                role_hashes: row.try_get("settings_roles")?,
                hidden: row
                    .try_get::<Option<sqlx::types::Json<Vec<String>>>, _>("hidden")?
                    .map(|h| h.0)
                    .unwrap_or_default(),
                push: row.try_get::<Option<bool>, _>("push")?.unwrap_or(false),
            }),
            _ => None,
        },
    };
    let pending: Vec<String> = row.try_get("pending")?;
    let leaver_ids: Vec<String> = row.try_get("leaver_ids")?;
    let left_at: Vec<DateTime<Utc>> = row.try_get("left_at")?;
    Ok(Opening {
        account,
        pending: pending.into_iter().collect(),
        dead_letters: super::dead_letters::from_columns(&row)?,
        leavers: leaver_ids.into_iter().zip(left_at).collect(),
        approvals_open: row.try_get("approvals_open")?,
    })
}

/// Records the end of an account's cycle. Its CRM fingerprint is kept when the cycle ended
/// `clean` and no refusal of Wazzup's is open, so that unchanged rows next time mean nothing to
/// do until `due_at` (when the first grace of a user who left ends).
pub async fn finish_account(
    db: impl PgExecutor<'_>,
    account_id: &str,
    fingerprint: &str,
    success: bool,
    error: Option<&str>,
    (source_fingerprint, due_at): (Option<&str>, Option<DateTime<Utc>>),
) -> Result<()> {
    sqlx::query(
        "INSERT INTO accounts (account_id, token_fingerprint, status, last_cycle_at, last_success_at, last_error,
                               source_fingerprint, due_at)
         VALUES ($1, $2, 'ok', now(), CASE WHEN $3 THEN now() END, $4,
                 CASE WHEN NOT EXISTS (
                    SELECT 1 FROM dead_letters
                    WHERE account_id = $1 AND resolved_at IS NULL AND kind = 'rejected'
                 ) THEN $5 END, $6)
         ON CONFLICT (account_id) DO UPDATE SET
            token_fingerprint = EXCLUDED.token_fingerprint,
            status = 'ok', auth_failed_at = NULL,
            last_cycle_at = now(),
            last_success_at = COALESCE(EXCLUDED.last_success_at, accounts.last_success_at),
            last_error = EXCLUDED.last_error,
            source_fingerprint = EXCLUDED.source_fingerprint,
            due_at = EXCLUDED.due_at",
    )
    .bind(account_id)
    .bind(fingerprint)
    .bind(success)
    .bind(error)
    .bind(source_fingerprint)
    .bind(due_at)
    .execute(db)
    .await?;
    Ok(())
}

/// The fingerprints stored at each account's last clean cycle (of the accounts `only`, when
/// given), with the token then used; none for an account that is due again (a grace ending).
pub async fn load_source_fingerprints(
    pool: &PgPool,
    only: Option<&std::collections::HashSet<String>>,
) -> Result<HashMap<String, (String, String)>> {
    let mut conn = pool.acquire().await?;
    let only: Option<Vec<&str>> = only.map(|o| o.iter().map(String::as_str).collect());
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT account_id, source_fingerprint, token_fingerprint FROM accounts
         WHERE source_fingerprint IS NOT NULL AND token_fingerprint IS NOT NULL AND status = 'ok'
           AND (due_at IS NULL OR due_at > now())
           AND ($1::text[] IS NULL OR account_id = ANY($1))",
    )
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(rows.into_iter().map(|(a, s, t)| (a, (s, t))).collect())
}

/// Records a cycle for accounts skipped because nothing changed, in one statement.
pub async fn touch_unchanged(pool: &PgPool, account_ids: &[String]) -> Result<()> {
    if account_ids.is_empty() {
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    sqlx::query(
        "UPDATE accounts SET last_cycle_at = now(), last_success_at = now(), last_error = NULL
         WHERE account_id = ANY($1)",
    )
    .bind(account_ids)
    .execute(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(())
}

/// Marks an account whose token Wazzup refused.
pub async fn mark_auth_failed(
    pool: &PgPool,
    account_id: &str,
    fingerprint: &str,
    status: u16,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO accounts (account_id, token_fingerprint, status, auth_failed_at, last_cycle_at, last_error)
         VALUES ($1, $2, 'auth_failed', now(), now(), $3)
         ON CONFLICT (account_id) DO UPDATE SET
            token_fingerprint = EXCLUDED.token_fingerprint, status = 'auth_failed', source_fingerprint = NULL,
            auth_failed_at = now(), last_cycle_at = now(), last_error = EXCLUDED.last_error",
    )
    .bind(account_id)
    .bind(fingerprint)
    .bind(format!("Wazzup refused the token (HTTP {status})"))
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the settings document Wazzup acknowledged, the hashes of its role rows (in its
/// order), and its history rows (what changed from the document Wazzup held, each with its
/// cause), in one statement. Returns how many rows of each action were written, those that
/// widen access apart: (action, widens access, rows).
pub async fn save_settings(
    pool: &PgPool,
    account_id: &str,
    (doc_json, hash, role_hashes): (&str, &str, &[i64]),
    rows: SettingsRows<'_>,
    (cycle, causes): (Option<i64>, &[super::Cause]),
) -> Result<Vec<(String, bool, i64)>> {
    let causes: Vec<&str> = causes.iter().map(|c| c.as_str()).collect();
    // A role row's values are {role, allow_get_new_clients}; a phone's {hidden}; the push
    // flag's {push}. NULL where there is no row. A widening a person approved names them, and
    // its approval is applied.
    sqlx::query_as(
        "WITH d AS (
            SELECT * FROM UNNEST($6::text[], $7::text[], $8::text[], $9::text[], $10::bool[],
                                 $11::text[], $12::bool[], $13::bool[], $5::text[])
                AS d(u, c, action, o_role, o_flag, n_role, n_flag, widens, cause)
         ), applied AS (
            UPDATE approvals a SET status = 'applied', closed_at = now()
            FROM d
            WHERE a.account_id = $1 AND a.reason = 'widens_access' AND a.status = 'approved'
              AND a.user_id = d.u AND a.channel_id = d.c AND d.widens
            RETURNING a.id, a.user_id, a.channel_id, a.decided_by, a.note
         ), h AS (
            INSERT INTO changes (cycle_id, account_id, user_id, channel_id, action, before, after,
                                 widens_access, cause, actor, note, approval_id)
            SELECT $4, $1, d.u, d.c, d.action,
                   CASE WHEN d.o_flag IS NULL THEN NULL
                        WHEN d.action LIKE 'phone%' THEN jsonb_build_object('hidden', d.o_flag)
                        WHEN d.action LIKE 'push%' THEN jsonb_build_object('push', d.o_flag)
                        ELSE jsonb_build_object('role', d.o_role, 'allow_get_new_clients', d.o_flag) END,
                   CASE WHEN d.n_flag IS NULL THEN NULL
                        WHEN d.action LIKE 'phone%' THEN jsonb_build_object('hidden', d.n_flag)
                        WHEN d.action LIKE 'push%' THEN jsonb_build_object('push', d.n_flag)
                        ELSE jsonb_build_object('role', d.n_role, 'allow_get_new_clients', d.n_flag) END,
                   d.widens, d.cause, ap.decided_by, ap.note, ap.id
            FROM d LEFT JOIN applied ap ON ap.user_id = d.u AND ap.channel_id = d.c
            RETURNING action, widens_access
         ), saved AS (
            INSERT INTO accounts (account_id, settings_hash, settings_doc, settings_roles)
            VALUES ($1, $2, $3::jsonb, $14)
            ON CONFLICT (account_id) DO UPDATE
            SET settings_hash = EXCLUDED.settings_hash, settings_doc = EXCLUDED.settings_doc,
                settings_roles = EXCLUDED.settings_roles
         )
         SELECT action, widens_access, count(*) FROM h GROUP BY 1, 2",
    )
    .bind(account_id)
    .bind(hash)
    .bind(doc_json)
    .bind(cycle)
    .bind(causes)
    .bind(rows.users)
    .bind(rows.channels)
    .bind(rows.actions)
    .bind(rows.old_role)
    .bind(rows.old_flag)
    .bind(rows.new_role)
    .bind(rows.new_flag)
    .bind(rows.widens)
    .bind(role_hashes)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}

/// The history rows of a settings push, column by column, as `save_settings` binds them.
#[derive(Default)]
pub struct SettingsRows<'a> {
    users: Vec<Option<&'a str>>,
    channels: Vec<Option<&'a str>>,
    actions: Vec<&'static str>,
    old_role: Vec<Option<&'static str>>,
    old_flag: Vec<Option<bool>>,
    new_role: Vec<Option<&'static str>>,
    new_flag: Vec<Option<bool>>,
    widens: Vec<bool>,
}

impl<'a> SettingsRows<'a> {
    /// One row: whose and which channel's, the action, whether it widens access, and the
    /// values before and after (None: no row).
    pub fn push(
        &mut self,
        (user, channel): (Option<&'a str>, Option<&'a str>),
        action: &'static str,
        widens: bool,
        (before, after): (
            Option<crate::domain::RowValues>,
            Option<crate::domain::RowValues>,
        ),
    ) {
        self.users.push(user);
        self.channels.push(channel);
        self.actions.push(action);
        self.widens.push(widens);
        self.old_role.push(before.and_then(|b| b.0));
        self.old_flag.push(before.map(|b| b.1));
        self.new_role.push(after.and_then(|a| a.0));
        self.new_flag.push(after.map(|a| a.1));
    }
}

/// Enough of the last acknowledged settings document to tell what a push changes, without
/// reading it whole: its role rows' hashes (None for a document written before they were
/// kept), the users whose contacts' phones it hides, and its push flag.
#[derive(Debug, Clone)]
pub struct AcknowledgedOutline {
    pub role_hashes: Option<Vec<i64>>,
    pub hidden: Vec<String>,
    pub push: bool,
}

/// The outline of the account's last acknowledged settings document; None when there is none.
pub async fn acknowledged_outline(
    pool: &PgPool,
    account_id: &str,
) -> Result<Option<AcknowledgedOutline>> {
    type Outline = (
        Option<Vec<i64>>,
        Option<sqlx::types::Json<Vec<String>>>,
        Option<bool>,
    );
    let row: Option<Outline> = sqlx::query_as(
        "SELECT settings_roles, settings_doc->'hide_phone_numbers_for_user_ids',
                    (settings_doc->>'push_input_output_message_events_for_managers')::bool
             FROM accounts WHERE account_id = $1 AND settings_doc IS NOT NULL",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(role_hashes, hidden, push)| AcknowledgedOutline {
        role_hashes,
        hidden: hidden.map(|h| h.0).unwrap_or_default(),
        push: push.unwrap_or(false),
    }))
}

/// The last acknowledged document's role rows at these positions (from 0).
pub async fn acknowledged_roles_at(
    pool: &PgPool,
    account_id: &str,
    positions: &[usize],
) -> Result<Vec<crate::domain::RoleEntry>> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let positions: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    let rows: Vec<sqlx::types::Json<crate::domain::RoleEntry>> = sqlx::query_scalar(
        "SELECT r.e FROM accounts a,
                LATERAL (SELECT a.settings_doc->'user_roles' AS roles) d,
                LATERAL (SELECT d.roles->p AS e FROM unnest($2::int[]) AS p) r
         WHERE a.account_id = $1 AND r.e IS NOT NULL",
    )
    .bind(account_id)
    .bind(positions)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// The account's last acknowledged settings document, whole (canonical).
pub async fn acknowledged_settings(pool: &PgPool, account_id: &str) -> Result<Option<SettingsDoc>> {
    let doc: Option<Option<sqlx::types::Json<SettingsDoc>>> =
        sqlx::query_scalar("SELECT settings_doc FROM accounts WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(pool)
            .await?;
    Ok(doc.flatten().map(|d| {
        let mut doc = d.0;
        doc.canonicalize();
        doc
    }))
}

/// Notes the users who left the CRM this cycle (their grace starts now) and forgets it for
/// those who came back, in one statement; a mass leave a person approved is applied with it.
/// Returns when each new leaver left.
pub async fn mark_leavers(
    pool: &PgPool,
    account_id: &str,
    (left, returned): (&[String], &[String]),
    approval: Option<i64>,
) -> Result<HashMap<String, DateTime<Utc>>> {
    if left.is_empty() && returned.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "WITH back AS (
            UPDATE mirror_users SET left_at = NULL
            WHERE account_id = $1 AND user_id = ANY($3) AND left_at IS NOT NULL
         ), applied AS (
            UPDATE approvals SET status = 'applied', closed_at = now()
            WHERE id = $4 AND status = 'approved'
         )
         UPDATE mirror_users SET left_at = now()
         WHERE account_id = $1 AND user_id = ANY($2) AND left_at IS NULL
         RETURNING user_id, left_at",
    )
    .bind(account_id)
    .bind(left)
    .bind(returned)
    .bind(approval)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The account's users who left the CRM and are still in Wazzup: when each left.
pub async fn load_leavers(
    pool: &PgPool,
    account_id: &str,
) -> Result<HashMap<String, DateTime<Utc>>> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT user_id, left_at FROM mirror_users WHERE account_id = $1 AND left_at IS NOT NULL",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Users who left the CRM and wait out their grace in Wazzup, over every account.
pub async fn users_in_grace(pool: &PgPool) -> Result<i64> {
    let mut conn = pool.acquire().await?;
    let n = sqlx::query_scalar("SELECT count(*) FROM mirror_users WHERE left_at IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    crate::db::hand_back(conn).await;
    Ok(n)
}
