//! Reading the CRM: the three queries, from one REPEATABLE READ READ ONLY snapshot.

use std::collections::{BTreeMap, HashMap};
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
    #[error("Failed to read the CRM database: {0}")]
    Database(#[from] sqlx::Error),
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

/// Everything one cycle reads from the CRM, grouped by account.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub accounts: Vec<SourceAccount>,
    /// Account rows refused (no id, no token, repeated id), with why.
    pub bad_accounts: Vec<(String, String)>,
    pub users: HashMap<String, Vec<SourceUser>>,
    pub roles: HashMap<String, Vec<SourceRole>>,
    /// Rows whose account has no row in the accounts query (or no account_id).
    pub orphan_users: usize,
    pub orphan_roles: usize,
}

/// Opens a pool whose sessions are read-only: the daemon can never write to the CRM.
pub fn connect(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let opts = PgConnectOptions::from_str(settings.source.url.expose_secret())?
        .application_name("wazzup-sync")
        .options([("default_transaction_read_only", "on")]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.source.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(opts))
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
    match ty.as_str() {
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" | "UNKNOWN" => {
            Ok(row.try_get::<Option<String>, _>(i)?)
        }
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

/// Checks a query's columns without reading its rows (`LIMIT 0`).
pub async fn check_query(
    pool: &PgPool,
    sql: &str,
    shape: &QueryShape,
    needs_account_id: bool,
) -> Result<(), SourceError> {
    let mut conn = pool.acquire().await?;
    let wrapped = format!("SELECT * FROM ({sql}) AS q LIMIT 0");
    let describe = sqlx::Executor::describe(
        &mut *conn,
        sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(wrapped)),
    )
    .await?;
    let names: Vec<String> = describe
        .columns()
        .iter()
        .map(|c| c.name().to_lowercase())
        .collect();
    let extra: &[&'static str] = if needs_account_id {
        &["account_id"]
    } else {
        &[]
    };
    for c in shape.required.iter().chain(extra) {
        if !names.iter().any(|n| n == c) {
            return Err(SourceError::MissingColumn {
                query: shape.name,
                column: c,
            });
        }
    }
    Ok(())
}

/// Reads the three queries in one consistent, read-only snapshot.
///
/// In single-account mode (`single` is the account id and token) the accounts query is not run
/// and every row belongs to that account.
#[tracing::instrument(skip_all)]
pub async fn read_snapshot(
    pool: &PgPool,
    settings: &Settings,
    single: Option<SourceAccount>,
) -> Result<Snapshot, SourceError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut snap = Snapshot::default();
    let single_id = single.as_ref().map(|a| a.account_id.clone());

    match single {
        Some(account) => snap.accounts.push(account),
        None => {
            let mut rows =
                sqlx::query(AssertSqlSafe(settings.source.accounts_query.clone())).fetch(&mut *tx);
            let mut cols: Option<Columns> = None;
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let mut all = Vec::new();
            while let Some(row) = rows.try_next().await? {
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
                    (Some(id), Some(token))
                        if !id.trim().is_empty() && !token.trim().is_empty() =>
                    {
                        *seen.entry(id.clone()).or_default() += 1;
                        all.push(SourceAccount {
                            account_id: id,
                            token: SecretString::from(token.trim().to_string()),
                            push_input_output_message_events_for_managers: push,
                        });
                    }
                    (Some(id), _) if !id.trim().is_empty() => snap
                        .bad_accounts
                        .push((id, "the account row has no token".into())),
                    _ => snap
                        .bad_accounts
                        .push(("(no id)".into(), "an account row has no account_id".into())),
                }
            }
            drop(rows);
            for a in all {
                if seen[&a.account_id] > 1 {
                    if !snap.bad_accounts.iter().any(|(id, _)| *id == a.account_id) {
                        snap.bad_accounts.push((
                            a.account_id.clone(),
                            "the account id appears on more than one row of the accounts query"
                                .into(),
                        ));
                    }
                } else {
                    snap.accounts.push(a);
                }
            }
        }
    }

    let account_of = |row_account: Option<String>| -> Option<String> {
        match &single_id {
            Some(id) => Some(id.clone()),
            None => row_account,
        }
    };
    let known: std::collections::HashSet<String> =
        snap.accounts.iter().map(|a| a.account_id.clone()).collect();

    {
        let mut rows =
            sqlx::query(AssertSqlSafe(settings.source.users_query.clone())).fetch(&mut *tx);
        let mut cols: Option<Columns> = None;
        while let Some(row) = rows.try_next().await? {
            let c = match &cols {
                Some(c) => c,
                None => {
                    let c = Columns::of(
                        &row,
                        &USERS_SHAPE,
                        &["account_id", "id", "name", "phone", "hide_phone"],
                    )?;
                    if single_id.is_none() && c.0[0].is_none() {
                        return Err(SourceError::MissingColumn {
                            query: USERS_SHAPE.name,
                            column: "account_id",
                        });
                    }
                    cols.insert(c)
                }
            };
            let q = USERS_SHAPE.name;
            let user = SourceUser {
                account_id: text(&row, q, c.0[0])?,
                id: text(&row, q, c.0[1])?,
                name: text(&row, q, c.0[2])?,
                phone: text(&row, q, c.0[3])?,
                hide_phone: boolean(&row, q, c.0[4])?,
            };
            match account_of(user.account_id.clone()) {
                Some(a) if known.contains(&a) => snap.users.entry(a).or_default().push(user),
                _ => snap.orphan_users += 1,
            }
        }
    }
    {
        let mut rows =
            sqlx::query(AssertSqlSafe(settings.source.roles_query.clone())).fetch(&mut *tx);
        let mut cols: Option<Columns> = None;
        while let Some(row) = rows.try_next().await? {
            let c = match &cols {
                Some(c) => c,
                None => {
                    let c = Columns::of(
                        &row,
                        &ROLES_SHAPE,
                        &[
                            "account_id",
                            "user_id",
                            "channel_id",
                            "role",
                            "allow_get_new_clients",
                        ],
                    )?;
                    if single_id.is_none() && c.0[0].is_none() {
                        return Err(SourceError::MissingColumn {
                            query: ROLES_SHAPE.name,
                            column: "account_id",
                        });
                    }
                    cols.insert(c)
                }
            };
            let q = ROLES_SHAPE.name;
            let role = SourceRole {
                account_id: text(&row, q, c.0[0])?,
                user_id: text(&row, q, c.0[1])?,
                channel_id: text(&row, q, c.0[2])?,
                role: text(&row, q, c.0[3])?,
                allow_get_new_clients: boolean(&row, q, c.0[4])?,
            };
            match account_of(role.account_id.clone()) {
                Some(a) if known.contains(&a) => snap.roles.entry(a).or_default().push(role),
                _ => snap.orphan_roles += 1,
            }
        }
    }
    tx.commit().await?;
    Ok(snap)
}
