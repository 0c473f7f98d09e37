//! One account's cycle, as its list of stages: the token's cool-down, local rejections, drift
//! repair (reconcile), the plan, users, dead letters that closed, settings, deletes, the end.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use wazzup_api::{Account, RequestStats};

use super::report::{AccountOutcome, AccountReport};
use super::{CycleOptions, Engine, Stop, Trigger};
use wazzup_api::fold_code;

use super::phones::PhoneBook;
use crate::domain::{
    CrmText, Entity, Mirror, Normalized, RememberedUsers, SourceRole, SourceUser, ValidUser,
    normalize_account, token_fingerprint,
};
use crate::plan::{self, DeleteGuard, UserPlan};
use crate::source::SourceAccount;
use crate::state::{self, AccountState, DeadLetterKind, OpenDeadLetter, Resolution, StateError};

/// What every stage of one account's cycle works on.
pub(super) struct Job<'a> {
    pub account: &'a SourceAccount,
    pub api: Account<'a>,
    pub norm: &'a Normalized,
    pub opts: &'a CycleOptions,
    /// The token's fingerprint (what the state remembers of it).
    pub token: String,
    /// The account's open dead letters (and those an operator discarded), as the cycle began.
    pub open: Vec<OpenDeadLetter>,
    /// Of those, the records Wazzup refused that are not due again.
    pub waiting: plan::Waiting,
    /// What Wazzup held of the users whose CRM rows changed or who left, and who holds each
    /// phone.
    pub previous: Previous,
    /// The cycle the account's history rows belong to, and the cause of its changes.
    pub record: state::Record,
    /// Users drift repair made the mirror forget (a reconcile), pushed again as repairs: what
    /// Wazzup held of each edited one, None for one missing there.
    pub drifted: foldhash::HashMap<String, Option<state::Shown>>,
    /// Wazzup's settings document when it drifted from the one last acknowledged (JSON).
    pub settings_found: Option<String>,
    /// Users who left the CRM and are still in Wazzup, without access: when each left.
    pub left: HashMap<String, DateTime<Utc>>,
    /// The users the CRM returns, valid or refused.
    pub present: foldhash::HashSet<&'a str>,
    /// Whether any approval of the account was open as the cycle began.
    pub approvals_open: bool,
}

/// What the mirror remembered of the users whose CRM rows changed (or who left the CRM): what
/// Wazzup held of each, for the history, and, when a user sent this cycle brings a phone, who
/// holds each phone.
#[derive(Debug, Default)]
pub(super) struct Previous {
    pub shown: foldhash::HashMap<CrmText, state::Shown>,
    pub phones: Option<PhoneBook>,
}

impl Job<'_> {
    pub fn id(&self) -> &str {
        &self.account.account_id
    }

    /// The dead letters of `entity` that were open as the cycle began.
    pub fn open_of(&self, entity: Entity) -> impl Iterator<Item = &OpenDeadLetter> {
        self.open
            .iter()
            .filter(move |d| d.is_open() && d.entity == entity)
    }

    /// Why a record's change is made: a drift repair, a refusal sent again (by hand in a
    /// `dead-letters retry --now` cycle), or the cycle's own cause.
    pub fn cause_of(&self, entity: Entity, record_id: &str) -> state::Cause {
        if entity == Entity::User && self.drifted.contains_key(record_id) {
            return state::Cause::DriftRepair;
        }
        if entity != Entity::Settings && self.has_left(record_id) {
            return state::Cause::LeftCrm;
        }
        let refused = self
            .open_of(entity)
            .any(|d| d.kind == DeadLetterKind::Rejected && d.record_id == record_id);
        match self.record.cause {
            state::Cause::CrmChange if refused => state::Cause::Retry,
            cause => cause,
        }
    }

    /// True for a user in Wazzup that the CRM no longer returns (a leaver, in its grace or
    /// deleted now), whose changes are the consequences of its leaving.
    pub fn has_left(&self, user_id: &str) -> bool {
        !self.present.contains(user_id)
    }

    /// What Wazzup held of a user, for its history row (None when unknown).
    pub fn shown(&self, user_id: &str) -> state::Shown {
        self.previous
            .shown
            .get(user_id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Engine {
    /// Holds the account's advisory lock for the length of its cycle; another replica holding
    /// it means the account is that replica's this time. Under the lock, one query reads the
    /// mirror and the phones it was read from, and the CRM rows are normalized.
    pub(super) async fn sync_account_locked(
        &self,
        account: &SourceAccount,
        source_fingerprint: &str,
        (users, roles): (Vec<SourceUser>, Vec<SourceRole>),
        opts: &CycleOptions,
        stats: &RequestStats,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, StateError> {
        if !self.lock_account(&account.account_id).await? {
            return Ok(AccountOutcome::Locked);
        }
        let api = Account {
            account_id: &account.account_id,
            token: &account.token,
            stats,
        };
        let result = async {
            // The state reads that open the cycle share one session: each query handed back to
            // the pool would cost a round trip of its own.
            let mut session = self.state.acquire().await?;
            let id = account.account_id.as_str();
            let (mirror, mut phones) = if opts.trigger == Trigger::Notify {
                state::load_mirror_kept(&mut session, id, &self.mirror_cache).await?
            } else {
                state::load_mirror_and_phones(&mut *session, id).await?
            };
            let norm = normalize_account(&users, &roles, &self.normalize, &mut phones);
            drop((users, roles));
            let unremembered = unremembered_rows(&norm, &mirror, &phones);
            state::remember_rows(&mut *session, &account.account_id, &unremembered).await?;
            drop(unremembered);
            let previous = previous(&norm, &mirror, phones);
            self.sync_account(
                account,
                api,
                source_fingerprint,
                &norm,
                (mirror, session, previous),
                opts,
                report,
            )
            .await
        }
        .await;
        self.unlock_account(&account.account_id).await;
        result
    }

    /// The stages, in order. A stage that stops (a refused token, a fault that outlasted its
    /// retries, shutdown) lets the later stages record what they must, but send nothing.
    /// `mirror` is the account's mirror as read under its lock, with the session it was read
    /// on; the session goes back to the pool once the cycle's opening reads are done.
    #[allow(clippy::too_many_arguments)]
    async fn sync_account(
        &self,
        account: &SourceAccount,
        api: Account<'_>,
        source_fingerprint: &str,
        norm: &Normalized,
        (mut mirror, mut session, previous): (Mirror, PoolConnection<Postgres>, Previous),
        opts: &CycleOptions,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, StateError> {
        let id = account.account_id.as_str();
        let token = token_fingerprint(&account.token);
        // The last document keeps refused users' roles, and is compared in a reconcile.
        let with_doc = opts.reconcile || !norm.rejected_user_ids.is_empty();
        let opening = state::open_account(&mut *session, id, with_doc).await?;
        crate::db::hand_back(session).await;
        let state::Opening {
            account: mut last,
            dead_letters: open,
            mut pending,
            leavers,
            approvals_open,
        } = opening;
        if let Some(skipped) = self.cooling_down(&last, &token) {
            return Ok(skipped);
        }
        let mut job = Job {
            account,
            api,
            norm,
            opts,
            token,
            waiting: super::rejections::waiting(&open, Utc::now()),
            open,
            previous,
            record: record_of(opts),
            drifted: Default::default(),
            settings_found: None,
            left: leavers,
            present: norm
                .users
                .iter()
                .map(|u| u.payload.id.as_str())
                .chain(norm.rejected_user_ids.iter().map(CrmText::as_str))
                .collect(),
            approvals_open,
        };
        self.record_local_rejections(&job, report).await?;
        if opts.reconcile
            && let Some(outcome) = self.drift_stage(&mut job, &mut last, report).await?
        {
            return Ok(outcome);
        }
        if opts.reconcile {
            // Drift repair may have changed the mirror and what is pending.
            mirror = state::load_mirror(&self.state, id).await?;
            pending = state::load_pending(&self.state, id).await?;
        }
        let plan = self.plan_for(&job, &mirror, &pending, report);
        let stop = self
            .push_stages(&job, plan, (&mut mirror, &mut last), report)
            .await?;
        self.finish(&job, source_fingerprint, stop, report).await
    }

    /// The stages that send, in order: the leavers' grace, users, settings, deletes, and the
    /// creates that deletes made room for.
    async fn push_stages(
        &self,
        job: &Job<'_>,
        mut plan: UserPlan<'_>,
        (mirror, last): (&mut Mirror, &mut AccountState),
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        self.departures_stage(job, &mut plan, last).await?;
        // Users still in Wazzup that leave it, now or after their grace, give up their phones.
        let holders: Vec<String> = (plan.deletes.iter().cloned())
            .chain(plan.leaving.iter().map(|(id, _)| id.clone()))
            .collect();
        let users = self
            .users_stage(job, &plan, &holders, mirror, report)
            .await?;
        let mut stop = users.stop;
        self.close_dead_letters(job, mirror).await?;
        let late = held_for_room(job, mirror, users.full_refused);
        let deletes = if stop.is_none() {
            let mut deletes = plan.deletes.clone();
            deletes.extend(early_leavers(&mut plan, late.len()));
            deletes
        } else {
            vec![]
        };
        let settings_stop = self
            .settings_stage(
                job,
                mirror,
                (&deletes, &plan.held_leavers),
                last,
                stop.is_some(),
                report,
            )
            .await?;
        stop = stop.or(settings_stop);
        if stop.is_none() && !deletes.is_empty() {
            stop = self.deletes_stage(job, &deletes, mirror, report).await?;
            if stop.is_none() && report.deleted > 0 {
                stop = self
                    .room_made(
                        job,
                        late,
                        (&deletes, &plan.held_leavers),
                        mirror,
                        last,
                        report,
                    )
                    .await?;
            }
        }
        self.close_returned_deletes(job).await?;
        report.leaving = plan.leaving.len();
        report.next_due = plan.leaving.iter().map(|(_, at)| *at).min();
        Ok(stop)
    }

    /// Users who left the CRM: their grace starts (or ends, for those who came back). When the
    /// guard holds them back, nothing of theirs changes: they keep the roles Wazzup holds, so
    /// the document they are kept from is read.
    async fn departures_stage(
        &self,
        job: &Job<'_>,
        plan: &mut UserPlan<'_>,
        last: &mut AccountState,
    ) -> Result<(), StateError> {
        let approval = self.guard_approvals(job, plan).await?;
        let marks = (&plan.new_leavers[..], &plan.returned[..]);
        let started = state::mark_leavers(&self.state, job.id(), marks, approval).await?;
        for (id, at) in plan.leaving.iter_mut() {
            if let Some(left) = started.get(id.as_str()) {
                *at = *left + self.departures(&job.left).grace;
            }
        }
        if !plan.held_leavers.is_empty() && last.settings_doc.is_none() {
            last.settings_doc = state::acknowledged_settings(&self.state, job.id()).await?;
        }
        Ok(())
    }

    /// The guard's holds as approvals: a mass deletion waits user by user, a mass leave as one
    /// approval for the account; what a person approved goes now. Let through by the allow
    /// flag instead, they are recorded as decided by `cli` or `config`. Returns the mass leave
    /// approval that now applies.
    async fn guard_approvals(
        &self,
        job: &Job<'_>,
        plan: &mut UserPlan<'_>,
    ) -> Result<Option<i64>, StateError> {
        use state::approvals::{self, Reason};
        let leaves = self.settings.delete_grace() > std::time::Duration::ZERO;
        let reason = if leaves {
            Reason::MassLeave
        } else {
            Reason::MassDelete
        };
        if plan.released {
            let by = if self.settings.sync.allow_mass_delete {
                "config"
            } else {
                "cli"
            };
            let holds = if leaves {
                vec![leave_hold(&plan.new_leavers)]
            } else {
                plan.deletes.iter().map(|id| delete_hold(job, id)).collect()
            };
            approvals::record_allowed(
                &self.state,
                job.id(),
                reason,
                &holds,
                (by, job.record.cycle),
            )
            .await?;
            return Ok(None);
        }
        if !leaves && job.approvals_open {
            self.keep_held_deletions_held(job, plan).await?;
        }
        let held = if leaves {
            &plan.held_leavers
        } else {
            &plan.held_deletes
        };
        if held.is_empty() && !job.approvals_open {
            return Ok(None);
        }
        let holds: Vec<approvals::Hold> = match (leaves, held.is_empty()) {
            (_, true) => Vec::new(),
            (true, false) => vec![leave_hold(held)],
            (false, false) => held.iter().map(|id| delete_hold(job, id)).collect(),
        };
        let open = approvals::sync_holds(&self.state, job.id(), reason, &holds).await?;
        let approved: Vec<&approvals::Approval> =
            open.iter().filter(|a| a.status == "approved").collect();
        if approved.is_empty() {
            return Ok(None);
        }
        if leaves {
            // The users who would leave are those the approval was given for.
            plan.new_leavers = std::mem::take(&mut plan.held_leavers);
            plan.leave_blocked = None;
            let at = Utc::now() + self.departures(&job.left).grace;
            plan.leaving
                .extend(plan.new_leavers.iter().map(|id| (id.clone(), at)));
            return Ok(approved.first().map(|a| a.id));
        }
        let approved: std::collections::HashSet<&str> = approved
            .iter()
            .filter_map(|a| a.user_id.as_deref())
            .collect();
        let (go, wait): (Vec<String>, Vec<String>) = std::mem::take(&mut plan.held_deletes)
            .into_iter()
            .partition(|id| approved.contains(id.as_str()));
        plan.deletes.extend(go);
        if wait.is_empty() {
            plan.deletes_blocked = None;
        }
        plan.held_deletes = wait;
        Ok(None)
    }

    /// A deletion once held waits for its own decision, however few are left: deciding some of
    /// a mass deletion must not let the rest (a rejected one included) through when they drop
    /// under the guard's bar.
    async fn keep_held_deletions_held(
        &self,
        job: &Job<'_>,
        plan: &mut UserPlan<'_>,
    ) -> Result<(), StateError> {
        use state::approvals::{self, Reason};
        if plan.deletes.is_empty() {
            return Ok(());
        }
        let open: std::collections::HashSet<String> =
            approvals::open_approvals(&self.state, Some(job.id()))
                .await?
                .into_iter()
                .filter(|a| a.reason == Reason::MassDelete.as_str())
                .filter_map(|a| a.user_id)
                .collect();
        let (held, go): (Vec<String>, Vec<String>) = std::mem::take(&mut plan.deletes)
            .into_iter()
            .partition(|id| open.contains(id));
        plan.deletes = go;
        plan.held_deletes.extend(held);
        plan.held_deletes.sort();
        plan.held_deletes.dedup();
        Ok(())
    }

    /// Users who left the CRM, and how long they stay in Wazzup after.
    pub(super) fn departures<'l>(
        &self,
        left: &'l HashMap<String, DateTime<Utc>>,
    ) -> plan::Departures<'l> {
        plan::Departures {
            left,
            grace: chrono::Duration::from_std(self.settings.delete_grace())
                .unwrap_or(chrono::Duration::MAX),
            now: Utc::now(),
        }
    }

    /// Deletes made room in an account that was full: the creates Wazzup refused for the user
    /// limit (this cycle, or earlier and waiting) go now, then the settings with their roles.
    async fn room_made(
        &self,
        job: &Job<'_>,
        late: Vec<&ValidUser>,
        (deleted, held): (&[String], &[String]),
        mirror: &mut Mirror,
        last: &mut AccountState,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        if late.is_empty() {
            return Ok(None);
        }
        tracing::info!(
            users = late.len(),
            "Deleted users made room: creating the users the user limit held back"
        );
        // Each is counted again by what this attempt comes to: refused earlier in this cycle,
        // or waiting since an earlier one.
        let waited = late
            .iter()
            .filter(|u| plan::is_waiting(&job.waiting, Entity::User, &u.payload.id, &u.hash))
            .count();
        report.waiting = report.waiting.saturating_sub(waited);
        report.rejected_remotely = report.rejected_remotely.saturating_sub(late.len() - waited);
        let plan = UserPlan {
            creates: late,
            ..Default::default()
        };
        let done = self.users_stage(job, &plan, &[], mirror, report).await?;
        let landed: Vec<String> = plan
            .creates
            .iter()
            .filter(|u| mirror.get(u.payload.id.as_str()) == Some(&u.hash))
            .map(|u| u.payload.id.to_string())
            .collect();
        let closed = state::resolve(
            &self.state,
            job.id(),
            Entity::User,
            &landed,
            Resolution::Synced,
            &job.record,
        );
        super::report::changes_recorded("refusal_closed", closed.await?);

        if done.stop.is_some() {
            return Ok(done.stop);
        }
        self.settings_stage(job, mirror, (deleted, held), last, false, report)
            .await
    }

    /// Skipped while Wazzup refused this very token and the cool-down has not passed.
    fn cooling_down(&self, last: &AccountState, token: &str) -> Option<AccountOutcome> {
        let failed_at = last.auth_failed_at?;
        let cooldown = chrono::Duration::seconds(self.settings.wazzup.auth_cooldown_secs as i64);
        (last.token_fingerprint.as_deref() == Some(token) && Utc::now() < failed_at + cooldown)
            .then(|| {
                AccountOutcome::Skipped(
                    "Wazzup refused this token earlier; waiting for a new token or the cool-down"
                        .into(),
                )
            })
    }

    /// The deletion guard for this account in this cycle.
    pub(super) fn guard(&self, account: &SourceAccount, opts: &CycleOptions) -> DeleteGuard {
        DeleteGuard {
            max_percent: self.settings.sync.mass_delete_max_percent,
            min: self.settings.sync.mass_delete_min,
            allowed: self.settings.sync.allow_mass_delete
                || opts.allow_mass_delete.contains(&account.account_id)
                || opts.allow_mass_delete.contains("*"),
        }
    }

    /// The users' plan, its counts in the report, and a line when deletions are held back.
    fn plan_for<'n>(
        &self,
        job: &Job<'n>,
        mirror: &Mirror,
        pending: &std::collections::HashSet<String>,
        report: &mut AccountReport,
    ) -> UserPlan<'n> {
        let p = plan::plan_users(
            job.norm,
            mirror,
            (pending, &job.waiting),
            self.settings.sync.delete_missing,
            self.guard(job.account, job.opts),
            self.departures(&job.left),
        );
        report.unchanged = p.unchanged;
        report.waiting = p.waiting + p.deletes_waiting;
        report.deletes_blocked = p.deletes_blocked;
        report.leave_blocked = p.leave_blocked;
        if let Some((would, mirrored)) = p.leave_blocked {
            tracing::error!(
                would_leave = would,
                mirrored,
                max_percent = self.settings.sync.mass_delete_max_percent,
                "Held back a mass leave: the CRM no longer returns many synced users; nobody's access is revoked. Check the users query; let it through with `wazzup-sync sync --allow-mass-delete ACCOUNT`"
            );
        }
        if let Some((would, mirrored)) = p.deletes_blocked {
            tracing::error!(
                would_delete = would,
                mirrored,
                max_percent = self.settings.sync.mass_delete_max_percent,
                "Held back a mass deletion: the CRM no longer returns many synced users. Check the users query; let it through with `wazzup-sync sync --allow-mass-delete ACCOUNT`"
            );
        }
        p
    }

    /// Records how the account's cycle ended. A clean end (nothing left to send or retry)
    /// stores the CRM fingerprint, so unchanged rows next time mean nothing to do.
    async fn finish(
        &self,
        job: &Job<'_>,
        source_fingerprint: &str,
        stop: Option<Stop>,
        report: &AccountReport,
    ) -> Result<AccountOutcome, StateError> {
        let id = job.id();
        let outcome = match stop {
            None => AccountOutcome::Completed,
            Some(Stop::Shutdown) => AccountOutcome::Incomplete("the daemon is stopping".into()),
            Some(Stop::Transient(why)) => AccountOutcome::Incomplete(why),
            Some(Stop::Auth(status)) => {
                state::mark_auth_failed(&self.state, id, &job.token, status).await?;
                return Ok(AccountOutcome::AuthFailed(format!(
                    "Wazzup refused the token (HTTP {status}); the account is skipped until its token changes"
                )));
            }
        };
        let mut session = self.state.acquire().await?;
        // Refusals still open keep it from ending clean too (the statement checks them).
        let clean = outcome == AccountOutcome::Completed
            && report.deferred == 0
            && report.waiting == 0
            && report.deletes_blocked.is_none()
            && report.leave_blocked.is_none()
            && report.rejected_remotely == 0;
        state::finish_account(
            &mut *session,
            id,
            &job.token,
            outcome == AccountOutcome::Completed,
            outcome.reason(),
            (
                clean
                    .then_some(source_fingerprint)
                    .filter(|f| !f.is_empty()),
                report.next_due,
            ),
        )
        .await?;
        crate::db::hand_back(session).await;
        Ok(outcome)
    }
}

/// A deletion the guard holds: the user Wazzup holds, which the CRM no longer returns.
fn delete_hold(job: &Job<'_>, user_id: &str) -> state::approvals::Hold {
    let shown = job.shown(user_id);
    state::approvals::Hold {
        user_id: Some(user_id.to_string()),
        channel_id: None,
        action: "user_deleted",
        before: Some(serde_json::json!({"name": shown.name, "phone": shown.phone})),
        after: None,
        content: serde_json::json!({"user_id": user_id, "in_crm": false}),
        content_hash: crate::domain::content_hash(format!("gone\0{user_id}").as_bytes()),
    }
}

/// A mass leave the guard holds: the users who would leave at once.
fn leave_hold(ids: &[String]) -> state::approvals::Hold {
    let mut ids = ids.to_vec();
    ids.sort();
    state::approvals::Hold {
        user_id: None,
        channel_id: None,
        action: "mass_leave",
        before: None,
        after: Some(serde_json::json!({"leaving": ids.len()})),
        content: serde_json::json!({ "leaving": ids }),
        content_hash: crate::domain::content_hash(ids.join("\0").as_bytes()),
    }
}

/// At Wazzup's user limit, with `needed` creates waiting for room: users in their grace are
/// deleted early, those who left first first, as many as needed. They leave `plan.leaving`.
fn early_leavers(plan: &mut UserPlan<'_>, needed: usize) -> Vec<String> {
    if needed == 0 || plan.leaving.is_empty() {
        return Vec::new();
    }
    plan.leaving.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let n = needed.min(plan.leaving.len());
    let early: Vec<String> = plan.leaving.drain(..n).map(|(id, _)| id).collect();
    tracing::info!(
        users = early.len(),
        "The account is at Wazzup's user limit: deleting users who left the CRM before their grace ends, to make room"
    );
    early
}

/// The creates to send once deletes made room: those refused for the user limit this cycle,
/// and those refused for it earlier that wait, unchanged, for their next attempt.
fn held_for_room<'n>(
    job: &Job<'n>,
    mirror: &Mirror,
    refused_now: Vec<&'n ValidUser>,
) -> Vec<&'n ValidUser> {
    let limit = fold_code("USER_LIMIT_EXCEEDED");
    let held: foldhash::HashSet<&str> = job
        .open_of(Entity::User)
        .filter(|d| d.kind == DeadLetterKind::Rejected && fold_code(&d.error_code) == limit)
        .map(|d| d.record_id.as_str())
        .collect();
    let mut late = refused_now;
    late.extend(job.norm.users.iter().filter(|u| {
        held.contains(u.payload.id.as_str())
            && !mirror.contains_key(&u.payload.id)
            && plan::is_waiting(&job.waiting, Entity::User, &u.payload.id, &u.hash)
    }));
    late.sort_by(|a, b| a.payload.id.cmp(&b.payload.id));
    late.dedup_by(|a, b| a.payload.id == b.payload.id);
    late
}

/// What the mirror remembered of the users normalization did not recognise (`left`: users
/// whose row changed, and users the CRM no longer returns): what Wazzup held of each, and, when a
/// user sent this cycle brings a phone, who holds each phone.
fn previous(norm: &Normalized, mirror: &Mirror, left: RememberedUsers) -> Previous {
    let moving = norm
        .users
        .iter()
        .any(|u| u.payload.phone.is_some() && mirror.get(&u.payload.id) != Some(&u.hash));
    let mut book = moving.then(PhoneBook::default);
    if let Some(book) = book.as_mut() {
        // A user recognised by its unchanged row holds the phone it is sent with.
        for u in norm.users.iter().filter(|u| u.row_remembered) {
            if let Some(p) = &u.payload.phone {
                book.holder.insert(p.clone(), u.payload.id.clone());
            }
        }
    }
    let mut shown = foldhash::HashMap::with_capacity_and_hasher(left.len(), Default::default());
    for (id, remembered) in left {
        let digits = remembered.phone.and_then(|(_, digits, _)| digits);
        let name = remembered.row.map(|r| r.name);
        if let Some(book) = book.as_mut() {
            if let Some(d) = &digits {
                book.holder.insert(d.clone(), id.clone());
            }
            if let Some(n) = &name {
                book.leaver_name.insert(id.clone(), n.clone());
            }
        }
        let show = state::Shown {
            name: name.map(|n| n.to_string()),
            phone: digits.as_deref().map(crate::domain::mask_phone),
        };
        shown.insert(id, show);
    }
    Previous {
        shown,
        phones: book,
    }
}

/// Users Wazzup holds as they are, whose CRM row the mirror does not remember (yet, or under
/// this salt): their row is recorded, so that it is recognised next cycle.
fn unremembered_rows<'n>(
    norm: &'n Normalized,
    mirror: &Mirror,
    remembered: &RememberedUsers,
) -> Vec<&'n ValidUser> {
    norm.users
        .iter()
        .filter(|u| {
            !u.row_remembered
                && u.source_hash.is_some()
                && mirror.get(&u.payload.id) == Some(&u.hash)
                && remembered
                    .get(&u.payload.id)
                    .and_then(|r| r.row.as_ref())
                    .map(|r| r.source_hash)
                    != u.source_hash
        })
        .collect()
}

/// The history's cycle and cause for this cycle's changes: a person's `dead-letters retry --now`
/// is manual; otherwise the CRM changed (a record's own cause can still be a retry or a repair).
fn record_of(opts: &CycleOptions) -> state::Record {
    state::Record {
        cycle: opts.cycle_id,
        cause: if opts.trigger == Trigger::Retry {
            state::Cause::Manual
        } else {
            state::Cause::CrmChange
        },
    }
}
