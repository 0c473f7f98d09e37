//! The dry run behind `plan`: what a cycle would send for an account. It reads the mirror
//! when the state schema exists, and sends and writes nothing.

use super::report::{AccountOutcome, AccountReport};
use super::{CycleOptions, Engine};
use crate::domain::{CrmText, Normalized, settings_hash};
use crate::plan;
use crate::source::SourceAccount;
use crate::state::{self, StateError};

impl Engine {
    /// Plans one account; with `opts.detail`, every record that would change.
    pub async fn plan_account(
        &self,
        account: &SourceAccount,
        norm: &Normalized,
        mirror_exists: bool,
        opts: &CycleOptions,
        report: &mut AccountReport,
    ) -> Result<AccountOutcome, StateError> {
        let id = &account.account_id;
        let (mirror, pending, open, mut last, mirrored, left) = if mirror_exists {
            let with_doc = opts.detail || !norm.rejected_user_ids.is_empty();
            (
                state::load_mirror(&self.state, id).await?,
                state::load_pending(&self.state, id).await?,
                state::open_dead_letters(&self.state, id).await?,
                state::load_account(&self.state, id, with_doc).await?,
                if opts.detail {
                    state::load_mirrored_users(&self.state, id).await?
                } else {
                    Default::default()
                },
                state::load_leavers(&self.state, id).await?,
            )
        } else {
            Default::default()
        };
        let waiting = super::rejections::waiting(&open, chrono::Utc::now());
        let p = plan::plan_users(
            norm,
            &mirror,
            (&pending, &waiting),
            self.settings.sync.delete_missing,
            self.guard(account, opts),
            self.departures(&left),
        );
        if !p.held_leavers.is_empty() && last.settings_doc.is_none() {
            last.settings_doc = state::acknowledged_settings(&self.state, id).await?;
        }
        report.rejected_locally = norm.rejected.len();
        report.phone_warnings = norm.phone_warnings;
        report.unchanged = p.unchanged;
        report.waiting = p.waiting + p.deletes_waiting;
        report.would_create = p.creates.len();
        report.would_update = p.updates.len();
        report.would_delete = p.deletes.len();
        report.deletes_blocked = p.deletes_blocked;
        report.leaving = p.leaving.len();
        report.leave_blocked = p.leave_blocked;
        // Assume every due push lands, to show the settings the cycle would send.
        let mut in_wazzup: foldhash::HashSet<&str> = mirror.keys().map(CrmText::as_str).collect();
        in_wazzup.extend(p.creates.iter().map(|u| u.payload.id.as_str()));
        for d in &p.deletes {
            in_wazzup.remove(d.as_str());
        }
        let doc = plan::settings_doc(
            norm,
            &in_wazzup,
            (last.settings_doc.as_ref(), &p.held_leavers),
            account.push_input_output_message_events_for_managers,
        );
        // Hashed as `sync` hashes what it sends.
        report.settings_changed =
            last.settings_hash.as_deref() != Some(settings_hash(&doc).as_str());
        let doc = doc.to_owned_doc();
        if opts.detail {
            report.records = plan::detail(&plan::DetailInput {
                account_id: id,
                norm,
                plan: &p,
                mirrored: &mirrored,
                previous_doc: last.settings_doc.as_ref(),
                next_doc: &doc,
            });
        }
        Ok(AccountOutcome::Completed)
    }
}
