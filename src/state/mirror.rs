//! `mirror_users` and `pending_users`: what Wazzup acknowledged per user (the payload's hash,
//! the phone it was read from, the name), and users sent whose answer was not yet recorded.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::PgPool;
use sqlx::{PgExecutor, Row};

use super::Result;
use crate::db::arrays::{bools, int8s, texts};
use crate::domain::LastPushed;
use crate::domain::{CrmText, Mirror, Remembered, RememberedRow, RememberedUsers, ValidUser};

/// The users bound by [`bind_users`], as a table `u` of the statement ($2 to $9).
macro_rules! users_table {
    () => {
        "UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::text[],
                $8::int8[], $9::bool[])
         AS u(id, hash, source, phone, valid, name, source_hash, hide)"
    };
}

/// The mirror of one account: user id → hash of the payload Wazzup acknowledged.
pub async fn load_mirror(pool: &PgPool, account_id: &str) -> Result<Mirror> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, hash FROM mirror_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, hash)| (id.into(), hash))
        .collect())
}

/// The last acknowledged name and phone of an account's users (for `plan --detail`).
pub async fn load_mirrored_users(
    pool: &PgPool,
    account_id: &str,
) -> Result<HashMap<String, LastPushed>> {
    type Row = (String, Option<String>, Option<String>);
    let rows: std::result::Result<Vec<Row>, sqlx::Error> =
        sqlx::query_as("SELECT user_id, name, phone FROM mirror_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(pool)
            .await;
    Ok(not_migrated_yet(rows)?
        .into_iter()
        .map(|(id, name, phone)| (id, LastPushed { name, phone }))
        .collect())
}

/// A dry run may read a schema not yet migrated this far: a missing table or column means
/// nothing is known yet.
fn not_migrated_yet<T>(rows: std::result::Result<Vec<T>, sqlx::Error>) -> Result<Vec<T>> {
    match rows {
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42703" | "42P01")) => {
            Ok(Vec::new())
        }
        other => Ok(other?),
    }
}

/// Notes users about to be sent, before the request: if the process dies before recording the
/// answer, the next cycle still knows they may be in Wazzup.
pub async fn mark_pending(pool: &PgPool, account_id: &str, ids: &[String]) -> Result<()> {
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
pub async fn load_pending(db: impl PgExecutor<'_>, account_id: &str) -> Result<HashSet<String>> {
    let ids: std::result::Result<Vec<String>, sqlx::Error> =
        sqlx::query_scalar("SELECT user_id FROM pending_users WHERE account_id = $1")
            .bind(account_id)
            .fetch_all(db)
            .await;
    Ok(not_migrated_yet(ids)?.into_iter().collect())
}

/// The mirror of one account (user id → acknowledged hash) and the phones its users were read
/// from, in one query: what a cycle needs before it normalizes and plans an account.
pub async fn load_mirror_and_phones(
    db: impl PgExecutor<'_>,
    account_id: &str,
) -> Result<(Mirror, RememberedUsers)> {
    let rows = fetch_remembered(db, account_id, ALL).await?.rows;
    let mut mirror = Mirror::with_capacity_and_hasher(rows.len(), Default::default());
    let mut cache = RememberedUsers::with_capacity_and_hasher(rows.len(), Default::default());
    for (id, hash, remembered) in rows {
        cache.insert(id.clone(), remembered);
        mirror.insert(id, hash);
    }
    Ok((mirror, cache))
}

/// What the mirror remembers of an account's users, for normalization to reuse (a dry run's
/// view, which may come before the state schema exists).
pub async fn load_remembered(pool: &PgPool, account_id: &str) -> Result<RememberedUsers> {
    let rows = fetch_remembered(pool, account_id, ALL)
        .await
        .map(|written| vec![written]);
    Ok(not_migrated_yet(rows)?
        .into_iter()
        .flat_map(|w| w.rows)
        .map(|(id, _, remembered)| (id, remembered))
        .collect())
}

/// `since` that asks for every row.
pub(super) const ALL: i64 = -1;

/// An account's mirror rows written after a point (see [`fetch_remembered`]).
pub(super) struct Written {
    /// Rows the account's mirror holds now, in all.
    pub count: i64,
    /// The number of the latest write to any of them: where the next read starts.
    pub latest: i64,
    /// The rows written after the point asked for: user id, acknowledged hash, what
    /// normalization may reuse.
    pub rows: Vec<(CrmText, String, Remembered)>,
}

/// The account's mirror rows written after `since` (every row with [`ALL`]), sent by
/// PostgreSQL as one row of columns (one array per column): a thousand users cost one row to
/// receive and decode instead of a thousand. Each is its user id, its acknowledged hash and what
/// normalization may reuse; a row is only remembered whole (name, flag and source hash all
/// known). With them, how many rows the account holds and its latest write.
pub(super) async fn fetch_remembered(
    db: impl PgExecutor<'_>,
    account_id: &str,
    since: i64,
) -> std::result::Result<Written, sqlx::Error> {
    let row = sqlx::query(
        "SELECT array_agg(user_id) FILTER (WHERE w > $2), array_agg(hash) FILTER (WHERE w > $2),
                array_agg(phone_source) FILTER (WHERE w > $2), array_agg(phone) FILTER (WHERE w > $2),
                array_agg(phone_valid) FILTER (WHERE w > $2),
                array_agg(source_hash) FILTER (WHERE w > $2), array_agg(name) FILTER (WHERE w > $2),
                array_agg(hide_phone) FILTER (WHERE w > $2), count(*), coalesce(max(w), 0)
         FROM (SELECT *, coalesce(written, 0) AS w FROM mirror_users WHERE account_id = $1) AS m",
    )
    .bind(account_id)
    .bind(since)
    .fetch_one(db)
    .await?;
    let count: i64 = row.try_get(8)?;
    let latest: i64 = row.try_get(9)?;
    let [ids, sources, phones, names] = [0, 2, 3, 6].map(|i| texts::<CrmText>(&row, i));
    let hashes = texts::<String>(&row, 1);
    let (valid, source_hashes, hide) = (bools(&row, 4)?, int8s(&row, 5)?, bools(&row, 7)?);
    let (ids, hashes) = (ids?, hashes?);
    let (sources, phones, names) = (sources?, phones?, names?);
    let n = ids.len();
    let mut hashes = hashes.into_iter();
    let mut sources = sources.into_iter();
    let mut phones = phones.into_iter();
    let mut valid = valid.into_iter();
    let mut source_hashes = source_hashes.into_iter();
    let mut names = names.into_iter();
    let mut hide = hide.into_iter();
    let mut rows = Vec::with_capacity(n);
    for id in ids {
        // Every array has one element per row: PostgreSQL aggregates them in one pass. Ids
        // and hashes are never NULL in the table.
        let (
            Some(id),
            Some(Some(hash)),
            Some(source),
            Some(phone),
            Some(valid),
            Some(sh),
            Some(name),
            Some(h),
        ) = (
            id,
            hashes.next(),
            sources.next(),
            phones.next(),
            valid.next(),
            source_hashes.next(),
            names.next(),
            hide.next(),
        )
        else {
            return Err(sqlx::Error::Protocol(
                "the mirror's columns came back with different lengths, or a NULL id or hash"
                    .into(),
            ));
        };
        let row = match (sh, name, h) {
            (Some(source_hash), Some(name), Some(hide_phone)) => Some(RememberedRow {
                source_hash,
                name,
                hash: hash.clone(),
                hide_phone,
            }),
            _ => None,
        };
        let phone = source.map(|s| (s, phone, valid.unwrap_or(false)));
        rows.push((id, hash, Remembered { phone, row }));
    }
    Ok(Written {
        count,
        latest,
        rows,
    })
}

/// What the history shows of a user: its name as sent and its phone masked as the logs mask it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    pub name: Option<String>,
    pub phone: Option<String>,
}

/// A user Wazzup acknowledged, and what its history row says: created or updated (with what
/// Wazzup held before), and why.
#[derive(Debug, Clone)]
pub struct Landed<'u> {
    pub user: &'u ValidUser,
    /// None for a user Wazzup did not hold (created).
    pub before: Option<Shown>,
    pub cause: super::Cause,
}

/// Records users Wazzup acknowledged, and their history rows (`user_created` or
/// `user_updated`), in one statement.
pub async fn upsert_mirror(
    pool: &PgPool,
    account_id: &str,
    landed: &[Landed<'_>],
    cycle: Option<i64>,
) -> Result<()> {
    if landed.is_empty() {
        return Ok(());
    }
    let users: Vec<&ValidUser> = landed.iter().map(|l| l.user).collect();
    let query = sqlx::query(concat!(
        "WITH done AS (
            DELETE FROM pending_users WHERE account_id = $1 AND user_id = ANY($2)
         ), u AS (
            SELECT * FROM ",
        users_table!(),
        " ), h AS (
            INSERT INTO changes (cycle_id, account_id, user_id, action, before, after, cause)
            SELECT $10, $1, u.id,
                   CASE WHEN b.known THEN 'user_updated' ELSE 'user_created' END,
                   CASE WHEN b.known
                        THEN jsonb_strip_nulls(jsonb_build_object('name', b.name, 'phone', b.phone)) END,
                   jsonb_strip_nulls(jsonb_build_object('name', u.name, 'phone', b.shown_phone)),
                   b.cause
            FROM u JOIN UNNEST($2::text[], $11::bool[], $12::text[], $13::text[], $14::text[], $15::text[])
                        AS b(id, known, name, phone, shown_phone, cause) ON b.id = u.id
         )
         INSERT INTO mirror_users (account_id, user_id, hash, synced_at, phone_source, phone, phone_valid,
                                   name, source_hash, hide_phone)
         SELECT $1, u.id, u.hash, now(), u.source, u.phone, u.valid, u.name, u.source_hash, u.hide
         FROM u
         ON CONFLICT (account_id, user_id) DO UPDATE SET hash = EXCLUDED.hash, synced_at = now(),
            phone_source = EXCLUDED.phone_source, phone = EXCLUDED.phone, phone_valid = EXCLUDED.phone_valid,
            name = EXCLUDED.name, source_hash = EXCLUDED.source_hash, hide_phone = EXCLUDED.hide_phone,
            written = DEFAULT"
    ));
    let before = |f: fn(&Shown) -> Option<&str>| -> Vec<Option<&str>> {
        landed
            .iter()
            .map(|l| l.before.as_ref().and_then(f))
            .collect()
    };
    bind_users(query.bind(account_id), &users)
        .bind(cycle)
        .bind(
            landed
                .iter()
                .map(|l| l.before.is_some())
                .collect::<Vec<bool>>(),
        )
        .bind(before(|s| s.name.as_deref()))
        .bind(before(|s| s.phone.as_deref()))
        .bind(
            users
                .iter()
                .map(|u| u.payload.phone.as_deref().map(crate::domain::mask_phone))
                .collect::<Vec<Option<String>>>(),
        )
        .bind(
            landed
                .iter()
                .map(|l| l.cause.as_str())
                .collect::<Vec<&str>>(),
        )
        .execute(pool)
        .await?;
    Ok(())
}

/// Records which CRM row each of these users, unchanged in Wazzup, now comes from (with what
/// normalization reuses), so that the row is recognised next time. Needed after an upgrade or
/// a settings change (another salt), and for users synced before rows were hashed. Only a
/// mirror row still holding the user's hash is touched.
pub async fn remember_rows(
    db: impl PgExecutor<'_>,
    account_id: &str,
    users: &[&ValidUser],
) -> Result<()> {
    if users.is_empty() {
        return Ok(());
    }
    let query = sqlx::query(concat!(
        "UPDATE mirror_users m SET source_hash = u.source_hash, name = u.name, hide_phone = u.hide,
                phone_source = u.source, phone = u.phone, phone_valid = u.valid, written = DEFAULT
         FROM ",
        users_table!(),
        " WHERE m.account_id = $1 AND m.user_id = u.id AND m.hash = u.hash"
    ));
    bind_users(query.bind(account_id), users)
        .execute(db)
        .await?;
    Ok(())
}

/// Binds what the mirror keeps of each user, one array per column, as `users_table!` reads them.
fn bind_users<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    users: &[&'q ValidUser],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let column = |f: fn(&'q ValidUser) -> Option<&'q str>| -> Vec<Option<&'q str>> {
        users.iter().map(|u| f(u)).collect()
    };
    query
        .bind(column(|u| Some(u.payload.id.as_str())))
        .bind(column(|u| Some(u.hash.as_str())))
        .bind(column(|u| u.phone_source.as_deref()))
        .bind(column(|u| u.payload.phone.as_deref()))
        .bind(users.iter().map(|u| u.phone_valid).collect::<Vec<bool>>())
        .bind(column(|u| Some(u.payload.name.as_str())))
        .bind(
            users
                .iter()
                .map(|u| u.source_hash)
                .collect::<Vec<Option<i64>>>(),
        )
        .bind(users.iter().map(|u| u.hide_phone).collect::<Vec<bool>>())
}

/// Forgets users: those Wazzup acknowledged deleting, with a `user_deleted` history row each
/// (what Wazzup held, and why, in `gone`), or, without `gone`, users the mirror must stop
/// counting on (drift repair, a send never recorded).
pub async fn delete_mirror(
    pool: &PgPool,
    account_id: &str,
    ids: &[String],
    gone: Option<(Option<i64>, super::Cause, &[Shown])>,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let (cycle, cause, shown) = match gone {
        Some((cycle, cause, shown)) => (cycle, Some(cause.as_str()), shown),
        None => (None, None, &[][..]),
    };
    let field = |f: fn(&Shown) -> Option<&str>| -> Vec<Option<&str>> {
        ids.iter()
            .enumerate()
            .map(|(i, _)| shown.get(i).and_then(f))
            .collect()
    };
    // A deletion a person approved names them, and its approval is applied.
    sqlx::query(
        "WITH done AS (
            DELETE FROM pending_users WHERE account_id = $1 AND user_id = ANY($2)
         ), applied AS (
            UPDATE approvals SET status = 'applied', closed_at = now()
            WHERE account_id = $1 AND reason = 'mass_delete' AND status = 'approved'
              AND user_id = ANY($2) AND $4::text IS NOT NULL
            RETURNING id, user_id, decided_by, note
         ), h AS (
            INSERT INTO changes (cycle_id, account_id, user_id, action, before, cause, actor,
                                 note, approval_id)
            SELECT $3, $1, g.id, 'user_deleted',
                   jsonb_strip_nulls(jsonb_build_object('name', g.name, 'phone', g.phone)), $4,
                   a.decided_by, a.note, a.id
            FROM UNNEST($2::text[], $5::text[], $6::text[]) AS g(id, name, phone)
            LEFT JOIN applied a ON a.user_id = g.id
            WHERE $4::text IS NOT NULL
         )
         DELETE FROM mirror_users WHERE account_id = $1 AND user_id = ANY($2)",
    )
    .bind(account_id)
    .bind(ids)
    .bind(cycle)
    .bind(cause)
    .bind(field(|s| s.name.as_deref()))
    .bind(field(|s| s.phone.as_deref()))
    .execute(pool)
    .await?;
    Ok(())
}

/// What the mirror holds for one user (for `explain`).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct MirrorEntry {
    pub hash: String,
    pub synced_at: chrono::DateTime<chrono::Utc>,
    pub name: Option<String>,
    pub phone: Option<String>,
    pub phone_source: Option<String>,
}

/// The mirror's row of one user, and whether the user was sent without its answer recorded.
pub async fn mirror_entry(
    pool: &PgPool,
    account_id: &str,
    user_id: &str,
) -> Result<(Option<MirrorEntry>, bool)> {
    let entry: Option<MirrorEntry> = sqlx::query_as(
        "SELECT hash, synced_at, name, phone, phone_source FROM mirror_users
         WHERE account_id = $1 AND user_id = $2",
    )
    .bind(account_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    let pending: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pending_users WHERE account_id = $1 AND user_id = $2)",
    )
    .bind(account_id)
    .bind(user_id)
    .fetch_one(pool)
    .await?;
    Ok((entry, pending))
}

/// The accounts whose mirror holds this user.
pub async fn accounts_holding(pool: &PgPool, user_id: &str) -> Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT account_id FROM mirror_users WHERE user_id = $1 ORDER BY account_id",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await
    .map_err(Into::into)
}
