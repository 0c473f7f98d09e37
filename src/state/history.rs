//! `cycles` and `changes`: the record of what each cycle did, and of every change Wazzup
//! acknowledged. The rows of `changes` are written by the same statements that write the mirror,
//! the settings document and the dead letters they describe (see [`Record`]); this module holds
//! what they share, the cycle rows, the reads of `history` and `access`, and pruning.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;

use super::Result;

/// Why a change was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The CRM changed.
    CrmChange,
    /// A reconcile put back what was edited in Wazzup.
    DriftRepair,
    /// A record Wazzup refused before, sent again on its schedule.
    Retry,
    /// A person asked for it (`dead-letters retry --now`, `dead-letters discard`, a decision
    /// on an approval).
    Manual,
    /// The user left the CRM: its access revoked, its user deleted after the grace.
    LeftCrm,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::CrmChange => "crm_change",
            Cause::DriftRepair => "drift_repair",
            Cause::Retry => "retry",
            Cause::Manual => "manual",
            Cause::LeftCrm => "left_crm",
        }
    }
}

/// Every action a history row can name, as `plan --detail` names the same changes.
pub const ACTIONS: [&str; 16] = [
    "user_created",
    "user_updated",
    "user_deleted",
    "role_granted",
    "role_changed",
    "role_revoked",
    "new_clients_on",
    "new_clients_off",
    "phone_hidden",
    "phone_shown",
    "push_for_managers_on",
    "push_for_managers_off",
    "refused",
    "refusal_closed",
    "approved",
    "rejected",
];

/// Where the history rows of a write belong: the cycle (None outside one), and the cause of
/// the changes that have no cause of their own.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub cycle: Option<i64>,
    pub cause: Cause,
}

impl Record {
    /// A change made outside any cycle, by a person.
    pub fn manual() -> Self {
        Self {
            cycle: None,
            cause: Cause::Manual,
        }
    }
}

/// What a cycle row says when the cycle ends.
#[derive(Debug, Clone, Default)]
pub struct CycleCounts {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub settings_pushed: usize,
    pub refused_locally: usize,
    pub refused_by_wazzup: usize,
    pub requests: u64,
    /// `completed`, `partial` or `failed`.
    pub outcome: &'static str,
}

/// Opens a cycle's row; its id names the cycle in every history row it writes.
pub async fn start_cycle(
    pool: &PgPool,
    run_id: &str,
    trigger: &str,
    instance: &str,
) -> Result<i64> {
    let mut conn = pool.acquire().await?;
    let id = sqlx::query_scalar(
        "INSERT INTO cycles (run_id, trigger, instance) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(run_id)
    .bind(trigger)
    .bind(instance)
    .fetch_one(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(id)
}

/// Closes a cycle's row with what it did.
pub async fn finish_cycle(pool: &PgPool, id: i64, c: &CycleCounts) -> Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query(
        "UPDATE cycles SET finished_at = now(), created = $2, updated = $3, deleted = $4,
                settings_pushed = $5, refused_locally = $6, refused_by_wazzup = $7,
                requests = $8, outcome = $9
         WHERE id = $1",
    )
    .bind(id)
    .bind(c.created as i32)
    .bind(c.updated as i32)
    .bind(c.deleted as i32)
    .bind(c.settings_pushed as i32)
    .bind(c.refused_locally as i32)
    .bind(c.refused_by_wazzup as i32)
    .bind(c.requests as i64)
    .bind(c.outcome)
    .execute(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(())
}

/// One history row, as `history` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ChangeRow {
    pub id: i64,
    pub acknowledged_at: DateTime<Utc>,
    pub cycle_id: Option<i64>,
    pub account_id: String,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub action: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub widens_access: bool,
    pub cause: String,
    pub instance: Option<String>,
    pub actor: Option<String>,
    pub note: Option<String>,
    /// The approval a person decided for this change, when one was.
    pub approval_id: Option<i64>,
}

/// Which history rows to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub user_id: Option<String>,
    pub account_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub actions: Vec<String>,
    pub widens_access: bool,
    pub cycle: Option<i64>,
    pub limit: i64,
}

/// History rows, newest first.
pub async fn history(pool: &PgPool, f: &HistoryFilter) -> Result<Vec<ChangeRow>> {
    let actions: Option<&[String]> = (!f.actions.is_empty()).then_some(&f.actions[..]);
    sqlx::query_as(
        "SELECT c.id, c.acknowledged_at, c.cycle_id, c.account_id, c.user_id, c.channel_id,
                c.action, c.before, c.after, c.widens_access, c.cause, y.instance, c.actor, c.note,
                c.approval_id
         FROM changes c LEFT JOIN cycles y ON y.id = c.cycle_id
         WHERE ($1::text IS NULL OR c.user_id = $1)
           AND ($2::text IS NULL OR c.account_id = $2)
           AND ($3::timestamptz IS NULL OR c.acknowledged_at >= $3)
           AND ($4::timestamptz IS NULL OR c.acknowledged_at < $4)
           AND ($5::text[] IS NULL OR c.action = ANY($5))
           AND (NOT $6 OR c.widens_access)
           AND ($7::bigint IS NULL OR c.cycle_id = $7)
         ORDER BY c.acknowledged_at DESC, c.id DESC
         LIMIT $8",
    )
    .bind(&f.user_id)
    .bind(&f.account_id)
    .bind(f.since)
    .bind(f.until)
    .bind(actions)
    .bind(f.widens_access)
    .bind(f.cycle)
    .bind(f.limit)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}

/// One role a user holds now, as Wazzup acknowledged it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AccessRow {
    pub account_id: String,
    pub user_id: String,
    pub name: Option<String>,
    pub channel_id: String,
    pub role: String,
    pub receives_new_clients: bool,
    pub phones_hidden: bool,
    /// When the history first recorded this role on this channel (the latest grant or change);
    /// None when that is older than the history.
    pub since: Option<DateTime<Utc>>,
}

/// Who holds which role on which channel now: the settings documents Wazzup last acknowledged,
/// with the time each role was given, from the history.
pub async fn access(
    pool: &PgPool,
    account: Option<&str>,
    roles: &[String],
    channel: Option<&str>,
) -> Result<Vec<AccessRow>> {
    let roles: Option<&[String]> = (!roles.is_empty()).then_some(roles);
    sqlx::query_as(
        "SELECT a.account_id, r->>'user_id' AS user_id, m.name, r->>'channel_id' AS channel_id,
                r->>'role' AS role, (r->>'allow_get_new_clients')::bool AS receives_new_clients,
                COALESCE(a.settings_doc->'hide_phone_numbers_for_user_ids' ? (r->>'user_id'), false)
                    AS phones_hidden,
                (SELECT max(c.acknowledged_at) FROM changes c
                 WHERE c.account_id = a.account_id AND c.user_id = r->>'user_id'
                   AND c.channel_id = r->>'channel_id'
                   AND c.action IN ('role_granted', 'role_changed')) AS since
         FROM accounts a
         CROSS JOIN LATERAL jsonb_array_elements(a.settings_doc->'user_roles') AS r
         LEFT JOIN mirror_users m ON m.account_id = a.account_id AND m.user_id = r->>'user_id'
         WHERE a.settings_doc IS NOT NULL
           AND ($1::text IS NULL OR a.account_id = $1)
           AND ($2::text[] IS NULL OR r->>'role' = ANY($2))
           AND ($3::text IS NULL OR r->>'channel_id' = $3)
         ORDER BY a.account_id, r->>'channel_id', r->>'role', r->>'user_id'",
    )
    .bind(account)
    .bind(roles)
    .bind(channel)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}

/// Deletes history rows older than `days`, at most `batch` at a time, each batch its own short
/// transaction (no long lock). Returns how many rows went: changes, then cycles. A cycle goes
/// once it ended before the cut-off, so every change it acknowledged (between its start and
/// its end) went before it; one that never recorded its end is given a day.
pub async fn prune(pool: &PgPool, days: u32, batch: i64) -> Result<(u64, u64)> {
    let mut gone = (0, 0);
    loop {
        let n = sqlx::query(
            "DELETE FROM changes WHERE id IN (
                SELECT id FROM changes WHERE acknowledged_at < now() - make_interval(days => $1)
                ORDER BY id LIMIT $2)",
        )
        .bind(days as i32)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        gone.0 += n;
        if n < batch as u64 {
            break;
        }
    }
    loop {
        let n = sqlx::query(
            "DELETE FROM cycles WHERE id IN (
                SELECT y.id FROM cycles y
                WHERE y.started_at < now() - make_interval(days => $1)
                  AND coalesce(y.finished_at, y.started_at + interval '1 day')
                      < now() - make_interval(days => $1)
                ORDER BY y.id LIMIT $2)",
        )
        .bind(days as i32)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        gone.1 += n;
        if n < batch as u64 {
            break;
        }
    }
    Ok(gone)
}

/// Rows and on-disk size (with indexes) of `changes` and of `cycles`.
pub async fn sizes(pool: &PgPool) -> Result<[(i64, i64); 2]> {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM changes), pg_total_relation_size('changes'),
                (SELECT count(*) FROM cycles), pg_total_relation_size('cycles')",
    )
    .fetch_one(pool)
    .await?;
    Ok([(row.0, row.1), (row.2, row.3)])
}

/// The history rows of dead letters, as SQL: an `INSERT INTO changes` from the rows of `cte`
/// (columns `entity`, `record_id`, `error_code`, `error_message`), those where `keep` holds,
/// with `action`, `before` and `after` (SQL expressions over the row), `$1` the account and the
/// cycle and cause at `cycle` and `cause`. A role row's record id (`user/channel`) is split in
/// two; the settings document belongs to no user.
pub(super) fn dead_letter_rows(
    cte: &str,
    keep: &str,
    (action, before, after): (&str, &str, &str),
    (cycle, cause): (&str, &str),
) -> String {
    format!(
        "INSERT INTO changes (cycle_id, account_id, user_id, channel_id, action, before, after, cause)
         SELECT {cycle}, $1,
                CASE WHEN d.entity <> 'settings' THEN d.record_id
                     WHEN d.record_id <> '(document)' THEN regexp_replace(d.record_id, '/[^/]*$', '')
                END,
                CASE WHEN d.entity = 'settings' AND d.record_id <> '(document)'
                     THEN substring(d.record_id from '[^/]*$') END,
                {action}, {before}, {after}, {cause}
         FROM {cte} AS d WHERE {keep}"
    )
}
