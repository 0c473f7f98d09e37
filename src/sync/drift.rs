//! Drift repair, in a reconcile cycle: the account read back from Wazzup; users missing or
//! edited there are forgotten by the mirror (so the cycle pushes them again), users the CRM
//! does not know are reported (and deleted with `prune_unknown`), edited settings are noticed.

use std::collections::HashMap;

use wazzup_api::{ApiError, UserPayload};

use super::Engine;
use super::account::Job;
use super::report::{AccountOutcome, AccountReport};
use crate::domain::ValidUser;
use crate::state::{self, AccountState, StateError};

/// How drift repair went.
enum Drift {
    /// Repaired: the users the mirror forgot (pushed again), with what Wazzup held of each
    /// edited one (None for one missing there), and Wazzup's settings document (as JSON) when
    /// it drifted (the settings are pushed again).
    Repaired(Vec<(String, Option<state::Shown>)>, Option<String>),
    /// Wazzup could not be read back (or pruning failed).
    Failed(ApiError),
}

impl Engine {
    /// Repairs drift before the account's push. Some(outcome) ends the account's cycle: its
    /// token was refused, or Wazzup could not be read back.
    pub(super) async fn drift_stage(
        &self,
        job: &mut Job<'_>,
        last: &mut AccountState,
        report: &mut AccountReport,
    ) -> Result<Option<AccountOutcome>, StateError> {
        match self.repair_drift(job, last, report).await? {
            Drift::Repaired(forgotten, settings_found) => {
                job.drifted = forgotten.into_iter().collect();
                if settings_found.is_some() {
                    last.settings_hash = None;
                }
                job.settings_found = settings_found;
                Ok(None)
            }
            Drift::Failed(ApiError::Unauthorized { status }) => {
                state::mark_auth_failed(&self.state, job.id(), &job.token, status).await?;
                Ok(Some(AccountOutcome::AuthFailed(format!(
                    "Wazzup refused the token (HTTP {status}) while reading it back"
                ))))
            }
            Drift::Failed(e) => {
                let why = format!("could not read the account back from Wazzup: {e}");
                state::finish_account(
                    &self.state,
                    job.id(),
                    &job.token,
                    false,
                    Some(&why),
                    (None, None),
                )
                .await?;
                Ok(Some(AccountOutcome::Incomplete(why)))
            }
        }
    }

    async fn repair_drift(
        &self,
        job: &Job<'_>,
        last: &AccountState,
        report: &mut AccountReport,
    ) -> Result<Drift, StateError> {
        let remote = match self.client.get_all_users(&job.api).await {
            Ok(r) => r,
            Err(e) => return Ok(Drift::Failed(e)),
        };
        let mut remote_settings = match self.client.get_settings(&job.api).await {
            Ok(s) => s,
            Err(e) => return Ok(Drift::Failed(e)),
        };
        let mirror = state::load_mirror(&self.state, job.id()).await?;
        let remote: HashMap<&str, &UserPayload> =
            remote.iter().map(|u| (u.id.as_str(), u)).collect();
        let desired: HashMap<&str, &ValidUser> = job
            .norm
            .users
            .iter()
            .map(|u| (u.payload.id.as_str(), u))
            .collect();
        let mut forget = Vec::new();
        for (uid, hash) in &mirror {
            match (remote.get(uid.as_str()), desired.get(uid.as_str())) {
                (None, _) => {
                    report.drift_missing += 1;
                    forget.push((uid.to_string(), None));
                }
                (Some(r), Some(d)) if **r != d.payload && *hash == d.hash => {
                    report.drift_changed += 1;
                    let held = state::Shown {
                        name: Some(r.name.to_string()),
                        phone: r.phone.as_deref().map(crate::domain::mask_phone),
                    };
                    forget.push((uid.to_string(), Some(held)));
                }
                _ => {}
            }
        }
        let ids: Vec<String> = forget.iter().map(|(id, _)| id.clone()).collect();
        state::delete_mirror(&self.state, job.id(), &ids, None).await?;
        let mut unknown: Vec<String> = remote
            .keys()
            .filter(|u| {
                !mirror.contains_key(**u)
                    && !desired.contains_key(**u)
                    && !job.norm.rejected_user_ids.contains(**u)
            })
            .map(|u| u.to_string())
            .collect();
        unknown.sort();
        report.unknown_in_wazzup = unknown.len();
        if let Err(e) = self.prune(job, &unknown, remote.len(), report).await {
            return Ok(Drift::Failed(e));
        }
        remote_settings.canonicalize();
        let drifted = last.settings_doc.as_ref().is_some_and(|doc| {
            let mut doc = doc.clone();
            doc.canonicalize();
            doc != remote_settings
        });
        report.drift_settings = drifted;
        log_drift(report, drifted);
        let found = drifted.then(|| serde_json::to_string(&remote_settings).unwrap_or_default());
        Ok(Drift::Repaired(forget, found))
    }

    /// Reports users Wazzup holds that the CRM does not know, and deletes them with
    /// `prune_unknown`, unless they are most of Wazzup's users (a broken users query).
    async fn prune(
        &self,
        job: &Job<'_>,
        unknown: &[String],
        in_wazzup: usize,
        report: &mut AccountReport,
    ) -> Result<(), ApiError> {
        if unknown.is_empty() {
            return Ok(());
        }
        let sync = &self.settings.sync;
        let sample: Vec<&str> = unknown.iter().take(10).map(String::as_str).collect();
        tracing::warn!(
            count = unknown.len(),
            sample = %sample.join(", "),
            prune = sync.prune_unknown,
            "Wazzup holds users that the CRM does not know"
        );
        if !sync.prune_unknown {
            return Ok(());
        }
        let too_many = unknown.len() > sync.mass_delete_min
            && unknown.len() * 100 > in_wazzup * sync.mass_delete_max_percent as usize
            && !sync.allow_mass_delete;
        if too_many {
            tracing::error!(
                unknown = unknown.len(),
                in_wazzup,
                "Held back pruning: most of Wazzup's users are unknown to the CRM. Check the users query"
            );
            return Ok(());
        }
        for chunk in unknown.chunks(sync.batch_size) {
            self.client.delete_users(&job.api, chunk).await?;
            report.pruned += chunk.len();
        }
        Ok(())
    }
}

/// Counts the repairs, and says when Wazzup drifted.
fn log_drift(report: &AccountReport, settings_drifted: bool) {
    for (kind, n) in [
        ("missing", report.drift_missing),
        ("changed", report.drift_changed),
        ("settings", settings_drifted as usize),
        ("pruned", report.pruned),
    ] {
        metrics::counter!("wazzup_sync_drift_repaired_total", "kind" => kind).increment(n as u64);
    }
    if report.drift_missing + report.drift_changed + settings_drifted as usize > 0 {
        tracing::warn!(
            missing = report.drift_missing,
            changed = report.drift_changed,
            settings = settings_drifted,
            "Wazzup drifted from what was synced; pushing it again"
        );
    }
}
