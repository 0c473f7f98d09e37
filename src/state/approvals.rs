//! `approvals`: changes held until a person decides. A cycle brings an account's holds in line
//! with what is risky now ([`sync_holds`]); `wazzup-sync approvals` decides ([`decide`]); the
//! statement that records a held change going out marks its approval applied.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;

use super::Result;

/// Why a change waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It gives someone more access (`sync.hold_widening`).
    WidensAccess,
    /// A deletion over the mass-deletion guard.
    MassDelete,
    /// More of an account's users leaving at once than the guard lets go.
    MassLeave,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WidensAccess => "widens_access",
            Reason::MassDelete => "mass_delete",
            Reason::MassLeave => "mass_leave",
        }
    }
}

/// A change a cycle would make that must wait: the same record as `plan --detail`'s, and the
/// CRM content it was computed from.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub action: &'static str,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub content: serde_json::Value,
    pub content_hash: String,
}

/// One approval as the commands and the cycle read it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Approval {
    pub id: i64,
    pub account_id: String,
    pub user_id: Option<String>,
    pub channel_id: Option<String>,
    pub action: String,
    pub reason: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub content_hash: String,
    pub status: String,
    pub held_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    pub note: Option<String>,
}

const COLUMNS: &str = "id, account_id, user_id, channel_id, action, reason, before, after, \
     content_hash, status, held_at, decided_at, decided_by, note";

/// Brings the account's open approvals for `reason` in line with the changes that must wait
/// now (`holds`), in one transaction: an open approval whose change is no longer held, or
/// whose CRM content changed, closes as `superseded`; a held change without an open approval
/// opens one, waiting. Returns the open approvals for `reason` after that.
pub async fn sync_holds(
    pool: &PgPool,
    account_id: &str,
    reason: Reason,
    holds: &[Hold],
) -> Result<Vec<Approval>> {
    let holds = serde_json::to_value(holds).expect("holds serialize");
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE approvals a SET status = 'superseded', closed_at = now()
         WHERE a.account_id = $1 AND a.reason = $2
           AND a.status IN ('waiting', 'approved', 'rejected')
           AND NOT EXISTS (
               SELECT 1 FROM jsonb_to_recordset($3::jsonb)
                   AS h(user_id text, channel_id text, content_hash text)
               WHERE h.user_id IS NOT DISTINCT FROM a.user_id
                 AND h.channel_id IS NOT DISTINCT FROM a.channel_id
                 AND h.content_hash = a.content_hash)",
    )
    .bind(account_id)
    .bind(reason.as_str())
    .bind(&holds)
    .execute(&mut *tx)
    .await?;
    let open: Vec<Approval> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH opened AS (
            INSERT INTO approvals (account_id, user_id, channel_id, action, reason, before, after,
                                   content, content_hash)
            SELECT $1, h.user_id, h.channel_id, h.action, $2, h.before, h.after, h.content,
                   h.content_hash
            FROM jsonb_to_recordset($3::jsonb) AS h(user_id text, channel_id text, action text,
                 before jsonb, after jsonb, content jsonb, content_hash text)
            ON CONFLICT DO NOTHING
            RETURNING {COLUMNS}
         )
         SELECT {COLUMNS} FROM opened
         UNION ALL
         SELECT {COLUMNS} FROM approvals
         WHERE account_id = $1 AND reason = $2 AND status IN ('waiting', 'approved', 'rejected')"
    )))
    .bind(account_id)
    .bind(reason.as_str())
    .bind(&holds)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(open)
}

/// Records changes let through without a person's decision, by `--allow-mass-delete` (`cli`)
/// or `sync.allow_mass_delete` (`config`): each an approval decided and applied at once, with
/// its history row.
pub async fn record_allowed(
    pool: &PgPool,
    account_id: &str,
    reason: Reason,
    holds: &[Hold],
    (by, cycle): (&str, Option<i64>),
) -> Result<()> {
    if holds.is_empty() {
        return Ok(());
    }
    let holds = serde_json::to_value(holds).expect("holds serialize");
    sqlx::query(
        "WITH closed AS (
            UPDATE approvals a SET status = 'superseded', closed_at = now()
            WHERE a.account_id = $1 AND a.reason = $2
              AND a.status IN ('waiting', 'approved', 'rejected')
         ), decided AS (
            INSERT INTO approvals (account_id, user_id, channel_id, action, reason, before, after,
                                   content, content_hash, status, decided_at, decided_by,
                                   closed_at)
            SELECT $1, h.user_id, h.channel_id, h.action, $2, h.before, h.after, h.content,
                   h.content_hash, 'applied', now(), $4, now()
            FROM jsonb_to_recordset($3::jsonb) AS h(user_id text, channel_id text, action text,
                 before jsonb, after jsonb, content jsonb, content_hash text)
            RETURNING id, user_id, channel_id, before, after
         )
         INSERT INTO changes (cycle_id, account_id, user_id, channel_id, action, before, after,
                              cause, actor, approval_id)
         SELECT $5, $1, user_id, channel_id, 'approved', before, after, 'manual', $4, id
         FROM decided",
    )
    .bind(account_id)
    .bind(reason.as_str())
    .bind(&holds)
    .bind(by)
    .bind(cycle)
    .execute(pool)
    .await?;
    Ok(())
}

/// The open approvals (waiting, approved and not yet applied, rejected), oldest first.
pub async fn open_approvals(pool: &PgPool, account_id: Option<&str>) -> Result<Vec<Approval>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM approvals
         WHERE status IN ('waiting', 'approved', 'rejected')
           AND ($1::text IS NULL OR account_id = $1)
         ORDER BY held_at, id"
    )))
    .bind(account_id)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}

/// These approvals as they are now (any status).
pub async fn approvals_by_id(pool: &PgPool, ids: &[i64]) -> Result<Vec<Approval>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM approvals WHERE id = ANY($1) ORDER BY id"
    )))
    .bind(ids)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}

/// A person's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
}

/// Decides these open approvals, in one transaction: each is `approved` or `rejected` with who
/// and the note, each decision is a history row, the accounts are looked at again by the next
/// cycle (their clean fingerprints forgotten), and `channel` is notified with each account id,
/// so that a running daemon syncs them at once. Returns the approvals decided.
pub async fn decide(
    pool: &PgPool,
    ids: &[i64],
    decision: Decision,
    (by, note): (&str, Option<&str>),
    channel: &str,
) -> Result<Vec<Approval>> {
    let (status, action) = match decision {
        Decision::Approve => ("approved", "approved"),
        Decision::Reject => ("rejected", "rejected"),
    };
    let mut tx = pool.begin().await?;
    let decided: Vec<Approval> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE approvals SET status = $2, decided_at = now(), decided_by = $3, note = $4
         WHERE id = ANY($1) AND status IN ('waiting', 'approved', 'rejected')
         RETURNING {COLUMNS}"
    )))
    .bind(ids)
    .bind(status)
    .bind(by)
    .bind(note)
    .fetch_all(&mut *tx)
    .await?;
    let accounts: Vec<&str> = {
        let mut a: Vec<&str> = decided.iter().map(|d| d.account_id.as_str()).collect();
        a.sort_unstable();
        a.dedup();
        a
    };
    sqlx::query(
        "WITH h AS (
            INSERT INTO changes (account_id, user_id, channel_id, action, before, after, cause,
                                 actor, note, approval_id)
            SELECT account_id, user_id, channel_id, $2, before, after, 'manual', decided_by, note,
                   id
            FROM approvals WHERE id = ANY($1) AND decided_at IS NOT NULL
              AND status = $3
         ), seen AS (
            UPDATE accounts SET source_fingerprint = NULL WHERE account_id = ANY($4)
         )
         SELECT pg_notify($5, a) FROM unnest($4::text[]) AS a",
    )
    .bind(decided.iter().map(|d| d.id).collect::<Vec<i64>>())
    .bind(action)
    .bind(status)
    .bind(&accounts)
    .bind(channel)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(decided)
}

/// Open approvals per reason (waiting only), and how long the oldest has waited, for the
/// gauges.
pub async fn waiting_counts(pool: &PgPool) -> Result<Vec<(String, i64, f64)>> {
    let mut conn = pool.acquire().await?;
    let rows = sqlx::query_as(
        "SELECT r.reason, count(a.id),
                coalesce(extract(epoch FROM now() - min(a.held_at)), 0)::float8
         FROM unnest(ARRAY['widens_access', 'mass_delete', 'mass_leave']) AS r(reason)
         LEFT JOIN approvals a ON a.reason = r.reason AND a.status = 'waiting'
         GROUP BY r.reason ORDER BY r.reason",
    )
    .fetch_all(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(rows)
}

/// The notification channel of approval decisions: the state schema's name, then
/// `_decisions`.
pub fn decisions_channel(schema: &str) -> String {
    format!("{schema}_decisions")
}
