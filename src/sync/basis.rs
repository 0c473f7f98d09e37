//! What Wazzup held before a settings push, as much of it as is needed to tell what the push
//! changes: for the history's rows, and for the changes that must wait for a person.

use std::collections::HashMap;

use super::Engine;
use super::account::Job;
use crate::domain::{RoleEntry, SettingsDoc, SettingsDocRef};
use crate::plan;
use crate::state::{self, AccountState, StateError};

/// The document Wazzup held.
pub(super) enum Basis {
    /// None was acknowledged: every row is new.
    Nothing,
    /// Whole: found by a reconcile, loaded with the account, or read whole.
    Whole(SettingsDoc),
    /// Its outline (a hash per role row, the phones, the flag) and the rows read back so far,
    /// by position.
    Hashed(state::AcknowledgedOutline, HashMap<usize, RoleEntry>),
}

impl Engine {
    /// What Wazzup holds now. Before this cycle's first push (`first`) that is what a
    /// reconcile found, or what the account's opening read; after it, the state's.
    pub(super) async fn basis(
        &self,
        job: &Job<'_>,
        last: &AccountState,
        first: bool,
    ) -> Result<Basis, StateError> {
        let found = job
            .settings_found
            .as_deref()
            .filter(|_| first)
            .and_then(|json| serde_json::from_str::<SettingsDoc>(json).ok());
        if let Some(doc) = found {
            return Ok(Basis::Whole(doc));
        }
        if let Some(doc) = last.settings_doc.as_ref().filter(|_| first) {
            return Ok(Basis::Whole(doc.clone()));
        }
        let outline = match last.settings_outline.as_ref().filter(|_| first) {
            Some(o) => Some(o.clone()),
            None => state::acknowledged_outline(&self.state, job.id()).await?,
        };
        Ok(match outline {
            None => Basis::Nothing,
            Some(o) if o.role_hashes.is_none() => {
                // Written before the hashes were kept: read whole, once.
                match state::acknowledged_settings(&self.state, job.id()).await? {
                    Some(doc) => Basis::Whole(doc),
                    None => Basis::Nothing,
                }
            }
            Some(o) => Basis::Hashed(o, HashMap::new()),
        })
    }
}

impl Basis {
    /// Reads back the old rows that a document with these role-row hashes no longer has.
    pub(super) async fn read_for(
        &mut self,
        pool: &sqlx::PgPool,
        account_id: &str,
        hashes: &[i64],
    ) -> Result<(), StateError> {
        let Basis::Hashed(outline, rows) = self else {
            return Ok(());
        };
        let old = outline.role_hashes.as_deref().unwrap_or_default();
        let (gone, _) = plan::changed_rows(old, hashes);
        let missing: Vec<usize> = gone.into_iter().filter(|p| !rows.contains_key(p)).collect();
        let read = state::acknowledged_roles_at(pool, account_id, &missing).await?;
        rows.extend(missing.into_iter().zip(read));
        Ok(())
    }

    /// The two sides to compare for a document with these role-row hashes: whole, or only
    /// the rows that differ (read with [`Basis::read_for`] first).
    pub(super) fn sides<'b>(
        &'b self,
        doc: &'b SettingsDocRef<'_>,
        hashes: &[i64],
    ) -> (Option<SettingsDocRef<'b>>, SettingsDocRef<'b>) {
        match self {
            Basis::Nothing => (None, doc.clone()),
            Basis::Whole(held) => (Some(held.view()), doc.clone()),
            Basis::Hashed(outline, rows) => {
                let old = outline.role_hashes.as_deref().unwrap_or_default();
                let (gone, added) = plan::changed_rows(old, hashes);
                let before = SettingsDocRef {
                    user_roles: gone.iter().filter_map(|p| rows.get(p)).collect(),
                    hide_phone_numbers_for_user_ids: outline
                        .hidden
                        .iter()
                        .map(String::as_str)
                        .collect(),
                    push_input_output_message_events_for_managers: outline.push,
                };
                let after = SettingsDocRef {
                    user_roles: added.iter().map(|&i| doc.user_roles[i]).collect(),
                    ..doc.clone()
                };
                (Some(before), after)
            }
        }
    }
}

/// The document's role-row hashes, in its order.
pub(super) fn role_hashes(doc: &SettingsDocRef<'_>) -> Vec<i64> {
    doc.user_roles.iter().map(|r| plan::role_hash(r)).collect()
}
