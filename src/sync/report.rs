//! What a cycle did, account by account: the reports, their log lines and their metrics.

use serde::Serialize;

use crate::plan::PlanRecord;

/// How an account's cycle ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum AccountOutcome {
    /// Everything due was sent and recorded.
    #[default]
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
    /// Why the account did not complete, when it did not.
    pub fn reason(&self) -> Option<&str> {
        match self {
            AccountOutcome::Incomplete(w)
            | AccountOutcome::AuthFailed(w)
            | AccountOutcome::Skipped(w)
            | AccountOutcome::Failed(w) => Some(w),
            AccountOutcome::Completed | AccountOutcome::Locked => None,
        }
    }

    pub fn label(&self) -> &'static str {
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
#[derive(Debug, Clone, Default, Serialize)]
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
    /// Users who left the CRM and wait out their grace in Wazzup, without access.
    pub leaving: usize,
    /// Leavers held back by the guard: (would leave, users mirrored).
    pub leave_blocked: Option<(usize, usize)>,
    /// Role rows whose widening waits for a person (`sync.hold_widening`).
    pub withheld: usize,
    /// When the first of those graces ends: the account is looked at again then.
    #[serde(skip)]
    pub next_due: Option<chrono::DateTime<chrono::Utc>>,
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
    pub fn new(account_id: &str) -> Self {
        Self {
            account_id: account_id.to_string(),
            ..Default::default()
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

/// One line per account: its plan in a dry run, else its summary with every count; the
/// records counted by outcome.
impl CycleReport {
    /// What the cycle's row in `cycles` says of it.
    pub fn counts(&self) -> crate::state::history::CycleCounts {
        let sum = |f: fn(&AccountReport) -> usize| self.accounts.iter().map(f).sum::<usize>();
        crate::state::history::CycleCounts {
            created: sum(|a| a.created),
            updated: sum(|a| a.updated),
            deleted: sum(|a| a.deleted),
            settings_pushed: sum(|a| usize::from(a.settings_pushed)),
            refused_locally: sum(|a| a.rejected_locally),
            refused_by_wazzup: sum(|a| a.rejected_remotely),
            requests: self.accounts.iter().map(|a| a.requests).sum(),
            outcome: if self.all_ok() {
                "completed"
            } else {
                "partial"
            },
        }
    }
}

pub fn log_account(r: &AccountReport, dry_run: bool) {
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
    log_summary(r);
    for (outcome, n) in [
        ("created", r.created),
        ("updated", r.updated),
        ("deleted", r.deleted),
        ("rejected_locally", r.rejected_locally),
        ("rejected_remotely", r.rejected_remotely),
        ("deferred", r.deferred),
    ] {
        metrics::counter!("wazzup_sync_records_total", "outcome" => outcome).increment(n as u64);
    }
}

/// The account's summary line, at the level its outcome deserves.
fn log_summary(r: &AccountReport) {
    let reason = r.outcome.reason().unwrap_or("");
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
                leaving = r.leaving,
                withheld = r.withheld,
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
}

pub fn log_cycle(c: &CycleReport, opts: &super::CycleOptions) {
    let (dry_run, partial) = (opts.dry_run, opts.only_accounts.is_some());
    let sum = |f: fn(&AccountReport) -> usize| c.accounts.iter().map(f).sum::<usize>();
    let failed = c.accounts.iter().filter(|a| !a.outcome.is_ok()).count();
    tracing::info!(
        trigger = opts.trigger.as_str(),
        cycle_id = opts.cycle_id,
        accounts = c.accounts.len(),
        accounts_not_completed = failed,
        bad_account_rows = c.bad_accounts.len(),
        created = sum(|a| a.created),
        updated = sum(|a| a.updated),
        deleted = sum(|a| a.deleted),
        leaving = sum(|a| a.leaving),
        withheld = sum(|a| a.withheld),
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

/// Counts history rows written (`wazzup_sync_changes_recorded_total{action}`), once committed.
pub fn changes_recorded(action: &str, n: u64) {
    if n > 0 {
        metrics::counter!("wazzup_sync_changes_recorded_total", "action" => action.to_string())
            .increment(n);
    }
}

/// Counts history rows that gave someone more access (`wazzup_sync_access_widened_total{action}`).
pub fn access_widened(action: &str, n: u64) {
    if n > 0 {
        metrics::counter!("wazzup_sync_access_widened_total", "action" => action.to_string())
            .increment(n);
    }
}
