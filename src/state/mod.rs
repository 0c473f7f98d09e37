//! The daemon's own tables: the mirror of what Wazzup acknowledged, accounts, dead letters.
//!
//! Every write is set-based, and happens only after Wazzup acknowledged what it records. Every
//! function returns [`StateError`]. One file per table family: [`accounts`], [`mirror`],
//! [`dead_letters`], and [`locks`] for the per-account advisory lock.

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPool};

use crate::config::Settings;

pub mod accounts;
pub mod approvals;
pub mod dead_letters;
pub mod history;
pub mod locks;
pub mod mirror;
pub mod mirror_cache;

pub use accounts::*;
pub use dead_letters::*;
pub use history::{Cause, Record};
pub use locks::*;
pub use mirror::*;
pub use mirror_cache::{MIRROR_CACHE_USERS, MirrorCache, load_mirror_kept};

/// A state database operation failed; the cause is said once, in a line.
#[derive(Debug, thiserror::Error)]
#[error("The state database: {}", crate::db::describe(.0))]
pub struct StateError(#[from] pub sqlx::Error);

/// The result of a state operation.
pub type Result<T> = std::result::Result<T, StateError>;

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn connect_options(settings: &Settings) -> std::result::Result<PgConnectOptions, sqlx::Error> {
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
pub fn connect(settings: &Settings) -> std::result::Result<PgPool, sqlx::Error> {
    let schema = settings.state.schema.clone();
    Ok(crate::db::pool_options()
        // Each account in flight holds one session for its lock and uses one more for its queries.
        .max_connections(pool_size(settings))
        .acquire_timeout(Duration::from_secs(settings.state.connect_timeout_secs))
        // sqlx already checks a session when it goes back to the pool; checking it again when
        // it is taken would cost every state query a second round trip. A session that died
        // in between fails its query, and that account's cycle says so and is retried.
        .test_before_acquire(false)
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

/// Connections the state pool may open: at least a query session per account in flight, plus
/// one for the cycle. The accounts' advisory locks live on one more session ([`lock_session`]).
pub fn pool_size(settings: &Settings) -> u32 {
    settings
        .state
        .max_connections
        .max(settings.sync.concurrency as u32 + 1)
}

/// A session of its own that holds the advisory locks of the accounts being synced.
pub async fn lock_session(settings: &Settings) -> Result<sqlx::PgConnection> {
    let opts = connect_options(settings)?;
    let timeout = Duration::from_secs(settings.state.connect_timeout_secs);
    match tokio::time::timeout(timeout, sqlx::ConnectOptions::connect(&opts)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(StateError(sqlx::Error::PoolTimedOut)),
    }
}

/// A pool of one session for LISTEN on the state database (approval decisions).
pub fn listen_pool(settings: &Settings) -> std::result::Result<PgPool, sqlx::Error> {
    Ok(crate::db::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(settings.state.connect_timeout_secs))
        .connect_lazy_with(connect_options(settings)?))
}

/// Where the state database is, for connection errors.
pub fn target(settings: &Settings) -> std::result::Result<crate::db::Target, sqlx::Error> {
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
pub async fn migrate(pool: &PgPool, schema: &str) -> std::result::Result<(), String> {
    let describe = |e: sqlx::Error| crate::db::describe(&e);
    let mut conn = pool.acquire().await.map_err(describe)?;
    if up_to_date(&mut conn).await {
        crate::db::hand_back(conn).await;
        return Ok(());
    }
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

/// True when every embedded migration is applied, and nothing else: one query instead of the
/// migrator's round trips, for the common start of a process.
async fn up_to_date(conn: &mut sqlx::PgConnection) -> bool {
    let embedded: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let applied: std::result::Result<(Vec<i64>, bool), _> = sqlx::query_as(
        "SELECT coalesce(array_agg(version ORDER BY version) FILTER (WHERE success), '{}'),
                coalesce(bool_or(NOT success), false)
         FROM _sqlx_migrations",
    )
    .fetch_one(&mut *conn)
    .await;
    matches!(applied, Ok((versions, false)) if versions == embedded)
}

/// True when the state tables exist (a dry run must not create them).
pub async fn is_migrated(pool: &PgPool, schema: &str) -> Result<bool> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{schema}.mirror_users"))
        .fetch_one(pool)
        .await?;
    Ok(found.is_some())
}
