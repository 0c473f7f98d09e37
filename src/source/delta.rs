//! Reading a few named accounts (a notified cycle, `explain`): the accounts query, then one
//! statement for the users and the role fingerprint of those accounts only, each account read
//! by its account column in its own type (an index on it serves). Users come with their rows'
//! hashes; role rows are read only for the accounts whose role fingerprint differs from the
//! rows kept in the [`RowCache`]. An account whose fingerprint is that of its last clean cycle
//! is skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use sqlx::PgConnection;

use super::accounts::read_accounts;
use super::cache::RowCache;
use super::columns::{
    ACCOUNTS_SHAPE, Group, GroupReader, Named, Probed, QueryShape, ROLES_GROUPED, ROLES_SHAPE,
    USERS_GROUPED, USERS_SHAPE, account_filter, decode_named, ids_for, named_roles_sql, named_sql,
    probe,
};
use super::snapshot::{Handover, RowCounts};
use super::{AccountRows, ReadSummary, SkipUnchanged, SourceAccount, SourceError, crm_query};
use crate::config::Settings;
use crate::domain::SourceRole;

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
        None => wanted_accounts(a, settings, wanted, cache, &mut summary).await?,
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
    let (read, mut roles) = read_named(a, settings, multi, &ids, cache).await?;
    let mut stop = false;
    for (key, named) in read {
        let Some(account) = key.and_then(|k| accounts.remove(&k)) else {
            continue;
        };
        let roles = roles.remove(&account.account_id).unwrap_or_default();
        stop = !hand_over(account, named, roles, skip, handover, &mut summary).await;
        if stop {
            break;
        }
    }
    // The accounts without a single row: their users may all have left.
    for account in std::mem::take(&mut accounts).into_values() {
        if stop {
            break;
        }
        let none = Named {
            users: Vec::new(),
            roles: (0, "0".into()),
        };
        stop = !hand_over(account, none, Vec::new(), skip, handover, &mut summary).await;
    }
    lock(cache).trim();
    Ok(summary)
}

/// Reads the accounts `ids`: their users and role fingerprints, then the role rows of those
/// whose fingerprint is not the kept one (the others' come from the cache, which keeps what is
/// read).
async fn read_named(
    a: &mut PgConnection,
    settings: &Settings,
    multi: bool,
    ids: &[String],
    cache: &Mutex<RowCache>,
) -> Result<(Vec<Group<Named>>, HashMap<String, Vec<SourceRole>>), SourceError> {
    let q = &settings.source;
    let users = probe_kept(
        &mut *a,
        &q.users_query,
        (&USERS_SHAPE, USERS_GROUPED.names),
        multi,
        cache,
    )
    .await?;
    let roles = probe_kept(
        &mut *a,
        &q.roles_query,
        (&ROLES_SHAPE, ROLES_GROUPED.names),
        multi,
        cache,
    )
    .await?;
    let sql = named_sql((&q.users_query, &users), (&q.roles_query, &roles), multi);
    let rows = crm_query(sql)
        .bind(bound_ids(ids, &users, multi))
        .fetch(&mut *a);
    let read = groups(rows, &USERS_SHAPE, decode_named).await?;
    let mut kept = HashMap::new();
    let mut moved = Vec::new();
    for (key, named) in &read {
        let Some(id) = key else { continue };
        match lock(cache).roles(id, &named.roles) {
            Some(rows) => {
                kept.insert(id.clone(), rows);
            }
            None => moved.push(id.clone()),
        }
    }
    if !moved.is_empty() {
        let sql = named_roles_sql(&q.roles_query, &roles, multi);
        let rows = crm_query(sql)
            .bind(bound_ids(&moved, &roles, multi))
            .fetch(&mut *a);
        for (key, rows) in groups(rows, &ROLES_SHAPE, ROLES_GROUPED.decode).await? {
            let Some(id) = key else { continue };
            if let Some((_, named)) = read.iter().find(|(k, _)| k.as_deref() == Some(id.as_str())) {
                lock(cache).keep(&id, named.roles.clone(), &rows);
            }
            kept.insert(id, rows);
        }
    }
    Ok((read, kept))
}

/// Computes the account's fingerprint and hands it over, or notes it as unchanged. False when
/// the receiver is gone.
async fn hand_over(
    account: SourceAccount,
    named: Named,
    roles: Vec<SourceRole>,
    skip: &SkipUnchanged,
    handover: &Handover,
    summary: &mut ReadSummary,
) -> bool {
    let Named {
        users,
        roles: print,
    } = named;
    let hashes: Vec<i64> = users.iter().filter_map(|u| u.row_hash).collect();
    let fingerprint = RowCounts::of(&hashes, print).print(&skip.salt, &account);
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

/// A query's columns, as probed before (kept in the cache) or now.
async fn probe_kept(
    conn: &mut PgConnection,
    query: &str,
    how: (&'static QueryShape, &[&'static str]),
    multi: bool,
    cache: &Mutex<RowCache>,
) -> Result<Probed, SourceError> {
    if let Some(probed) = lock(cache).probed(query) {
        return Ok(probed);
    }
    let probed = probe(conn, query, how.0, how.1, multi).await?;
    lock(cache).keep_probed(query, &probed);
    Ok(probed)
}

/// Every group of a statement, in its order.
async fn groups<G: super::columns::Rows>(
    rows: futures::stream::BoxStream<'_, Result<sqlx::postgres::PgRow, sqlx::Error>>,
    shape: &'static QueryShape,
    decode: fn(&sqlx::postgres::PgRow) -> Result<Group<G>, sqlx::Error>,
) -> Result<Vec<Group<G>>, SourceError> {
    let mut reader = GroupReader::new(rows, shape.name, decode);
    let mut out = Vec::new();
    reader.advance().await?;
    while let Some(group) = reader.head.take() {
        out.push(group);
        reader.advance().await?;
    }
    Ok(out)
}

/// The ids a query's account column can hold (all of them in single-account mode, where the
/// column is not read).
fn bound_ids(ids: &[String], probed: &Probed, multi: bool) -> Vec<String> {
    if multi {
        ids_for(ids, probed.cols.kind(0))
    } else {
        ids.to_vec()
    }
}

/// The rows of the accounts query whose account is wanted, filtered by PostgreSQL.
async fn wanted_accounts(
    conn: &mut PgConnection,
    settings: &Settings,
    wanted: &HashSet<String>,
    cache: &Mutex<RowCache>,
    summary: &mut ReadSummary,
) -> Result<Vec<SourceAccount>, SourceError> {
    let names = [
        "account_id",
        "token",
        "push_input_output_message_events_for_managers",
    ];
    let query = &settings.source.accounts_query;
    let probed = probe_kept(&mut *conn, query, (&ACCOUNTS_SHAPE, &names), true, cache).await?;
    let kind = probed.cols.kind(0);
    let ids: Vec<String> = wanted.iter().cloned().collect();
    let sql = format!(
        "SELECT q.* FROM ({query}) AS q WHERE {}",
        account_filter(probed.account_column(), kind)
    );
    let filtered = crm_query(sql).bind(ids_for(&ids, kind));
    read_accounts(conn, filtered, summary).await
}
