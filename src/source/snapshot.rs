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

use super::accounts::{all_accounts, read_accounts};
use super::cache::RowCache;
use super::columns::{
    GroupReader, Grouping, Probed, ROLES_GROUPED, ROLES_SHAPE, Rows, USERS_GROUPED, USERS_SHAPE,
    grouped_sql, probe, quoted,
};
use super::{
    AccountRows, ReadSummary, SkipUnchanged, SourceAccount, SourceError, crm_query, in_query,
};
use crate::config::Settings;
use crate::domain::{SourceRole, SourceUser, content_hash};

/// Starts reading the CRM. With `only`, just those accounts are read ([`super::delta`]), their
/// rows kept in `cache`; otherwise every account, less those whose rows did not change. In
/// single-account mode (`single`) the accounts query is not run and every row belongs to that
/// account. At most `ahead` accounts wait in the channel.
pub fn stream_snapshot(
    pool: PgPool,
    settings: Arc<Settings>,
    single: Option<SourceAccount>,
    only: Option<HashSet<String>>,
    skip: SkipUnchanged,
    ahead: usize,
    cache: Arc<std::sync::Mutex<RowCache>>,
) -> (
    tokio::sync::mpsc::Receiver<AccountRows>,
    tokio::task::JoinHandle<Result<ReadSummary, SourceError>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(ahead.max(1));
    let task = tokio::spawn(async move {
        let handover = Handover { tx };
        match only {
            Some(wanted) => {
                let mut a = pool.acquire().await?;
                let read = super::delta::read_wanted(
                    &mut a, &settings, single, &wanted, &skip, &cache, &handover,
                )
                .await;
                if read.is_err() {
                    // A query may have changed under its name: probe again next time.
                    cache
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .forget_probes();
                }
                finish(vec![a], read).await
            }
            None => {
                let (a, b) = tokio::join!(pool.acquire(), pool.acquire());
                let (mut a, mut b) = (a?, b?);
                let read = async {
                    open_snapshot(&mut a, &mut b).await?;
                    read_rows(&mut a, &mut b, &settings, single, skip, handover).await
                };
                let result = read.await;
                finish(vec![b, a], result).await
            }
        }
    });
    (rx, task)
}

/// Ends the read's transactions: committed when the read succeeded; otherwise the sessions are
/// closed, so that none goes back to the pool with a transaction open.
async fn finish(
    sessions: Vec<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    result: Result<ReadSummary, SourceError>,
) -> Result<ReadSummary, SourceError> {
    if result.is_ok() {
        for mut s in sessions {
            sqlx::raw_sql("COMMIT").execute(&mut *s).await?;
        }
    } else {
        for s in sessions {
            let _ = s.close().await;
        }
    }
    result
}

/// Where the accounts go: the channel.
pub(super) struct Handover {
    tx: Sender<AccountRows>,
}

impl Handover {
    /// Hands an account over; false when the receiver is gone.
    pub(super) async fn send(&self, rows: AccountRows) -> bool {
        self.tx.send(rows).await.is_ok()
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
    let mut summary = ReadSummary::default();
    let multi = single.is_none();
    let accounts = match single {
        Some(acct) => vec![acct],
        None => read_accounts(a, all_accounts(settings), &mut summary).await?,
    };
    let q = &settings.source;
    let users = probe(
        &mut *a,
        &q.users_query,
        &USERS_SHAPE,
        USERS_GROUPED.names,
        multi,
    )
    .await?;
    let roles = probe(
        &mut *a,
        &q.roles_query,
        &ROLES_SHAPE,
        ROLES_GROUPED.names,
        multi,
    )
    .await?;
    let counts = fingerprints(a, settings, multi, [&users, &roles]).await?;
    let to_read = choose(accounts, &counts, &skip, multi, &mut summary);
    skip.to_sync
        .store(to_read.accounts.len(), Ordering::Relaxed);
    if to_read.accounts.is_empty() {
        return Ok(summary);
    }
    let quiet: Vec<String> = summary.unchanged.iter().map(|(id, _)| id.clone()).collect();
    let reading = Reading {
        settings,
        multi,
        quiet: &quiet,
        probed: [users, roles],
    };
    merge(a, b, &reading, to_read, &handover, &mut summary).await?;
    Ok(summary)
}

/// Two REPEATABLE READ READ ONLY transactions on one exported snapshot.
pub(super) async fn open_snapshot(
    a: &mut PgConnection,
    b: &mut PgConnection,
) -> Result<(), SourceError> {
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
        let print = rows.print(&skip.salt, &account);
        if skip.unchanged(&account, &print) {
            summary.unchanged.push((id, rows.users as usize));
        } else {
            to_read.prints.insert(id.clone(), print);
            to_read.accounts.insert(id, account);
        }
    }
    to_read
}

/// What the grouped reads need: the queries, the mode, the accounts not to read, and the users'
/// and roles' columns as probed.
struct Reading<'a> {
    settings: &'a Settings,
    multi: bool,
    quiet: &'a [String],
    probed: [Probed; 2],
}

/// Streams users and roles grouped by account, merges them, and hands each account over;
/// then the accounts without a single row (their users may have left).
async fn merge(
    a: &mut PgConnection,
    b: &mut PgConnection,
    reading: &Reading<'_>,
    mut to_read: ToRead,
    handover: &Handover,
    summary: &mut ReadSummary,
) -> Result<(), SourceError> {
    let multi = reading.multi;
    let (mut users, mut roles) = readers(a, b, reading).await?;
    users.advance().await?;
    roles.advance().await?;
    let single_id = (!multi)
        .then(|| to_read.accounts.keys().next().cloned())
        .flatten();
    while let Some(key) = next_account(&users, &roles, single_id.as_deref()) {
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

/// The account whose rows come next: Some(None) for rows without one, None at the end.
/// In single-account mode (`single`, the account's id) every row is that account's, whatever
/// its account_id.
pub(super) fn next_account<U: Rows, R: Rows>(
    users: &GroupReader<'_, U>,
    roles: &GroupReader<'_, R>,
    single: Option<&str>,
) -> Option<Option<String>> {
    if let Some(id) = single {
        return (users.head.is_some() || roles.head.is_some()).then(|| Some(id.to_string()));
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
    reading: &Reading<'_>,
) -> Result<
    (
        GroupReader<'c, Vec<SourceUser>>,
        GroupReader<'c, Vec<SourceRole>>,
    ),
    SourceError,
> {
    let q = &reading.settings.source;
    let [u, r] = &reading.probed;
    let users = grouped(a, &q.users_query, &USERS_GROUPED, u, reading).await?;
    let roles = grouped(b, &q.roles_query, &ROLES_GROUPED, r, reading).await?;
    Ok((users, roles))
}

/// A query read one account at a time (see `grouped_sql`), its columns as probed in the same
/// snapshot: its accounts in byte order (COLLATE "C"), without the unchanged accounts' rows, so
/// both streams and the merge agree on the order.
async fn grouped<'c, G: Rows>(
    conn: &'c mut PgConnection,
    query: &str,
    how: &Grouping<G>,
    probed: &Probed,
    reading: &Reading<'_>,
) -> Result<GroupReader<'c, G>, SourceError> {
    let multi = reading.multi;
    if multi {
        // Rows sorted by account stream out one account at a time; hashing them by account
        // would hold every account in the CRM's memory first.
        sqlx::raw_sql("SET LOCAL enable_hashagg = off")
            .execute(&mut *conn)
            .await?;
    }
    let sql = grouped_sql(query, probed, how.hashed, multi);
    let statement = crm_query(sql);
    let statement = if multi {
        statement.bind(reading.quiet.to_vec())
    } else {
        statement
    };
    let rows = statement.fetch(conn);
    Ok(GroupReader::new(rows, how.shape.name, how.decode))
}

/// One account's rows as PostgreSQL counts them: rows and the sum of their row hashes.
#[derive(Debug, Clone)]
pub(super) struct RowCounts {
    pub(super) users: i64,
    pub(super) users_sum: String,
    pub(super) roles: i64,
    pub(super) roles_sum: String,
}

impl Default for RowCounts {
    /// No rows, as PostgreSQL's `COALESCE(sum(...), 0)` says it.
    fn default() -> Self {
        Self::of(&[], (0, "0".into()))
    }
}

impl RowCounts {
    /// The counts of users read with their hashes (summed here as PostgreSQL sums them), and
    /// the role rows' count and sum as PostgreSQL gave them.
    pub(super) fn of(users: &[i64], (roles, roles_sum): (i64, String)) -> Self {
        Self {
            users: users.len() as i64,
            users_sum: users
                .iter()
                .map(|&h| i128::from(h))
                .sum::<i128>()
                .to_string(),
            roles,
            roles_sum,
        }
    }

    /// The account's fingerprint: its rows, and what else decides what they mean.
    pub(super) fn print(&self, salt: &str, account: &SourceAccount) -> String {
        content_hash(
            format!(
                "{}|{}|{}:{}|{}:{}",
                salt,
                account.push_input_output_message_events_for_managers,
                self.users,
                self.users_sum,
                self.roles,
                self.roles_sum
            )
            .as_bytes(),
        )
    }
}

/// Per account (all rows under "" in single-account mode): user rows and their hash sum, role
/// rows and theirs. Order-independent, computed by PostgreSQL (in parallel where it can), with
/// the row hash the reads use ([`Probed::row_hash`]).
async fn fingerprints(
    conn: &mut PgConnection,
    settings: &Settings,
    multi: bool,
    [users, roles]: [&Probed; 2],
) -> Result<HashMap<String, RowCounts>, SourceError> {
    let sql = |q: &str, probed: &Probed| {
        let (key, group) = if multi {
            (
                format!("q.{}::text", quoted(probed.account_column())),
                " GROUP BY 1",
            )
        } else {
            ("''::text".to_string(), "")
        };
        format!(
            "SELECT {key}, count(*), COALESCE(sum({}), 0)::text FROM ({q}) AS q{group}",
            probed.row_hash()
        )
    };
    let mut out: HashMap<String, RowCounts> = HashMap::new();
    for (query, shape, probed, is_users) in [
        (&settings.source.users_query, &USERS_SHAPE, users, true),
        (&settings.source.roles_query, &ROLES_SHAPE, roles, false),
    ] {
        let rows: Vec<(Option<String>, i64, String)> =
            sqlx::query_as(AssertSqlSafe(sql(query, probed)))
                .persistent(false)
                .fetch_all(&mut *conn)
                .await
                .map_err(in_query(shape.name))?;
        for (id, n, sum) in rows {
            let e = out.entry(id.unwrap_or_default()).or_default();
            if is_users {
                (e.users, e.users_sum) = (n, sum);
            } else {
                (e.roles, e.roles_sum) = (n, sum);
            }
        }
    }
    Ok(out)
}
