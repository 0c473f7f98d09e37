//! The settings stage: the account's whole settings document, over the users that are in
//! Wazzup, pushed when its hash changed (and it was not refused with this very content).

use wazzup_api::{ApiError, Bytes};

use super::account::Job;
use super::basis::{self, Basis};
use super::report::AccountReport;
use super::{Engine, Stop};
use crate::domain::{
    CrmText, Entity, Mirror, RoleEntry, SettingsDocRef, content_hash, mask_digits, settings_hash,
};
use crate::plan::{self, SETTINGS_RECORD};
use crate::state::{self, AccountState, RemoteRejection, Resolution, StateError};

impl Engine {
    /// Builds the document (without the users deleted now; with the roles Wazzup holds for
    /// the leavers the guard `held`) and pushes it when it changed and nothing stopped the
    /// account (`blocked`); its dead letter closes once Wazzup holds what the CRM says. With
    /// `sync.hold_widening`, what widens access waits for a person: the document goes without
    /// it.
    pub(super) async fn settings_stage(
        &self,
        job: &Job<'_>,
        mirror: &Mirror,
        (deletes, held): (&[String], &[String]),
        last: &mut AccountState,
        blocked: bool,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let mut in_wazzup: foldhash::HashSet<&str> = mirror.keys().map(CrmText::as_str).collect();
        for d in deletes {
            in_wazzup.remove(d.as_str());
        }
        let wanted = plan::settings_doc(
            job.norm,
            &in_wazzup,
            (last.settings_doc.as_ref(), held),
            job.account.push_input_output_message_events_for_managers,
        );
        let mut basis = None;
        let mut withheld = Withheld::default();
        let hold = self.settings.sync.hold_widening;
        if hold
            && !blocked
            && (job.approvals_open
                || last.settings_hash.as_deref() != Some(settings_hash(&wanted).as_str()))
        {
            let mut b = self.basis(job, last, !report.settings_pushed).await?;
            withheld = self.widening_holds(job, &mut b, &wanted).await?;
            basis = Some(b);
        } else if !hold && job.approvals_open && !report.settings_pushed {
            // Holding was switched off: what waited goes out like any change.
            state::approvals::sync_holds(
                &self.state,
                job.id(),
                state::approvals::Reason::WidensAccess,
                &[],
            )
            .await?;
        }
        let doc = withheld.apply(&wanted);
        report.withheld = withheld.keys.len();
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
                    .push_settings(job, &doc, (json, &hash), (last, basis), report)
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

    /// The changes of `wanted` that widen access, held as approvals: those waiting or rejected
    /// are withheld; an approved one goes out.
    async fn widening_holds(
        &self,
        job: &Job<'_>,
        basis: &mut Basis,
        wanted: &SettingsDocRef<'_>,
    ) -> Result<Withheld, StateError> {
        use state::approvals::{self, Reason};
        let hashes = basis::role_hashes(wanted);
        basis.read_for(&self.state, job.id(), &hashes).await?;
        let (before, after) = basis.sides(wanted, &hashes);
        let widening: Vec<plan::DocDiff<'_>> = plan::doc_diff(before.as_ref(), &after)
            .into_iter()
            .filter(plan::DocDiff::widens)
            .collect();
        if widening.is_empty() && !job.approvals_open {
            return Ok(Withheld::default());
        }
        let holds: Vec<approvals::Hold> = widening.iter().filter_map(widening_hold).collect();
        let open =
            approvals::sync_holds(&self.state, job.id(), Reason::WidensAccess, &holds).await?;
        let mut withheld = Withheld::default();
        for d in &widening {
            let plan::DocDiff::Role {
                user_id,
                channel_id,
                from,
                ..
            } = *d
            else {
                continue;
            };
            let decided = open.iter().find(|a| {
                a.user_id.as_deref() == Some(user_id) && a.channel_id.as_deref() == Some(channel_id)
            });
            if decided.is_some_and(|a| a.status == "approved") {
                continue;
            }
            withheld
                .keys
                .push((user_id.to_string(), channel_id.to_string()));
            if let Some(from) = from {
                withheld.restored.push(RoleEntry {
                    user_id: user_id.into(),
                    channel_id: channel_id.into(),
                    role: from.role,
                    allow_get_new_clients: from.allow_get_new_clients,
                });
            }
        }
        if !withheld.keys.is_empty() {
            tracing::warn!(
                changes = withheld.keys.len(),
                "Holding changes that widen access until a person approves them (`wazzup-sync approvals list`)"
            );
        }
        Ok(withheld)
    }

    /// Records the document Wazzup acknowledged with its history rows: what changed from the
    /// one it held (the `basis`, read now when not yet).
    async fn record_settings(
        &self,
        job: &Job<'_>,
        doc: &SettingsDocRef<'_>,
        (text, hash): (&str, &str),
        basis: Basis,
        cause: state::Cause,
    ) -> Result<(), StateError> {
        let mut basis = basis;
        let hashes = basis::role_hashes(doc);
        basis.read_for(&self.state, job.id(), &hashes).await?;
        let (before, after) = basis.sides(doc, &hashes);
        let diff = plan::doc_diff(before.as_ref(), &after);
        // What a user who left the CRM loses is the consequence of its leaving.
        let causes: Vec<state::Cause> = diff
            .iter()
            .map(|d| match d.user_id() {
                Some(user) if job.has_left(user) => state::Cause::LeftCrm,
                _ => cause,
            })
            .collect();
        let mut rows = state::SettingsRows::default();
        for d in &diff {
            let (channel, before, after) = d.values();
            rows.push(
                (d.user_id(), channel),
                d.action(),
                d.widens(),
                (before, after),
            );
        }
        let record = (job.record.cycle, &causes[..]);
        let written =
            state::save_settings(&self.state, job.id(), (text, hash, &hashes), rows, record);
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
        (last, basis): (&AccountState, Option<Basis>),
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let sent = self.client.patch_settings(&job.api, json.clone()).await;
        let (status, code, description) = match sent {
            Ok(()) => {
                let text = std::str::from_utf8(&json).expect("JSON is UTF-8");
                // A reconcile found Wazzup's document edited: this push repairs it.
                let cause = match job.settings_found.as_deref() {
                    Some(_) if !report.settings_pushed => state::Cause::DriftRepair,
                    _ => job.cause_of(Entity::Settings, SETTINGS_RECORD),
                };
                let basis = match basis {
                    Some(b) => b,
                    None => self.basis(job, last, !report.settings_pushed).await?,
                };
                self.record_settings(job, doc, (text, hash), basis, cause)
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

/// The changes that widen access and wait for a person: their role rows (user, channel), and
/// the rows Wazzup holds for them, which the document keeps instead.
#[derive(Debug, Default)]
struct Withheld {
    keys: Vec<(String, String)>,
    restored: Vec<RoleEntry>,
}

impl Withheld {
    /// `wanted` without the withheld changes: each of those rows as Wazzup holds it, or none.
    fn apply<'a>(&'a self, wanted: &SettingsDocRef<'a>) -> SettingsDocRef<'a> {
        if self.keys.is_empty() {
            return wanted.clone();
        }
        let held: std::collections::HashSet<(&str, &str)> = self
            .keys
            .iter()
            .map(|(u, c)| (u.as_str(), c.as_str()))
            .collect();
        let mut doc = wanted.clone();
        doc.user_roles
            .retain(|r| !held.contains(&(r.user_id.as_str(), r.channel_id.as_str())));
        doc.user_roles.extend(self.restored.iter());
        doc.canonicalize();
        doc
    }
}

/// A change that widens access, as the approval that holds it.
fn widening_hold(d: &plan::DocDiff<'_>) -> Option<state::approvals::Hold> {
    let plan::DocDiff::Role {
        user_id,
        channel_id,
        from,
        to,
    } = *d
    else {
        return None;
    };
    let access = |a: plan::Access| serde_json::json!({"role": a.role.as_str(), "allow_get_new_clients": a.allow_get_new_clients});
    let content = serde_json::json!({
        "user_id": user_id,
        "channel_id": channel_id,
        "from": from.map(access),
        "to": access(to),
    });
    Some(state::approvals::Hold {
        user_id: Some(user_id.to_string()),
        channel_id: Some(channel_id.to_string()),
        action: d.action(),
        before: from.map(access),
        after: Some(access(to)),
        content_hash: content_hash(content.to_string().as_bytes()),
        content,
    })
}
