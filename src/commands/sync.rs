//! `sync`, `reconcile` and `migrate`: check both databases answer, migrate, one cycle.

use tokio::sync::watch;

use super::warn_insecure;
use crate::config::Settings;
use crate::state;
use crate::sync::{CycleOptions, CycleReport, Engine};

/// Applies pending migrations to the state schema, after checking the state database answers.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = state::connect(settings)?;
    crate::db::probe_all(&[&state::target(settings)?]).await?;
    migrate_schema(&pool, &settings.state.schema).await?;
    tracing::info!(schema = %settings.state.schema, "State schema is up to date");
    Ok(())
}

/// Runs the migrations; the error says "Failed to migrate" and the cause once.
pub(crate) async fn migrate_schema(pool: &sqlx::PgPool, schema: &str) -> anyhow::Result<()> {
    state::migrate(pool, schema)
        .await
        .map_err(|e| anyhow::anyhow!("Failed to migrate the state schema: {e}"))
}

/// `sync`: check both databases answer, migrate, one cycle, report.
pub async fn sync_once(settings: Settings, opts: CycleOptions) -> anyhow::Result<CycleReport> {
    warn_insecure(&settings);
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    engine.probe().await?;
    migrate_schema(&engine.state, &engine.settings.state.schema).await?;
    match engine.run_cycle(&opts).await {
        Ok(report) => Ok(report),
        Err(e) => Err(anyhow::anyhow!(engine.explain(&e).await)),
    }
}

/// One cycle, each account that did not complete named on stderr, and the exit code: 0 when
/// every account completed (or was another replica's), 1 otherwise.
pub async fn sync_and_report(
    settings: Settings,
    opts: CycleOptions,
) -> anyhow::Result<std::process::ExitCode> {
    let report = sync_once(settings, opts).await?;
    for line in super::failed_accounts(&report) {
        eprintln!("wazzup-sync: account not synced: {line}");
    }
    Ok(std::process::ExitCode::from(super::exit_code(&report) as u8))
}
