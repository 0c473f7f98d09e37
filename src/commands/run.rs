//! `run`: the daemon. Health and metrics first, the state database waited for, then a cycle
//! at start, on every tick of the schedules, and after notifications, until SIGTERM/SIGINT.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

use std::sync::Arc;

use super::listen::{listen_forever, listen_pool};
use super::sync::migrate_schema;
use super::{shutdown_signal, warn_insecure};
use crate::config::Settings;
use crate::ops::Health;
use crate::sync::{CycleOptions, CycleReport, Engine, Trigger};

/// `run`: serve health and metrics, wait for the state database and migrate, then a cycle at
/// start and on every tick of the schedule until SIGTERM/SIGINT. A database that is down, at
/// start or later, never stops the daemon: readiness fails and the log says why, at growing
/// intervals, until it recovers.
pub async fn run_daemon(settings: Settings) -> anyhow::Result<()> {
    warn_insecure(&settings);
    // Set at SIGTERM/SIGINT: no new batch starts; the request in flight finishes.
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let engine = Engine::new(settings, stop.clone())?;
    let health = serve_health(&engine).await?;
    tokio::select! {
        () = wait_for_state(&engine) => {}
        _ = stop.wait_for(|s| *s) => {
            tracing::info!("wazzup-sync stopped before the state database was ready");
            return Ok(());
        }
    }
    health.migrated();
    engine.export_state_gauges(None, true).await;
    let mut triggers = Triggers::start(&engine, &health).await?;
    tracing::info!(
        schedule = %engine.settings.sync.schedule,
        reconcile_schedule = %engine.settings.sync.reconcile_schedule,
        listen_channel = %engine.settings.sync.listen_channel,
        "wazzup-sync started"
    );
    run_cycles(&engine, &health, &mut triggers, stop).await;
    triggers.shutdown().await;
    tracing::info!("wazzup-sync stopped");
    Ok(())
}

/// Serves `/healthz`, `/readyz` and `/metrics` (unless switched off).
async fn serve_health(engine: &Engine) -> anyhow::Result<Arc<Health>> {
    let settings = &engine.settings;
    // The recorder first: gauges set before it would be lost.
    let metrics = settings
        .http
        .enabled
        .then(crate::ops::install_metrics)
        .flatten();
    crate::ops::register_metrics();
    let health = Health::new(
        settings,
        engine.source_target.clone(),
        engine.state_target.clone(),
    );
    if settings.http.enabled {
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
    Ok(health)
}

/// Cycles one after the other as the triggers ask, until the stop signal; a cycle under way
/// at the signal gets the grace period to finish its requests in flight.
async fn run_cycles(
    engine: &Engine,
    health: &Health,
    triggers: &mut Triggers,
    mut stop: watch::Receiver<bool>,
) {
    let grace = Duration::from_secs(engine.settings.sync.shutdown_grace_secs);
    let mut failures = FailureLog::default();
    let mut quiet = false;
    // After a failed cycle, a full one is tried again soon (1 s, 2 s, 4 s … up to a minute)
    // instead of at the next tick: what a failed notified cycle was to send is not left waiting.
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Once a day, between cycles: the history older than its retention goes.
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let opts = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = prune.tick() => {
                prune_history(engine).await;
                continue;
            }
            opts = triggers.next() => opts,
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => {
                triggers.full(Trigger::Schedule)
            }
            // Quiet for a while: the sessions the cycle left idle are closed.
            () = tokio::time::sleep(crate::db::IDLE_TIMEOUT), if !quiet => {
                crate::db::close_idle(&engine.source).await;
                crate::db::close_idle(&engine.state).await;
                engine.release_locks().await;
                quiet = true;
                continue;
            }
        };
        quiet = false;
        let cycle = engine.run_cycle(&opts);
        tokio::pin!(cycle);
        let result = tokio::select! {
            r = &mut cycle => r,
            _ = stop.wait_for(|s| *s) => {
                tracing::info!(grace_secs = grace.as_secs(), "Stopping: finishing the requests in flight");
                match tokio::time::timeout(grace, &mut cycle).await {
                    Ok(r) => failures.record(engine, r).await,
                    Err(_) => tracing::warn!("The grace period ended before the cycle did; unacknowledged work is retried on the next start"),
                }
                break;
            }
        };
        if result.is_ok() {
            health.cycle_finished();
        }
        failures.record(engine, result).await;
        retry_at = failures
            .retry_in()
            .map(|delay| tokio::time::Instant::now() + delay);
        if retry_at.is_some() {
            // A database that restarted or ended the daemon's sessions leaves them dead in the
            // pools and as the lock session: they go, and the retry opens new ones.
            crate::db::close_idle(&engine.source).await;
            crate::db::close_idle(&engine.state).await;
            engine.release_locks().await;
        }
    }
}

/// How often `run` prunes the history.
const PRUNE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Rows deleted per statement when pruning: each batch a short transaction of its own.
const PRUNE_BATCH: i64 = 5_000;

/// Deletes the history rows older than `history.retention_days` (none when it is 0), and says
/// how many went.
async fn prune_history(engine: &Engine) {
    let days = engine.settings.history.retention_days;
    if days == 0 {
        return;
    }
    match crate::state::history::prune(&engine.state, days, PRUNE_BATCH).await {
        Ok((changes, cycles)) => {
            tracing::info!(changes, cycles, retention_days = days, "Pruned the history")
        }
        Err(e) => tracing::warn!(error = %e, "Could not prune the history; trying again tomorrow"),
    }
}

/// What starts a cycle: the sync schedule, the reconcile schedule, notifications from the CRM,
/// and decisions on approvals.
struct Triggers {
    scheduler: JobScheduler,
    tick: mpsc::Receiver<()>,
    reconcile: mpsc::Receiver<()>,
    notified: mpsc::UnboundedReceiver<String>,
}

impl Triggers {
    /// Starts both schedules (a first tick at once) and, with a listen channel, LISTEN.
    async fn start(engine: &Engine, health: &Arc<Health>) -> anyhow::Result<Self> {
        let settings = &engine.settings;
        let scheduler = JobScheduler::new().await?;
        let (tick_tx, tick) = mpsc::channel::<()>(1);
        let (reconcile_tx, reconcile) = mpsc::channel::<()>(1);
        for (schedule, tx) in [
            (&settings.sync.schedule, tick_tx.clone()),
            (&settings.sync.reconcile_schedule, reconcile_tx),
        ] {
            let job = Job::new_async(schedule.as_str(), move |_, _| {
                let tx = tx.clone();
                // A tick while a cycle runs is held (one at most): cycles never overlap.
                Box::pin(async move {
                    let _ = tx.try_send(());
                })
            })?;
            scheduler.add(job).await?;
        }
        scheduler.start().await?;
        let (notify_tx, notified) = mpsc::unbounded_channel::<String>();
        // A person's decision on an approval syncs its account at once, as a notification: on
        // the LISTEN session when the state shares its database, else on a session of its own.
        if !super::listen::decisions_share_listen(settings) {
            tokio::spawn(super::listen::listen_decisions(
                engine.clone(),
                notify_tx.clone(),
            ));
        }
        if !settings.sync.listen_channel.is_empty() {
            let pool = listen_pool(settings)?;
            tokio::spawn(listen_forever(
                engine.clone(),
                pool,
                notify_tx,
                health.clone(),
            ));
        }
        let _ = tick_tx.try_send(());
        Ok(Self {
            scheduler,
            tick,
            reconcile,
            notified,
        })
    }

    /// The next cycle's options. A pending reconcile or scheduled tick comes first (it covers
    /// every account, so the notifications waiting are taken with it). Notifications that
    /// arrived while the last cycle ran start the next one at once; after a quiet spell, the
    /// first one is followed by a short pause that gathers the rest of its burst. A notified
    /// cycle covers the notified accounts only (an empty payload means all).
    async fn next(&mut self) -> CycleOptions {
        if self.reconcile.try_recv().is_ok() {
            return self.full(Trigger::Reconcile);
        }
        if self.tick.try_recv().is_ok() {
            return self.full(Trigger::Schedule);
        }
        let mut accounts = HashSet::new();
        self.drain(&mut accounts);
        if accounts.is_empty() {
            tokio::select! {
                Some(()) = self.reconcile.recv() => return self.full(Trigger::Reconcile),
                Some(()) = self.tick.recv() => return self.full(Trigger::Schedule),
                Some(first) = self.notified.recv() => {
                    accounts.insert(first);
                    tokio::time::sleep(NOTIFY_GATHER).await;
                    self.drain(&mut accounts);
                }
            }
        }
        let all = accounts.contains("");
        tracing::debug!(
            accounts = accounts.len(),
            all,
            "Syncing after a notification"
        );
        CycleOptions {
            only_accounts: (!all).then_some(accounts),
            trigger: Trigger::Notify,
            ..Default::default()
        }
    }

    /// Takes every notification waiting.
    fn drain(&mut self, accounts: &mut HashSet<String>) {
        while let Ok(more) = self.notified.try_recv() {
            accounts.insert(more);
        }
    }

    /// A cycle over every account: the notifications waiting are covered by it, since its
    /// snapshot is taken after they were sent.
    fn full(&mut self, trigger: Trigger) -> CycleOptions {
        self.drain(&mut HashSet::new());
        if trigger == Trigger::Reconcile {
            return CycleOptions::reconcile();
        }
        CycleOptions {
            trigger,
            ..Default::default()
        }
    }

    async fn shutdown(mut self) {
        let _ = self.scheduler.shutdown().await;
    }
}

/// Waits until the state database answers and its schema is migrated, saying why not at
/// growing intervals (1 s, 2 s, 4 s … 60 s).
async fn wait_for_state(engine: &Engine) {
    let mut delay = Duration::from_secs(1);
    let mut failed = false;
    loop {
        let attempt = match engine.state_target.probe().await {
            Err(e) => Err(e.to_string()),
            Ok(()) => migrate_schema(&engine.state, &engine.settings.state.schema)
                .await
                .map_err(|e| e.to_string()),
        };
        match attempt {
            Ok(()) => {
                if failed {
                    tracing::info!("The state database answers again; the schema is up to date");
                }
                return;
            }
            Err(why) => {
                failed = true;
                tracing::error!(
                    error = %why,
                    retry_in_secs = delay.as_secs(),
                    "Waiting for the state database before the first cycle"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}

/// The longest wait between two attempts to reach a database that is down.
pub(super) const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Logs failed cycles at growing intervals: the 1st, 2nd, 4th, 8th … failure in a row, each
/// with its cause, and once when cycles succeed again.
#[derive(Default)]
struct FailureLog {
    in_a_row: u64,
}

impl FailureLog {
    /// How soon to try again after the failures in a row (none after a success).
    fn retry_in(&self) -> Option<Duration> {
        (self.in_a_row > 0)
            .then(|| Duration::from_secs(1 << (self.in_a_row - 1).min(6)).min(MAX_RETRY_DELAY))
    }

    async fn record(&mut self, engine: &Engine, r: Result<CycleReport, crate::sync::CycleError>) {
        match r {
            Ok(_) => {
                if self.in_a_row > 0 {
                    tracing::info!(failed_cycles = self.in_a_row, "Cycles run again");
                }
                self.in_a_row = 0;
            }
            Err(e) => {
                metrics::counter!("wazzup_sync_cycles_total", "result" => "failed").increment(1);
                self.in_a_row += 1;
                if self.in_a_row.is_power_of_two() {
                    let why = engine.explain(&e).await;
                    tracing::error!(
                        error = %why,
                        failed_cycles = self.in_a_row,
                        "Cycle failed; a full cycle tries again soon"
                    );
                }
            }
        }
    }
}

/// After a quiet spell, how long notifications are gathered before the cycle they trigger
/// starts: long enough for the rest of a burst of transactions, short next to a cycle.
const NOTIFY_GATHER: Duration = Duration::from_millis(50);
