//! `dead_letters`: records refused locally (kind `invalid`) or by Wazzup (kind `rejected`), one
//! open row per record, with the reason and, for refusals, when to try again.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use sqlx::postgres::PgPool;

use super::Result;
use crate::domain::{Entity, Rejection};

/// Who refused the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterKind {
    /// Refused by the daemon's own checks; never sent. Closes when the CRM row is fixed.
    Invalid,
    /// Refused by Wazzup; sent again on a schedule, or at once when its content changes.
    Rejected,
}

impl DeadLetterKind {
    fn parse(s: &str) -> Option<Self> {
        [DeadLetterKind::Invalid, DeadLetterKind::Rejected]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Invalid => "invalid",
            DeadLetterKind::Rejected => "rejected",
        }
    }
}

/// How a dead letter was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    /// The record is now in Wazzup as the CRM says.
    Synced,
    /// The record left the CRM.
    Gone,
    /// A refused role row was fixed in the CRM.
    Fixed,
    /// A user whose deletion was refused came back to the CRM.
    Returned,
    /// An operator closed it by hand.
    Discarded,
}

impl Resolution {
    fn parse(s: &str) -> Option<Self> {
        [
            Resolution::Synced,
            Resolution::Gone,
            Resolution::Fixed,
            Resolution::Returned,
            Resolution::Discarded,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Synced => "synced",
            Resolution::Gone => "gone",
            Resolution::Fixed => "fixed",
            Resolution::Returned => "returned",
            Resolution::Discarded => "discarded",
        }
    }
}

/// Open dead letters per account, for every account the state knows (0 included).
pub async fn open_dead_letter_counts(
    pool: &PgPool,
    only: Option<&std::collections::HashSet<String>>,
) -> Result<Vec<(String, i64)>> {
    let only: Option<Vec<&str>> = only.map(|o| o.iter().map(String::as_str).collect());
    // On a session handed back before returning: the cycle's row is closed next, and would
    // otherwise open a session of its own while this one is still on its way back.
    let mut conn = pool.acquire().await?;
    let counts = sqlx::query_as(
        "SELECT a.account_id, count(d.id) FROM (
             SELECT account_id FROM accounts WHERE $1::text[] IS NULL
             UNION SELECT account_id FROM dead_letters WHERE $1::text[] IS NULL
             UNION SELECT unnest($1::text[])
         ) AS a LEFT JOIN dead_letters d ON d.account_id = a.account_id AND d.resolved_at IS NULL
         GROUP BY a.account_id ORDER BY a.account_id",
    )
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    crate::db::hand_back(conn).await;
    Ok(counts)
}

/// A dead letter's entity is stored as its text (`user`, `settings`, `delete`).
impl sqlx::Type<sqlx::Postgres> for Entity {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <&str as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Entity {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for Entity {
    fn decode(
        value: sqlx::postgres::PgValueRef<'r>,
    ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Entity::parse(text)
            .ok_or_else(|| format!("no dead-letter entity is called {text:?}").into())
    }
}

/// An open dead letter (or one an operator discarded), as the planner needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OpenDeadLetter {
    pub entity: Entity,
    pub record_id: String,
    pub kind: DeadLetterKind,
    pub error_code: String,
    pub error_message: String,
    pub payload_hash: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// `Discarded` for rows an operator closed by hand; None for open rows.
    pub resolution: Option<Resolution>,
}

impl OpenDeadLetter {
    pub fn is_open(&self) -> bool {
        self.resolution.is_none()
    }
}

pub async fn open_dead_letters(
    db: impl PgExecutor<'_>,
    account_id: &str,
) -> Result<Vec<OpenDeadLetter>> {
    sqlx::query_as(
        "SELECT entity, record_id, kind, error_code, error_message, payload_hash, next_attempt_at, resolution
         FROM dead_letters
         WHERE account_id = $1 AND (resolved_at IS NULL OR resolution = 'discarded')",
    )
    .bind(account_id)
    .fetch_all(db)
    .await
    .map_err(Into::into)
}

/// Dead letters sent as one array per column (see [`super::open_account`]): columns `entity`,
/// `record_id`, `kind`, `error_code`, `error_message`, `payload_hash`, `next_attempt_at` and
/// `resolution`, all NULL when there is none.
pub(super) fn from_columns(row: &sqlx::postgres::PgRow) -> Result<Vec<OpenDeadLetter>> {
    use sqlx::Row;
    let texts = |c: &str| -> std::result::Result<Vec<Option<String>>, sqlx::Error> {
        Ok(row
            .try_get::<Option<Vec<Option<String>>>, _>(c)?
            .unwrap_or_default())
    };
    let ids = texts("record_id")?;
    let entities = texts("entity")?;
    let kinds = texts("kind")?;
    let codes = texts("error_code")?;
    let messages = texts("error_message")?;
    let hashes = texts("payload_hash")?;
    let resolutions = texts("resolution")?;
    let next: Vec<Option<DateTime<Utc>>> = row
        .try_get::<Option<Vec<Option<DateTime<Utc>>>>, _>("next_attempt_at")?
        .unwrap_or_default();
    let bad = |what: &str| {
        super::StateError(sqlx::Error::Protocol(format!(
            "a dead letter's {what} is not one the daemon knows"
        )))
    };
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        let at = |v: &Vec<Option<String>>| v.get(i).cloned().flatten();
        out.push(OpenDeadLetter {
            entity: at(&entities)
                .as_deref()
                .and_then(Entity::parse)
                .ok_or_else(|| bad("entity"))?,
            record_id: id.unwrap_or_default(),
            kind: at(&kinds)
                .as_deref()
                .and_then(DeadLetterKind::parse)
                .ok_or_else(|| bad("kind"))?,
            error_code: at(&codes).unwrap_or_default(),
            error_message: at(&messages).unwrap_or_default(),
            payload_hash: at(&hashes),
            next_attempt_at: next.get(i).copied().flatten(),
            resolution: match at(&resolutions) {
                Some(r) => Some(Resolution::parse(&r).ok_or_else(|| bad("resolution"))?),
                None => None,
            },
        });
    }
    Ok(out)
}

/// Writes local rejections (kind `invalid`), one open row per record, in one statement, with a
/// `refused` history row for each dead letter it opens.
pub async fn record_invalid(
    pool: &PgPool,
    account_id: &str,
    rejections: &[&Rejection],
    record: &super::Record,
) -> Result<u64> {
    if rejections.is_empty() {
        return Ok(0);
    }
    let entities: Vec<&str> = rejections.iter().map(|r| r.entity.as_str()).collect();
    let ids: Vec<&str> = rejections.iter().map(|r| r.record_id.as_str()).collect();
    let codes: Vec<&str> = rejections.iter().map(|r| r.code).collect();
    let messages: Vec<&str> = rejections.iter().map(|r| r.message.as_str()).collect();
    let payloads: Vec<serde_json::Value> = rejections.iter().map(|r| r.payload.clone()).collect();
    let hashes: Vec<String> = rejections.iter().map(|r| invalid_hash(r)).collect();
    let sql = format!(
        "WITH d AS (
            INSERT INTO dead_letters (account_id, entity, record_id, kind, error_code, error_message, payload, payload_hash)
            SELECT $1, r.entity, r.record_id, 'invalid', r.code, r.message, r.payload, r.hash
            FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[], $7::text[])
                 AS r(entity, record_id, code, message, payload, hash)
            ON CONFLICT (account_id, entity, record_id) WHERE resolved_at IS NULL DO UPDATE SET
               kind = 'invalid', error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message,
               http_status = NULL, payload = EXCLUDED.payload, payload_hash = EXCLUDED.payload_hash,
               attempts = dead_letters.attempts + 1, last_failed_at = now(), next_attempt_at = NULL
            RETURNING entity, record_id, error_code, error_message, xmax = 0 AS opened
         ), h AS ({})
         SELECT count(*) FILTER (WHERE opened) FROM d",
        super::history::dead_letter_rows("d", "d.opened", REFUSED, ("$8", "$9"))
    );
    let opened: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .bind(entities)
        .bind(ids)
        .bind(codes)
        .bind(messages)
        .bind(payloads)
        .bind(hashes)
        .bind(record.cycle)
        .bind(record.cause.as_str())
        .fetch_one(pool)
        .await?;
    Ok(opened as u64)
}

/// A `refused` history row: the record's entity, its code and reason, with every run of seven
/// or more digits masked as `mask_digits` masks it in the logs (`791 *** *89`).
const REFUSED: (&str, &str, &str) = (
    "'refused'",
    "NULL",
    "jsonb_build_object('entity', d.entity, 'code', d.error_code, 'reason',
         regexp_replace(d.error_message, '([[:digit:]]{3})[[:digit:]]{2,}([[:digit:]]{2})',
                        '\\1 *** *\\2', 'g'))",
);

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
    record: &super::Record,
) -> Result<u64> {
    if rejections.is_empty() {
        return Ok(0);
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
    let sql = format!(
        "WITH r AS (
            SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::jsonb[], $8::text[])
                AS r(entity, record_id, code, message, status, payload, hash)
         ), w AS (
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
                ELSE interval '1 day' END
         RETURNING d.entity, d.record_id, d.error_code, d.error_message, d.xmax = 0 AS opened
         ), h AS ({})
         SELECT count(*) FILTER (WHERE opened) FROM w",
        super::history::dead_letter_rows("w", "d.opened", REFUSED, ("$9", "$10"))
    );
    let opened: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .bind(entities)
        .bind(ids)
        .bind(codes)
        .bind(messages)
        .bind(statuses)
        .bind(payloads)
        .bind(hashes)
        .bind(record.cycle)
        .bind(record.cause.as_str())
        .fetch_one(pool)
        .await?;
    Ok(opened as u64)
}

/// Closes open dead letters: the record synced, was fixed, or left the CRM.
pub async fn resolve(
    pool: &PgPool,
    account_id: &str,
    entity: Entity,
    record_ids: &[String],
    resolution: Resolution,
    record: &super::Record,
) -> Result<u64> {
    if record_ids.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "WITH c AS (
            UPDATE dead_letters SET resolved_at = now(), resolution = $4
            WHERE account_id = $1 AND entity = $2 AND record_id = ANY($3) AND resolved_at IS NULL
            RETURNING entity, record_id, error_code, error_message, resolution
         ), h AS ({})
         SELECT count(*) FROM c",
        super::history::dead_letter_rows("c", "true", CLOSED, ("$5", "$6"))
    );
    let closed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account_id)
        .bind(entity)
        .bind(record_ids)
        .bind(resolution)
        .bind(record.cycle)
        .bind(record.cause.as_str())
        .fetch_one(pool)
        .await?;
    Ok(closed as u64)
}

/// A `refusal_closed` history row: the refusal's entity and code, and how it closed.
const CLOSED: (&str, &str, &str) = (
    "'refusal_closed'",
    "jsonb_build_object('entity', d.entity, 'code', d.error_code)",
    "jsonb_build_object('resolution', d.resolution)",
);

/// One dead letter as an operator reads it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub account_id: String,
    pub entity: Entity,
    pub record_id: String,
    pub kind: DeadLetterKind,
    pub error_code: String,
    pub error_message: String,
    pub http_status: Option<i32>,
    pub payload: Option<serde_json::Value>,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<Resolution>,
}

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub account: Option<String>,
    pub id: Option<i64>,
}

/// Open dead letters (and resolved ones when `include_resolved`).
pub async fn list_dead_letters(
    pool: &PgPool,
    sel: &Selection,
    include_resolved: bool,
) -> Result<Vec<DeadLetterRow>> {
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
    .map_err(Into::into)
}

/// Makes refused records due at the next cycle. Returns the accounts touched.
pub async fn retry_dead_letters(pool: &PgPool, sel: &Selection) -> Result<Vec<String>> {
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
    .map_err(Into::into)
}

/// Closes dead letters by hand. The record stays quiet while it is unchanged: a refused user
/// is not sent again and an invalid row is not reported again until the CRM changes it; a
/// refused deletion is not tried again while the user stays out of the CRM.
pub async fn discard_dead_letters(pool: &PgPool, sel: &Selection) -> Result<u64> {
    // Each closed dead letter is a history row of its own account, made by hand.
    let closed: i64 = sqlx::query_scalar(
        "WITH c AS (
            UPDATE dead_letters SET resolved_at = now(), resolution = 'discarded'
            WHERE resolved_at IS NULL AND ($1::text IS NULL OR account_id = $1) AND ($2::bigint IS NULL OR id = $2)
            RETURNING account_id, entity, record_id, error_code
         ), h AS (
            INSERT INTO changes (account_id, user_id, channel_id, action, before, after, cause)
            SELECT c.account_id,
                   CASE WHEN c.entity <> 'settings' THEN c.record_id
                        WHEN c.record_id <> '(document)' THEN regexp_replace(c.record_id, '/[^/]*$', '')
                   END,
                   CASE WHEN c.entity = 'settings' AND c.record_id <> '(document)'
                        THEN substring(c.record_id from '[^/]*$') END,
                   'refusal_closed', jsonb_build_object('entity', c.entity, 'code', c.error_code),
                   jsonb_build_object('resolution', 'discarded'), 'manual'
            FROM c
         )
         SELECT count(*) FROM c",
    )
    .bind(&sel.account)
    .bind(sel.id)
    .fetch_one(pool)
    .await?;
    Ok(closed as u64)
}
