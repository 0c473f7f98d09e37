//! The commands, wired: daemon, one-shot sync, dry run, migrate, check.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Settings;
use crate::source::{self, ACCOUNTS_SHAPE, ROLES_SHAPE, USERS_SHAPE};
use crate::state;
use crate::sync::{AccountOutcome, CycleOptions, CycleReport, Engine};
use crate::wazzup::{Account, RequestStats};

fn warn_insecure(settings: &Settings) {
    if settings.insecure_http_in_use() {
        tracing::warn!(
            "WAZZUP_SYNC__WAZZUP__ALLOW_INSECURE_HTTP is on: tokens travel over plain http to a non-loopback host"
        );
    }
}

/// Applies pending migrations to the state schema.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = state::connect(settings)?;
    state::migrate(&pool, &settings.state.schema)
        .await
        .context("Failed to migrate the state schema")?;
    tracing::info!(schema = %settings.state.schema, "State schema is up to date");
    Ok(())
}

/// `sync`: migrate, one cycle, report.
pub async fn sync_once(settings: Settings, opts: CycleOptions) -> anyhow::Result<CycleReport> {
    warn_insecure(&settings);
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    state::migrate(&engine.state, &engine.settings.state.schema)
        .await
        .context("Failed to migrate the state schema")?;
    let report = engine.run_cycle(&opts).await?;
    Ok(report)
}

/// `plan`: what a cycle would do; sends nothing, writes nothing.
pub async fn plan(settings: Settings) -> anyhow::Result<CycleReport> {
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    let report = engine
        .run_cycle(&CycleOptions {
            dry_run: true,
            ..Default::default()
        })
        .await?;
    Ok(report)
}

/// Prints a plan as a table.
pub fn print_plan(report: &CycleReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<24} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8}",
        "ACCOUNT", "CREATE", "UPDATE", "DELETE", "SETTINGS", "INVALID", "WAITING"
    )?;
    for a in &report.accounts {
        let delete = match a.deletes_blocked {
            Some((n, _)) => format!("{n} held"),
            None => a.would_delete.to_string(),
        };
        writeln!(
            out,
            "{:<24} {:>8} {:>8} {:>8} {:>10} {:>9} {:>8}",
            a.account_id,
            a.would_create,
            a.would_update,
            delete,
            if a.settings_changed { "change" } else { "same" },
            a.rejected_locally,
            a.waiting
        )?;
    }
    for (id, why) in &report.bad_accounts {
        writeln!(out, "{id:<24} skipped: {why}")?;
    }
    if report.orphan_users + report.orphan_roles > 0 {
        writeln!(
            out,
            "{} user rows and {} role rows belong to no account row and are skipped",
            report.orphan_users, report.orphan_roles
        )?;
    }
    Ok(())
}

/// `check`: settings, both databases, the queries' columns, each token with one cheap GET.
pub async fn check(settings: Settings) -> anyhow::Result<bool> {
    warn_insecure(&settings);
    let mut ok = true;
    let mut say = |good: bool, what: String| {
        ok &= good;
        println!("{} {what}", if good { "ok  " } else { "FAIL" });
    };
    say(true, "configuration".into());
    let src = source::connect(&settings)?;
    match sqlx::query("SELECT 1").execute(&src).await {
        Ok(_) => say(true, "CRM database reachable".into()),
        Err(e) => say(false, format!("CRM database: {}", db_error(&e))),
    }
    let st = state::connect(&settings)?;
    match sqlx::query("SELECT 1").execute(&st).await {
        Ok(_) => say(true, "state database reachable".into()),
        Err(e) => say(false, format!("state database: {}", db_error(&e))),
    }
    let mut queries = vec![
        (&settings.source.users_query, &USERS_SHAPE),
        (&settings.source.roles_query, &ROLES_SHAPE),
    ];
    if settings.single_token().is_none() {
        queries.push((&settings.source.accounts_query, &ACCOUNTS_SHAPE));
    }
    for (q, shape) in queries {
        let multi = settings.single_token().is_none();
        match source::check_query(&src, q, shape, multi).await {
            Ok(()) => say(true, format!("{} query columns", shape.name)),
            Err(e) => say(false, e.to_string()),
        }
    }
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings.clone(), rx)?;
    let accounts = match settings.single_token() {
        Some(t) => vec![(settings.wazzup.single_account_id.clone(), t)],
        None => match source::list_accounts(&src, &settings).await {
            Ok((accounts, _)) => accounts
                .into_iter()
                .map(|a| (a.account_id, a.token))
                .collect(),
            Err(e) => {
                say(false, format!("accounts query: {e}"));
                vec![]
            }
        },
    };
    for (id, token) in accounts {
        let stats = RequestStats::default();
        let acct = Account {
            account_id: &id,
            token: &token,
            stats: &stats,
        };
        match engine.client.get_users_page(&acct, 0, 1).await {
            Ok(_) => say(true, format!("account {id}: token accepted")),
            Err(e) => say(false, format!("account {id}: {e}")),
        }
    }
    Ok(ok)
}

fn db_error(e: &sqlx::Error) -> String {
    // sqlx errors do not carry the URL; keep only the first line.
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// `run`: migrate, then a cycle at start and on every tick of the schedule until SIGTERM/SIGINT.
pub async fn run_daemon(settings: Settings) -> anyhow::Result<()> {
    warn_insecure(&settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine = Engine::new(settings.clone(), stop_rx.clone())?;
    // The database may come up after the daemon: keep trying to migrate.
    loop {
        match state::migrate(&engine.state, &settings.state.schema).await {
            Ok(()) => break,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "Failed to migrate the state schema; retrying in 5 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown_signal() => return Ok(()),
                }
            }
        }
    }

    let health = crate::ops::Health::new(&settings, engine.source.clone(), engine.state.clone());
    if settings.http.enabled {
        let metrics = crate::ops::install_metrics();
        let addr = crate::ops::serve(&settings.http.listen, health.clone(), metrics)
            .await
            .with_context(|| {
                format!(
                    "Failed to listen on {} (WAZZUP_SYNC__HTTP__LISTEN)",
                    settings.http.listen
                )
            })?;
        tracing::info!(address = %addr, "Serving /healthz, /readyz and /metrics");
    }

    let scheduler = JobScheduler::new().await?;
    let (tick_tx, mut tick_rx) = mpsc::channel::<()>(1);
    let (reconcile_tx, mut reconcile_rx) = mpsc::channel::<()>(1);
    for (schedule, tx) in [
        (&settings.sync.schedule, tick_tx.clone()),
        (&settings.sync.reconcile_schedule, reconcile_tx.clone()),
    ] {
        scheduler
            .add(Job::new_async(schedule.as_str(), move |_, _| {
                let tx = tx.clone();
                // A tick while a cycle runs is dropped: cycles never overlap.
                Box::pin(async move {
                    let _ = tx.try_send(());
                })
            })?)
            .await?;
    }
    scheduler.start().await?;
    let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<String>();
    if !settings.sync.listen_channel.is_empty() {
        listen(&engine, &settings.sync.listen_channel, notify_tx).await?;
    }
    let _ = tick_tx.try_send(());
    tracing::info!(
        schedule = %settings.sync.schedule,
        reconcile_schedule = %settings.sync.reconcile_schedule,
        listen_channel = %settings.sync.listen_channel,
        "wazzup-sync started"
    );

    let grace = Duration::from_secs(settings.sync.shutdown_grace_secs);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let opts = tokio::select! {
            biased;
            _ = &mut signal => break,
            Some(()) = reconcile_rx.recv() => CycleOptions { reconcile: true, ..Default::default() },
            Some(()) = tick_rx.recv() => CycleOptions::default(),
            Some(first) = notify_rx.recv() => {
                // Debounce: a burst of changes costs one cycle.
                tokio::time::sleep(NOTIFY_DEBOUNCE).await;
                let mut accounts = HashSet::from([first]);
                while let Ok(more) = notify_rx.try_recv() {
                    accounts.insert(more);
                }
                let all = accounts.contains("");
                tracing::info!(accounts = accounts.len(), "Syncing after a notification");
                CycleOptions { only_accounts: (!all).then_some(accounts), ..Default::default() }
            }
        };
        let cycle = engine.run_cycle(&opts);
        tokio::pin!(cycle);
        tokio::select! {
            r = &mut cycle => {
                if r.is_ok() {
                    health.cycle_finished();
                }
                log_cycle_error(r);
            }
            _ = &mut signal => {
                tracing::info!(grace_secs = grace.as_secs(), "Stopping: finishing the requests in flight");
                let _ = stop_tx.send(true);
                match tokio::time::timeout(grace, &mut cycle).await {
                    Ok(r) => log_cycle_error(r),
                    Err(_) => tracing::warn!("The grace period ended before the cycle did; unacknowledged work is retried on the next start"),
                }
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    tracing::info!("wazzup-sync stopped");
    Ok(())
}

/// How long notifications are gathered before the cycle they trigger starts.
const NOTIFY_DEBOUNCE: Duration = Duration::from_millis(200);

/// LISTENs on the CRM database; every notification's payload (an account id) is passed on.
async fn listen(
    engine: &Engine,
    channel: &str,
    tx: mpsc::UnboundedSender<String>,
) -> anyhow::Result<()> {
    let mut listener = sqlx::postgres::PgListener::connect_with(&engine.source)
        .await
        .context("Failed to open the LISTEN connection to the CRM database")?;
    listener.listen(channel).await.with_context(|| {
        format!("Failed to LISTEN on {channel} (WAZZUP_SYNC__SYNC__LISTEN_CHANNEL)")
    })?;
    tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(n) => {
                    if tx.send(n.payload().trim().to_string()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // The listener reconnects on the next recv; polling covers the gap.
                    tracing::warn!(error = %e, "Lost the LISTEN connection; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}

fn log_cycle_error(r: Result<CycleReport, crate::sync::CycleError>) {
    if let Err(e) = r {
        tracing::error!(error = %e, "Cycle failed; the next scheduled cycle will try again");
    }
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Exit status of `sync`: 0 when every account completed.
pub fn exit_code(report: &CycleReport) -> i32 {
    if report.all_ok() { 0 } else { 1 }
}

/// Names the accounts that did not complete, for the final line of `sync`.
pub fn failed_accounts(report: &CycleReport) -> Vec<String> {
    report
        .accounts
        .iter()
        .filter(|a| !a.outcome.is_ok())
        .map(|a| match &a.outcome {
            AccountOutcome::Incomplete(w)
            | AccountOutcome::AuthFailed(w)
            | AccountOutcome::Skipped(w)
            | AccountOutcome::Failed(w) => format!("{}: {w}", a.account_id),
            _ => a.account_id.clone(),
        })
        .chain(
            report
                .bad_accounts
                .iter()
                .map(|(id, w)| format!("{id}: {w}")),
        )
        .collect()
}

/// Parses `--allow-mass-delete` values.
pub fn allow_set(values: &[String]) -> HashSet<String> {
    values.iter().cloned().collect()
}
