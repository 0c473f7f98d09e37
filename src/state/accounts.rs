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
}

/// Opens an account's cycle in one statement: forgets its clean fingerprint (so that if the
/// process dies mid-way and the CRM then returns to its old rows, the account is still synced),
/// and reads its state (its last settings document only when `with_doc`), the users pending
/// and its dead letters.
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
                ARRAY(SELECT user_id FROM pending_users WHERE account_id = $1) AS pending,
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
         ) AS d",
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
    };
    let pending: Vec<String> = row.try_get("pending")?;
    Ok(Opening {
        account,
        pending: pending.into_iter().collect(),
        dead_letters: super::dead_letters::from_columns(&row)?,
    })
}

/// Records the end of an account's cycle. Its CRM fingerprint is kept when the cycle ended
/// `clean` and no refusal of Wazzup's is open, so that unchanged rows next time mean nothing to
/// do.
pub async fn finish_account(
    db: impl PgExecutor<'_>,
    account_id: &str,
    fingerprint: &str,
    success: bool,
    error: Option<&str>,
    source_fingerprint: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO accounts (account_id, token_fingerprint, status, last_cycle_at, last_success_at, last_error,
                               source_fingerprint)
         VALUES ($1, $2, 'ok', now(), CASE WHEN $3 THEN now() END, $4,
                 CASE WHEN NOT EXISTS (
                    SELECT 1 FROM dead_letters
                    WHERE account_id = $1 AND resolved_at IS NULL AND kind = 'rejected'
                 ) THEN $5 END)
         ON CONFLICT (account_id) DO UPDATE SET
            token_fingerprint = EXCLUDED.token_fingerprint,
            status = 'ok', auth_failed_at = NULL,
            last_cycle_at = now(),
            last_success_at = COALESCE(EXCLUDED.last_success_at, accounts.last_success_at),
            last_error = EXCLUDED.last_error,
            source_fingerprint = EXCLUDED.source_fingerprint",
    )
    .bind(account_id)
    .bind(fingerprint)
    .bind(success)
    .bind(error)
    .bind(source_fingerprint)
    .execute(db)
    .await?;
    Ok(())
}

/// The fingerprints stored at each account's last clean cycle (of the accounts `only`, when
/// given), with the token then used.
pub async fn load_source_fingerprints(
    pool: &PgPool,
    only: Option<&std::collections::HashSet<String>>,
) -> Result<HashMap<String, (String, String)>> {
    let mut conn = pool.acquire().await?;
    let only: Option<Vec<&str>> = only.map(|o| o.iter().map(String::as_str).collect());
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT account_id, source_fingerprint, token_fingerprint FROM accounts
         WHERE source_fingerprint IS NOT NULL AND token_fingerprint IS NOT NULL AND status = 'ok'
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

/// Records the settings document Wazzup acknowledged, with a history row per role row granted,
/// changed or revoked, per user whose contacts' phones became hidden or shown, and for the push
/// flag, in one statement. The rows compare the document with `previous` (the document as
/// found in Wazzup, after drift) or else with the one last acknowledged; `widens_access` follows
/// [`crate::plan::widens`]. Returns how many rows of each action were written.
pub async fn save_settings(
    pool: &PgPool,
    account_id: &str,
    (doc_json, hash): (&str, &str),
    previous: Option<&str>,
    (cycle, cause): (Option<i64>, super::Cause),
) -> Result<Vec<(String, i64)>> {
    let sql = format!(
        "WITH prev AS (
            SELECT COALESCE($4::jsonb, (SELECT settings_doc FROM accounts WHERE account_id = $1)) AS d
         ), n AS (
            SELECT r->>'user_id' AS u, r->>'channel_id' AS c, r->>'role' AS n_role,
                   (r->>'allow_get_new_clients')::bool AS n_new
            FROM jsonb_array_elements($3::jsonb->'user_roles') AS r
         ), o AS (
            SELECT r->>'user_id' AS u, r->>'channel_id' AS c, r->>'role' AS o_role,
                   (r->>'allow_get_new_clients')::bool AS o_new
            FROM prev, jsonb_array_elements(prev.d->'user_roles') AS r
         ), roles AS (
            SELECT COALESCE(n.u, o.u) AS u, COALESCE(n.c, o.c) AS c, o.o_role, o.o_new, n.n_role, n.n_new
            FROM n FULL JOIN o ON o.u = n.u AND o.c = n.c
            WHERE o.o_role IS DISTINCT FROM n.n_role OR o.o_new IS DISTINCT FROM n.n_new
         ), hidden AS (
            SELECT h AS u, true AS now FROM jsonb_array_elements_text($3::jsonb->'hide_phone_numbers_for_user_ids') AS h
            EXCEPT SELECT h, true FROM prev, jsonb_array_elements_text(prev.d->'hide_phone_numbers_for_user_ids') AS h
            UNION ALL
            (SELECT h, false FROM prev, jsonb_array_elements_text(prev.d->'hide_phone_numbers_for_user_ids') AS h
             EXCEPT SELECT h, false FROM jsonb_array_elements_text($3::jsonb->'hide_phone_numbers_for_user_ids') AS h)
         ), rows AS (
            SELECT u, c,
                   CASE WHEN o_role IS NULL THEN 'role_granted' WHEN n_role IS NULL THEN 'role_revoked'
                        WHEN o_role <> n_role THEN 'role_changed'
                        WHEN n_new THEN 'new_clients_on' ELSE 'new_clients_off' END AS action,
                   CASE WHEN o_role IS NOT NULL
                        THEN jsonb_build_object('role', o_role, 'allow_get_new_clients', o_new) END AS before,
                   CASE WHEN n_role IS NOT NULL
                        THEN jsonb_build_object('role', n_role, 'allow_get_new_clients', n_new) END AS after,
                   {widens} AS widens
            FROM roles
            UNION ALL
            SELECT u, NULL, CASE WHEN now THEN 'phone_hidden' ELSE 'phone_shown' END,
                   jsonb_build_object('hidden', NOT now), jsonb_build_object('hidden', now), false
            FROM hidden
            UNION ALL
            SELECT NULL, NULL,
                   CASE WHEN ($3::jsonb->>'push_input_output_message_events_for_managers')::bool
                        THEN 'push_for_managers_on' ELSE 'push_for_managers_off' END,
                   jsonb_build_object('push', prev.d->'push_input_output_message_events_for_managers'),
                   jsonb_build_object('push', $3::jsonb->'push_input_output_message_events_for_managers'),
                   false
            FROM prev
            WHERE prev.d IS NOT NULL
              AND prev.d->'push_input_output_message_events_for_managers'
                  IS DISTINCT FROM $3::jsonb->'push_input_output_message_events_for_managers'
         ), h AS (
            INSERT INTO changes (cycle_id, account_id, user_id, channel_id, action, before, after,
                                 widens_access, cause)
            SELECT $5, $1, u, c, action, before, after, widens, $6 FROM rows
            RETURNING action
         ), saved AS (
            INSERT INTO accounts (account_id, settings_hash, settings_doc) VALUES ($1, $2, $3::jsonb)
            ON CONFLICT (account_id) DO UPDATE SET settings_hash = $2, settings_doc = $3::jsonb
         )
         SELECT action, count(*) FROM h GROUP BY action",
        widens = crate::plan::widening_sql("o", "n"),
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .bind(hash)
        .bind(doc_json)
        .bind(previous)
        .bind(cycle)
        .bind(cause.as_str())
        .fetch_all(pool)
        .await
        .map_err(Into::into)
}
