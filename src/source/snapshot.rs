//! The CRM read as one consistent snapshot and handed over one account at a time, so memory
//! holds a few accounts, not the whole CRM.
//!
//! Users and roles are read grouped by account (one row of arrays per account) on two
//! sessions sharing one exported snapshot (REPEATABLE READ, READ ONLY); the two streams are
//! merged by account. PostgreSQL first
//! fingerprints every account's rows in the same snapshot, so accounts whose rows did not
//! change since their last clean cycle are neither sent by PostgreSQL nor decoded here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::sync::mpsc::Sender;

use super::accounts::read_accounts;
use super::columns::{
    GroupReader, Grouping, ROLES_GROUPED, ROLES_SHAPE, USERS_GROUPED, USERS_SHAPE, grouped_sql,
    probe,
};
use super::{
    AccountRows, ReadSummary, SkipUnchanged, SourceAccount, SourceError, crm_query, in_query,
};
use crate::config::Settings;
use crate::domain::{SourceRole, SourceUser, content_hash, token_fingerprint};

/// Starts reading the CRM. In single-account mode (`single`) the accounts query is not run
/// and every row belongs to that account. At most `ahead` accounts wait in the channel.
pub fn stream_snapshot(
    pool: PgPool,
    settings: Arc<Settings>,
    single: Option<SourceAccount>,
    only: Option<HashSet<String>>,
    skip: SkipUnchanged,
    ahead: usize,
) -> (
    tokio::sync::mpsc::Receiver<AccountRows>,
    tokio::task::JoinHandle<Result<ReadSummary, SourceError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(ahead.max(1));
    let task = tokio::spawn(async move {
        let (a, b) = tokio::join!(pool.acquire(), pool.acquire());
        let (mut a, mut b) = (a?, b?);
        let handover = Handover { only, tx };
        let result = read_rows(&mut a, &mut b, &settings, single, skip, handover).await;
        if result.is_ok() {
            sqlx::raw_sql("COMMIT").execute(&mut *b).await?;
            sqlx::raw_sql("COMMIT").execute(&mut *a).await?;
        } else {
            // Never hand a session with an open transaction back to the pool.
            let _ = a.close().await;
            let _ = b.close().await;
        }
        result
    });
    (rx, task)
}

/// Where the accounts go: the channel, for the accounts asked for.
struct Handover {
    only: Option<HashSet<String>>,
    tx: Sender<AccountRows>,
}

impl Handover {
    fn wanted(&self, id: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(id))
    }

    /// Hands an account over; false when the receiver is gone.
    async fn send(&self, rows: AccountRows) -> bool {
        !self.wanted(&rows.account.account_id) || self.tx.send(rows).await.is_ok()
    }
}

/// The accounts to read and the fingerprints to store when their cycle ends clean.
struct ToRead {
    accounts: BTreeMap<String, SourceAccount>,
    prints: HashMap<String, String>,
}

async fn read_rows(
    a: &mut PgConnection,
    b: &mut PgConnection,
    settings: &Settings,
    single: Option<SourceAccount>,
    skip: SkipUnchanged,
    handover: Handover,
) -> Result<ReadSummary, SourceError> {
    open_snapshot(a, b).await?;
    let mut summary = ReadSummary::default();
    let multi = single.is_none();
    let accounts = match single {
        Some(acct) => vec![acct],
        None => read_accounts(a, settings, &mut summary).await?,
    };
    let counts = fingerprints(a, settings, multi).await?;
    let to_read = choose(accounts, &counts, &skip, multi, &mut summary);
    let wanted = to_read
        .accounts
        .keys()
        .filter(|id| handover.wanted(id))
        .count();
    skip.to_sync.store(wanted, Ordering::Relaxed);
    if to_read.accounts.is_empty() {
        return Ok(summary);
    }
    let quiet: Vec<String> = summary.unchanged.iter().map(|(id, _)| id.clone()).collect();
    merge(
        a,
        b,
        settings,
        multi,
        &quiet,
        to_read,
        &handover,
        &mut summary,
    )
    .await?;
    Ok(summary)
}

/// Two REPEATABLE READ READ ONLY transactions on one exported snapshot.
async fn open_snapshot(a: &mut PgConnection, b: &mut PgConnection) -> Result<(), SourceError> {
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *a)
        .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
        .persistent(false)
        .fetch_one(&mut *a)
        .await?;
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *b)
        .await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "")
    )))
    .execute(&mut *b)
    .await?;
    Ok(())
}

/// Each account's fingerprint; an account whose fingerprint and token match its last clean
/// cycle is noted as unchanged and not read.
fn choose(
    accounts: Vec<SourceAccount>,
    counts: &HashMap<String, RowCounts>,
    skip: &SkipUnchanged,
    multi: bool,
    summary: &mut ReadSummary,
) -> ToRead {
    let mut to_read = ToRead {
        accounts: BTreeMap::new(),
        prints: HashMap::with_capacity(accounts.len()),
    };
    for account in accounts {
        let id = account.account_id.clone();
        let rows = counts
            .get(if multi { id.as_str() } else { "" })
            .cloned()
            .unwrap_or_default();
        let print = content_hash(
            format!(
                "{}|{}|{}:{}|{}:{}",
                skip.salt,
                account.push_input_output_message_events_for_managers,
                rows.users,
                rows.users_sum,
                rows.roles,
                rows.roles_sum
            )
            .as_bytes(),
        );
        let token = token_fingerprint(&account.token);
        if skip.enabled && skip.known.get(&id) == Some(&(print.clone(), token)) {
            summary.unchanged.push((id, rows.users as usize));
        } else {
            to_read.prints.insert(id.clone(), print);
            to_read.accounts.insert(id, account);
        }
    }
    to_read
}

/// Streams users and roles grouped by account, merges them, and hands each account over;
/// then the accounts without a single row (their users may have left).
#[allow(clippy::too_many_arguments)]
async fn merge(
    a: &mut PgConnection,
    b: &mut PgConnection,
    settings: &Settings,
    multi: bool,
    quiet: &[String],
    mut to_read: ToRead,
    handover: &Handover,
    summary: &mut ReadSummary,
) -> Result<(), SourceError> {
    let (mut users, mut roles) = readers(a, b, settings, multi, quiet).await?;
    users.advance().await?;
    roles.advance().await?;
    while let Some(key) = next_account(&users, &roles, multi, &to_read) {
        let (u, r) = if multi {
            (
                users.take(key.as_deref()).await?,
                roles.take(key.as_deref()).await?,
            )
        } else {
            (users.take_all().await?, roles.take_all().await?)
        };
        match key.and_then(|k| to_read.accounts.remove(&k)) {
            Some(account) => {
                let fingerprint = to_read
                    .prints
                    .remove(&account.account_id)
                    .unwrap_or_default();
                let rows = AccountRows {
                    account,
                    users: u,
                    roles: r,
                    fingerprint,
                };
                if !handover.send(rows).await {
                    return Ok(());
                }
            }
            None => {
                summary.orphan_users += u.len();
                summary.orphan_roles += r.len();
            }
        }
    }
    drop((users, roles));
    for (_, account) in std::mem::take(&mut to_read.accounts) {
        let fingerprint = to_read
            .prints
            .remove(&account.account_id)
            .unwrap_or_default();
        let rows = AccountRows {
            account,
            users: vec![],
            roles: vec![],
            fingerprint,
        };
        if !handover.send(rows).await {
            break;
        }
    }
    Ok(())
}

/// The account whose rows come next: Some(None) for rows without an account, None at the end.
/// In single-account mode every row is the one account's, whatever its account_id.
fn next_account<U, R>(
    users: &GroupReader<'_, U>,
    roles: &GroupReader<'_, R>,
    multi: bool,
    to_read: &ToRead,
) -> Option<Option<String>> {
    if !multi {
        return (users.head.is_some() || roles.head.is_some())
            .then(|| to_read.accounts.keys().next().cloned());
    }
    match (users.next_account(), roles.next_account()) {
        (None, None) => None,
        (Some(u), None) => Some(u.map(str::to_string)),
        (None, Some(r)) => Some(r.map(str::to_string)),
        // NULL sorts last: a present account comes first.
        (Some(u), Some(r)) => Some(match (u, r) {
            (Some(u), Some(r)) => Some(u.min(r).to_string()),
            (Some(u), None) => Some(u.to_string()),
            (None, Some(r)) => Some(r.to_string()),
            (None, None) => None,
        }),
    }
}

/// The users query on one session and the roles query on the other, grouped by account.
async fn readers<'c>(
    a: &'c mut PgConnection,
    b: &'c mut PgConnection,
    settings: &Settings,
    multi: bool,
    quiet: &[String],
) -> Result<(GroupReader<'c, SourceUser>, GroupReader<'c, SourceRole>), SourceError> {
    let users = grouped(
        a,
        &settings.source.users_query,
        &USERS_GROUPED,
        multi,
        quiet,
    )
    .await?;
    let roles = grouped(
        b,
        &settings.source.roles_query,
        &ROLES_GROUPED,
        multi,
        quiet,
    )
    .await?;
    Ok((users, roles))
}

/// A query read one account at a time (see `grouped_sql`): its columns checked first, in the
/// same snapshot, then its accounts in byte order (COLLATE "C"), without the unchanged
/// accounts' rows, so both streams and the merge agree on the order.
async fn grouped<'c, T>(
    conn: &'c mut PgConnection,
    query: &str,
    how: &Grouping<T>,
    multi: bool,
    quiet: &[String],
) -> Result<GroupReader<'c, T>, SourceError> {
    let (cols, spelled) = probe(&mut *conn, query, how.shape, how.names, multi).await?;
    if multi {
        // Rows sorted by account stream out one account at a time; hashing them by account
        // would hold every account in the CRM's memory first.
        sqlx::raw_sql("SET LOCAL enable_hashagg = off")
            .execute(&mut *conn)
            .await?;
    }
    let sql = grouped_sql(query, &cols, &spelled, how.hashed, multi);
    let statement = crm_query(sql);
    let statement = if multi {
        statement.bind(quiet.to_vec())
    } else {
        statement
    };
    let rows = statement.fetch(conn);
    Ok(GroupReader::new(rows, how.shape.name, how.decode))
}

/// One account's rows as PostgreSQL counts them: rows and the sum of their row hashes.
#[derive(Debug, Clone, Default)]
struct RowCounts {
    users: i64,
    users_sum: String,
    roles: i64,
    roles_sum: String,
}

/// Per account (all rows under "" in single-account mode): user rows and their hash sum, role
/// rows and theirs. Order-independent, computed by PostgreSQL (in parallel where it can).
async fn fingerprints(
    conn: &mut PgConnection,
    settings: &Settings,
    multi: bool,
) -> Result<HashMap<String, RowCounts>, SourceError> {
    let sql = |q: &str| {
        let (key, group) = if multi {
            ("account_id::text", " GROUP BY 1")
        } else {
            ("''::text", "")
        };
        format!(
            "SELECT {key}, count(*), COALESCE(sum(hashtextextended(q::text, 0)), 0)::text FROM ({q}) AS q{group}"
        )
    };
    let mut out: HashMap<String, RowCounts> = HashMap::new();
    for (query, shape, users) in [
        (&settings.source.users_query, &USERS_SHAPE, true),
        (&settings.source.roles_query, &ROLES_SHAPE, false),
    ] {
        let rows: Vec<(Option<String>, i64, String)> = sqlx::query_as(AssertSqlSafe(sql(query)))
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .map_err(in_query(shape.name))?;
        for (id, n, sum) in rows {
            let e = out.entry(id.unwrap_or_default()).or_default();
            if users {
                (e.users, e.users_sum) = (n, sum);
            } else {
                (e.roles, e.roles_sum) = (n, sum);
            }
        }
    }
    Ok(out)
}
