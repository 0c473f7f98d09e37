//! Dead letters in a cycle: local rejections written when new or changed, refusals that are
//! not due again, and dead letters closed once their record synced, left, or was fixed.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::Engine;
use super::account::Job;
use super::report::AccountReport;
use crate::domain::{CrmText, Entity, Mirror};
use crate::plan::{SETTINGS_RECORD, Waiting};
use crate::state::{self, DeadLetterKind, OpenDeadLetter, Resolution, StateError};

/// Records Wazzup refused that are not due again, or that an operator discarded.
pub fn waiting(open: &[OpenDeadLetter], now: DateTime<Utc>) -> Waiting {
    open.iter()
        .filter(|d| d.kind == DeadLetterKind::Rejected)
        .filter(|d| !d.is_open() || d.next_attempt_at.is_some_and(|t| t > now))
        .map(|d| ((d.entity, d.record_id.clone()), d.payload_hash.clone()))
        .collect()
}

impl Engine {
    /// Writes the account's local rejections that are new or changed (one row per record,
    /// even when a record is refused for two reasons), with a line each. They are never sent.
    pub(super) async fn record_local_rejections(
        &self,
        job: &Job<'_>,
        report: &mut AccountReport,
    ) -> Result<(), StateError> {
        let norm = job.norm;
        report.rejected_locally = norm.rejected.len();
        report.phone_warnings = norm.phone_warnings;
        report.phone_not_valid = norm.phone_not_valid;
        let open_invalid: HashMap<(Entity, &str), Option<&str>> = job
            .open
            .iter()
            .filter(|d| d.kind == DeadLetterKind::Invalid)
            .map(|d| ((d.entity, d.record_id.as_str()), d.payload_hash.as_deref()))
            .collect();
        let mut seen = HashSet::new();
        let fresh: Vec<_> = norm
            .rejected
            .iter()
            .filter(|r| seen.insert((r.entity, r.record_id.as_str())))
            .filter(|r| {
                open_invalid.get(&(r.entity, r.record_id.as_str()))
                    != Some(&Some(state::invalid_hash(r).as_str()))
            })
            .collect();
        for r in &fresh {
            tracing::warn!(
                entity = r.entity.as_str(),
                record_id = %r.record_id,
                code = r.code,
                reason = %r.message,
                "Refused a CRM record; it is not sent to Wazzup"
            );
        }
        let opened = state::record_invalid(&self.state, job.id(), &fresh, &job.record).await?;
        super::report::changes_recorded("refused", opened);
        Ok(())
    }

    /// Closes user dead letters whose record is now in Wazzup as the CRM says (`synced`) or
    /// left the CRM (`gone`), and role-row dead letters whose row was fixed (`fixed`).
    pub(super) async fn close_dead_letters(
        &self,
        job: &Job<'_>,
        mirror: &Mirror,
    ) -> Result<(), StateError> {
        if !job.open.iter().any(OpenDeadLetter::is_open) {
            return Ok(());
        }
        let norm = job.norm;
        let crm_ids = crm_user_ids(job);
        let valid: HashMap<&str, &str> = norm
            .users
            .iter()
            .map(|u| (u.payload.id.as_str(), u.hash.as_str()))
            .collect();
        let refused_now: HashSet<(Entity, &str)> = norm
            .rejected
            .iter()
            .map(|r| (r.entity, r.record_id.as_str()))
            .collect();
        let (mut synced, mut gone, mut fixed) = (Vec::new(), Vec::new(), Vec::new());
        for d in job.open.iter().filter(|d| d.is_open()) {
            if refused_now.contains(&(d.entity, d.record_id.as_str())) {
                continue;
            }
            match d.entity {
                Entity::User => match valid.get(d.record_id.as_str()) {
                    Some(h) if mirror.get(d.record_id.as_str()).map(String::as_str) == Some(*h) => {
                        synced.push(d.record_id.clone());
                    }
                    None if !crm_ids.contains(d.record_id.as_str()) => {
                        gone.push(d.record_id.clone());
                    }
                    _ => {}
                },
                Entity::Settings
                    if d.record_id != SETTINGS_RECORD && d.kind == DeadLetterKind::Invalid =>
                {
                    fixed.push(d.record_id.clone());
                }
                _ => {}
            }
        }
        let id = job.id();
        for (entity, ids, resolution) in [
            (Entity::User, &synced, Resolution::Synced),
            (Entity::User, &gone, Resolution::Gone),
            (Entity::Settings, &fixed, Resolution::Fixed),
        ] {
            let closed = state::resolve(&self.state, id, entity, ids, resolution, &job.record);
            super::report::changes_recorded("refusal_closed", closed.await?);
        }
        Ok(())
    }

    /// A refused deletion is moot once its user is back in the CRM.
    pub(super) async fn close_returned_deletes(&self, job: &Job<'_>) -> Result<(), StateError> {
        if job.open_of(Entity::Delete).next().is_none() {
            return Ok(());
        }
        let crm_ids = crm_user_ids(job);
        let returned: Vec<String> = job
            .open_of(Entity::Delete)
            .filter(|d| crm_ids.contains(d.record_id.as_str()))
            .map(|d| d.record_id.clone())
            .collect();
        let closed = state::resolve(
            &self.state,
            job.id(),
            Entity::Delete,
            &returned,
            Resolution::Returned,
            &job.record,
        );
        super::report::changes_recorded("refusal_closed", closed.await?);
        Ok(())
    }
}

/// Every user id the CRM returned, valid or refused.
fn crm_user_ids<'a>(job: &'a Job<'_>) -> foldhash::HashSet<&'a str> {
    job.norm
        .users
        .iter()
        .map(|u| u.payload.id.as_str())
        .chain(job.norm.rejected_user_ids.iter().map(CrmText::as_str))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(
        kind: DeadLetterKind,
        due_in: i64,
        resolution: Option<Resolution>,
    ) -> OpenDeadLetter {
        OpenDeadLetter {
            entity: Entity::User,
            record_id: "1".into(),
            kind,
            error_code: "X".into(),
            error_message: String::new(),
            payload_hash: Some("h".into()),
            next_attempt_at: Some(Utc::now() + chrono::Duration::seconds(due_in)),
            resolution,
        }
    }

    #[test]
    fn a_refusal_waits_until_it_is_due_and_a_discarded_one_waits_for_a_change() {
        let now = Utc::now();
        let key = (Entity::User, "1".to_string());
        let not_due = [dead_letter(DeadLetterKind::Rejected, 60, None)];
        assert_eq!(
            waiting(&not_due, now).get(&key),
            Some(&Some("h".to_string()))
        );
        let due = [dead_letter(DeadLetterKind::Rejected, -1, None)];
        assert!(waiting(&due, now).is_empty());
        let discarded = [dead_letter(
            DeadLetterKind::Rejected,
            -1,
            Some(Resolution::Discarded),
        )];
        assert!(waiting(&discarded, now).contains_key(&key));
        let invalid = [dead_letter(DeadLetterKind::Invalid, 60, None)];
        assert!(
            waiting(&invalid, now).is_empty(),
            "local rejections are never sent anyway"
        );
    }
}
