//! The daemon's own tables: the mirror of what Wazzup acknowledged, accounts, dead letters.
//!
//! Every write is set-based, and happens only after Wazzup acknowledged what it records.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection};

use crate::config::Settings;
use crate::domain::{Entity, Rejection, SettingsDoc};

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn connect_options(settings: &Settings) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(
        PgConnectOptions::from_str(settings.state_url().expose_secret())?
            .application_name("wazzup-sync")
            .options([("search_path", settings.state.schema.as_str())]),
    )
}

/// Opens the state pool; its sessions' search_path is the state schema. The state needs real
/// sessions (search_path, advisory locks): a direct connection or a session pooler. A session
/// whose search_path did not take (a pooler that drops startup options) is refused, so the
/// tables can never land in another schema.
pub fn connect(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let schema = settings.state.schema.clone();
    Ok(PgPoolOptions::new()
        // Each account in flight holds one session for its lock and uses one more for its queries.
        .max_connections(pool_size(settings))
        .acquire_timeout(Duration::from_secs(settings.state.connect_timeout_secs))
        .idle_timeout(crate::db::IDLE_TIMEOUT)
        .after_connect(move |conn, _| {
            let schema = schema.clone();
            Box::pin(async move {
                let path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
                    .fetch_one(&mut *conn)
                    .await?;
                if path.trim_matches('"') != schema {
                    return Err(sqlx::Error::Configuration(
                        format!("the state session's search_path is {path:?}, not {schema:?}: the state database needs a direct connection or a session pooler (PgBouncer in transaction mode drops it)").into(),
                    ));
                }
                Ok(())
            })
        })
        .connect_lazy_with(connect_options(settings)?))
}

/// Connections the state pool may open: at least a lock session and a query session per
/// account in flight, plus two.
pub fn pool_size(settings: &Settings) -> u32 {
    settings
        .state
        .max_connections
        .max(2 * settings.sync.concurrency as u32 + 2)
}

/// Where the state database is, for connection errors.
pub fn target(settings: &Settings) -> Result<crate::db::Target, sqlx::Error> {
    Ok(crate::db::Target::new(
        crate::db::Which::State,
        connect_options(settings)?,
        Duration::from_secs(settings.state.connect_timeout_secs),
        settings.state_url_variable(),
        "WAZZUP_SYNC__STATE__CONNECT_TIMEOUT_SECS",
    ))
}

/// Creates the schema if needed and applies pending migrations (additive only). The error says
/// the cause once, in a line.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), String> {
    let describe = |e: sqlx::Error| crate::db::describe(&e);
    let mut conn = pool.acquire().await.map_err(describe)?;
    // The schema name was checked to be a plain identifier at start-up.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *conn)
    .await
    .map_err(describe)?;
    MIGRATOR.run(&mut *conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => crate::db::describe(&e),
        sqlx::migrate::MigrateError::ExecuteMigration(e, version) => {
            format!("migration {version}: {}", crate::db::describe(&e))
        }
        other => other.to_string(),
    })
}

/// True when the state tables exist (a dry run must not create them).
pub async fn is_migrated(pool: &PgPool, schema: &str) -> Result<bool, sqlx::Error> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{schema}.mirror_users"))
        .fetch_one(pool)
        .await?;
    Ok(found.is_some())
}

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
    settings_doc: Option<serde_json::Value>,
}

/// The account's state; its last settings document only when `with_doc` (it can be large).
pub async fn load_account(
    pool: &PgPool,
    account_id: &str,
    with_doc: bool,
) -> Result<AccountState, sqlx::Error> {
    let row: Option<AccountRow> = sqlx::query_as(
        "SELECT token_fingerprint, status, auth_failed_at, settings_hash,
                CASE WHEN $2 THEN settings_doc END AS settings_doc
         FROM accounts WHERE account_id = $1",
    )
    .bind(account_id)
    .bind(with_doc)
    .fetch_optional(pool)
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
            settings_doc: r.settings_doc.and_then(|d| serde_json::from_value(d).ok()),
        },
    })
}

/// Records the end of an account's cycle.
pub async fn finish_account(
    pool: &PgPool,
    account_id: &str,
    fingerprint: &str,
    success: bool,
    error: Option<&str>,
    source_fingerprint: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO accounts (account_id, token_fingerprint, status, last_cycle_at, last_success_at, last_error,
                               source_fingerprint)
         VALUES ($1, $2, 'ok', now(), CASE WHEN $3 THEN now() END, $4, $5)
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
    .execute(pool)
    .await?;
    Ok(())
}

/// The fingerprints stored at each account's last clean cycle, with the token then used.
pub async fn load_source_fingerprints(
    pool: &PgPool,
) -> Result<std::collections::HashMap<String, (String, String)>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT account_id, source_fingerprint, token_fingerprint FROM accounts
         WHERE source_fingerprint IS NOT NULL AND token_fingerprint IS NOT NULL AND status = 'ok'",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(a, s, t)| (a, (s, t))).collect())
}

/// Forgets an account's clean fingerprint before anything is sent for it: if the process dies
/// mid-way and the CRM then returns to its old rows, the account is still synced.
pub async fn clear_source_fingerprint(pool: &PgPool, account_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE accounts SET source_fingerprint = NULL
         WHERE account_id = $1 AND source_fingerprint IS NOT NULL",
    )
    .bind(account_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a cycle for accounts skipped because nothing changed, in one statement.
pub async fn touch_unchanged(pool: &PgPool, account_ids: &[String]) -> Result<(), sqlx::Error> {
    if account_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE accounts SET last_cycle_at = now(), last_success_at = now(), last_error = NULL
         WHERE account_id = ANY($1)",
    )
    .bind(account_ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks an account whose token Wazzup refused.
pub async fn mark_auth_failed(
    pool: &PgPool,
    account_id: &str,
    fingerprint: &str,
    status: u16,
) -> Result<(), sqlx::Error> {
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

pub async fn save_settings(
    pool: &PgPool,
    account_id: &str,
    doc: &SettingsDoc,
    hash: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO accounts (account_id, settings_hash, settings_doc) VALUES ($1, $2, $3)
         ON CONFLICT (account_id) DO UPDATE SET settings_hash = $2, settings_doc = $3",
    )
    .bind(account_id)
    .bind(hash)
    .bind(serde_json::to_value(doc).expect("settings serialize"))
    .execute(pool)
    .await?;
    Ok(())
}

/// The mirror of one account: user id → hash of the payload Wazzup acknowledged.
pub async fn load_mirror(
    pool: &PgPool,
    account_id: &str,
) -> Result<HashMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, hash FROM mirror_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// The last acknowledged name and phone of an account's users (for `plan --detail`).
pub async fn load_mirrored_users(
    pool: &PgPool,
    account_id: &str,
) -> Result<HashMap<String, crate::plan::LastPushed>, sqlx::Error> {
    type Row = (String, Option<String>, Option<String>);
    let rows: Result<Vec<Row>, _> =
        sqlx::query_as("SELECT user_id, name, phone FROM mirror_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(pool)
            .await;
    match rows {
        Ok(rows) => Ok(rows
            .into_iter()
            .map(|(id, name, phone)| (id, crate::plan::LastPushed { name, phone }))
            .collect()),
        // A schema not yet migrated this far: nothing known.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
            Ok(Default::default())
        }
        Err(e) => Err(e),
    }
}

/// Open dead letters per account, for every account the state knows (0 included).
pub async fn open_dead_letter_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.account_id, count(d.id) FROM (
             SELECT account_id FROM accounts UNION SELECT account_id FROM dead_letters
         ) AS a LEFT JOIN dead_letters d ON d.account_id = a.account_id AND d.resolved_at IS NULL
         GROUP BY a.account_id ORDER BY a.account_id",
    )
    .fetch_all(pool)
    .await
}

/// Notes users about to be sent, before the request: if the process dies before recording the
/// answer, the next cycle still knows they may be in Wazzup.
pub async fn mark_pending(
    pool: &PgPool,
    account_id: &str,
    ids: &[String],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pending_users (account_id, user_id) SELECT $1, u FROM UNNEST($2::text[]) AS u
         ON CONFLICT DO NOTHING",
    )
    .bind(account_id)
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// Users sent earlier whose answer was never recorded.
pub async fn load_pending(
    pool: &PgPool,
    account_id: &str,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let ids: Result<Vec<String>, _> =
        sqlx::query_scalar("SELECT user_id FROM pending_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(pool)
            .await;
    match ids {
        Ok(ids) => Ok(ids.into_iter().collect()),
        // A dry run against a schema not yet migrated this far: nothing is pending.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
            Ok(Default::default())
        }
        Err(e) => Err(e),
    }
}

/// The phones read in earlier cycles, for normalization to reuse.
pub async fn load_phone_cache(
    pool: &PgPool,
    account_id: &str,
) -> Result<crate::domain::PhoneCache, sqlx::Error> {
    type Row = (String, String, Option<String>, Option<bool>);
    let rows: Result<Vec<Row>, _> = sqlx::query_as(
        "SELECT user_id, phone_source, phone, phone_valid FROM mirror_users
         WHERE account_id = $1 AND phone_source IS NOT NULL",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await;
    match rows {
        Ok(rows) => Ok(rows
            .into_iter()
            .map(|(id, source, phone, valid)| (id, (source, phone, valid.unwrap_or(false))))
            .collect()),
        // A dry run against a schema not yet migrated this far: nothing cached.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42703") => {
            Ok(Default::default())
        }
        Err(e) => Err(e),
    }
}

/// Records users Wazzup acknowledged, in one statement.
pub async fn upsert_mirror(
    pool: &PgPool,
    account_id: &str,
    users: &[&crate::domain::ValidUser],
) -> Result<(), sqlx::Error> {
    if users.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = users.iter().map(|u| u.payload.id.as_str()).collect();
    let hashes: Vec<&str> = users.iter().map(|u| u.hash.as_str()).collect();
    let sources: Vec<Option<&str>> = users.iter().map(|u| u.phone_source.as_deref()).collect();
    let phones: Vec<Option<&str>> = users.iter().map(|u| u.payload.phone.as_deref()).collect();
    let valid: Vec<bool> = users.iter().map(|u| u.phone_valid).collect();
    let names: Vec<&str> = users.iter().map(|u| u.payload.name.as_str()).collect();
    sqlx::query(
        "WITH done AS (
            DELETE FROM pending_users WHERE account_id = $1 AND user_id = ANY($2)
         )
         INSERT INTO mirror_users (account_id, user_id, hash, synced_at, phone_source, phone, phone_valid, name)
         SELECT $1, u.id, u.hash, now(), u.source, u.phone, u.valid, u.name
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::text[])
              AS u(id, hash, source, phone, valid, name)
         ON CONFLICT (account_id, user_id) DO UPDATE SET hash = EXCLUDED.hash, synced_at = now(),
            phone_source = EXCLUDED.phone_source, phone = EXCLUDED.phone, phone_valid = EXCLUDED.phone_valid,
            name = EXCLUDED.name",
    )
    .bind(account_id)
    .bind(ids)
    .bind(hashes)
    .bind(sources)
    .bind(phones)
    .bind(valid)
    .bind(names)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets users Wazzup acknowledged deleting.
pub async fn delete_mirror(
    pool: &PgPool,
    account_id: &str,
    ids: &[String],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH done AS (
            DELETE FROM pending_users WHERE account_id = $1 AND user_id = ANY($2)
         )
         DELETE FROM mirror_users WHERE account_id = $1 AND user_id = ANY($2)",
    )
    .bind(account_id)
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(())
}

/// An open dead letter (or one an operator discarded), as the planner needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenDeadLetter {
    pub entity: String,
    pub record_id: String,
    pub kind: String,
    pub error_code: String,
    pub error_message: String,
    pub payload_hash: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// `discarded` for rows an operator closed by hand; None for open rows.
    pub resolution: Option<String>,
}

impl OpenDeadLetter {
    pub fn is_open(&self) -> bool {
        self.resolution.is_none()
    }
}

pub async fn open_dead_letters(
    pool: &PgPool,
    account_id: &str,
) -> Result<Vec<OpenDeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT entity, record_id, kind, error_code, error_message, payload_hash, next_attempt_at, resolution
         FROM dead_letters
         WHERE account_id = $1 AND (resolved_at IS NULL OR resolution = 'discarded')",
    )
    .bind(account_id)
    .fetch_all(pool)
    .await
}

/// Open dead letters of an account: (all, refused by Wazzup).
pub async fn count_open_dead_letters(
    pool: &PgPool,
    account_id: &str,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE kind = 'rejected')
         FROM dead_letters WHERE account_id = $1 AND resolved_at IS NULL",
    )
    .bind(account_id)
    .fetch_one(pool)
    .await
}

/// Writes local rejections (kind `invalid`), one open row per record, in one statement.
pub async fn record_invalid(
    pool: &PgPool,
    account_id: &str,
    rejections: &[&Rejection],
) -> Result<(), sqlx::Error> {
    if rejections.is_empty() {
        return Ok(());
    }
    let entities: Vec<&str> = rejections.iter().map(|r| r.entity.as_str()).collect();
    let ids: Vec<&str> = rejections.iter().map(|r| r.record_id.as_str()).collect();
    let codes: Vec<&str> = rejections.iter().map(|r| r.code).collect();
    let messages: Vec<&str> = rejections.iter().map(|r| r.message.as_str()).collect();
    let payloads: Vec<serde_json::Value> = rejections.iter().map(|r| r.payload.clone()).collect();
    let hashes: Vec<String> = rejections.iter().map(|r| invalid_hash(r)).collect();
    sqlx::query(
        "INSERT INTO dead_letters (account_id, entity, record_id, kind, error_code, error_message, payload, payload_hash)
         SELECT $1, r.entity, r.record_id, 'invalid', r.code, r.message, r.payload, r.hash
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
              AS r(entity, record_id, code, message, payload, hash)
         ON CONFLICT (account_id, entity, record_id) WHERE resolved_at IS NULL DO UPDATE SET
            kind = 'invalid', error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
            http_status = NULL, payload = EXCLUDED.payload, payload_hash = EXCLUDED.payload_hash,
            attempts = dead_letters.attempts + 1, last_failed_at = now(), next_attempt_at = NULL",
    )
    .bind(account_id)
    .bind(entities)
    .bind(ids)
    .bind(codes)
    .bind(messages)
    .bind(payloads)
    .bind(hashes)
    .execute(pool)
    .await?;
    Ok(())
}

/// A stable hash of a local rejection: its row and its reason; unchanged ones are not rewritten.
pub fn invalid_hash(r: &Rejection) -> String {
    crate::domain::content_hash(format!("{}|{}|{}", r.code, r.message, r.payload).as_bytes())
}

/// A record Wazzup refused.
#[derive(Debug, Clone)]
pub struct RemoteRejection {
    pub entity: Entity,
    pub record_id: String,
    pub code: String,
    pub message: String,
    pub http_status: Option<u16>,
    pub payload: serde_json::Value,
    pub payload_hash: String,
}

/// Writes remote rejections (kind `rejected`) and schedules their next attempt:
/// 1 min, 5 min, 30 min, 2 h, then daily; a changed payload restarts the schedule.
pub async fn record_rejected(
    pool: &PgPool,
    account_id: &str,
    rejections: &[RemoteRejection],
) -> Result<(), sqlx::Error> {
    if rejections.is_empty() {
        return Ok(());
    }
    let entities: Vec<&str> = rejections.iter().map(|r| r.entity.as_str()).collect();
    let ids: Vec<&str> = rejections.iter().map(|r| r.record_id.as_str()).collect();
    let codes: Vec<&str> = rejections.iter().map(|r| r.code.as_str()).collect();
    let messages: Vec<&str> = rejections.iter().map(|r| r.message.as_str()).collect();
    let statuses: Vec<Option<i32>> = rejections
        .iter()
        .map(|r| r.http_status.map(i32::from))
        .collect();
    let payloads: Vec<serde_json::Value> = rejections.iter().map(|r| r.payload.clone()).collect();
    let hashes: Vec<&str> = rejections.iter().map(|r| r.payload_hash.as_str()).collect();
    sqlx::query(
        "WITH r AS (
            SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::jsonb[], $8::text[])
                AS r(entity, record_id, code, message, status, payload, hash)
         )
         INSERT INTO dead_letters AS d (account_id, entity, record_id, kind, error_code, error_message,
                                        http_status, payload, payload_hash, next_attempt_at)
         SELECT $1, r.entity, r.record_id, 'rejected', r.code, r.message, r.status, r.payload, r.hash,
                now() + interval '1 minute'
         FROM r
         ON CONFLICT (account_id, entity, record_id) WHERE resolved_at IS NULL DO UPDATE SET
            attempts = CASE WHEN d.kind = 'rejected' AND d.payload_hash = EXCLUDED.payload_hash
                            THEN d.attempts + 1 ELSE 1 END,
            kind = 'rejected', error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
            http_status = EXCLUDED.http_status, payload = EXCLUDED.payload,
            payload_hash = EXCLUDED.payload_hash, last_failed_at = now(),
            next_attempt_at = now() + CASE
                WHEN d.kind <> 'rejected' OR d.payload_hash IS DISTINCT FROM EXCLUDED.payload_hash
                    THEN interval '1 minute'
                WHEN d.attempts = 1 THEN interval '5 minutes'
                WHEN d.attempts = 2 THEN interval '30 minutes'
                WHEN d.attempts = 3 THEN interval '2 hours'
                ELSE interval '1 day' END",
    )
    .bind(account_id)
    .bind(entities)
    .bind(ids)
    .bind(codes)
    .bind(messages)
    .bind(statuses)
    .bind(payloads)
    .bind(hashes)
    .execute(pool)
    .await?;
    Ok(())
}

/// Closes open dead letters: the record synced, was fixed, or left the CRM.
pub async fn resolve(
    pool: &PgPool,
    account_id: &str,
    entity: Entity,
    record_ids: &[String],
    resolution: &str,
) -> Result<u64, sqlx::Error> {
    if record_ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "UPDATE dead_letters SET resolved_at = now(), resolution = $4
         WHERE account_id = $1 AND entity = $2 AND record_id = ANY($3) AND resolved_at IS NULL",
    )
    .bind(account_id)
    .bind(entity.as_str())
    .bind(record_ids)
    .bind(resolution)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Takes the per-account advisory lock on this session, if no other process holds it.
pub async fn try_lock_account(
    conn: &mut PgConnection,
    schema: &str,
    account_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("wazzup-sync:{schema}:{account_id}"))
        .fetch_one(conn)
        .await
}

pub async fn unlock_account(
    conn: &mut PgConnection,
    schema: &str,
    account_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(format!("wazzup-sync:{schema}:{account_id}"))
        .execute(conn)
        .await?;
    Ok(())
}
