//! The commands, wired: daemon, one-shot sync, dry run, migrate, check.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::Settings;
use crate::plan::{Access, Change, PlanRecord};
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

/// Applies pending migrations to the state schema, after checking the state database answers.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let pool = state::connect(settings)?;
    crate::db::probe_all(&[&state::target(settings)?]).await?;
    migrate_schema(&pool, &settings.state.schema).await?;
    tracing::info!(schema = %settings.state.schema, "State schema is up to date");
    Ok(())
}

/// Runs the migrations; the error says "Failed to migrate" and the cause once.
async fn migrate_schema(pool: &sqlx::PgPool, schema: &str) -> anyhow::Result<()> {
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

/// `plan`: what a cycle would do; sends nothing, writes nothing.
pub async fn plan(settings: Settings, detail: bool) -> anyhow::Result<CycleReport> {
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings, rx)?;
    engine.probe().await?;
    let opts = CycleOptions {
        dry_run: true,
        detail,
        ..Default::default()
    };
    match engine.run_cycle(&opts).await {
        Ok(report) => Ok(report),
        Err(e) => Err(anyhow::anyhow!(engine.explain(&e).await)),
    }
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
    if let Some(records) = &report.records {
        print_records(records, out)?;
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

/// Prints `plan --detail`'s records, one line each; changes that widen access are marked.
fn print_records(records: &[PlanRecord], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    if records.is_empty() {
        return writeln!(out, "No record would change.");
    }
    writeln!(
        out,
        "{:<16} {:<20} {:<16} DETAIL",
        "ACCOUNT", "USER", "ACTION"
    )?;
    for r in records {
        let (action, detail) = describe_change(&r.change);
        let mark = if r.widens_access {
            "  [WIDENS ACCESS]"
        } else {
            ""
        };
        writeln!(
            out,
            "{:<16} {:<20} {:<16} {detail}{mark}",
            crate::domain::clip(&r.account_id),
            crate::domain::clip(&r.user_id),
            action
        )?;
    }
    Ok(())
}

fn describe_change(c: &Change) -> (&'static str, String) {
    let access = |a: &Access| {
        format!(
            "{}{}",
            a.role.as_str(),
            if a.allow_get_new_clients {
                " + new clients"
            } else {
                ""
            }
        )
    };
    let value = |v: &Option<String>| match v {
        Some(v) => format!("{v:?}"),
        None => "(none)".to_string(),
    };
    match c {
        Change::Create { name, phone } => (
            "create",
            match phone {
                Some(p) => format!("name {name:?}, phone {p}"),
                None => format!("name {name:?}, no phone"),
            },
        ),
        Change::Update { changes } => (
            "update",
            changes
                .iter()
                .map(|(field, ch)| format!("{field}: {} -> {}", value(&ch.from), value(&ch.to)))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Change::Delete => ("delete", String::new()),
        Change::DeleteHeld => ("delete held", "held back by the mass-deletion guard".into()),
        Change::RoleAdded {
            channel_id,
            access: a,
        } => ("role added", format!("channel {channel_id}: {}", access(a))),
        Change::RoleChanged {
            channel_id,
            from,
            to,
        } => (
            "role changed",
            format!("channel {channel_id}: {} -> {}", access(from), access(to)),
        ),
        Change::RoleRemoved {
            channel_id,
            access: a,
        } => (
            "role removed",
            format!("channel {channel_id}: {}", access(a)),
        ),
        Change::HidePhoneNumbers { hidden } => (
            "phones hidden",
            if *hidden {
                "contacts' phones hidden"
            } else {
                "contacts' phones shown"
            }
            .into(),
        ),
        Change::UnreadablePhone { phone } => (
            "phone unreadable",
            format!("{phone:?} is not a phone number; sent without a phone"),
        ),
        Change::Refused { code, reason, .. } => ("refused", format!("{code}: {reason}")),
    }
}

/// `check`: settings, both databases, the queries' columns and types, the role values, the
/// LISTEN channel, and each token with one cheap GET. One line per check; a database that
/// cannot be reached is said once and the checks that need it are skipped.
pub async fn check(settings: Settings) -> anyhow::Result<bool> {
    warn_insecure(&settings);
    let mut ok = true;
    let mut say = |verdict: Verdict, what: String| {
        ok &= verdict != Verdict::Fail;
        println!("{} {what}", verdict.label());
    };
    say(Verdict::Ok, "configuration".into());
    let (_tx, rx) = watch::channel(false);
    let engine = Engine::new(settings.clone(), rx)?;
    let crm_ok = match engine.source_target.probe().await {
        Ok(()) => {
            say(
                Verdict::Ok,
                format!("CRM database reachable ({})", engine.source_target),
            );
            true
        }
        Err(e) => {
            say(Verdict::Fail, e.to_string());
            false
        }
    };
    match engine.state_target.probe().await {
        Ok(()) => say(
            Verdict::Ok,
            format!("state database reachable ({})", engine.state_target),
        ),
        Err(e) => say(Verdict::Fail, e.to_string()),
    }
    let multi = settings.single_token().is_none();
    if crm_ok {
        let mut queries = vec![
            (&settings.source.users_query, &USERS_SHAPE),
            (&settings.source.roles_query, &ROLES_SHAPE),
        ];
        if multi {
            queries.push((&settings.source.accounts_query, &ACCOUNTS_SHAPE));
        }
        for (q, shape) in queries {
            match source::check_query(&engine.source, q, shape, multi).await {
                Ok(()) => say(Verdict::Ok, format!("{} query columns", shape.name)),
                Err(e) => say(Verdict::Fail, e.to_string()),
            }
        }
        match source::role_values(&engine.source, &settings).await {
            Ok(values) => {
                let lines = role_value_lines(&values, &settings.role_map());
                let refused = lines.iter().filter(|(_, refused)| *refused).count();
                let verdict = if refused > 0 {
                    Verdict::Warn
                } else {
                    Verdict::Ok
                };
                say(
                    verdict,
                    format!(
                        "role values in the user roles query: {} distinct, {refused} refused",
                        values.len()
                    ),
                );
                for (line, _) in lines {
                    println!("       {line}");
                }
            }
            Err(e) => say(Verdict::Fail, e.to_string()),
        }
        if !settings.sync.listen_channel.is_empty() {
            match check_listen(&engine).await {
                Ok(()) => say(
                    Verdict::Ok,
                    format!(
                        "LISTEN on {} receives notifications",
                        settings.sync.listen_channel
                    ),
                ),
                Err(why) => say(Verdict::Fail, why),
            }
        }
    } else {
        println!(
            "skip the queries, the role values and the tokens: the CRM database cannot be reached"
        );
    }
    let accounts = match settings.single_token() {
        Some(t) => vec![(settings.wazzup.single_account_id.clone(), t)],
        None if !crm_ok => vec![],
        None => match source::list_accounts(&engine.source, &settings).await {
            Ok((accounts, _)) => accounts
                .into_iter()
                .map(|a| (a.account_id, a.token))
                .collect(),
            Err(e) => {
                say(Verdict::Fail, e.to_string());
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
            Ok(_) => say(Verdict::Ok, format!("account {id}: token accepted")),
            Err(e) => say(Verdict::Fail, format!("account {id}: {e}")),
        }
    }
    Ok(ok)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line per distinct role value: how many rows carry it and what it becomes (or why it is
/// refused); true when refused.
fn role_value_lines(
    values: &[(Option<String>, i64)],
    map: &std::collections::BTreeMap<String, crate::domain::Role>,
) -> Vec<(String, bool)> {
    values
        .iter()
        .map(|(value, rows)| {
            let shown = match value {
                Some(v) => format!("{:?}", crate::domain::clip(v)),
                None => "NULL".to_string(),
            };
            let raw = value.as_deref().unwrap_or("");
            let (outcome, refused) = match crate::domain::read_role(raw, map) {
                Ok(role) if map.contains_key(&raw.trim().to_lowercase()) => {
                    (format!("-> {} (source.role_map)", role.as_str()), false)
                }
                Ok(role) => (format!("-> {}", role.as_str()), false),
                Err(r) => (format!("refused: {}: {}", r.code, r.message), true),
            };
            (format!("{shown:<24} {rows:>8} rows  {outcome}"), refused)
        })
        .collect()
}

/// Prefix of the notifications the daemon sends itself to see that LISTEN works.
const PROBE_PREFIX: &str = "wazzup-sync:probe:";

/// A session for LISTEN: `source.listen_url` (a direct connection), or the CRM URL.
fn listen_pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let opts = source::connect_options(settings.listen_url())?;
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(settings.source.connect_timeout_secs))
        .connect_lazy_with(opts))
}

/// The advice for a LISTEN that hears nothing.
fn listen_advice(channel: &str) -> String {
    format!(
        "LISTEN on {channel} receives no notifications: the CRM connection most likely goes through a transaction pooler such as PgBouncer, which cannot carry LISTEN. Set WAZZUP_SYNC__SOURCE__LISTEN_URL to a direct connection to the CRM database; until then changes are picked up by the schedule only"
    )
}

/// Opens a LISTEN session and proves it hears before listening on the real channel: a
/// notification on a random channel of its own, sent through the CRM pool, must arrive within
/// a few seconds. Through a transaction pooler it never does (or lands on another client), and
/// the real channel is never listened on, so no stray registration is left on a pooled server.
async fn open_listener(
    engine: &Engine,
    pool: &sqlx::PgPool,
) -> Result<sqlx::postgres::PgListener, String> {
    let channel = &engine.settings.sync.listen_channel;
    let mut listener = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .map_err(|e| {
            format!(
                "Failed to open the LISTEN session: {}",
                crate::db::describe(&e)
            )
        })?;
    let probe = format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let probe_channel = probe.replace([':', '-'], "_");
    listener
        .listen(&probe_channel)
        .await
        .map_err(|e| format!("Failed to LISTEN: {}", crate::db::describe(&e)))?;
    if let Err(why) = notify(engine, &probe_channel, &probe).await {
        return Err(format!(
            "{} (the test notification failed: {why})",
            listen_advice(channel)
        ));
    }
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload() == probe => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    })
    .await;
    if heard != Ok(true) {
        return Err(listen_advice(channel));
    }
    let fail =
        |e: sqlx::Error| format!("Failed to LISTEN on {channel}: {}", crate::db::describe(&e));
    listener.unlisten(&probe_channel).await.map_err(fail)?;
    listener.listen(channel).await.map_err(fail)?;
    Ok(listener)
}

/// Sends one notification through the CRM pool.
async fn notify(engine: &Engine, channel: &str, payload: &str) -> Result<(), String> {
    let describe = |e: sqlx::Error| crate::db::describe(&e);
    let mut tx = source::begin_read_only(&engine.source)
        .await
        .map_err(describe)?;
    sqlx::query("SELECT pg_notify($1, $2)::text")
        .persistent(false)
        .bind(channel)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .map_err(describe)?;
    tx.commit().await.map_err(describe)
}

async fn check_listen(engine: &Engine) -> Result<(), String> {
    let pool = listen_pool(&engine.settings).map_err(|e| e.to_string())?;
    let result = open_listener(engine, &pool).await.map(|_| ());
    pool.close().await;
    result
}

/// `run`: serve health and metrics, wait for the state database and migrate, then a cycle at
/// start and on every tick of the schedule until SIGTERM/SIGINT. A database that is down, at
/// start or later, never stops the daemon: readiness fails and the log says why, at growing
/// intervals, until it recovers.
pub async fn run_daemon(settings: Settings) -> anyhow::Result<()> {
    warn_insecure(&settings);
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine = Engine::new(settings.clone(), stop_rx.clone())?;
    let health = crate::ops::Health::new(
        &settings,
        engine.source_target.clone(),
        engine.state_target.clone(),
    );
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
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        ready = wait_for_state(&engine) => ready,
        _ = &mut signal => {
            tracing::info!("wazzup-sync stopped before the state database was ready");
            return Ok(());
        }
    }
    health.migrated();
    engine.export_dead_letter_gauges().await;

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
        let listen = listen_pool(&settings)?;
        tokio::spawn(listen_forever(
            engine.clone(),
            listen,
            notify_tx,
            health.clone(),
        ));
    }
    let _ = tick_tx.try_send(());
    tracing::info!(
        schedule = %settings.sync.schedule,
        reconcile_schedule = %settings.sync.reconcile_schedule,
        listen_channel = %settings.sync.listen_channel,
        "wazzup-sync started"
    );

    let grace = Duration::from_secs(settings.sync.shutdown_grace_secs);
    let mut failures = FailureLog::default();
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
                failures.record(&engine, r).await;
            }
            _ = &mut signal => {
                tracing::info!(grace_secs = grace.as_secs(), "Stopping: finishing the requests in flight");
                let _ = stop_tx.send(true);
                match tokio::time::timeout(grace, &mut cycle).await {
                    Ok(r) => failures.record(&engine, r).await,
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
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);

/// Logs failed cycles at growing intervals: the 1st, 2nd, 4th, 8th … failure in a row, each
/// with its cause, and once when cycles succeed again.
#[derive(Default)]
struct FailureLog {
    in_a_row: u64,
}

impl FailureLog {
    async fn record(&mut self, engine: &Engine, r: Result<CycleReport, crate::sync::CycleError>) {
        match r {
            Ok(_) => {
                if self.in_a_row > 0 {
                    tracing::info!(failed_cycles = self.in_a_row, "Cycles run again");
                }
                self.in_a_row = 0;
            }
            Err(e) => {
                self.in_a_row += 1;
                if self.in_a_row.is_power_of_two() {
                    let why = engine.explain(&e).await;
                    tracing::error!(
                        error = %why,
                        failed_cycles = self.in_a_row,
                        "Cycle failed; the next scheduled cycle will try again"
                    );
                }
            }
        }
    }
}

/// How long notifications are gathered before the cycle they trigger starts.
const NOTIFY_DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps a LISTEN session open and passes every notification's payload (an account id) on.
/// A session that cannot be opened, or that hears nothing (a transaction pooler), is an error
/// said at growing intervals and fails readiness; a session lost and reopened triggers a cycle
/// for every account, since notifications may have been missed in between.
async fn listen_forever(
    engine: Engine,
    pool: sqlx::PgPool,
    tx: mpsc::UnboundedSender<String>,
    health: std::sync::Arc<crate::ops::Health>,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        let mut listener = match open_listener(&engine, &pool).await {
            Ok(l) => l,
            Err(why) => {
                health.listen_failed(Some(why.clone()));
                tracing::error!(error = %why, retry_in_secs = delay.as_secs(), "LISTEN is not working");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
                continue;
            }
        };
        health.listen_failed(None);
        delay = Duration::from_secs(1);
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload().starts_with(PROBE_PREFIX) => {}
                Ok(Some(n)) => {
                    if tx.send(n.payload().trim().to_string()).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    tracing::warn!(
                        "Lost the LISTEN session; reopening it and syncing every account in case a notification was missed"
                    );
                    if tx.send(String::new()).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "The LISTEN session failed; reopening it");
                    break;
                }
            }
        }
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
