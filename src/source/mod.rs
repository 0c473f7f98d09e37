//! Reading the CRM: the three queries, from one REPEATABLE READ READ ONLY snapshot, streamed
//! one account at a time ([`snapshot`]); the accounts query ([`accounts`]); the columns and
//! their types ([`columns`]). Nothing here needs a session, so a transaction pooler such as
//! PgBouncer can stand in between. This module knows nothing of the Wazzup API.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool};

use crate::config::Settings;
use crate::domain::{SourceRole, SourceUser};

mod accounts;
mod cache;
mod columns;
mod delta;
mod snapshot;

pub use accounts::list_accounts;
pub use cache::{ROW_CACHE_ROWS, RowCache};
pub use columns::{ACCOUNTS_SHAPE, QueryShape, ROLES_SHAPE, USERS_SHAPE};
pub use snapshot::stream_snapshot;

use columns::{boolean, column_index, text};

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
pub(super) fn in_query(query: &'static str) -> impl Fn(sqlx::Error) -> SourceError {
    move |error| SourceError::Query { query, error }
}

/// A CRM statement, unnamed: named prepared statements break behind a transaction pooler.
pub(super) fn crm_query(
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

/// Opens the CRM pool; `run` closes its idle sessions, so a quiet daemon holds none.
pub fn connect(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let opts = connect_options(&settings.source.url)?;
    Ok(crate::db::pool_options()
        .max_connections(settings.source.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(settings.source.connect_timeout_secs))
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

impl SkipUnchanged {
    /// True when the account's rows and token are those of its last clean cycle.
    pub(crate) fn unchanged(&self, account: &SourceAccount, print: &str) -> bool {
        self.enabled
            && self
                .known
                .get(&account.account_id)
                .is_some_and(|(p, token)| {
                    p == print && *token == crate::domain::token_fingerprint(&account.token)
                })
    }
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

/// The accounts whose users or role rows name this user id (for `explain`).
pub async fn accounts_of_user(
    pool: &PgPool,
    settings: &Settings,
    user_id: &str,
) -> Result<Vec<String>, SourceError> {
    let mut tx = begin_read_only(pool).await?;
    let sql = format!(
        "SELECT account_id::text FROM ({}) AS u WHERE id::text = $1
         UNION SELECT account_id::text FROM ({}) AS r WHERE user_id::text = $1",
        settings.source.users_query, settings.source.roles_query
    );
    let mut ids: Vec<Option<String>> = sqlx::query_scalar(AssertSqlSafe(sql))
        .persistent(false)
        .bind(user_id)
        .fetch_all(&mut *tx)
        .await
        .map_err(in_query(USERS_SHAPE.name))?;
    tx.rollback().await?;
    ids.sort();
    Ok(ids.into_iter().flatten().collect())
}
