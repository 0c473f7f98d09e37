//! Reading a few named accounts (a notified cycle, `explain`): the accounts query, the users
//! and the role rows of those accounts only, filtered inside PostgreSQL by the account column
//! in its own type (an index on it serves). Rows the daemon read before and holds in its
//! [`RowCache`] are hashed by PostgreSQL but not sent; an account whose fingerprint, computed
//! from those hashes, is that of its last clean cycle is skipped.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use sqlx::PgConnection;

use super::accounts::read_accounts;
use super::cache::RowCache;
use super::columns::{
    ACCOUNTS_SHAPE, Delta, Group, GroupReader, Grouping, ROLES_GROUPED, USERS_GROUPED,
    account_filter, decode_role_delta, decode_user_delta, delta_sql, ids_for, probe,
};
use super::snapshot::{Handover, RowCounts};
use super::{AccountRows, ReadSummary, SkipUnchanged, SourceAccount, SourceError, crm_query};
use crate::config::Settings;
use crate::domain::{SourceRole, SourceUser};

/// Reads the `wanted` accounts in one REPEATABLE READ READ ONLY transaction on `a` (its
/// results are small: one session serves, and no snapshot is exported). In single-account mode
/// (`single`), the one account is read when it is wanted.
pub(super) async fn read_wanted(
    a: &mut PgConnection,
    settings: &Settings,
    single: Option<SourceAccount>,
    wanted: &HashSet<String>,
    skip: &SkipUnchanged,
    cache: &Mutex<RowCache>,
    handover: &Handover,
) -> Result<ReadSummary, SourceError> {
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *a)
        .await?;
    let mut summary = ReadSummary::default();
    let multi = single.is_none();
    let accounts = match single {
        Some(acct) => vec![acct]
            .into_iter()
            .filter(|a| wanted.contains(&a.account_id))
            .collect(),
        None => wanted_accounts(a, settings, wanted, &mut summary).await?,
    };
    let mut accounts: BTreeMap<String, SourceAccount> = accounts
        .into_iter()
        .map(|a| (a.account_id.clone(), a))
        .collect();
    skip.to_sync
        .store(accounts.len(), std::sync::atomic::Ordering::Relaxed);
    if accounts.is_empty() {
        return Ok(summary);
    }
    let ids: Vec<String> = accounts.keys().cloned().collect();
    let (known_users, known_roles) = lock(cache).known(ids.iter().map(String::as_str));
    let q = &settings.source;
    let users = delta_read(a, &q.users_query, &USERS_DELTA, multi, &ids, known_users).await?;
    let roles = delta_read(a, &q.roles_query, &ROLES_DELTA, multi, &ids, known_roles).await?;
    let (mut users, mut roles) = (users.into_iter().peekable(), roles.into_iter().peekable());
    let mut stop = false;
    loop {
        // Both lists are ordered by account; an account missing from one has no such rows.
        let key = match (users.peek(), roles.peek()) {
            (None, None) => break,
            (Some((u, _)), None) => u.clone(),
            (None, Some((r, _))) => r.clone(),
            (Some((u, _)), Some((r, _))) => u.clone().min(r.clone()),
        };
        let (u, r) = (take(&mut users, &key), take(&mut roles, &key));
        let account = match (multi, &key) {
            (true, Some(k)) => accounts.remove(k),
            (false, _) => accounts.pop_first().map(|(_, a)| a),
            (true, None) => None,
        };
        if let Some(account) = account {
            stop = !hand_over(account, u, r, skip, cache, handover, &mut summary).await;
            if stop {
                break;
            }
        }
    }
    // The accounts without a single row: their users may all have left.
    for account in std::mem::take(&mut accounts).into_values() {
        if stop {
            break;
        }
        let empty = (Delta::default(), Delta::default());
        stop = !hand_over(
            account,
            empty.0,
            empty.1,
            skip,
            cache,
            handover,
            &mut summary,
        )
        .await;
    }
    lock(cache).trim();
    Ok(summary)
}

/// The next group of a list ordered by account, when it is `key`'s; else no rows.
fn take<T>(
    list: &mut std::iter::Peekable<std::vec::IntoIter<Group<Delta<T>>>>,
    key: &Option<String>,
) -> Delta<T> {
    list.next_if(|(k, _)| k == key)
        .map(|(_, d)| d)
        .unwrap_or_default()
}

/// Resolves an account's rows through the cache and hands it over, or notes it as unchanged.
/// False when the receiver is gone.
async fn hand_over(
    account: SourceAccount,
    users: Delta<SourceUser>,
    roles: Delta<SourceRole>,
    skip: &SkipUnchanged,
    cache: &Mutex<RowCache>,
    handover: &Handover,
    summary: &mut ReadSummary,
) -> bool {
    let counts = RowCounts::of(&users.all, &roles.all);
    let resolved = lock(cache).resolve(&account.account_id, users, roles);
    let Ok((users, roles)) = resolved else {
        // Two rows of different accounts with one hash: this account waits for a cycle that
        // reads it whole (the next scheduled one; its cached rows are gone).
        tracing::warn!(
            account_id = %account.account_id,
            "A notified account's rows could not be told apart by their hashes; it is synced by the next scheduled cycle"
        );
        return true;
    };
    let fingerprint = counts.print(&skip.salt, &account);
    if skip.unchanged(&account, &fingerprint) {
        summary.unchanged.push((account.account_id, users.len()));
        return true;
    }
    handover
        .send(AccountRows {
            account,
            users,
            roles,
            fingerprint,
        })
        .await
}

fn lock(cache: &Mutex<RowCache>) -> std::sync::MutexGuard<'_, RowCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const USERS_DELTA: Grouping<Delta<SourceUser>> = Grouping {
    shape: USERS_GROUPED.shape,
    names: USERS_GROUPED.names,
    hashed: true,
    decode: decode_user_delta,
};
const ROLES_DELTA: Grouping<Delta<SourceRole>> = Grouping {
    shape: ROLES_GROUPED.shape,
    names: ROLES_GROUPED.names,
    hashed: true,
    decode: decode_role_delta,
};

/// The rows of the accounts `ids` of a query, less the rows whose hash is in `known`: one
/// group per account, in the accounts' byte order.
async fn delta_read<T>(
    conn: &mut PgConnection,
    query: &str,
    how: &Grouping<Delta<T>>,
    multi: bool,
    ids: &[String],
    known: Vec<i64>,
) -> Result<Vec<Group<Delta<T>>>, SourceError> {
    let probed = probe(&mut *conn, query, how.shape, how.names, multi).await?;
    let rows = crm_query(delta_sql(query, &probed, multi))
        .bind(ids_for(ids, probed.cols.kind(0)))
        .bind(known)
        .fetch(conn);
    let mut reader = GroupReader::new(rows, how.shape.name, how.decode);
    let mut groups = Vec::new();
    reader.advance().await?;
    while let Some(group) = reader.head.take() {
        groups.push(group);
        reader.advance().await?;
    }
    Ok(groups)
}

/// The rows of the accounts query whose account is wanted, filtered by PostgreSQL.
async fn wanted_accounts(
    conn: &mut PgConnection,
    settings: &Settings,
    wanted: &HashSet<String>,
    summary: &mut ReadSummary,
) -> Result<Vec<SourceAccount>, SourceError> {
    let names = [
        "account_id",
        "token",
        "push_input_output_message_events_for_managers",
    ];
    let query = &settings.source.accounts_query;
    let probed = probe(&mut *conn, query, &ACCOUNTS_SHAPE, &names, true).await?;
    let kind = probed.cols.kind(0);
    let ids: Vec<String> = wanted.iter().cloned().collect();
    let sql = format!(
        "SELECT q.* FROM ({query}) AS q WHERE {}",
        account_filter(probed.account_column(), kind)
    );
    let filtered = crm_query(sql).bind(ids_for(&ids, kind));
    read_accounts(conn, filtered, summary).await
}
