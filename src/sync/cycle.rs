//! A cycle over every account: the CRM streams in one account at a time, a few accounts are
//! synced at once, and the cycle ends with one summary line.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use futures::StreamExt;
use tracing::Instrument;
use wazzup_api::RequestStats;

use super::Engine;
use super::progress::CycleProgress;
use super::report::{AccountOutcome, AccountReport, CycleReport, log_account, log_cycle};
use crate::domain::normalize_account;
use crate::source::{self, AccountRows, ReadSummary, SkipUnchanged, SourceError};
use crate::state::{self, StateError};

/// What started a cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Trigger {
    /// `run`'s schedule.
    Schedule,
    /// A NOTIFY heard by `run`.
    Notify,
    /// The `sync` command (and `plan`).
    #[default]
    Sync,
    /// The reconcile schedule or the `reconcile` command.
    Reconcile,
    /// `dead-letters retry --now`.
    Retry,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Notify => "notify",
            Trigger::Sync => "sync",
            Trigger::Reconcile => "reconcile",
            Trigger::Retry => "retry",
        }
    }
}

/// Options of one cycle.
#[derive(Debug, Clone, Default)]
pub struct CycleOptions {
    /// What started it.
    pub trigger: Trigger,
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
    /// The cycle's row in `cycles` (set as the cycle starts; None in a dry run).
    pub cycle_id: Option<i64>,
}

impl CycleOptions {
    /// A reconcile: every account read back from Wazzup and repaired first.
    pub fn reconcile() -> Self {
        Self {
            reconcile: true,
            trigger: Trigger::Reconcile,
            ..Default::default()
        }
    }

    /// Every cycle but a dry run and a reconcile skips the accounts whose rows did not change
    /// since their last clean cycle (a notified one too: a notification may name an account
    /// whose views did not change).
    fn skips_unchanged(&self) -> bool {
        !self.dry_run && !self.reconcile
    }
}

/// The cycle could not run: the CRM could not be read, or the state database failed.
#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl Engine {
    /// Runs one cycle over every account.
    pub async fn run_cycle(&self, opts: &CycleOptions) -> Result<CycleReport, CycleError> {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let span = tracing::info_span!("cycle", run_id = %run_id, dry_run = opts.dry_run);
        async {
            if opts.dry_run {
                return self.cycle(opts, run_id).await;
            }
            // The cycle's row first: every history row it writes names it.
            let trigger = opts.trigger.as_str();
            let id =
                state::history::start_cycle(&self.state, &run_id, trigger, &self.instance).await?;
            let opts = CycleOptions {
                cycle_id: Some(id),
                ..opts.clone()
            };
            let result = self.cycle(&opts, run_id).await;
            let counts = match &result {
                Ok(report) => report.counts(),
                Err(_) => state::history::CycleCounts {
                    outcome: "failed",
                    ..Default::default()
                },
            };
            if let Err(e) = state::history::finish_cycle(&self.state, id, &counts).await {
                tracing::warn!(error = %e, cycle_id = id, "Could not record the end of the cycle");
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn cycle(&self, opts: &CycleOptions, run_id: String) -> Result<CycleReport, CycleError> {
        let started = Instant::now();
        // A dry run must work before the state schema exists.
        let mirror_exists =
            !opts.dry_run || state::is_migrated(&self.state, &self.settings.state.schema).await?;
        // The CRM's two reading sessions open while the state is asked what to skip.
        let (skip, ()) = tokio::join!(self.skip_unchanged(opts), super::warm_up(&self.source, 2));
        let skip = skip?;
        let progress = CycleProgress::start(skip.to_sync.clone());
        let (rows, reader) = source::stream_snapshot(
            self.source.clone(),
            self.settings.clone(),
            self.single_account(),
            opts.only_accounts.clone(),
            skip,
            self.settings.sync.concurrency,
            self.row_cache.clone(),
        );
        let mut reports = self
            .sync_accounts(rows, opts, mirror_exists, &progress)
            .await;
        progress.stop();
        let summary = reader.await.map_err(|e| {
            SourceError::Database(sqlx::Error::Protocol(format!(
                "the CRM reader stopped: {e}"
            )))
        })??;
        report_unusable_rows(&summary);
        reports.extend(self.record_unchanged(&summary).await?);
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
        if !opts.dry_run {
            // Users in their grace are counted again when this cycle could have changed them:
            // a cycle over every account, or one where someone left or was deleted.
            let departures = report
                .accounts
                .iter()
                .any(|a| a.leaving > 0 || a.deleted > 0);
            let grace = opts.only_accounts.is_none() || departures;
            self.export_state_gauges(opts.only_accounts.as_ref(), grace)
                .await;
        }
        // After the gauges: once a cycle is counted, the gauges it changed are current.
        log_cycle(&report, opts);
        Ok(report)
    }

    /// What the reader needs to skip accounts whose rows did not change since a clean cycle.
    async fn skip_unchanged(&self, opts: &CycleOptions) -> Result<SkipUnchanged, CycleError> {
        let enabled = opts.skips_unchanged();
        Ok(SkipUnchanged {
            enabled,
            known: if enabled {
                state::load_source_fingerprints(&self.state, opts.only_accounts.as_ref()).await?
            } else {
                Default::default()
            },
            salt: self.fingerprint_salt(),
            to_sync: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Syncs the accounts as the reader hands them over, `sync.concurrency` at a time.
    async fn sync_accounts(
        &self,
        rows: tokio::sync::mpsc::Receiver<AccountRows>,
        opts: &CycleOptions,
        mirror_exists: bool,
        progress: &CycleProgress,
    ) -> Vec<AccountReport> {
        futures::stream::unfold(
            rows,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        )
        .map(|rows| self.sync_one(rows, opts, mirror_exists, progress))
        .buffer_unordered(self.settings.sync.concurrency)
        .collect()
        .await
    }

    /// One account: its rows normalized, then planned (dry run) or synced; its summary logged.
    async fn sync_one(
        &self,
        rows: AccountRows,
        opts: &CycleOptions,
        mirror_exists: bool,
        progress: &CycleProgress,
    ) -> AccountReport {
        let AccountRows {
            account,
            users,
            roles,
            fingerprint,
        } = rows;
        let span = tracing::info_span!("account", account_id = %account.account_id);
        async move {
            let started = Instant::now();
            let stats = RequestStats::default();
            let mut report = AccountReport::new(&account.account_id);
            report.users_read = users.len();
            report.roles_read = roles.len();
            let outcome = if opts.dry_run {
                // Phones read in earlier cycles are not parsed again.
                let mut cache = if mirror_exists {
                    state::load_remembered(&self.state, &account.account_id)
                        .await
                        .unwrap_or_default()
                } else {
                    Default::default()
                };
                let norm = normalize_account(&users, &roles, &self.normalize, &mut cache);
                drop((cache, users, roles));
                self.plan_account(&account, &norm, mirror_exists, opts, &mut report)
                    .await
            } else {
                let rows = (users, roles);
                self.sync_account_locked(&account, &fingerprint, rows, opts, &stats, &mut report)
                    .await
            };
            report.outcome = outcome.unwrap_or_else(|e| AccountOutcome::Failed(e.to_string()));
            report.requests = stats.requests();
            report.retries = stats.retries();
            report.duration_ms = started.elapsed().as_millis() as u64;
            log_account(&report, opts.dry_run);
            progress.account_done(report.created + report.updated);
            report
        }
        .instrument(span)
        .await
    }

    /// Accounts skipped because their rows did not change: recorded as synced, one line each.
    async fn record_unchanged(
        &self,
        summary: &ReadSummary,
    ) -> Result<Vec<AccountReport>, CycleError> {
        let ids: Vec<String> = summary.unchanged.iter().map(|(id, _)| id.clone()).collect();
        state::touch_unchanged(&self.state, &ids).await?;
        Ok(summary
            .unchanged
            .iter()
            .map(|(id, users)| {
                let mut r = AccountReport::new(id);
                r.users_read = *users;
                r.unchanged = *users;
                r.source_unchanged = true;
                log_account(&r, false);
                r
            })
            .collect())
    }
}

/// Account rows that could not be used, and rows whose account has no row.
fn report_unusable_rows(summary: &ReadSummary) {
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
}
