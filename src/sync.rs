//! One cycle: read the CRM snapshot, then per account normalize, diff, push, record.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Settings;
use crate::domain::{
    Entity, NormalizeOptions, Normalized, SettingsDoc, UserPayload, ValidUser, normalize_account,
};
use crate::plan::{self, DeleteGuard, PlanRecord, SETTINGS_RECORD, SplitStep};
use crate::source::{self, SkipUnchanged, SourceAccount, SourceError};
use crate::state::{self, RemoteRejection};
use crate::wazzup::{Account, ApiError, RequestStats, WazzupClient, token_fingerprint};

/// How an account's cycle ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum AccountOutcome {
    /// Everything due was sent and recorded.
    Completed,
    /// Some work was left for the next cycle (transient failures, shutdown).
    Incomplete(String),
    /// Wazzup refused the token; the account waits for a new one or the cool-down.
    AuthFailed(String),
    /// Not attempted (token refused earlier and unchanged).
    Skipped(String),
    /// Another replica holds the account's lock.
    Locked,
    /// The cycle for this account broke (state database, for instance).
    Failed(String),
}

impl AccountOutcome {
    /// True when the account could be synced as far as this process is concerned.
    pub fn is_ok(&self) -> bool {
        matches!(self, AccountOutcome::Completed | AccountOutcome::Locked)
    }
    fn label(&self) -> &'static str {
        match self {
            AccountOutcome::Completed => "completed",
            AccountOutcome::Incomplete(_) => "incomplete",
            AccountOutcome::AuthFailed(_) => "auth_failed",
            AccountOutcome::Skipped(_) => "skipped",
            AccountOutcome::Locked => "locked",
            AccountOutcome::Failed(_) => "failed",
        }
    }
}

/// What happened to one account in one cycle.
#[derive(Debug, Clone, Serialize)]
pub struct AccountReport {
    pub account_id: String,
    #[serde(flatten)]
    pub outcome: AccountOutcome,
    pub users_read: usize,
    pub roles_read: usize,
    /// Skipped without reading its rows: they did not change since its last clean cycle.
    pub source_unchanged: bool,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub settings_pushed: bool,
    pub settings_changed: bool,
    pub rejected_locally: usize,
    pub rejected_remotely: usize,
    /// Left for the next cycle after transient failures.
    pub deferred: usize,
    /// Refused earlier, not yet due again.
    pub waiting: usize,
    pub deletes_blocked: Option<(usize, usize)>,
    pub phone_warnings: usize,
    /// Phones sent although libphonenumber does not know their range.
    pub phone_not_valid: usize,
    pub requests: u64,
    pub retries: u64,
    pub duration_ms: u64,
    /// Drift repair: users missing from Wazzup, users edited there, settings edited there.
    pub drift_missing: usize,
    pub drift_changed: usize,
    pub drift_settings: bool,
    /// Users in Wazzup that the CRM does not know, and how many of them were deleted.
    pub unknown_in_wazzup: usize,
    pub pruned: usize,
    /// In a dry run: what would be sent.
    pub would_create: usize,
    pub would_update: usize,
    pub would_delete: usize,
    /// In a detailed dry run: every record that would change.
    #[serde(skip)]
    pub records: Vec<PlanRecord>,
}

impl AccountReport {
    fn new(account_id: &str) -> Self {
        Self {
            account_id: account_id.to_string(),
            outcome: AccountOutcome::Completed,
            users_read: 0,
            roles_read: 0,
            source_unchanged: false,
            created: 0,
            updated: 0,
            deleted: 0,
            unchanged: 0,
            settings_pushed: false,
            settings_changed: false,
            rejected_locally: 0,
            rejected_remotely: 0,
            deferred: 0,
            waiting: 0,
            deletes_blocked: None,
            phone_warnings: 0,
            phone_not_valid: 0,
            requests: 0,
            retries: 0,
            duration_ms: 0,
            drift_missing: 0,
            drift_changed: 0,
            drift_settings: false,
            unknown_in_wazzup: 0,
            pruned: 0,
            would_create: 0,
            would_update: 0,
            would_delete: 0,
            records: Vec::new(),
        }
    }
}

/// A whole cycle.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub run_id: String,
    pub accounts: Vec<AccountReport>,
    pub bad_accounts: Vec<(String, String)>,
    pub orphan_users: usize,
    pub orphan_roles: usize,
    pub duration_ms: u64,
    /// In a detailed dry run: every record that would change, account by account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<PlanRecord>>,
}

impl CycleReport {
    /// True when every account completed (or is another replica's).
    pub fn all_ok(&self) -> bool {
        self.bad_accounts.is_empty() && self.accounts.iter().all(|a| a.outcome.is_ok())
    }
}

/// Options of one cycle.
#[derive(Debug, Clone, Default)]
pub struct CycleOptions {
    /// Compute and report, send nothing, write nothing.
    pub dry_run: bool,
    /// Accounts whose mass deletion is let through this cycle.
    pub allow_mass_delete: HashSet<String>,
    /// Sync only these accounts (all when None).
    pub only_accounts: Option<HashSet<String>>,
    /// Read each account's users and settings back from Wazzup and repair drift first.
    pub reconcile: bool,
    /// In a dry run: list every record that would change (`plan --detail`).
    pub detail: bool,
}

/// The cycle could not start: the CRM could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("The state database: {}", crate::db::describe(.0))]
    State(sqlx::Error),
}

impl From<sqlx::Error> for CycleError {
    fn from(e: sqlx::Error) -> Self {
        CycleError::State(e)
    }
}

/// The sync engine: pools, client and settings, wired once.
#[derive(Clone)]
pub struct Engine {
    pub settings: Arc<Settings>,
    pub source: PgPool,
    pub state: PgPool,
    /// Where each database is, to say why a connection failed.
    pub source_target: crate::db::Target,
    pub state_target: crate::db::Target,
    pub client: WazzupClient,
    normalize: Arc<NormalizeOptions>,
    shutdown: watch::Receiver<bool>,
}

/// Why pushing stopped early for an account.
enum Stop {
    Transient(String),
    Auth(u16),
    Shutdown,
}

impl Engine {
    pub fn new(settings: Settings, shutdown: watch::Receiver<bool>) -> anyhow::Result<Self> {
        let source = source::connect(&settings)?;
        let state = state::connect(&settings)?;
        let client = WazzupClient::new(&settings)?;
        let normalize = NormalizeOptions {
            region: settings.phone_region(),
            role_map: settings.role_map(),
        };
        Ok(Self {
            source_target: source::target(&settings)?,
            state_target: state::target(&settings)?,
            settings: Arc::new(settings),
            source,
            state,
            client,
            normalize: Arc::new(normalize),
            shutdown,
        })
    }

    /// Checks that both databases accept a connection; Err names each one that does not.
    pub async fn probe(&self) -> Result<(), crate::db::Unreachable> {
        crate::db::probe_all(&[&self.source_target, &self.state_target]).await
    }

    /// Says why a cycle failed: a connection failure names the database, its host and port,
    /// the cause and the variable to check; a failed query is named.
    pub async fn explain(&self, e: &CycleError) -> String {
        match e {
            CycleError::Source(s) => match s.sqlx() {
                Some(err) if crate::db::is_connection_error(err) => {
                    self.source_target.explain(err).await
                }
                _ => s.to_string(),
            },
            CycleError::State(err) => self.state_target.explain(err).await,
        }
    }

    /// What, besides the rows, decides what a row means: the code's version and the settings
    /// that change normalization or deletion.
    fn fingerprint_salt(&self) -> String {
        crate::domain::content_hash(
            format!(
                "{}|{:?}|{:?}|{}",
                env!("CARGO_PKG_VERSION"),
                self.normalize.region,
                self.normalize.role_map,
                self.settings.sync.delete_missing
            )
            .as_bytes(),
        )
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The single account of single-account mode, when the token is set.
    fn single_account(&self) -> Option<SourceAccount> {
        self.settings.single_token().map(|token| SourceAccount {
            account_id: self.settings.wazzup.single_account_id.clone(),
            token,
            push_input_output_message_events_for_managers: self
                .settings
                .wazzup
                .push_input_output_message_events_for_managers,
        })
    }

    /// Runs one cycle over every account.
    pub async fn run_cycle(&self, opts: &CycleOptions) -> Result<CycleReport, CycleError> {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let span = tracing::info_span!("cycle", run_id = %run_id, dry_run = opts.dry_run);
        self.run_cycle_inner(opts, run_id).instrument(span).await
    }

    async fn run_cycle_inner(
        &self,
        opts: &CycleOptions,
        run_id: String,
    ) -> Result<CycleReport, CycleError> {
        let started = Instant::now();
        let mirror_exists = if opts.dry_run {
            state::is_migrated(&self.state, &self.settings.state.schema).await?
        } else {
            true
        };
        // Accounts arrive one at a time while the CRM is read; a few wait ahead.
        // A plain scheduled cycle skips accounts whose rows did not change since a clean cycle.
        let skip = SkipUnchanged {
            enabled: !opts.dry_run && !opts.reconcile && opts.only_accounts.is_none(),
            known: if !opts.dry_run && !opts.reconcile && opts.only_accounts.is_none() {
                state::load_source_fingerprints(&self.state).await?
            } else {
                Default::default()
            },
            salt: self.fingerprint_salt(),
            to_sync: Arc::new(AtomicUsize::new(0)),
        };
        let progress = CycleProgress::start(skip.to_sync.clone());
        let (rows, reader) = source::stream_snapshot(
            self.source.clone(),
            self.settings.clone(),
            self.single_account(),
            opts.only_accounts.clone(),
            skip,
            self.settings.sync.concurrency,
        );
        let jobs = futures::stream::unfold(rows, |mut rx| async move {
            rx.recv()
                .await
                .map(|r| ((r.account, r.users, r.roles, r.fingerprint), rx))
        });
        let reports: Vec<AccountReport> = jobs
            .map(|(account, users, roles, fingerprint)| {
                let progress = &progress;
                let span = tracing::info_span!("account", account_id = %account.account_id);
                async move {
                    let started = Instant::now();
                    let stats = RequestStats::default();
                    let mut report = AccountReport::new(&account.account_id);
                    report.users_read = users.len();
                    report.roles_read = roles.len();
                    // Phones read in earlier cycles are not parsed again.
                    let cache = if mirror_exists {
                        state::load_phone_cache(&self.state, &account.account_id)
                            .await
                            .unwrap_or_default()
                    } else {
                        Default::default()
                    };
                    let norm = normalize_account(&users, &roles, &self.normalize, &cache);
                    drop(cache);
                    drop((users, roles));
                    let outcome = if opts.dry_run {
                        self.plan_account(&account, &norm, mirror_exists, opts, &mut report)
                            .await
                    } else {
                        self.sync_account_locked(
                            &account,
                            &fingerprint,
                            &norm,
                            opts,
                            &stats,
                            &mut report,
                        )
                        .await
                    };
                    report.outcome = outcome.unwrap_or_else(|e| {
                        AccountOutcome::Failed(format!(
                            "state database: {}",
                            crate::db::describe(&e)
                        ))
                    });
                    report.requests = stats.requests();
                    report.retries = stats.retries();
                    report.duration_ms = started.elapsed().as_millis() as u64;
                    log_account(&report, opts.dry_run);
                    progress.account_done(report.created + report.updated);
                    report
                }
                .instrument(span)
            })
            .buffer_unordered(self.settings.sync.concurrency)
            .collect()
            .await;
        progress.stop();
        let summary = reader.await.map_err(|e| {
            CycleError::Source(SourceError::Database(sqlx::Error::Protocol(format!(
                "the CRM reader stopped: {e}"
            ))))
        })??;
        for (id, why) in &summary.bad_accounts {
            tracing::error!(account_id = %id, reason = %why, "Skipping an account row of the accounts query");
        }
        if summary.orphan_users + summary.orphan_roles > 0 {
            tracing::warn!(
                users = summary.orphan_users,
                roles = summary.orphan_roles,
                "Skipped rows whose account has no row in the accounts query"
            );
        }
        let mut reports = reports;
        let unchanged: Vec<String> = summary.unchanged.iter().map(|(id, _)| id.clone()).collect();
        state::touch_unchanged(&self.state, &unchanged).await?;
        for (id, users) in &summary.unchanged {
            let mut r = AccountReport::new(id);
            r.users_read = *users;
            r.unchanged = *users;
            r.source_unchanged = true;
            log_account(&r, false);
            reports.push(r);
        }
        reports.sort_by(|a, b| a.account_id.cmp(&b.account_id));
        let records = opts.detail.then(|| {
            reports
                .iter_mut()
                .flat_map(|r| std::mem::take(&mut r.records))
                .collect()
        });
        let report = CycleReport {
            run_id,
            accounts: reports,
            bad_accounts: summary.bad_accounts,
            orphan_users: summary.orphan_users,
            orphan_roles: summary.orphan_roles,
            duration_ms: started.elapsed().as_millis() as u64,
            records,
        };
        log_cycle(&report, opts.dry_run, opts.only_accounts.is_some());
        if !opts.dry_run {
            self.export_dead_letter_gauges().await;
        }
        Ok(report)
    }

    /// Sets `wazzup_sync_open_dead_letters` for every account the state knows, from the table:
    /// accounts skipped as unchanged, and those whose last dead letter closed, are exported too.
    pub async fn export_dead_letter_gauges(&self) {
        match state::open_dead_letter_counts(&self.state).await {
            Ok(counts) => {
                for (account_id, n) in counts {
                    metrics::gauge!("wazzup_sync_open_dead_letters", "account_id" => account_id)
                        .set(n as f64);
                }
            }
            Err(e) => tracing::warn!(
                error = %crate::db::describe(&e),
                "Could not count the open dead letters for the metrics"
            ),
        }
    }

    /// Dry run for one account: reads the mirror if it exists, writes nothing, sends nothing.
    async fn plan_account(
        &self,
        account: &SourceAccount,
        norm: &Normalized,
        mirror_exists: bool,
        opts: &CycleOptions,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, sqlx::Error> {
        let (mirror, pending, open, acct_state) = if mirror_exists {
            (
                state::load_mirror(&self.state, &account.account_id).await?,
                state::load_pending(&self.state, &account.account_id).await?,
                state::open_dead_letters(&self.state, &account.account_id).await?,
                state::load_account(
                    &self.state,
                    &account.account_id,
                    opts.detail || !norm.rejected_user_ids.is_empty(),
                )
                .await?,
            )
        } else {
            Default::default()
        };
        let mirrored = if mirror_exists && opts.detail {
            state::load_mirrored_users(&self.state, &account.account_id).await?
        } else {
            Default::default()
        };
        let now = Utc::now();
        let p = plan::plan_users(
            norm,
            &mirror,
            &pending,
            &open,
            now,
            self.settings.sync.delete_missing,
            self.guard(account, opts),
        );
        report.rejected_locally = norm.rejected.len();
        report.phone_warnings = norm.phone_warnings;
        report.unchanged = p.unchanged;
        report.waiting = p.waiting + p.deletes_waiting;
        report.would_create = p.creates.len();
        report.would_update = p.updates.len();
        report.would_delete = p.deletes.len();
        report.deletes_blocked = p.deletes_blocked;
        // Assume every due push lands, to show the settings the cycle would send.
        let mut in_wazzup: HashSet<String> = mirror.keys().cloned().collect();
        in_wazzup.extend(p.creates.iter().map(|u| u.payload.id.clone()));
        for id in &p.deletes {
            in_wazzup.remove(id);
        }
        let doc = plan::settings_doc(
            norm,
            &in_wazzup,
            acct_state.settings_doc.as_ref(),
            account.push_input_output_message_events_for_managers,
        );
        report.settings_changed = acct_state.settings_hash.as_deref() != Some(doc.hash().as_str());
        if opts.detail {
            let held: Vec<String> = if p.deletes_blocked.is_some() {
                let present: HashSet<&str> =
                    norm.users.iter().map(|u| u.payload.id.as_str()).collect();
                let mut held: Vec<String> = mirror
                    .keys()
                    .filter(|id| {
                        !present.contains(id.as_str()) && !norm.rejected_user_ids.contains(*id)
                    })
                    .cloned()
                    .collect();
                held.sort();
                held
            } else {
                Vec::new()
            };
            report.records = plan::detail(&plan::DetailInput {
                account_id: &account.account_id,
                norm,
                plan: &p,
                mirrored: &mirrored,
                previous_doc: acct_state.settings_doc.as_ref(),
                next_doc: &doc,
                held_deletes: &held,
            });
        }
        Ok(AccountOutcome::Completed)
    }

    fn guard(&self, account: &SourceAccount, opts: &CycleOptions) -> DeleteGuard {
        DeleteGuard {
            max_percent: self.settings.sync.mass_delete_max_percent,
            min: self.settings.sync.mass_delete_min,
            allowed: self.settings.sync.allow_mass_delete
                || opts.allow_mass_delete.contains(&account.account_id)
                || opts.allow_mass_delete.contains("*"),
        }
    }

    /// Takes the account's advisory lock for the length of its cycle.
    async fn sync_account_locked(
        &self,
        account: &SourceAccount,
        source_fingerprint: &str,
        norm: &Normalized,
        opts: &CycleOptions,
        stats: &RequestStats,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, sqlx::Error> {
        let schema = &self.settings.state.schema;
        let mut lock_conn = self.state.acquire().await?;
        if !state::try_lock_account(&mut lock_conn, schema, &account.account_id).await? {
            return Ok(AccountOutcome::Locked);
        }
        let result = self
            .sync_account(account, source_fingerprint, norm, opts, stats, report)
            .await;
        if state::unlock_account(&mut lock_conn, schema, &account.account_id)
            .await
            .is_err()
        {
            // Closing the session releases the lock for sure.
            let _ = sqlx::Connection::close(lock_conn.detach()).await;
        }
        result
    }

    async fn sync_account(
        &self,
        account: &SourceAccount,
        source_fingerprint: &str,
        norm: &Normalized,
        opts: &CycleOptions,
        stats: &RequestStats,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, sqlx::Error> {
        let id = account.account_id.as_str();
        let fingerprint = token_fingerprint(&account.token);
        // The last document is needed to keep refused users' roles, and to compare in a reconcile.
        let with_doc = opts.reconcile || !norm.rejected_user_ids.is_empty();
        let mut acct_state = state::load_account(&self.state, id, with_doc).await?;
        if let Some(failed_at) = acct_state.auth_failed_at {
            let cooldown =
                chrono::Duration::seconds(self.settings.wazzup.auth_cooldown_secs as i64);
            if acct_state.token_fingerprint.as_deref() == Some(fingerprint.as_str())
                && Utc::now() < failed_at + cooldown
            {
                return Ok(AccountOutcome::Skipped(
                    "Wazzup refused this token earlier; waiting for a new token or the cool-down"
                        .into(),
                ));
            }
        }

        state::clear_source_fingerprint(&self.state, id).await?;

        // Local rejections: written when new or changed, never sent.
        let open = state::open_dead_letters(&self.state, id).await?;
        report.rejected_locally = norm.rejected.len();
        report.phone_warnings = norm.phone_warnings;
        report.phone_not_valid = norm.phone_not_valid;
        let open_invalid: HashMap<(&str, &str), Option<&str>> = open
            .iter()
            .filter(|d| d.kind == "invalid")
            .map(|d| {
                (
                    (d.entity.as_str(), d.record_id.as_str()),
                    d.payload_hash.as_deref(),
                )
            })
            .collect();
        let mut seen = HashSet::new();
        let fresh: Vec<_> = norm
            .rejected
            .iter()
            // One row per record even when a record is refused for two reasons.
            .filter(|r| seen.insert((r.entity.as_str(), r.record_id.as_str())))
            .filter(|r| {
                open_invalid.get(&(r.entity.as_str(), r.record_id.as_str()))
                    != Some(&Some(state::invalid_hash(r).as_str()))
            })
            .collect();
        if !fresh.is_empty() {
            for r in &fresh {
                tracing::warn!(
                    entity = r.entity.as_str(),
                    record_id = %r.record_id,
                    code = r.code,
                    reason = %r.message,
                    "Refused a CRM record; it is not sent to Wazzup"
                );
            }
            state::record_invalid(&self.state, id, &fresh).await?;
        }

        let acct = Account {
            account_id: id,
            token: &account.token,
            stats,
        };
        if opts.reconcile {
            match self.repair_drift(&acct, norm, &acct_state, report).await? {
                Ok(settings_drifted) => {
                    if settings_drifted {
                        acct_state.settings_hash = None;
                    }
                }
                Err(ApiError::Unauthorized { status }) => {
                    state::mark_auth_failed(&self.state, id, &fingerprint, status).await?;
                    return Ok(AccountOutcome::AuthFailed(format!(
                        "Wazzup refused the token (HTTP {status}) while reading it back"
                    )));
                }
                Err(e) => {
                    let why = format!("could not read the account back from Wazzup: {e}");
                    state::finish_account(&self.state, id, &fingerprint, false, Some(&why), None)
                        .await?;
                    return Ok(AccountOutcome::Incomplete(why));
                }
            }
        }

        let mut mirror = state::load_mirror(&self.state, id).await?;
        let pending = state::load_pending(&self.state, id).await?;
        let now = Utc::now();
        let p = plan::plan_users(
            norm,
            &mirror,
            &pending,
            &open,
            now,
            self.settings.sync.delete_missing,
            self.guard(account, opts),
        );
        report.unchanged = p.unchanged;
        report.waiting = p.waiting + p.deletes_waiting;
        report.deletes_blocked = p.deletes_blocked;
        if let Some((would, mirrored)) = p.deletes_blocked {
            tracing::error!(
                would_delete = would,
                mirrored,
                max_percent = self.settings.sync.mass_delete_max_percent,
                "Held back a mass deletion: the CRM no longer returns many synced users. Check the users query; let it through with `wazzup-sync sync --allow-mass-delete ACCOUNT`"
            );
        }

        let mut stop: Option<Stop> = None;

        // 1. Users: updates first, so that reaching the user limit only holds back creates.
        let mut due: Vec<&ValidUser> = p.updates.clone();
        due.extend(p.creates.iter().copied());
        for u in &due {
            if let Some(phone) = &u.unreadable_phone {
                tracing::warn!(
                    entity = "user",
                    record_id = %u.payload.id,
                    code = "unreadable_phone",
                    reason = "The phone could not be read as a phone number; the user is sent without one",
                    phone = %phone,
                    "Sending a user without its phone"
                );
            }
        }
        if !due.is_empty() {
            let in_mirror: HashSet<&str> =
                p.updates.iter().map(|u| u.payload.id.as_str()).collect();
            let outcome = self.push_users(&acct, &due, &in_mirror, report).await?;
            for (uid, hash) in &outcome.acked {
                mirror.insert(uid.clone(), hash.clone());
            }
            report.updated = outcome
                .acked
                .iter()
                .filter(|(u, _)| in_mirror.contains(u.as_str()))
                .count();
            report.created = outcome.acked.len() - report.updated;
            report.deferred += due.len() - outcome.acked.len() - outcome.rejected;
            stop = outcome.stop;
        }

        // Close user dead letters whose record is now in Wazzup as the CRM says, or gone.
        let crm_ids: HashSet<&str> = norm
            .users
            .iter()
            .map(|u| u.payload.id.as_str())
            .chain(norm.rejected_user_ids.iter().map(String::as_str))
            .collect();
        let valid: HashMap<&str, &str> = norm
            .users
            .iter()
            .map(|u| (u.payload.id.as_str(), u.hash.as_str()))
            .collect();
        let rejected_now: HashSet<(&str, &str)> = norm
            .rejected
            .iter()
            .map(|r| (r.entity.as_str(), r.record_id.as_str()))
            .collect();
        let mut synced_ids = Vec::new();
        let mut gone_ids = Vec::new();
        let mut fixed_roles = Vec::new();
        for d in open.iter().filter(|d| d.is_open()) {
            if rejected_now.contains(&(d.entity.as_str(), d.record_id.as_str())) {
                continue;
            }
            match d.entity.as_str() {
                "user" => {
                    if let Some(h) = valid.get(d.record_id.as_str()) {
                        if mirror.get(&d.record_id).map(String::as_str) == Some(*h) {
                            synced_ids.push(d.record_id.clone());
                        }
                    } else if !crm_ids.contains(d.record_id.as_str()) {
                        gone_ids.push(d.record_id.clone());
                    }
                }
                "settings" if d.record_id != SETTINGS_RECORD && d.kind == "invalid" => {
                    fixed_roles.push(d.record_id.clone());
                }
                _ => {}
            }
        }
        state::resolve(&self.state, id, Entity::User, &synced_ids, "synced").await?;
        state::resolve(&self.state, id, Entity::User, &gone_ids, "gone").await?;
        state::resolve(&self.state, id, Entity::Role, &fixed_roles, "fixed").await?;

        // 2. Settings: the whole document, when it changed.
        let deletes: Vec<String> = if stop.is_none() {
            p.deletes.clone()
        } else {
            vec![]
        };
        let mut in_wazzup: HashSet<String> = mirror.keys().cloned().collect();
        for d in &deletes {
            in_wazzup.remove(d);
        }
        let doc = plan::settings_doc(
            norm,
            &in_wazzup,
            acct_state.settings_doc.as_ref(),
            account.push_input_output_message_events_for_managers,
        );
        let hash = doc.hash();
        let settings_due = acct_state.settings_hash.as_deref() != Some(hash.as_str());
        report.settings_changed = settings_due;
        if settings_due && stop.is_none() {
            if plan::settings_waiting(&open, &hash, now) {
                report.waiting += 1;
            } else if self.stopping() {
                stop = Some(Stop::Shutdown);
            } else {
                match self.client.patch_settings(&acct, &doc).await {
                    Ok(()) => {
                        state::save_settings(&self.state, id, &doc, &hash).await?;
                        report.settings_pushed = true;
                    }
                    Err(e) => {
                        stop = self.settings_failed(id, &doc, &hash, e, report).await?;
                    }
                }
            }
        }
        if !settings_due {
            state::resolve(
                &self.state,
                id,
                Entity::Settings,
                &[SETTINGS_RECORD.to_string()],
                "synced",
            )
            .await?;
        }
        if report.settings_pushed {
            state::resolve(
                &self.state,
                id,
                Entity::Settings,
                &[SETTINGS_RECORD.to_string()],
                "synced",
            )
            .await?;
        }

        // 3. Deletes, after the settings stopped referencing them.
        if stop.is_none() && !deletes.is_empty() {
            let (deleted, s) = self.delete_users(&acct, &deletes, &mirror, report).await?;
            report.deleted = deleted;
            stop = s;
        }
        // A delete dead letter is moot once its user is back in the CRM.
        let returned: Vec<String> = open
            .iter()
            .filter(|d| {
                d.is_open() && d.entity == "delete" && crm_ids.contains(d.record_id.as_str())
            })
            .map(|d| d.record_id.clone())
            .collect();
        state::resolve(&self.state, id, Entity::Delete, &returned, "returned").await?;

        let outcome = match stop {
            None => AccountOutcome::Completed,
            Some(Stop::Shutdown) => AccountOutcome::Incomplete("the daemon is stopping".into()),
            Some(Stop::Transient(why)) => AccountOutcome::Incomplete(why),
            Some(Stop::Auth(status)) => {
                state::mark_auth_failed(&self.state, id, &fingerprint, status).await?;
                return Ok(AccountOutcome::AuthFailed(format!(
                    "Wazzup refused the token (HTTP {status}); the account is skipped until its token changes"
                )));
            }
        };
        let error = match &outcome {
            AccountOutcome::Incomplete(why) => Some(why.as_str()),
            _ => None,
        };
        let (_, open_rejected) = state::count_open_dead_letters(&self.state, id).await?;
        // Clean: nothing left to send or retry, so unchanged rows next time mean nothing to do.
        let clean = outcome == AccountOutcome::Completed
            && report.deferred == 0
            && report.waiting == 0
            && report.deletes_blocked.is_none()
            && report.rejected_remotely == 0
            && open_rejected == 0;
        state::finish_account(
            &self.state,
            id,
            &fingerprint,
            outcome == AccountOutcome::Completed,
            error,
            clean
                .then_some(source_fingerprint)
                .filter(|f| !f.is_empty()),
        )
        .await?;
        Ok(outcome)
    }

    /// Reads the account back from Wazzup and makes the mirror tell the truth: users missing
    /// or edited there are forgotten (so the cycle pushes them again), unknown users are
    /// reported (and deleted when `prune_unknown` is on). Ok(true) when the settings drifted.
    async fn repair_drift(
        &self,
        acct: &Account<'_>,
        norm: &Normalized,
        acct_state: &state::AccountState,
        report: &mut AccountReport,
    ) -> Result<Result<bool, ApiError>, sqlx::Error> {
        let id = acct.account_id;
        let remote = match self.client.get_all_users(acct).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let remote_settings = match self.client.get_settings(acct).await {
            Ok(s) => s,
            Err(e) => return Ok(Err(e)),
        };
        let mirror = state::load_mirror(&self.state, id).await?;
        let remote: HashMap<&str, &UserPayload> =
            remote.iter().map(|u| (u.id.as_str(), u)).collect();
        let desired: HashMap<&str, &ValidUser> = norm
            .users
            .iter()
            .map(|u| (u.payload.id.as_str(), u))
            .collect();
        let mut forget = Vec::new();
        for uid in mirror.keys() {
            match (remote.get(uid.as_str()), desired.get(uid.as_str())) {
                (None, _) => {
                    report.drift_missing += 1;
                    forget.push(uid.clone());
                }
                (Some(r), Some(d)) if **r != d.payload && mirror[uid] == d.hash => {
                    report.drift_changed += 1;
                    forget.push(uid.clone());
                }
                _ => {}
            }
        }
        state::delete_mirror(&self.state, id, &forget).await?;
        let mut unknown: Vec<String> = remote
            .keys()
            .filter(|u| {
                !mirror.contains_key(**u)
                    && !desired.contains_key(**u)
                    && !norm.rejected_user_ids.contains(**u)
            })
            .map(|u| u.to_string())
            .collect();
        unknown.sort();
        report.unknown_in_wazzup = unknown.len();
        if !unknown.is_empty() {
            let sample: Vec<&str> = unknown.iter().take(10).map(String::as_str).collect();
            tracing::warn!(
                count = unknown.len(),
                sample = %sample.join(", "),
                prune = self.settings.sync.prune_unknown,
                "Wazzup holds users that the CRM does not know"
            );
            let guard = self.settings.sync.mass_delete_max_percent as usize;
            let too_many = unknown.len() > self.settings.sync.mass_delete_min
                && unknown.len() * 100 > remote.len() * guard
                && !self.settings.sync.allow_mass_delete;
            if self.settings.sync.prune_unknown && too_many {
                tracing::error!(
                    unknown = unknown.len(),
                    in_wazzup = remote.len(),
                    "Held back pruning: most of Wazzup's users are unknown to the CRM. Check the users query"
                );
            } else if self.settings.sync.prune_unknown {
                for chunk in unknown.chunks(self.settings.sync.batch_size) {
                    match self.client.delete_users(acct, chunk).await {
                        Ok(()) => report.pruned += chunk.len(),
                        Err(e) => return Ok(Err(e)),
                    }
                }
            }
        }
        let mut remote_settings = remote_settings;
        remote_settings.canonicalize();
        let drifted = match &acct_state.settings_doc {
            Some(doc) => {
                let mut doc = doc.clone();
                doc.canonicalize();
                doc != remote_settings
            }
            None => false,
        };
        report.drift_settings = drifted;
        for (kind, n) in [
            ("missing", report.drift_missing),
            ("changed", report.drift_changed),
            ("settings", drifted as usize),
            ("pruned", report.pruned),
        ] {
            metrics::counter!("wazzup_sync_drift_repaired_total", "kind" => kind)
                .increment(n as u64);
        }
        if report.drift_missing + report.drift_changed + drifted as usize > 0 {
            tracing::warn!(
                missing = report.drift_missing,
                changed = report.drift_changed,
                settings = drifted,
                "Wazzup drifted from what was synced; pushing it again"
            );
        }
        Ok(Ok(drifted))
    }

    async fn settings_failed(
        &self,
        id: &str,
        doc: &SettingsDoc,
        hash: &str,
        e: ApiError,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, sqlx::Error> {
        Ok(match e {
            ApiError::Unauthorized { status } => Some(Stop::Auth(status)),
            ApiError::Transient { reason, .. } => {
                Some(Stop::Transient(format!("settings not pushed: {reason}")))
            }
            ApiError::Rejected {
                status,
                code,
                description,
                ..
            } => {
                tracing::error!(code = %code, description = %crate::domain::mask_digits(&description), http_status = status,
                    "Wazzup refused the account's settings document");
                report.rejected_remotely += 1;
                state::record_rejected(
                    &self.state,
                    id,
                    &[RemoteRejection {
                        entity: Entity::Settings,
                        record_id: SETTINGS_RECORD.into(),
                        code,
                        message: description,
                        http_status: Some(status),
                        payload: serde_json::to_value(doc).unwrap_or_default(),
                        payload_hash: hash.to_string(),
                    }],
                )
                .await?;
                None
            }
        })
    }

    /// Sends users in batches; a refused batch is split until the refused records stand alone.
    async fn push_users(
        &self,
        acct: &Account<'_>,
        due: &[&ValidUser],
        in_mirror: &HashSet<&str>,
        report: &mut AccountReport,
    ) -> Result<PushOutcome, sqlx::Error> {
        let id = acct.account_id;
        let batch_size = self.settings.sync.batch_size;
        let mut out = PushOutcome::default();
        let mut stack: Vec<Vec<&ValidUser>> =
            due.chunks(batch_size).rev().map(|c| c.to_vec()).collect();
        let mut limit_error: Option<(u16, String, String)> = None;
        let mut progress = Progress::new(id, due.len());
        // Phones refused as taken may be freed by other users of the same cycle (two users
        // swapping phones): those get one more try once the rest has landed.
        let mut held: Vec<RemoteRejection> = Vec::new();
        let mut second_round = false;
        loop {
            while let Some(mut batch) = stack.pop() {
                if let Some((status, code, description)) = &limit_error {
                    // The account is full: creates wait, updates still go.
                    let (updates, creates): (Vec<_>, Vec<_>) = batch
                        .into_iter()
                        .partition(|u| in_mirror.contains(u.payload.id.as_str()));
                    let dead: Vec<RemoteRejection> = creates
                        .iter()
                        .map(|u| user_rejection(u, *status, code, description))
                        .collect();
                    out.rejected += dead.len();
                    report.rejected_remotely += dead.len();
                    state::record_rejected(&self.state, id, &dead).await?;
                    batch = updates;
                    if batch.is_empty() {
                        continue;
                    }
                }
                if self.stopping() {
                    out.stop = Some(Stop::Shutdown);
                    break;
                }
                let payloads: Vec<UserPayload> = batch.iter().map(|u| u.payload.clone()).collect();
                let sending: Vec<String> = batch
                    .iter()
                    .filter(|u| !in_mirror.contains(u.payload.id.as_str()))
                    .map(|u| u.payload.id.clone())
                    .collect();
                state::mark_pending(&self.state, id, &sending).await?;
                match self.client.post_users(acct, &payloads).await {
                    Ok(processed) => {
                        let landed = match processed {
                            Some(n) if (n as usize) < batch.len() => {
                                tracing::warn!(
                                    sent = batch.len(),
                                    processed = n,
                                    "Wazzup processed fewer users than sent; checking which landed"
                                );
                                match self.confirm_landed(acct, &batch).await {
                                    Ok(l) => l,
                                    Err(ApiError::Unauthorized { status }) => {
                                        out.stop = Some(Stop::Auth(status));
                                        break;
                                    }
                                    Err(e) => {
                                        out.stop = Some(Stop::Transient(format!(
                                            "could not confirm a partial batch: {e}"
                                        )));
                                        break;
                                    }
                                }
                            }
                            _ => batch.clone(),
                        };
                        let ids: Vec<String> =
                            landed.iter().map(|u| u.payload.id.clone()).collect();
                        let hashes: Vec<String> = landed.iter().map(|u| u.hash.clone()).collect();
                        state::upsert_mirror(&self.state, id, &landed).await?;
                        state::resolve(&self.state, id, Entity::User, &ids, "synced").await?;
                        progress.add(landed.len());
                        out.acked.extend(ids.into_iter().zip(hashes));
                    }
                    Err(ApiError::Unauthorized { status }) => {
                        out.stop = Some(Stop::Auth(status));
                        break;
                    }
                    Err(ApiError::Transient { reason, .. }) => {
                        out.stop = Some(Stop::Transient(format!("users not pushed: {reason}")));
                        break;
                    }
                    Err(e @ ApiError::Rejected { .. }) => {
                        let ApiError::Rejected {
                            status,
                            ref code,
                            ref description,
                            ref indexes,
                        } = e
                        else {
                            unreachable!()
                        };
                        if e.code_is("USER_LIMIT_EXCEEDED")
                            && limit_error.is_none()
                            && batch.len() == 1
                        {
                            tracing::error!(code = %code, "The account reached Wazzup's user limit; no more users are created this cycle");
                            limit_error = Some((status, code.clone(), description.clone()));
                        }
                        // The limit is about the account, not the records: never single out by index.
                        let indexes: &[usize] = if e.code_is("USER_LIMIT_EXCEEDED") {
                            &[]
                        } else {
                            indexes
                        };
                        match plan::split_step(batch.len(), indexes) {
                            SplitStep::Alone
                                if !second_round && e.code_is("USER_ALREADY_EXISTS") =>
                            {
                                held.push(user_rejection(batch[0], status, code, description));
                            }
                            SplitStep::Alone => {
                                let r = user_rejection(batch[0], status, code, description);
                                tracing::warn!(record_id = %r.record_id, code = %code, description = %crate::domain::mask_digits(description),
                                http_status = status, "Wazzup refused a user");
                                out.rejected += 1;
                                report.rejected_remotely += 1;
                                state::record_rejected(&self.state, id, &[r]).await?;
                            }
                            SplitStep::Named(idx) => {
                                let named: HashSet<usize> = idx.into_iter().collect();
                                let mut rest = Vec::new();
                                let mut dead = Vec::new();
                                for (i, u) in batch.into_iter().enumerate() {
                                    if named.contains(&i) {
                                        dead.push(user_rejection(u, status, code, description));
                                    } else {
                                        rest.push(u);
                                    }
                                }
                                for r in &dead {
                                    tracing::warn!(record_id = %r.record_id, code = %code, description = %crate::domain::mask_digits(description),
                                    http_status = status, "Wazzup refused a user");
                                }
                                out.rejected += dead.len();
                                report.rejected_remotely += dead.len();
                                state::record_rejected(&self.state, id, &dead).await?;
                                if !rest.is_empty() {
                                    stack.push(rest);
                                }
                            }
                            SplitStep::Halve(mid) => {
                                let second = batch.split_off(mid);
                                stack.push(second);
                                stack.push(batch);
                            }
                        }
                    }
                }
            }
            if held.is_empty() {
                break;
            }
            if !second_round && out.stop.is_none() && !out.acked.is_empty() {
                second_round = true;
                let again: HashSet<String> = held.drain(..).map(|r| r.record_id).collect();
                let retry: Vec<&ValidUser> = due
                    .iter()
                    .copied()
                    .filter(|u| again.contains(&u.payload.id))
                    .collect();
                stack = retry.chunks(batch_size).rev().map(|c| c.to_vec()).collect();
                continue;
            }
            for r in &held {
                tracing::warn!(record_id = %r.record_id, code = %r.code,
                description = %crate::domain::mask_digits(&r.message), "Wazzup refused a user");
            }
            out.rejected += held.len();
            report.rejected_remotely += held.len();
            state::record_rejected(&self.state, id, &held).await?;
            break;
        }
        Ok(out)
    }

    /// After a short `processed`, reads the account's users to see which of the batch landed.
    async fn confirm_landed<'u>(
        &self,
        acct: &Account<'_>,
        batch: &[&'u ValidUser],
    ) -> Result<Vec<&'u ValidUser>, ApiError> {
        let remote: HashMap<String, UserPayload> = self
            .client
            .get_all_users(acct)
            .await?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        Ok(batch
            .iter()
            .copied()
            .filter(|u| match remote.get(&u.payload.id) {
                // Wazzup drops a phone it finds malformed; the rest must match.
                Some(r) => {
                    r.name == u.payload.name && (r.phone == u.payload.phone || r.phone.is_none())
                }
                None => false,
            })
            .collect())
    }

    async fn delete_users(
        &self,
        acct: &Account<'_>,
        ids: &[String],
        mirror: &HashMap<String, String>,
        report: &mut AccountReport,
    ) -> Result<(usize, Option<Stop>), sqlx::Error> {
        let id = acct.account_id;
        let mut stack: Vec<Vec<String>> = ids
            .chunks(self.settings.sync.batch_size)
            .rev()
            .map(|c| c.to_vec())
            .collect();
        let mut deleted = 0;
        while let Some(mut batch) = stack.pop() {
            if self.stopping() {
                return Ok((deleted, Some(Stop::Shutdown)));
            }
            match self.client.delete_users(acct, &batch).await {
                Ok(()) => {
                    state::delete_mirror(&self.state, id, &batch).await?;
                    state::resolve(&self.state, id, Entity::Delete, &batch, "synced").await?;
                    state::resolve(&self.state, id, Entity::User, &batch, "gone").await?;
                    deleted += batch.len();
                }
                Err(ApiError::Unauthorized { status }) => {
                    return Ok((deleted, Some(Stop::Auth(status))));
                }
                Err(ApiError::Transient { reason, .. }) => {
                    report.deferred += batch.len() + stack.iter().map(Vec::len).sum::<usize>();
                    return Ok((
                        deleted,
                        Some(Stop::Transient(format!("deletes not sent: {reason}"))),
                    ));
                }
                Err(ApiError::Rejected {
                    status,
                    code,
                    description,
                    indexes,
                }) => match plan::split_step(batch.len(), &indexes) {
                    SplitStep::Alone | SplitStep::Named(_)
                        if batch.len() == 1 && !mirror.contains_key(&batch[0]) =>
                    {
                        // Sent once but never recorded, and Wazzup does not want to delete it:
                        // it most likely never landed. Forget it.
                        state::delete_mirror(&self.state, id, &batch).await?;
                    }
                    SplitStep::Alone | SplitStep::Named(_) if batch.len() == 1 => {
                        report.rejected_remotely += 1;
                        tracing::warn!(record_id = %batch[0], code = %code, "Wazzup refused to delete a user");
                        state::record_rejected(
                            &self.state,
                            id,
                            &[RemoteRejection {
                                entity: Entity::Delete,
                                record_id: batch[0].clone(),
                                code,
                                message: description,
                                http_status: Some(status),
                                payload: serde_json::json!({ "user_ids": [batch[0]] }),
                                payload_hash: crate::domain::content_hash(batch[0].as_bytes()),
                            }],
                        )
                        .await?;
                    }
                    _ => {
                        let second = batch.split_off(batch.len() / 2);
                        stack.push(second);
                        stack.push(batch);
                    }
                },
            }
        }
        Ok((deleted, None))
    }
}

#[derive(Default)]
struct PushOutcome {
    acked: Vec<(String, String)>,
    rejected: usize,
    stop: Option<Stop>,
}

fn user_rejection(u: &ValidUser, status: u16, code: &str, description: &str) -> RemoteRejection {
    RemoteRejection {
        entity: Entity::User,
        record_id: u.payload.id.clone(),
        code: code.to_string(),
        message: if description.is_empty() {
            format!("Wazzup answered HTTP {status} {code}")
        } else {
            description.to_string()
        },
        http_status: Some(status),
        payload: serde_json::to_value(&u.payload).unwrap_or_default(),
        payload_hash: u.hash.clone(),
    }
}

/// Logs a long cycle's progress every few seconds: accounts done of those to sync, users
/// pushed, and the rate.
struct CycleProgress {
    accounts_done: Arc<AtomicUsize>,
    users_pushed: Arc<AtomicUsize>,
    ticker: tokio::task::JoinHandle<()>,
}

impl CycleProgress {
    fn start(to_sync: Arc<AtomicUsize>) -> Self {
        let accounts_done = Arc::new(AtomicUsize::new(0));
        let users_pushed = Arc::new(AtomicUsize::new(0));
        let (done, pushed) = (accounts_done.clone(), users_pushed.clone());
        let started = Instant::now();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.tick().await;
            loop {
                every.tick().await;
                let pushed = pushed.load(AtomicOrdering::Relaxed);
                tracing::info!(
                    accounts_done = done.load(AtomicOrdering::Relaxed),
                    accounts_total = to_sync.load(AtomicOrdering::Relaxed),
                    users_pushed = pushed,
                    users_per_sec =
                        (pushed as f64 / started.elapsed().as_secs_f64()).round() as u64,
                    "Cycle in progress"
                );
            }
        });
        Self {
            accounts_done,
            users_pushed,
            ticker,
        }
    }

    fn account_done(&self, users_pushed: usize) {
        self.accounts_done.fetch_add(1, AtomicOrdering::Relaxed);
        self.users_pushed
            .fetch_add(users_pushed, AtomicOrdering::Relaxed);
    }

    fn stop(&self) {
        self.ticker.abort();
    }
}

/// Logs long pushes every few seconds, so a first sync is not silence.
struct Progress<'a> {
    account_id: &'a str,
    total: usize,
    done: usize,
    started: Instant,
    last: Instant,
}

impl<'a> Progress<'a> {
    fn new(account_id: &'a str, total: usize) -> Self {
        let now = Instant::now();
        Self {
            account_id,
            total,
            done: 0,
            started: now,
            last: now,
        }
    }
    fn add(&mut self, n: usize) {
        self.done += n;
        if self.last.elapsed() >= Duration::from_secs(5) {
            self.last = Instant::now();
            let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                account_id = self.account_id,
                done = self.done,
                total = self.total,
                users_per_sec = rate.round() as u64,
                "Pushing users"
            );
        }
    }
}

fn log_account(r: &AccountReport, dry_run: bool) {
    if dry_run {
        tracing::info!(
            account_id = %r.account_id,
            would_create = r.would_create,
            would_update = r.would_update,
            would_delete = r.would_delete,
            settings_change = r.settings_changed,
            rejected_locally = r.rejected_locally,
            "Account plan"
        );
        return;
    }
    let reason = match &r.outcome {
        AccountOutcome::Incomplete(w)
        | AccountOutcome::AuthFailed(w)
        | AccountOutcome::Skipped(w)
        | AccountOutcome::Failed(w) => w.as_str(),
        _ => "",
    };
    macro_rules! summary {
        ($level:ident, $msg:literal) => {
            tracing::$level!(
                account_id = %r.account_id,
                outcome = r.outcome.label(),
                reason,
                read = r.users_read,
                source_unchanged = r.source_unchanged,
                created = r.created,
                updated = r.updated,
                deleted = r.deleted,
                unchanged = r.unchanged,
                settings_pushed = r.settings_pushed,
                rejected_locally = r.rejected_locally,
                rejected_remotely = r.rejected_remotely,
                deferred = r.deferred,
                waiting = r.waiting,
                phone_warnings = r.phone_warnings,
                phones_outside_known_ranges = r.phone_not_valid,
                drift_missing = r.drift_missing,
                drift_changed = r.drift_changed,
                drift_settings = r.drift_settings,
                unknown_in_wazzup = r.unknown_in_wazzup,
                requests = r.requests,
                retries = r.retries,
                duration_ms = r.duration_ms,
                $msg
            )
        };
    }
    match r.outcome {
        AccountOutcome::Skipped(_) => {
            summary!(warn, "Account not synced: its token was refused earlier")
        }
        AccountOutcome::Completed | AccountOutcome::Locked => {
            summary!(info, "Account synced")
        }
        AccountOutcome::Incomplete(_) => summary!(
            warn,
            "Account partly synced; the rest is left for the next cycle"
        ),
        AccountOutcome::AuthFailed(_) | AccountOutcome::Failed(_) => {
            summary!(error, "Account not synced")
        }
    }
    metrics::counter!("wazzup_sync_records_total", "outcome" => "created")
        .increment(r.created as u64);
    metrics::counter!("wazzup_sync_records_total", "outcome" => "updated")
        .increment(r.updated as u64);
    metrics::counter!("wazzup_sync_records_total", "outcome" => "deleted")
        .increment(r.deleted as u64);
    metrics::counter!("wazzup_sync_records_total", "outcome" => "rejected_locally")
        .increment(r.rejected_locally as u64);
    metrics::counter!("wazzup_sync_records_total", "outcome" => "rejected_remotely")
        .increment(r.rejected_remotely as u64);
    metrics::counter!("wazzup_sync_records_total", "outcome" => "deferred")
        .increment(r.deferred as u64);
}

fn log_cycle(c: &CycleReport, dry_run: bool, partial: bool) {
    let sum = |f: fn(&AccountReport) -> usize| c.accounts.iter().map(f).sum::<usize>();
    let failed = c.accounts.iter().filter(|a| !a.outcome.is_ok()).count();
    tracing::info!(
        accounts = c.accounts.len(),
        accounts_not_completed = failed,
        bad_account_rows = c.bad_accounts.len(),
        created = sum(|a| a.created),
        updated = sum(|a| a.updated),
        deleted = sum(|a| a.deleted),
        settings_pushed = sum(|a| a.settings_pushed as usize),
        rejected_locally = sum(|a| a.rejected_locally),
        rejected_remotely = sum(|a| a.rejected_remotely),
        deferred = sum(|a| a.deferred),
        requests = c.accounts.iter().map(|a| a.requests).sum::<u64>(),
        retries = c.accounts.iter().map(|a| a.retries).sum::<u64>(),
        orphan_rows = c.orphan_users + c.orphan_roles,
        duration_ms = c.duration_ms,
        dry_run,
        "Cycle finished"
    );
    // A cycle for a few notified accounts says nothing about the others.
    if !dry_run && !partial {
        let auth_failed = c
            .accounts
            .iter()
            .filter(|a| {
                matches!(
                    a.outcome,
                    AccountOutcome::AuthFailed(_) | AccountOutcome::Skipped(_)
                )
            })
            .count();
        metrics::gauge!("wazzup_sync_accounts_auth_failed").set(auth_failed as f64);
        if failed == 0 {
            metrics::gauge!("wazzup_sync_last_success_timestamp_seconds")
                .set(chrono::Utc::now().timestamp() as f64);
        }
    }
    if !dry_run {
        metrics::counter!("wazzup_sync_cycles_total", "result" => if failed == 0 { "ok" } else { "partial" }).increment(1);
        metrics::histogram!("wazzup_sync_cycle_duration_seconds")
            .record(c.duration_ms as f64 / 1000.0);
    }
}
