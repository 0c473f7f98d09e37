//! `wazzup-sync dead-letters`: list, retry and discard refused records by hand.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One dead letter as an operator reads it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub account_id: String,
    pub entity: String,
    pub record_id: String,
    pub kind: String,
    pub error_code: String,
    pub error_message: String,
    pub http_status: Option<i32>,
    pub payload: Option<serde_json::Value>,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub account: Option<String>,
    pub id: Option<i64>,
}

/// Open dead letters (and resolved ones when `include_resolved`).
pub async fn list(
    pool: &PgPool,
    sel: &Selection,
    include_resolved: bool,
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, account_id, entity, record_id, kind, error_code, error_message, http_status, payload,
                attempts, first_failed_at, last_failed_at, next_attempt_at, resolved_at, resolution
         FROM dead_letters
         WHERE ($1::text IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR id = $2)
           AND ($3 OR resolved_at IS NULL)
         ORDER BY account_id, entity, record_id, id",
    )
    .bind(&sel.account)
    .bind(sel.id)
    .bind(include_resolved)
    .fetch_all(pool)
    .await
}

/// Makes refused records due at the next cycle. Returns the accounts touched.
pub async fn retry(pool: &PgPool, sel: &Selection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE dead_letters SET next_attempt_at = now()
         WHERE resolved_at IS NULL AND ($1::text IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR id = $2)
         RETURNING account_id",
    )
    .bind(&sel.account)
    .bind(sel.id)
    .fetch_all(pool)
    .await
    .map(|mut v: Vec<String>| {
        v.sort();
        v.dedup();
        v
    })
}

/// Closes dead letters by hand. The record stays quiet while it is unchanged: a refused user
/// is not sent again and an invalid row is not reported again until the CRM changes it; a
/// refused deletion is not tried again while the user stays out of the CRM.
pub async fn discard(pool: &PgPool, sel: &Selection) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE dead_letters SET resolved_at = now(), resolution = 'discarded'
         WHERE resolved_at IS NULL AND ($1::text IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR id = $2)",
    )
    .bind(&sel.account)
    .bind(sel.id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

fn clip(s: &str, n: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line
            .chars()
            .take(n.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

/// Prints dead letters as a table a human can act on.
pub fn print_table(rows: &[DeadLetterRow], out: &mut impl Write) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "No dead letters.");
    }
    writeln!(
        out,
        "{:>6}  {:<14} {:<8} {:<20} {:<8} {:<28} {:>4}  {:<16}  WHY / WHAT TO FIX",
        "ID", "ACCOUNT", "ENTITY", "RECORD", "KIND", "CODE", "TRY", "NEXT ATTEMPT"
    )?;
    for r in rows {
        let next = match (&r.resolved_at, &r.next_attempt_at, r.kind.as_str()) {
            (Some(_), _, _) => r.resolution.clone().unwrap_or_else(|| "resolved".into()),
            (None, _, "invalid") => "when fixed in CRM".into(),
            (None, Some(t), _) => t.format("%Y-%m-%d %H:%M").to_string(),
            (None, None, _) => "next cycle".into(),
        };
        let code = match r.http_status {
            Some(s) => format!("{} ({s})", r.error_code),
            None => r.error_code.clone(),
        };
        writeln!(
            out,
            "{:>6}  {:<14} {:<8} {:<20} {:<8} {:<28} {:>4}  {:<16}  {}",
            r.id,
            clip(&r.account_id, 14),
            r.entity,
            clip(&r.record_id, 20),
            r.kind,
            clip(&code, 28),
            r.attempts,
            next,
            clip(&r.error_message, 200)
        )?;
    }
    Ok(())
}
