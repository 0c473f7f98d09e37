//! The settings stage: the account's whole settings document, over the users that are in
//! Wazzup, pushed when its hash changed (and it was not refused with this very content).

use wazzup_api::{ApiError, Bytes};

use super::account::Job;
use super::report::AccountReport;
use super::{Engine, Stop};
use crate::domain::{
    CrmText, Entity, Mirror, SettingsDoc, SettingsDocRef, content_hash, mask_digits,
};
use crate::plan::{self, SETTINGS_RECORD};
use crate::state::{self, AccountState, RemoteRejection, Resolution, StateError};

impl Engine {
    /// Builds the document and pushes it when it changed and nothing stopped the account
    /// (`blocked`); its dead letter closes once Wazzup holds what the CRM says.
    pub(super) async fn settings_stage(
        &self,
        job: &Job<'_>,
        mirror: &Mirror,
        deletes: &[String],
        last: &mut AccountState,
        blocked: bool,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let mut in_wazzup: foldhash::HashSet<&str> = mirror.keys().map(CrmText::as_str).collect();
        for d in deletes {
            in_wazzup.remove(d.as_str());
        }
        let doc = plan::settings_doc(
            job.norm,
            &in_wazzup,
            last.settings_doc.as_ref(),
            job.account.push_input_output_message_events_for_managers,
        );
        // Serialized once: hashed, sent and stored as these very bytes.
        let json = Bytes::from(doc.to_json());
        let hash = content_hash(&json);
        let due = last.settings_hash.as_deref() != Some(hash.as_str());
        report.settings_changed = due;
        let mut stop = None;
        if due && !blocked {
            if plan::settings_waiting(&job.waiting, &hash) {
                report.waiting += 1;
            } else if self.stopping() {
                stop = Some(Stop::Shutdown);
            } else {
                stop = self
                    .push_settings(job, &doc, (json, &hash), last, report)
                    .await?;
                if report.settings_pushed {
                    last.settings_hash = Some(hash.clone());
                }
            }
        }
        let refused_before = job
            .open_of(Entity::Settings)
            .any(|d| d.record_id == SETTINGS_RECORD);
        if refused_before && (!due || report.settings_pushed) {
            let record = [SETTINGS_RECORD.to_string()];
            let closed = state::resolve(
                &self.state,
                job.id(),
                Entity::Settings,
                &record,
                Resolution::Synced,
                &job.record,
            );
            super::report::changes_recorded("refusal_closed", closed.await?);
        }
        Ok(stop)
    }

    /// Records the document Wazzup acknowledged with its history rows: what changed from the
    /// one it held. That one is `held` when at hand (found by a reconcile, or loaded with the
    /// account); otherwise, from its `outline` (read as the account opened, or now), only the
    /// rows whose hashes differ are read back; a document saved before the hashes were kept is
    /// read whole.
    async fn record_settings(
        &self,
        job: &Job<'_>,
        doc: &SettingsDocRef<'_>,
        (text, hash): (&str, &str),
        (held, outline): (Option<&SettingsDoc>, Option<&state::AcknowledgedOutline>),
        cause: state::Cause,
    ) -> Result<(), StateError> {
        let hashes: Vec<i64> = doc.user_roles.iter().map(|r| plan::role_hash(r)).collect();
        let outline = match (held, outline) {
            (Some(_), _) => None,
            (None, Some(o)) => Some(o.clone()),
            (None, None) => state::acknowledged_outline(&self.state, job.id()).await?,
        };
        let whole = match &outline {
            Some(o) if o.role_hashes.is_none() => {
                state::acknowledged_settings(&self.state, job.id()).await?
            }
            _ => None,
        };
        let held = held.or(whole.as_ref());
        let (gone, added) = match outline.as_ref().and_then(|o| o.role_hashes.as_deref()) {
            Some(old) => plan::changed_rows(old, &hashes),
            None => (Vec::new(), Vec::new()),
        };
        let gone = state::acknowledged_roles_at(&self.state, job.id(), &gone).await?;
        let (before, after) = match (held, &outline) {
            (Some(held), _) => (Some(held.view()), doc.clone()),
            (None, Some(o)) => (
                // Only the rows that differ, on each side; the phones and the flag whole.
                Some(SettingsDocRef {
                    user_roles: gone.iter().collect(),
                    hide_phone_numbers_for_user_ids: o.hidden.iter().map(String::as_str).collect(),
                    push_input_output_message_events_for_managers: o.push,
                }),
                SettingsDocRef {
                    user_roles: added.iter().map(|&i| doc.user_roles[i]).collect(),
                    ..doc.clone()
                },
            ),
            (None, None) => (None, doc.clone()),
        };
        let diff = plan::doc_diff(before.as_ref(), &after);
        let record = (job.record.cycle, cause);
        let written =
            state::save_settings(&self.state, job.id(), (text, hash, &hashes), &diff, record);
        for (action, widens, n) in written.await? {
            super::report::changes_recorded(&action, n as u64);
            if widens {
                super::report::access_widened(&action, n as u64);
            }
        }
        Ok(())
    }

    /// `PATCH /v2/settings`; a refusal is a dead letter for the whole document. Once Wazzup
    /// acknowledged it, the document is recorded with what changed from the one it held.
    async fn push_settings(
        &self,
        job: &Job<'_>,
        doc: &SettingsDocRef<'_>,
        (json, hash): (Bytes, &str),
        last: &AccountState,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let sent = self.client.patch_settings(&job.api, json.clone()).await;
        let (status, code, description) = match sent {
            Ok(()) => {
                let text = std::str::from_utf8(&json).expect("JSON is UTF-8");
                // Compared with what Wazzup held: as found by a reconcile (before this
                // cycle's first push), or else as last acknowledged.
                let found = job
                    .settings_found
                    .as_deref()
                    .filter(|_| !report.settings_pushed);
                let cause = match found {
                    Some(_) => state::Cause::DriftRepair,
                    None => job.cause_of(Entity::Settings, SETTINGS_RECORD),
                };
                let found = found.and_then(|json| serde_json::from_str::<SettingsDoc>(json).ok());
                // What was read as the account opened is what Wazzup holds until this cycle
                // pushes a document.
                let first = !report.settings_pushed;
                let loaded = last.settings_doc.as_ref().filter(|_| first);
                let outline = last.settings_outline.as_ref().filter(|_| first);
                let held = found.as_ref().or(loaded);
                self.record_settings(job, doc, (text, hash), (held, outline), cause)
                    .await?;
                report.settings_pushed = true;
                return Ok(None);
            }
            Err(ApiError::Unauthorized { status }) => return Ok(Some(Stop::Auth(status))),
            Err(ApiError::Transient { reason, .. }) => {
                return Ok(Some(Stop::Transient(format!(
                    "settings not pushed: {reason}"
                ))));
            }
            Err(ApiError::Rejected {
                status,
                code,
                description,
                ..
            }) => (status, code, description),
        };
        tracing::error!(code = %code, description = %mask_digits(&description), http_status = status,
            "Wazzup refused the account's settings document");
        report.rejected_remotely += 1;
        let refused = RemoteRejection {
            entity: Entity::Settings,
            record_id: SETTINGS_RECORD.into(),
            code,
            message: description,
            http_status: Some(status),
            payload: serde_json::to_value(doc).unwrap_or_default(),
            payload_hash: hash.to_string(),
        };
        let refused = [refused];
        let opened = state::record_rejected(&self.state, job.id(), &refused, &job.record);
        super::report::changes_recorded("refused", opened.await?);
        Ok(None)
    }
}
