//! Reading the CRM: the three queries, from one REPEATABLE READ READ ONLY snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use futures::TryStreamExt;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Column, Row, TypeInfo};

use crate::config::Settings;
use crate::domain::{SourceRole, SourceUser};

/// The CRM's answer could not be used; the message names the query and column.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("The {query} query has no column `{column}`")]
    MissingColumn {
        query: &'static str,
        column: &'static str,
    },
    #[error("The {query} query's column `{column}` has type {found}; expected {expected}")]
    WrongType {
        query: &'static str,
        column: String,
        found: String,
        expected: &'static str,
    },
    /// One of the three queries failed in the database (the cause is said once, in the message).
    #[error("The {query} query failed: {}", crate::db::describe(.error))]
    Query {
        query: &'static str,
        error: sqlx::Error,
    },
    #[error("Failed to read the CRM database: {}", crate::db::describe(.0))]
    Database(sqlx::Error),
}

impl SourceError {
    /// The database error underneath, when there is one.
    pub fn sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            SourceError::Query { error, .. } | SourceError::Database(error) => Some(error),
            _ => None,
        }
    }
}

/// Names the query a database error came from.
fn in_query(query: &'static str) -> impl Fn(sqlx::Error) -> SourceError {
    move |error| SourceError::Query { query, error }
}

/// A CRM statement, unnamed: named prepared statements break behind a transaction pooler.
fn crm_query(
    sql: String,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(sql)).persistent(false)
}

/// A read-only transaction on the CRM. It is read-only by the SQL that opens it, not by a
/// startup parameter, which PgBouncer refuses.
pub async fn begin_read_only(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
}

impl From<sqlx::Error> for SourceError {
    fn from(e: sqlx::Error) -> Self {
        SourceError::Database(e)
    }
}

/// One account row.
#[derive(Clone)]
pub struct SourceAccount {
    pub account_id: String,
    pub token: SecretString,
    pub push_input_output_message_events_for_managers: bool,
}

impl std::fmt::Debug for SourceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceAccount")
            .field("account_id", &self.account_id)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// How the daemon connects to the CRM at `url`. Nothing here needs a session: no startup
/// `options`, no named statements, so a transaction pooler such as PgBouncer works in between.
/// Every read runs in a READ ONLY transaction: the daemon can never write to the CRM.
pub fn connect_options(url: &SecretString) -> Result<PgConnectOptions, sqlx::Error> {
    let opts = PgConnectOptions::from_str(url.expose_secret())?
        .application_name("wazzup-sync")
        .extra_float_digits(None)
        .statement_cache_capacity(0);
    // Reading the whole CRM is slow by design; sqlx's slow-statement warnings would be noise.
    Ok(sqlx::ConnectOptions::disable_statement_logging(opts))
}

/// Opens the CRM pool; idle sessions are closed, so a quiet daemon holds none.
pub fn connect(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let opts = connect_options(&settings.source.url)?;
    Ok(PgPoolOptions::new()
        .max_connections(settings.source.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(settings.source.connect_timeout_secs))
        .idle_timeout(crate::db::IDLE_TIMEOUT)
        .connect_lazy_with(opts))
}

/// Where the CRM database is, for connection errors.
pub fn target(settings: &Settings) -> Result<crate::db::Target, sqlx::Error> {
    Ok(crate::db::Target::new(
        crate::db::Which::Crm,
        connect_options(&settings.source.url)?,
        Duration::from_secs(settings.source.connect_timeout_secs),
        format!("{}__SOURCE__URL", crate::config::ENV_PREFIX),
        "WAZZUP_SYNC__SOURCE__CONNECT_TIMEOUT_SECS",
    ))
}

/// The columns each query must or may return.
pub struct QueryShape {
    pub name: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
}

pub const USERS_SHAPE: QueryShape = QueryShape {
    name: "users",
    required: &["id", "name"],
    optional: &["account_id", "phone", "hide_phone"],
};
pub const ROLES_SHAPE: QueryShape = QueryShape {
    name: "user roles",
    required: &["user_id", "channel_id", "role"],
    optional: &["account_id", "allow_get_new_clients"],
};
pub const ACCOUNTS_SHAPE: QueryShape = QueryShape {
    name: "accounts",
    required: &["account_id", "token"],
    optional: &["push_input_output_message_events_for_managers"],
};

fn column_index(row: &PgRow, name: &str) -> Option<usize> {
    row.columns()
        .iter()
        .position(|c| c.name().eq_ignore_ascii_case(name))
}

/// Reads a text column; integer and uuid columns are turned into text.
fn text(
    row: &PgRow,
    query: &'static str,
    idx: Option<usize>,
) -> Result<Option<String>, SourceError> {
    let Some(i) = idx else { return Ok(None) };
    let ty = row.columns()[i].type_info().name().to_string();
    match ty.to_ascii_uppercase().as_str() {
        "TEXT" | "VARCHAR" | "NAME" | "CITEXT" | "UNKNOWN" => {
            Ok(row.try_get::<Option<String>, _>(i)?)
        }
        // char(n) pads with spaces that mean nothing (and that `::text` drops).
        "BPCHAR" | "CHAR" => Ok(row
            .try_get::<Option<String>, _>(i)?
            .map(|v| v.trim_end_matches(' ').to_string())),
        "INT2" => Ok(row.try_get::<Option<i16>, _>(i)?.map(|v| v.to_string())),
        "INT4" => Ok(row.try_get::<Option<i32>, _>(i)?.map(|v| v.to_string())),
        "INT8" => Ok(row.try_get::<Option<i64>, _>(i)?.map(|v| v.to_string())),
        "UUID" => Ok(row
            .try_get::<Option<uuid::Uuid>, _>(i)?
            .map(|v| v.to_string())),
        _ => Err(SourceError::WrongType {
            query,
            column: row.columns()[i].name().to_string(),
            found: ty,
            expected: "text",
        }),
    }
}

fn boolean(
    row: &PgRow,
    query: &'static str,
    idx: Option<usize>,
) -> Result<Option<bool>, SourceError> {
    let Some(i) = idx else { return Ok(None) };
    let ty = row.columns()[i].type_info().name().to_string();
    if ty != "BOOL" {
        return Err(SourceError::WrongType {
            query,
            column: row.columns()[i].name().to_string(),
            found: ty,
            expected: "boolean",
        });
    }
    Ok(row.try_get::<Option<bool>, _>(i)?)
}

/// Column positions of one query, found from its first row.
struct Columns(Vec<Option<usize>>);

impl Columns {
    fn of(row: &PgRow, shape: &QueryShape, names: &[&'static str]) -> Result<Self, SourceError> {
        for c in shape.required {
            if column_index(row, c).is_none() {
                return Err(SourceError::MissingColumn {
                    query: shape.name,
                    column: c,
                });
            }
        }
        Ok(Columns(
            names.iter().map(|n| column_index(row, n)).collect(),
        ))
    }
}

/// Checks a query's columns and their types on at most one row. The query is joined to a
/// single row so that an empty result still describes its columns.
pub async fn check_query(
    pool: &PgPool,
    sql: &str,
    shape: &QueryShape,
    needs_account_id: bool,
) -> Result<(), SourceError> {
    let mut tx = begin_read_only(pool).await?;
    let wrapped = format!(
        "SELECT q.* FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT * FROM ({sql}) AS q LIMIT 1) AS q ON true"
    );
    let row = crm_query(wrapped)
        .fetch_one(&mut *tx)
        .await
        .map_err(in_query(shape.name))?;
    tx.rollback().await?;
    let extra: &[&'static str] = if needs_account_id {
        &["account_id"]
    } else {
        &[]
    };
    for c in shape.required.iter().chain(extra) {
        if column_index(&row, c).is_none() {
            return Err(SourceError::MissingColumn {
                query: shape.name,
                column: c,
            });
        }
    }
    let all: Vec<&'static str> = shape
        .required
        .iter()
        .chain(shape.optional)
        .copied()
        .collect();
    for name in all {
        let idx = column_index(&row, name);
        if BOOLEAN_COLUMNS.contains(&name) {
            boolean(&row, shape.name, idx)?;
        } else {
            text(&row, shape.name, idx)?;
        }
    }
    Ok(())
}

/// The columns read as booleans; every other column is read as text.
const BOOLEAN_COLUMNS: [&str; 3] = [
    "hide_phone",
    "allow_get_new_clients",
    "push_input_output_message_events_for_managers",
];

/// Every distinct value of the roles query's `role` column with its number of rows (for `check`).
pub async fn role_values(
    pool: &PgPool,
    settings: &Settings,
) -> Result<Vec<(Option<String>, i64)>, SourceError> {
    let mut tx = begin_read_only(pool).await?;
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT role::text, count(*) FROM ({}) AS q GROUP BY 1 ORDER BY 2 DESC, 1",
        settings.source.roles_query
    )))
    .persistent(false)
    .fetch_all(&mut *tx)
    .await
    .map_err(in_query(ROLES_SHAPE.name))?;
    tx.rollback().await?;
    Ok(rows)
}

/// One account's rows, as the streaming reader hands them over.
#[derive(Debug)]
pub struct AccountRows {
    pub account: SourceAccount,
    pub users: Vec<SourceUser>,
    pub roles: Vec<SourceRole>,
    /// The fingerprint of these rows, to store when the account's cycle ends clean.
    pub fingerprint: String,
}

/// What the reader needs to skip accounts whose CRM rows did not change since their last clean
/// cycle: their rows are neither sent by PostgreSQL nor decoded here.
#[derive(Debug, Clone, Default)]
pub struct SkipUnchanged {
    pub enabled: bool,
    /// account id → (fingerprint stored at its last clean cycle, token fingerprint then).
    pub known: HashMap<String, (String, String)>,
    /// Mixed into every fingerprint: the settings that change what the rows mean.
    pub salt: String,
    /// Set once known: how many accounts will be handed over (for progress lines).
    pub to_sync: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// What the reader learned about the rows it could not hand to an account.
#[derive(Debug, Default)]
pub struct ReadSummary {
    /// Account rows refused (no id, no token, repeated id), with why.
    pub bad_accounts: Vec<(String, String)>,
    /// Rows whose account has no row in the accounts query (or no account_id).
    pub orphan_users: usize,
    pub orphan_roles: usize,
    /// Accounts skipped because nothing changed, with their number of user rows.
    pub unchanged: Vec<(String, usize)>,
}

/// Reads the accounts query (a small result) inside the given transaction.
async fn read_accounts(
    conn: &mut sqlx::PgConnection,
    settings: &Settings,
    summary: &mut ReadSummary,
) -> Result<Vec<SourceAccount>, SourceError> {
    let mut rows = crm_query(settings.source.accounts_query.clone()).fetch(conn);
    let mut cols: Option<Columns> = None;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Vec::new();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(in_query(ACCOUNTS_SHAPE.name))?
    {
        let c = match &cols {
            Some(c) => c,
            None => cols.insert(Columns::of(
                &row,
                &ACCOUNTS_SHAPE,
                &[
                    "account_id",
                    "token",
                    "push_input_output_message_events_for_managers",
                ],
            )?),
        };
        let q = ACCOUNTS_SHAPE.name;
        let account_id = text(&row, q, c.0[0])?;
        let token = text(&row, q, c.0[1])?;
        let push = boolean(&row, q, c.0[2])?.unwrap_or(false);
        match (account_id, token) {
            (Some(id), Some(token)) if !id.trim().is_empty() && !token.trim().is_empty() => {
                *seen.entry(id.clone()).or_default() += 1;
                all.push(SourceAccount {
                    account_id: id,
                    token: SecretString::from(token.trim().to_string()),
                    push_input_output_message_events_for_managers: push,
                });
            }
            (Some(id), _) if !id.trim().is_empty() => summary
                .bad_accounts
                .push((id, "the account row has no token".into())),
            _ => summary
                .bad_accounts
                .push(("(no id)".into(), "an account row has no account_id".into())),
        }
    }
    let mut accounts = Vec::with_capacity(all.len());
    for a in all {
        if seen[&a.account_id] > 1 {
            if !summary
                .bad_accounts
                .iter()
                .any(|(id, _)| *id == a.account_id)
            {
                summary.bad_accounts.push((
                    a.account_id.clone(),
                    "the account id appears on more than one row of the accounts query".into(),
                ));
            }
        } else {
            accounts.push(a);
        }
    }
    accounts.sort_by(|a, b| a.account_id.cmp(&b.account_id));
    Ok(accounts)
}

/// The accounts the accounts query returns (for `check`).
pub async fn list_accounts(
    pool: &PgPool,
    settings: &Settings,
) -> Result<(Vec<SourceAccount>, ReadSummary), SourceError> {
    let mut tx = begin_read_only(pool).await?;
    let mut summary = ReadSummary::default();
    let accounts = read_accounts(&mut tx, settings, &mut summary).await?;
    tx.rollback().await?;
    Ok((accounts, summary))
}

fn decode_user(row: &PgRow, c: &Columns) -> Result<SourceUser, SourceError> {
    let q = USERS_SHAPE.name;
    Ok(SourceUser {
        account_id: text(row, q, c.0[0])?,
        id: text(row, q, c.0[1])?,
        name: text(row, q, c.0[2])?,
        phone: text(row, q, c.0[3])?,
        hide_phone: boolean(row, q, c.0[4])?,
    })
}

fn decode_role(row: &PgRow, c: &Columns) -> Result<SourceRole, SourceError> {
    let q = ROLES_SHAPE.name;
    Ok(SourceRole {
        account_id: text(row, q, c.0[0])?,
        user_id: text(row, q, c.0[1])?,
        channel_id: text(row, q, c.0[2])?,
        role: text(row, q, c.0[3])?,
        allow_get_new_clients: boolean(row, q, c.0[4])?,
    })
}

const USER_COLUMNS: [&str; 5] = ["account_id", "id", "name", "phone", "hide_phone"];
const ROLE_COLUMNS: [&str; 5] = [
    "account_id",
    "user_id",
    "channel_id",
    "role",
    "allow_get_new_clients",
];

/// A query's rows, decoded, one at a time, with one row of look-ahead.
struct RowReader<'c, T> {
    rows: futures::stream::BoxStream<'c, Result<PgRow, sqlx::Error>>,
    cols: Option<Columns>,
    shape: &'static QueryShape,
    names: &'static [&'static str],
    needs_account: bool,
    decode: fn(&PgRow, &Columns) -> Result<T, SourceError>,
    account: fn(&T) -> Option<&str>,
    head: Option<T>,
}

impl<T> RowReader<'_, T> {
    async fn advance(&mut self) -> Result<(), SourceError> {
        let next = self
            .rows
            .try_next()
            .await
            .map_err(in_query(self.shape.name))?;
        self.head = match next {
            None => None,
            Some(row) => {
                if self.cols.is_none() {
                    let c = Columns::of(&row, self.shape, self.names)?;
                    if self.needs_account && c.0[0].is_none() {
                        return Err(SourceError::MissingColumn {
                            query: self.shape.name,
                            column: "account_id",
                        });
                    }
                    self.cols = Some(c);
                }
                Some((self.decode)(&row, self.cols.as_ref().expect("columns"))?)
            }
        };
        Ok(())
    }

    /// The account of the next row: Some(None) for a row without one, None at the end.
    fn next_account(&self) -> Option<Option<&str>> {
        self.head.as_ref().map(|h| (self.account)(h))
    }

    /// Takes every row of `account` (rows arrive ordered by account).
    async fn take(&mut self, account: Option<&str>) -> Result<Vec<T>, SourceError> {
        let mut out = Vec::new();
        while let Some(h) = &self.head {
            if (self.account)(h) != account {
                break;
            }
            out.push(self.head.take().expect("head"));
            self.advance().await?;
        }
        Ok(out)
    }
}

/// Starts reading the CRM in one consistent, read-only snapshot and hands the rows over one
/// account at a time, so memory holds a few accounts, not the whole CRM.
///
/// Users and roles are read ordered by account on two sessions sharing one exported snapshot
/// (REPEATABLE READ, READ ONLY). In single-account mode (`single`) the accounts query is not run
/// and every row belongs to that account. At most `ahead` accounts wait in the channel.
pub fn stream_snapshot(
    pool: PgPool,
    settings: std::sync::Arc<Settings>,
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
        let mut a = pool.acquire().await?;
        let mut b = pool.acquire().await?;
        let result = read_rows(&mut a, &mut b, &settings, single, only, skip, tx).await;
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

async fn read_rows(
    a: &mut sqlx::PgConnection,
    b: &mut sqlx::PgConnection,
    settings: &Settings,
    single: Option<SourceAccount>,
    only: Option<HashSet<String>>,
    skip: SkipUnchanged,
    tx: tokio::sync::mpsc::Sender<AccountRows>,
) -> Result<ReadSummary, SourceError> {
    let mut summary = ReadSummary::default();
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
    let multi = single.is_none();
    let accounts = match single {
        Some(acct) => vec![acct],
        None => read_accounts(a, settings, &mut summary).await?,
    };
    let mut by_id: BTreeMap<String, SourceAccount> = accounts
        .into_iter()
        .map(|a| (a.account_id.clone(), a))
        .collect();
    // Fingerprints of every account's rows, computed by PostgreSQL in this same snapshot.
    let raw = fingerprints(a, settings, multi).await?;
    let mut prints: HashMap<String, String> = HashMap::with_capacity(by_id.len());
    for (id, account) in &by_id {
        let key = if multi { id.as_str() } else { "" };
        let rows = raw.get(key).cloned().unwrap_or_default();
        let print = crate::domain::content_hash(
            format!(
                "{}|{}|{}:{}|{}:{}",
                skip.salt,
                account.push_input_output_message_events_for_managers,
                rows.0,
                rows.1,
                rows.2,
                rows.3
            )
            .as_bytes(),
        );
        let token = crate::wazzup::token_fingerprint(&account.token);
        if skip.enabled && skip.known.get(id) == Some(&(print.clone(), token)) {
            summary.unchanged.push((id.clone(), rows.0 as usize));
        } else {
            prints.insert(id.clone(), print);
        }
    }
    let quiet: Vec<String> = summary.unchanged.iter().map(|(id, _)| id.clone()).collect();
    for id in &quiet {
        by_id.remove(id);
    }
    let wanted_count = by_id
        .keys()
        .filter(|id| only.as_ref().is_none_or(|o| o.contains(*id)))
        .count();
    skip.to_sync
        .store(wanted_count, std::sync::atomic::Ordering::Relaxed);
    if by_id.is_empty() {
        return Ok(summary);
    }
    // Byte order (COLLATE "C") so both streams and this merge agree on the order; the rows of
    // unchanged accounts stay in the database.
    let ordered = |q: &str| {
        if multi {
            format!(
                "SELECT * FROM ({q}) AS q \
                 WHERE account_id IS NULL OR NOT (account_id::text = ANY($1::text[])) \
                 ORDER BY account_id::text COLLATE \"C\""
            )
        } else {
            q.to_string()
        }
    };
    let bind_quiet =
        |q: sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>| {
            if multi { q.bind(quiet.clone()) } else { q }
        };
    let mut users = RowReader {
        rows: bind_quiet(crm_query(ordered(&settings.source.users_query))).fetch(&mut *a),
        cols: None,
        shape: &USERS_SHAPE,
        names: &USER_COLUMNS,
        needs_account: multi,
        decode: decode_user,
        account: |u: &SourceUser| u.account_id.as_deref(),
        head: None,
    };
    let mut roles = RowReader {
        rows: bind_quiet(crm_query(ordered(&settings.source.roles_query))).fetch(&mut *b),
        cols: None,
        shape: &ROLES_SHAPE,
        names: &ROLE_COLUMNS,
        needs_account: multi,
        decode: decode_role,
        account: |r: &SourceRole| r.account_id.as_deref(),
        head: None,
    };
    users.advance().await?;
    roles.advance().await?;
    let wanted = |id: &str| only.as_ref().is_none_or(|o| o.contains(id));
    loop {
        // In single-account mode every row is the account's, whatever its account_id.
        let key: Option<Option<String>> = if multi {
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
        } else if users.head.is_some() || roles.head.is_some() {
            Some(by_id.keys().next().cloned())
        } else {
            None
        };
        let Some(key) = key else { break };
        let (u, r) = if multi {
            (
                users.take(key.as_deref()).await?,
                roles.take(key.as_deref()).await?,
            )
        } else {
            let mut u = Vec::new();
            while let Some(h) = users.head.take() {
                u.push(h);
                users.advance().await?;
            }
            let mut r = Vec::new();
            while let Some(h) = roles.head.take() {
                r.push(h);
                roles.advance().await?;
            }
            (u, r)
        };
        match key.and_then(|k| by_id.remove(&k)) {
            Some(account) => {
                let fingerprint = prints.remove(&account.account_id).unwrap_or_default();
                if wanted(&account.account_id)
                    && tx
                        .send(AccountRows {
                            account,
                            users: u,
                            roles: r,
                            fingerprint,
                        })
                        .await
                        .is_err()
                {
                    break;
                }
            }
            None => {
                summary.orphan_users += u.len();
                summary.orphan_roles += r.len();
            }
        }
    }
    drop(users);
    drop(roles);
    // Accounts without a single row still need their cycle (their users may have left).
    for (_, account) in by_id {
        let fingerprint = prints.remove(&account.account_id).unwrap_or_default();
        if wanted(&account.account_id)
            && tx
                .send(AccountRows {
                    account,
                    users: vec![],
                    roles: vec![],
                    fingerprint,
                })
                .await
                .is_err()
        {
            break;
        }
    }
    Ok(summary)
}

/// Per account (all rows under "" in single-account mode): user rows and their hash sum, role
/// rows and theirs. Order-independent, computed by PostgreSQL (in parallel where it can).
async fn fingerprints(
    conn: &mut sqlx::PgConnection,
    settings: &Settings,
    multi: bool,
) -> Result<HashMap<String, (i64, String, i64, String)>, SourceError> {
    let sql = |q: &str| {
        if multi {
            format!(
                "SELECT account_id::text, count(*), COALESCE(sum(hashtextextended(q::text, 0)), 0)::text
                 FROM ({q}) AS q GROUP BY 1"
            )
        } else {
            format!(
                "SELECT ''::text, count(*), COALESCE(sum(hashtextextended(q::text, 0)), 0)::text FROM ({q}) AS q"
            )
        }
    };
    let mut out: HashMap<String, (i64, String, i64, String)> = HashMap::new();
    let users: Vec<(Option<String>, i64, String)> =
        sqlx::query_as(AssertSqlSafe(sql(&settings.source.users_query)))
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .map_err(in_query(USERS_SHAPE.name))?;
    for (id, n, sum) in users {
        let e = out.entry(id.unwrap_or_default()).or_default();
        e.0 = n;
        e.1 = sum;
    }
    let roles: Vec<(Option<String>, i64, String)> =
        sqlx::query_as(AssertSqlSafe(sql(&settings.source.roles_query)))
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .map_err(in_query(ROLES_SHAPE.name))?;
    for (id, n, sum) in roles {
        let e = out.entry(id.unwrap_or_default()).or_default();
        e.2 = n;
        e.3 = sum;
    }
    Ok(out)
}
